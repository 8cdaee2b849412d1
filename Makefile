# kiln: `make demo` (install + quickstart) and `make test` (install + test suite).
# The venv is created on first use; the install re-runs only when pyproject/constraints change.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.kiln-installed
CONSTRAINTS := constraints/cpu.txt
# pytest-xdist workers for the unit tests: the cores, up to 8 (each worker imports torch)
TEST_CPUS ?= $(shell n=$$(nproc 2>/dev/null || echo 2); echo $$(( n > 8 ? 8 : n )))

# DeepSpeed on CPU; its small C++ op is compiled once into the venv.
export DS_ACCELERATOR ?= cpu
export TORCH_EXTENSIONS_DIR ?= $(abspath $(VENV))/torch_extensions
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER ?= 0
export PIP_DISABLE_PIP_VERSION_CHECK = 1

.PHONY: install demo test test-fast lint format bench clean chromium

install: $(STAMP)

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first, from the pinned CPU build, so nothing can pull a CUDA build in its place
	$(PY) -m pip install -q -c $(CONSTRAINTS) "torch==2.13.0"
	$(PY) -m pip install -q -c $(CONSTRAINTS) -e ".[dev]"
	$(PY) -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	# DeepSpeed's host-side ops (CPU collectives, CPU Adam), compiled once into the venv
	$(PY) -c "from kiln.training.engine import prebuild_cpu_ops; prebuild_cpu_ops()"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/kiln quickstart

# tests/integration/test_report.py renders reports in headless Chromium: installed here when
# it is missing and we can (root with apt-get); otherwise that test skips, saying how.
# The unit tests run on every core (pytest-xdist: pure functions, no shared state); the
# integration and end-to-end tests in two lanes, a test file at a time each, the files that
# share a Ray, a cluster or a reference run in one lane (tests/conftest.py): one such test
# alone keeps 1.4 of 2 cores busy on average, its process starts being single-threaded.
test: $(STAMP) chromium
	$(PY) -m pytest -q -n $(TEST_CPUS) tests/unit
	$(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder --ignore=tests/unit

chromium:
	@command -v chromium >/dev/null 2>&1 || { \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    echo "make test: installing chromium (headless report rendering test)"; \
	    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	      --no-install-recommends chromium; } >/dev/null 2>&1 || \
	      echo "make test: could not install chromium; its test will skip"; \
	  fi; }

# The inner loop: unit tests only (no Ray, no DeepSpeed), under a minute.
test-fast: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_CPUS) tests/unit

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy kiln benchmarks

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# bench_openclip installs open_clip_torch into its own venv (benchmarks/.openclip-venv) on
# first use, never into kiln's.
# bench_matching builds ~500k MetaCLIP-style entries from WordNet (a Debian package) and
# pywordfreq (PyPI, a dev dependency; installed here if the venv predates it)
bench: $(STAMP)
	@test -f /usr/share/wordnet/data.noun || test -n "$$WNSEARCHDIR" || { \
	  echo "make bench: WordNet is missing: run 'sudo apt-get install wordnet-base'" \
	       "(Debian/Ubuntu), or set WNSEARCHDIR to a WordNet dict folder"; exit 2; }
	@$(PY) -c "import pywordfreq" 2>/dev/null || $(PY) -m pip install -q -c $(CONSTRAINTS) pywordfreq
	$(PY) benchmarks/bench_matching.py
	$(PY) benchmarks/bench_balance.py
	$(PY) benchmarks/bench_online_balance.py
	$(PY) benchmarks/bench_metadata_build.py
	$(PY) benchmarks/bench_language_id.py
	$(PY) benchmarks/bench_shard_write.py
	$(PY) benchmarks/bench_image_bytes.py
	$(PY) benchmarks/bench_curation_scale.py --sizes 10000 100000 1000000 --scaling-size 1000000
	$(PY) benchmarks/bench_activation_memory.py
	$(PY) benchmarks/bench_zero_memory.py
	$(PY) benchmarks/gpu_train.py  # without CUDA: says so and runs its CPU smoke configuration
	$(PY) benchmarks/gpu_step.py  # the same without CUDA
	$(PY) benchmarks/bench_loader.py
	$(PY) benchmarks/bench_openclip.py
	$(PY) benchmarks/bench_download.py  # img2dataset in its own venv (benchmarks/.img2dataset-venv)
	$(PY) benchmarks/bench_train_overhead.py --variants
	$(PY) benchmarks/bench_sync_cost.py
	$(PY) benchmarks/reliability_campaign.py  # 20 + 20 training kills, 10 curation kills

clean:
	rm -rf runs .pytest_cache .mypy_cache .ruff_cache
