"""The CLI as a user runs it: curate, inspect, train, stop, runs, resume, eval, bad input.

One small procedural pool and one short training run are shared by the tests of this module
(they build on each other in order, like a user's session).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import yaml

from tests.helpers_output import library_lines
from tests.helpers_training import local_ranks, running

REPO = Path(__file__).resolve().parents[2]
KILN = [sys.executable, "-m", "kiln.platform.cli"]


def kiln(*args: str, cwd: Path = REPO, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env.setdefault("DS_ACCELERATOR", "cpu")
    proc = subprocess.run(
        [*KILN, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"kiln {' '.join(args)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}"
            f"\n--- stderr\n{proc.stderr[-4000:]}"
        )
    return proc


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cli")


def curate_args(root: Path, *extra: str) -> list[str]:
    return [
        "curate",
        "recipes/quickstart/curate.yaml",
        "--set",
        f"run_dir={root}/curate",
        "--set",
        f"input.paths=[{root}/pool]",
        "--set",
        f"stages.metaclip_match.entries={root}/pool/metadata.txt",
        "--set",
        "input.synthetic.num_samples=600",
        "--set",
        "input.synthetic.num_eval=64",
        "--set",
        "shard.samples_per_shard=64",
        *extra,
    ]


def train_args(root: Path) -> list[str]:
    sets = {
        "run_dir": f"{root}/train",
        "data.dataset": f"{root}/curate/dataset",
        "data.batch_size": 8,
        "data.num_workers": 0,
        "model.vision.image_size": 16,
        "model.vision.layers": 1,
        "model.text.layers": 1,
        "model.text.context_length": 32,
        "max_steps": 6,
        "stop_after_step": 3,
        "checkpoint.every_steps": 3,
        "eval.zero_shot": f"{root}/pool/eval",
        "eval.retrieval": f"{root}/pool/eval",
        "log_every": 1,
    }
    args = ["train", "recipes/quickstart/train.yaml"]
    for k, v in sets.items():
        args += ["--set", f"{k}={v}"]
    return args


def test_help_lists_verbs() -> None:
    out = kiln("--help").stdout
    for verb in ("quickstart", "curate", "train", "resume", "eval", "runs", "inspect"):
        assert verb in out
    assert "experiment" in out


def test_experiment_mistakes_are_one_line_with_the_fix() -> None:
    typo = kiln(
        "experiment", "recipes/experiments/pruning.yaml", "--set", "pool.plant.mismatchd=0.5",
        check=False,
    )  # fmt: skip
    assert typo.returncode == 2 and "Traceback" not in typo.stderr
    assert "unknown field 'pool.plant.mismatchd': did you mean 'mismatched'?" in typo.stderr
    wrong = kiln("experiment", "recipes/quickstart/train.yaml", check=False)
    assert wrong.returncode == 2 and "runs `kind: experiment` recipes" in wrong.stderr


def test_curate_then_rerun_with_new_threshold(root: Path) -> None:
    first = kiln(*curate_args(root))
    assert "samples out" in first.stdout
    manifest = json.loads((root / "curate" / "dataset" / "manifest.json").read_text())
    assert manifest["num_samples"] > 0 and manifest["shards"]
    status = json.loads((root / "curate" / "status.json").read_text())
    assert status["state"] == "completed"
    assert sum(status["dropped_by_reason"].values()) + status["samples_out"] == status["samples_in"]
    effect = status["steps"]["metaclip_balance"]["extra"]["entry_counts"]
    assert effect["top"] and all(after <= before for _, before, after in effect["top"])
    assert "count before balancing" in first.stdout

    marker = root / "curate" / "steps"
    read_step = sorted(marker.glob("*read*"))[0] / "_SUCCESS"
    before = read_step.stat().st_mtime_ns
    again = kiln(*curate_args(root, "--set", "stages.metaclip_balance.t=5"))
    assert "samples out" in again.stdout
    assert read_step.stat().st_mtime_ns == before, "the read step was redone, not skipped"
    lower = json.loads((root / "curate" / "status.json").read_text())
    assert lower["samples_out"] < status["samples_out"]
    # (that a rerun gives the same bytes, whatever the parallelism, is test_pipeline's)


def test_inspect(root: Path) -> None:
    dataset = root / "curate" / "dataset"
    manifest = json.loads((dataset / "manifest.json").read_text())
    out = kiln("inspect", str(dataset), "-n", "2").stdout
    assert f"samples     {manifest['num_samples']} in {len(manifest['shards'])} shards" in out
    info = json.loads(kiln("inspect", str(dataset), "--json").stdout)
    assert info["num_samples"] == manifest["num_samples"] > 0
    assert [s["sha256"] for s in info["shards"]] == [s["sha256"] for s in manifest["shards"]]
    assert len(info["samples"]) == 3  # the default -n
    assert all(x["uid"] and x["text"] and x["image_bytes"] > 0 for x in info["samples"])
    assert info["samples"][0]["uid"] in out  # the text view shows the same first samples


def test_train_stop_runs_resume_eval(root: Path) -> None:
    """The verbs on one run. Local launcher: the Ray launcher's CLI path is the quickstart's
    and `test_ctrl_c_is_an_interruption_not_a_failure`'s (each Ray Train start costs ~25 s
    of process starts on 2 cores)."""
    trained = kiln(*train_args(root), "--set", "resources.launcher=local")
    run = root / "train"
    assert "[kiln] step 3/6" in trained.stdout and "[kiln] starting 2 local rank" in trained.stdout
    assert not library_lines(trained.stdout + trained.stderr), trained.stderr[-3000:]
    assert trained.stdout.splitlines()[-1].startswith(f"outputs in {run}: checkpoints")
    assert json.loads((run / "status.json").read_text())["state"] == "stopped"
    assert (run / "checkpoints" / "latest").read_text().strip().endswith("3")

    listing = kiln("runs", str(root)).stdout
    line = next(ln for ln in listing.splitlines() if str(run) in ln)
    assert "stopped" in line and "3/6" in line

    first_started = json.loads((run / "status.json").read_text())["started"]
    resumed = kiln("-v", "resume", str(run))  # -v: the libraries' lines too, not only kiln's
    assert library_lines(resumed.stdout + resumed.stderr)
    assert "[kiln] step 6/6" in resumed.stdout
    assert "[kiln] evaluating " in resumed.stdout  # the end-of-training eval, as a table
    assert "zero-shot color top1" in resumed.stdout and "chance " in resumed.stdout
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "completed" and status["last_step"] == 6
    assert status["started"] == first_started and len(status["attempts"]) == 2
    steps = [json.loads(ln)["step"] for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
    again = kiln("resume", str(run)).stdout
    assert "is complete at step 6" in again and "--set max_steps=N" in again
    assert (run / "eval.json").is_file()

    eval_recipe = root / "eval.yaml"
    eval_recipe.write_text(
        yaml.safe_dump(
            {
                "kind": "eval",
                "name": "cli-eval",
                "run_dir": str(root / "eval"),
                "checkpoint": str(run),
                "eval": {"zero_shot": str(root / "pool" / "eval")},
            }
        )
    )
    out = kiln("eval", str(eval_recipe)).stdout
    assert "zero-shot" in out
    result = json.loads((root / "eval" / "eval.json").read_text())
    assert set(result["zero_shot"]) == {"color", "shape"}
    assert "zero-shot" in kiln("eval", str(run)).stdout

    runs = {r["path"]: r for r in json.loads(kiln("runs", str(root), "--json").stdout)}
    assert (
        runs[str(run)]["loss"]
        == json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["loss"]
    )
    assert runs[str(root / "eval")]["eval"].startswith("color top1 ")
    assert runs[str(root / "eval")]["state"] == "completed"


@pytest.mark.parametrize(
    ("sig", "code", "said"),
    [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated (SIGTERM)")],
)
def test_ctrl_c_and_sigterm_are_an_interruption_not_a_failure(
    root: Path, sig: signal.Signals, code: int, said: str
) -> None:
    """SIGINT, and SIGTERM (`kill`, `docker stop`, a pod's end: it killed kiln at once, the
    ranks with it, and the run read as dead), to a real `kiln train` (local launcher)
    mid-training: exit 128 + the signal, status `interrupted` with the resume command, no
    rank left running, no traceback. The Ray launcher's Ctrl-C is `test_jobs`'s `kiln
    stop` (Ray Jobs stops a job with SIGINT)."""
    run = root / f"interrupted-{sig.name}"
    args = [*train_args(root), "--set", f"run_dir={run}", "--set", "max_steps=100000"]
    args += ["--set", "resources.launcher=local"]
    args += ["--set", "stop_after_step=null", "--set", "eval.zero_shot=null"]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1"}
    err_path = root / f"interrupted-{sig.name}.stderr"
    with open(err_path, "w") as err_file:  # a file, not a pipe: Ray's stderr must not block
        proc = subprocess.Popen(
            [*KILN, *args], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=err_file, text=True
        )
        assert proc.stdout is not None
        seen = []
        for line in proc.stdout:  # wait until training runs
            seen.append(line)
            if "[kiln] step " in line:
                break
        else:
            raise AssertionError("training never started:\n" + "".join(seen))
        ranks = local_ranks(psutil.Process(proc.pid))
        assert len(ranks) == 2 and running(ranks)
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=120)
    err = err_path.read_text()
    assert proc.returncode == code, err[-3000:]
    assert "Traceback" not in err and "Traceback" not in out
    assert f"kiln train: {said}; resume with `kiln resume {run}`" in err
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "interrupted"
    assert f"kiln resume {run}" in status["error"]
    assert not running(ranks)  # the ranks were stopped with it


def test_recipe_typo_is_a_clear_error(root: Path) -> None:
    proc = kiln(*curate_args(root, "--set", "stages.metaclip_balance.tt=5"), check=False)
    assert proc.returncode == 2
    assert "stages[3] (metaclip_balance): unknown field 'tt': did you mean 't'?" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("corrupt", [False, True], ids=["missing", "corrupt"])
def test_bad_input_file_names_the_path(root: Path, tmp_path: Path, corrupt: bool) -> None:
    """Missing: caught on the driver. Corrupt (a jsonl line that is not JSON): raised in a
    Ray read task; the CLI prints the worker's message (which names the file) alone, not
    Ray's wrapper or traceback, and says where the details are and that nothing is lost."""
    if corrupt:
        bad = tmp_path / "pool.jsonl"
        bad.write_text('{"text": "a red dog", "url": "u0"}\n{"text": "cut\n')
        spec = {"format": "jsonl", "paths": [str(bad)]}
    else:
        bad = tmp_path / "no-such-pool.parquet"
        spec = {"format": "parquet", "paths": [str(bad)]}
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "kind": "curate",
                "name": "missing",
                "run_dir": str(tmp_path / "run"),
                "input": spec,
                "match": {"entries": str(root / "pool" / "metadata.txt")},
                "execution": {"executor": "ray"},
            }
        )
    )
    proc = kiln("curate", str(recipe), check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("kiln curate: error:")]
    assert len(errors) == 1 and str(bad) in errors[0]
    if corrupt:  # the run started: its status says how it ended
        assert json.loads((tmp_path / "run" / "status.json").read_text())["state"] == "failed"
        assert "line 2 is not valid JSON" in errors[0]
        assert "Nothing written so far" in errors[0] and "is lost" in errors[0]
        assert "Traceback" not in proc.stderr and not library_lines(proc.stderr + proc.stdout)
        log = Path(errors[0].rsplit("(details: ", 1)[1].rstrip(")"))
        assert log.parent == tmp_path / "run" / "logs" and "Traceback" in log.read_text()
    else:  # caught before the job starts (as --dry-run does): nothing written
        assert not (tmp_path / "run").exists()


