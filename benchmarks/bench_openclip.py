"""Model step throughput: kiln vs OpenCLIP on the same architecture, CPU fp32, one process.

What is timed, for each side at the same batch: forward of both towers, the CLIP loss
(symmetric InfoNCE, fp32), backward, and one AdamW step (lr 1e-3, weight decay 0.1, betas
(0.9, 0.98), eps 1e-6: kiln's defaults), on random images and tokens. Each side steps with
the AdamW its trainer builds on CPU: ``torch.optim.AdamW`` for OpenCLIP, kiln's
(`kiln.training.optim`: torch's numbers bitwise, stepped in cache-sized slices) for kiln.
Architectures, checked to have equal parameter counts (the report has both):

- ``tiny``: kiln's ``clip-tiny`` (32 px, patch 8, 2 layers of width 64 and 4 heads per
  tower, byte vocabulary of 259, context 48, embedding 64) against OpenCLIP's ``CLIP``
  built from the same numbers (``head_width=16`` for 4 heads);
- ``vit-s-32``: kiln's ``clip-vit-s-32`` against OpenCLIP's ``ViT-S-32`` (224 px, 12 + 12
  layers of width 384, CLIP BPE vocabulary, context 77).

Tokens, two settings (``--tokens``):

- ``random`` (every model): random ids filling the whole context with the largest id last,
  so OpenCLIP's argmax pooling and kiln's end-of-text pooling read the same position. Every
  position is text: the worst case for kiln, which computes no position after the batch's
  last end-of-text token (causal attention: they cannot change the pooled features);
- ``coco`` (BPE models: ``vit-s-32``): the first ``batch`` human captions of COCO val2017
  (``../shared/data/coco_captions_val2017``), tokenized by OpenCLIP's own tokenizer for
  the model in its worker; kiln gets the same ids. Padding is id 0 on both sides and the
  end-of-text token is the largest id, so both pool the same position of the same rows.
  OpenCLIP computes all 77 positions of every row, kiln each caption's own (its text
  tower packs captions of mixed length, `kiln.models.layers.Packing`; attention alone runs
  on the batch padded to its longest caption): what training on real captions costs each.

Both use exact GELU, pre-LayerNorm blocks and no dropout; OpenCLIP runs its default
attention path (``nn.MultiheadAttention``, which calls ``scaled_dot_product_attention``
with its float causal mask), kiln its own. Both compute in fp32; kiln's linear maps run on
oneDNN (`kiln.models.gemm`), OpenCLIP's on torch's default (MKL). ``KILN_CPU_GEMM=torch``
in this process's environment puts kiln on torch's kernel too, which isolates that part
of the ratio.

OpenCLIP is never a kiln dependency: `--setup` (run automatically when missing) creates a
plain venv at ``benchmarks/.openclip-venv`` (gitignored; no system site packages, so it
cannot see kiln's venv) and installs ``torch==2.13.0`` (the local CPU wheel: any other
version pulls CUDA) and ``open_clip_torch`` there. OpenCLIP runs in a subprocess of that
venv's Python, kiln in this process; they take turns (rounds alternate) and each side is
timed by its process's CPU time on a fixed number of torch threads (``--threads``, default
1), so other load on the machine barely moves the ratio. The best round of each counts.

The torchvision workaround: open_clip imports torchvision at load time (for its image
transforms), and PyPI's torchvision wheel is a CUDA build whose C extension cannot load here
(it links libtorch_cuda), after which ``import torchvision`` fails in
``torchvision/_meta_registrations.py`` registering fake kernels for ``torchvision::nms`` and
``torchvision::qnms``, ops the missing extension would have defined. The OpenCLIP worker
declares those two op schemas (``torch.library.Library("torchvision", "DEF")``, no kernels)
before importing open_clip; every other torchvision op registration is already skipped when
the extension is absent, and nothing in this benchmark calls a torchvision op. The venv and
the installed packages are left untouched.

``--host-memory reuse`` runs both processes with kiln's allocator setting for training
ranks (`kiln.training.host_memory`: glibc keeps freed blocks for reuse instead of
faulting them in again every step); the default compares both with glibc's defaults.

Goal (issue 8): kiln >= 1.2x OpenCLIP samples/s. Prints JSON.
Run: python benchmarks/bench_openclip.py [--models tiny vit-s-32] [--batch 64 32]
[--steps 30 3] [--rounds 3] [--threads 1] [--tokens random coco] [--host-memory reuse]
[--setup]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import venv
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
VENV = HERE / ".openclip-venv"
VENV_PY = VENV / "bin" / "python"
TORCH_PIN = "torch==2.13.0"

#: kiln flavor, and the OpenCLIP model (a registered name, or the config of a custom one).
MODELS: dict[str, dict[str, Any]] = {
    "tiny": {
        "kiln": "clip-tiny",
        "open_clip": {
            "embed_dim": 64,
            "vision_cfg": {
                "image_size": 32,
                "patch_size": 8,
                "width": 64,
                "layers": 2,
                "head_width": 16,
            },
            "text_cfg": {
                "context_length": 48,
                "vocab_size": 259,
                "width": 64,
                "heads": 4,
                "layers": 2,
            },
        },
        "image_size": 32,
        "context_length": 48,
        "vocab_size": 259,
    },
    "vit-s-32": {
        "kiln": "clip-vit-s-32",
        "open_clip": "ViT-S-32",
        "image_size": 224,
        "context_length": 77,
        "vocab_size": 49408,
    },
}


# ------------------------------------------------------------------ shared by both sides


COCO_CAPTIONS = HERE.parents[1] / "shared" / "data" / "coco_captions_val2017"


def coco_captions(count: int) -> list[str]:
    """The first `count` captions of COCO val2017, in file order."""
    path = COCO_CAPTIONS / "captions_val2017.json"
    if not path.is_file():
        raise SystemExit(f"--tokens coco needs {path} (the shared data folder beside the repo)")
    annotations = json.loads(path.read_text())["annotations"]
    return [str(a["caption"]).strip() for a in annotations[:count]]


def _inputs(spec: dict[str, Any], batch: int, tokens: Any = None) -> tuple[Any, Any]:
    """Random images, and `tokens` (ids, [batch, context]) or random ids (module doc)."""
    import torch

    g = torch.Generator().manual_seed(0)
    size, ctx, vocab = spec["image_size"], spec["context_length"], spec["vocab_size"]
    images = torch.randn(batch, 3, size, size, generator=g)
    if tokens is not None:
        return images, torch.as_tensor(tokens, dtype=torch.long)
    ids = torch.randint(3, vocab - 1, (batch, ctx), generator=g)
    ids[:, -1] = vocab - 1  # argmax pooling == last-position pooling
    return images, ids


def _loss(img: Any, txt: Any, scale: Any) -> Any:
    """Symmetric InfoNCE on L2-normalized embeddings (what both libraries compute)."""
    import torch
    import torch.nn.functional as F

    labels = torch.arange(img.shape[0])
    logits = scale * img @ txt.T
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


class _Stepper:
    """Builds one side's model + AdamW once; `run(k)` times k training steps."""

    def __init__(
        self,
        model: Any,
        step: Any,
        spec: dict[str, Any],
        batch: int,
        tokens: Any = None,
        adamw: Any = None,
    ) -> None:
        import torch

        self.model, self.step = model, step
        self.images, self.tokens = _inputs(spec, batch, tokens)
        self.opt = (adamw or torch.optim.AdamW)(
            model.parameters(), lr=1e-3, weight_decay=0.1, betas=(0.9, 0.98), eps=1e-6
        )
        self.params = sum(p.numel() for p in model.parameters())
        self.batch = batch
        self.run(1)  # warm-up: allocator, kernels, optimizer state

    def run(self, steps: int) -> dict[str, float]:
        cpu, wall = time.process_time(), time.perf_counter()
        for _ in range(steps):
            self.opt.zero_grad(set_to_none=True)
            loss = self.step(self.model, self.images, self.tokens)
            loss.backward()
            self.opt.step()
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        n = steps * self.batch
        return {
            "cpu_samples_per_s": n / cpu,
            "wall_samples_per_s": n / wall,
            "loss": float(loss.detach()),
        }