def test_wrong_verb_for_recipe_kind() -> None:
    proc = kiln("train", "recipes/quickstart/curate.yaml", check=False)
    assert proc.returncode == 2 and "kiln curate recipes/quickstart/curate.yaml" in proc.stderr
    proc = kiln("eval", "recipes/quickstart/train.yaml", check=False)
    assert proc.returncode == 2 and "takes an eval recipe or a train run dir" in proc.stderr


def test_output_into_a_closed_pipe_is_not_an_error(root: Path) -> None:
    dataset = root / "curate" / "dataset"
    cmd = (
        f"{' '.join(KILN)} inspect {dataset} -n 50 | head -c 1 >/dev/null; exit ${{PIPESTATUS[0]}}"
    )
    proc = subprocess.run(["bash", "-c", cmd], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]


def test_readme_python_api_example_runs(root: Path) -> None:
    """The README's Python API block, run as written with its two paths pointed at this
    module's curated dataset and trained run."""
    readme = (REPO / "README.md").read_text()
    block = readme.split("<!-- python-api-example -->", 1)[1].split("```python\n", 1)[1]
    code = block.split("```", 1)[0]
    assert "runs/quickstart/train" in code and "runs/quickstart/curate/dataset" in code
    code = code.replace("runs/quickstart/curate/dataset", str(root / "curate" / "dataset"))
    code = code.replace("runs/quickstart/train", str(root / "train"))
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    count, *_ = proc.stdout.split()
    manifest = json.loads((root / "curate" / "dataset" / "manifest.json").read_text())
    assert int(count) == manifest["num_samples"]
    assert "torch.Size([1, " in proc.stdout and "torch.Size([2, " in proc.stdout


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs (needs root's mount; skipped where mounting is not allowed)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1M", "tmpfs", str(mnt)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip()})")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_run_dir_that_cannot_be_written_is_one_clear_line(root: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    for run_dir in (blocker, blocker / "run"):
        proc = kiln(*curate_args(root, "--set", f"run_dir={run_dir}"), check=False)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert "is a file; choose another run_dir" in proc.stderr
        assert "Traceback" not in proc.stderr
    assert blocker.read_text() == "not a folder"  # nothing of the user's was touched


def test_disk_full_and_read_only_are_one_clear_line(root: Path, tiny_disk: Path) -> None:
    """Curating onto a 1 MiB disk fills it (one line: what filled, nothing lost); remounted
    read-only, the run dir cannot be created, said before anything starts."""
    full = kiln(*curate_args(root, "--set", f"run_dir={tiny_disk}/run"), check=False)
    assert full.returncode == 2, full.stderr[-3000:]
    assert (
        "No space left on device" in full.stderr and "Nothing written so far is lost" in full.stderr
    )
    assert "Traceback" not in full.stderr
    subprocess.run(["mount", "-o", "remount,ro", str(tiny_disk)], check=True)
    ro = kiln(*curate_args(root, "--set", f"run_dir={tiny_disk}/other"), check=False)
    # caught by the run-dir check before anything starts (as --dry-run does)
    assert ro.returncode == 2 and "is not a writable folder" in ro.stderr, ro.stderr[-3000:]
    assert not (tiny_disk / "other").exists()
    assert "Traceback" not in ro.stderr