# ------------------------------------------------------------------ OpenCLIP (its venv)


def _keep_freed_memory() -> None:
    """kiln's `host_memory: reuse` allocator setting in this process. Loaded from its file,
    not through the `kiln` package, so the OpenCLIP venv (which has no kiln) can run it."""
    import importlib.util

    path = REPO / "kiln" / "training" / "host_memory.py"
    spec = importlib.util.spec_from_file_location("kiln_host_memory", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not module.keep_freed_memory():
        raise SystemExit("--host-memory reuse needs glibc (mallopt)")


def _openclip_worker(name: str, batch: int, threads: int, captions: bool, host_memory: str) -> None:
    """Runs inside the OpenCLIP venv: build once, then one JSON line per 'run K' command.
    `captions`: train on COCO captions tokenized by OpenCLIP (sent back for kiln)."""
    if host_memory == "reuse":
        _keep_freed_memory()
    import torch

    torch.set_num_threads(threads)
    # torchvision workaround (module docstring): declare the two ops its CUDA extension
    # would have, so torchvision's pure-Python import (which open_clip needs) succeeds.
    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor")
    import logging

    logging.disable(logging.WARNING)  # "no pretrained weights loaded": none are wanted
    import open_clip
    from open_clip.model import CLIP

    spec = MODELS[name]
    torch.manual_seed(0)
    cfg = spec["open_clip"]
    if isinstance(cfg, str):
        model = open_clip.create_model(cfg, output_dict=True)
    else:
        model = CLIP(**cfg, output_dict=True)
    model.train()

    def step(m: Any, images: Any, tokens: Any) -> Any:
        out = m(images, tokens)
        return _loss(out["image_features"], out["text_features"], out["logit_scale"])

    tokens = None
    if captions:
        tokens = open_clip.get_tokenizer(cfg)(coco_captions(batch)).tolist()
    stepper = _Stepper(model, step, spec, batch, tokens)
    print(
        json.dumps(
            {
                "ready": True,
                "params": stepper.params,
                "torch": torch.__version__,
                "open_clip": open_clip.__version__,
                "tokens": tokens,
            }
        ),
        flush=True,
    )
    for line in sys.stdin:
        steps = int(line.split()[1])
        print(json.dumps(stepper.run(steps)), flush=True)


# ------------------------------------------------------------------ kiln (this process)


def _kiln_stepper(name: str, batch: int, tokens: Any = None) -> _Stepper:
    import torch

    from kiln.models.build import build_model
    from kiln.models.config import ModelConfig
    from kiln.training.optim import AdamW

    spec = MODELS[name]
    torch.manual_seed(0)
    model = build_model(ModelConfig.model_validate({"flavor": spec["kiln"]}))
    model.train()

    def step(m: Any, images: Any, tokens: Any) -> Any:
        out = m(images, tokens)
        return _loss(out["image_embeds"], out["text_embeds"], out["logit_scale"])

    return _Stepper(model, step, spec, batch, tokens, adamw=AdamW)


def setup() -> None:
    """Create the OpenCLIP venv (a plain one: no system or kiln site packages)."""
    if VENV_PY.exists():
        probe = subprocess.run([str(VENV_PY), "-c", "import open_clip"], capture_output=True)
        if probe.returncode == 0 or b"torchvision" in probe.stderr:
            return  # installed (the torchvision import error is handled by the worker)
    print(f"[bench_openclip] creating {VENV} with {TORCH_PIN} + open_clip_torch", flush=True)
    venv.EnvBuilder(with_pip=True, clear=True, system_site_packages=False).create(VENV)
    pip = [str(VENV_PY), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, TORCH_PIN], check=True)
    subprocess.run([*pip, TORCH_PIN, "open_clip_torch"], check=True)


def compare(
    name: str,
    batch: int,
    steps: int,
    rounds: int,
    threads: int,
    tokens: str = "random",
    host_memory: str = "release",
) -> dict[str, Any]:
    import torch

    torch.set_num_threads(threads)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    cmd = [str(VENV_PY), __file__, "--worker", name, "--batch", str(batch)]
    cmd += ["--threads", str(threads), "--tokens", tokens, "--host-memory", host_memory]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdin is not None and proc.stdout is not None
    try:
        hello = json.loads(proc.stdout.readline() or "{}")
        if not hello.get("ready"):
            raise RuntimeError(f"the OpenCLIP worker did not start (exit {proc.wait()})")
        kiln = _kiln_stepper(name, batch, hello.get("tokens"))
        best: dict[str, dict[str, float]] = {"kiln": {}, "open_clip": {}}
        for _ in range(rounds):
            proc.stdin.write(f"run {steps}\n")
            proc.stdin.flush()
            results = {"open_clip": json.loads(proc.stdout.readline()), "kiln": kiln.run(steps)}
            for side, r in results.items():
                for key, value in r.items():
                    if key != "loss":
                        best[side][key] = max(best[side].get(key, 0.0), value)
    finally:
        proc.stdin.close()
        proc.wait(timeout=60)
    return {
        "model": name,
        "kiln_flavor": MODELS[name]["kiln"],
        "batch": batch,
        "threads": threads,
        "tokens": tokens,
        "host_memory": host_memory,
        "text_positions": _text_positions(hello.get("tokens"), MODELS[name]),
        "params": {"kiln": kiln.params, "open_clip": hello["params"]},
        "same_params": kiln.params == hello["params"],
        "samples_per_cpu_s": {k: round(v["cpu_samples_per_s"], 2) for k, v in best.items()},
        "samples_per_wall_s": {k: round(v["wall_samples_per_s"], 2) for k, v in best.items()},
        "kiln_over_open_clip": round(
            best["kiln"]["cpu_samples_per_s"] / best["open_clip"]["cpu_samples_per_s"], 3
        ),
        "open_clip_version": hello["open_clip"],
    }


def _text_positions(tokens: Any, spec: dict[str, Any]) -> dict[str, float]:
    """Positions per row that each side's text tower runs its per-token layers on:
    OpenCLIP the whole context; kiln the mean caption length when it packs the batch,
    else the batch's longest caption; and the mean caption length, for scale."""
    import torch

    from kiln.models.text import cut_captions

    ctx = spec["context_length"]
    if tokens is None:
        return {"open_clip": ctx, "kiln": ctx, "mean_text": ctx}
    cut, packing = cut_captions(torch.as_tensor(tokens, dtype=torch.long))
    mean = float((cut != 0).sum()) / len(cut)  # padding is id 0 on both sides
    kiln = mean if packing is not None else cut.shape[1]
    return {"open_clip": ctx, "kiln": round(kiln, 2), "mean_text": mean}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["tiny", "vit-s-32"], choices=list(MODELS))
    ap.add_argument("--batch", type=int, nargs="+", default=[64, 32], help="one per model")
    ap.add_argument("--steps", type=int, nargs="+", default=[30, 3], help="per round, per model")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--tokens",
        nargs="+",
        default=["random", "coco"],
        choices=["random", "coco"],
        help="token settings to run (module doc); coco only for the BPE models",
    )
    ap.add_argument(
        "--host-memory",
        default="release",
        choices=["release", "reuse"],
        help="glibc's allocator defaults (release), or kiln's `host_memory: reuse` setting "
        "in both processes (kiln.training.host_memory)",
    )
    ap.add_argument("--setup", action="store_true", help="only create the OpenCLIP venv")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker is not None:
        _openclip_worker(
            args.worker, args.batch[0], args.threads, "coco" in args.tokens, args.host_memory
        )
        return
    setup()
    if args.setup:
        return
    if args.host_memory == "reuse":
        _keep_freed_memory()
    results = []
    for i, name in enumerate(args.models):
        batch = args.batch[min(i, len(args.batch) - 1)]
        steps = args.steps[min(i, len(args.steps) - 1)]
        for tokens in args.tokens:
            if tokens == "coco" and MODELS[name]["vocab_size"] < 1000:
                continue  # a byte vocabulary: OpenCLIP's argmax pooling would read another row
            results.append(
                compare(name, batch, steps, args.rounds, args.threads, tokens, args.host_memory)
            )
            print(json.dumps(results[-1]), flush=True)
    print(
        json.dumps({"benchmark": "openclip", "goal": "kiln >= 1.2x", "results": results}, indent=2)
    )


if __name__ == "__main__":
    main()
