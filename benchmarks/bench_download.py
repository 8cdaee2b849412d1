"""Download throughput and robustness: kiln's `download` stage vs img2dataset, same URL list,
same local server, same resize.

The server is `tests/helpers_http.py` in its own process on 127.0.0.1, serving the real
Flickr8k and COCO photos of `../shared/data` (1,239 files, cycled; every URL is distinct, so
neither side saves a fetch). Both sides get the URL list as the same csv files (`--parts`
of them: one task / one img2dataset shard each), run `--processes` worker processes with
`--threads` requests in flight each, resize by `center_crop` to 256 px and encode JPEG at
quality 95, and write WebDataset shards:

- kiln: `run_curation` on the plan `[download]` (local executor, `--processes` workers);
  timed from the call to the manifest, reading the csv and writing the shards included;
- img2dataset: `img2dataset.download(...)` in a subprocess of its own venv, timed around the
  call (imports excluded), with its EXIF extraction and sha256 off (less work than its
  defaults; kiln computes neither in this plan either).

Two figures:

1. **images/s** on the well-behaved server (`--urls` URLs, best of `--rounds` rounds, the
   sides alternating), and how close the two sides' pictures are: the mean absolute pixel
   difference between kiln's and img2dataset's 256 px image of the same URL (Pillow's BOX /
   Lanczos vs OpenCV's INTER_AREA / Lanczos4 and two JPEG encoders: small, not zero);
2. **success rate** on a misbehaving server (`--bad-urls` URLs): 40% good, 10% one HTTP 500
   then fine, 10% HTTP 503 + Retry-After for 1.5 s after the first request, 10% a first
   response slower than the timeout, 10% a first body cut short, 5% a first connection
   reset, and 15% that never work (404, an HTML page labelled image/jpeg, a redirect loop):
   at most 85% can succeed. Both sides: 2 retries, a 2 s timeout.

img2dataset is never a kiln dependency: `--setup` (run automatically when missing) creates a
plain venv at `benchmarks/.img2dataset-venv` (gitignored, no system site packages) and
installs `img2dataset` there. HTTP proxies are unset for both sides (127.0.0.1 only).
Prints JSON. Run: python benchmarks/bench_download.py [--urls 2000] [--bad-urls 1000]
[--processes 2] [--threads 32] [--parts 8] [--rounds 2] [--setup]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
import venv
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DATA = REPO.parent / "shared" / "data"
FOLDERS = [
    DATA / "flickr8k_1k" / "images",
    DATA / "coco_mini" / "train2017",
    DATA / "coco_mini" / "val2017",
]
VENV = HERE / ".img2dataset-venv"
VENV_PY = VENV / "bin" / "python"
IMG2DATASET_PIN = "img2dataset==1.47.0"
SIZE, MODE, QUALITY = 256, "center_crop", 95
TIMEOUT_S, RETRIES = 2, 2
_NO_PROXY = ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "all_proxy")


def setup() -> None:
    """Create the img2dataset venv (a plain one: no system or kiln site packages)."""
    print(f"[bench_download] creating {VENV} and installing {IMG2DATASET_PIN}", file=sys.stderr)
    venv.EnvBuilder(with_pip=True, clear=True, system_site_packages=False).create(VENV)
    pip = [str(VENV_PY), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, IMG2DATASET_PIN], check=True)


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _NO_PROXY}
    env["no_proxy"] = env["NO_PROXY"] = "127.0.0.1,localhost"
    env["NO_ALBUMENTATIONS_UPDATE"] = "1"  # img2dataset's albumentations phones home otherwise
    return env


@contextmanager
def photo_server(slow_s: float) -> Iterator[str]:
    """The photo server in its own process; yields its base URL."""
    cmd = [sys.executable, "-m", "tests.helpers_http", *map(str, FOLDERS), "--slow-s", str(slow_s)]
    env = {**_env(), "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _names() -> list[str]:
    return sorted(p.name for f in FOLDERS for p in f.glob("*.jpg"))


def good_urls(base: str, n: int) -> list[str]:
    names = _names()
    return [f"{base}/img/{names[i % len(names)]}?n={i}" for i in range(n)]


def bad_urls(base: str, n: int) -> list[str]:
    """The misbehaving mix of the module doc, in a fixed interleaved order."""
    names = _names()
    mix = (
        ["img"] * 8
        + ["fail/500/1"] * 2
        + ["fail/busy/1.5"] * 2
        + ["fail/slow/1"] * 2
        + ["fail/truncated/1"] * 2
        + ["fail/reset/1"]
        + ["status/404", "notimage", "loop/a"]
    )
    out = []
    for i in range(n):
        kind, name = mix[i % len(mix)], names[i % len(names)]
        if kind in ("notimage", "loop/a"):
            out.append(f"{base}/{kind}?n={i}")
        else:
            out.append(f"{base}/{kind}/{name}?n={i}")
    return out


def write_parts(urls: list[str], folder: Path, parts: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    per = -(-len(urls) // parts)
    for k in range(parts):
        chunk = urls[k * per : (k + 1) * per]
        lines = ["url,caption", *(f"{u},photo {k * per + i}" for i, u in enumerate(chunk))]
        (folder / f"part-{k:03d}.csv").write_text("\n".join(lines) + "\n")


# ------------------------------------------------------------------ kiln


def run_kiln(urls_dir: Path, out: Path, processes: int, threads: int) -> dict[str, Any]:
    from kiln.data_curation import run_curation
    from kiln.data_curation.config import CurationConfig

    spec = {
        "input": {"format": "csv", "paths": [str(urls_dir)], "text_column": "caption"},
        "stages": [
            {
                "stage": "download",
                "allow_loopback": True,
                "resize_mode": MODE,
                "image_size": SIZE,
                "jpeg_quality": QUALITY,
                "concurrency": threads,
                "timeout_s": TIMEOUT_S,
                "retries": RETRIES,
            }
        ],
        "shard": {"samples_per_shard": 10_000},
        "execution": {"executor": "local", "workers": processes},
    }
    cfg = CurationConfig.model_validate(spec)
    start = time.perf_counter()
    result = run_curation(cfg, str(out))
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "ok": result.samples_out,
        "total": result.samples_in,
        "dropped": result.dropped_by_reason,
        "dataset": result.dataset_dir,
    }


# ------------------------------------------------------------------ img2dataset (its venv)

_WORKER = """
import glob, json, sys, time
from img2dataset import download
args = json.loads(sys.argv[1])
start = time.perf_counter()
download(url_list=args["urls"], input_format="csv", url_col="url", caption_col="caption",
         output_format="webdataset", output_folder=args["out"],
         processes_count=args["processes"], thread_count=args["threads"],
         image_size=args["size"], resize_mode=args["mode"], encode_quality=args["quality"],
         timeout=args["timeout"], retries=args["retries"], number_sample_per_shard=10000,
         extract_exif=False, compute_hash=None, distributor="multiprocessing",
         enable_wandb=False, disallowed_header_directives=[])
seconds = time.perf_counter() - start
ok = total = 0
for f in glob.glob(args["out"] + "/*_stats.json"):
    s = json.load(open(f))
    ok += s["successes"]
    total += s["count"]
print(json.dumps({"seconds": seconds, "ok": ok, "total": total}))
"""


def run_img2dataset(urls_dir: Path, out: Path, processes: int, threads: int) -> dict[str, Any]:
    args = {
        "urls": str(urls_dir),
        "out": str(out),
        "processes": processes,
        "threads": threads,
        "size": SIZE,
        "mode": MODE,
        "quality": QUALITY,
        "timeout": TIMEOUT_S,
        "retries": RETRIES,
    }
    done = subprocess.run(
        [str(VENV_PY), "-c", _WORKER, json.dumps(args)],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=3600,
    )
    if done.returncode != 0:
        raise RuntimeError(f"img2dataset failed:\n{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    result["dataset"] = str(out)
    return result


# ------------------------------------------------------------------ comparing pictures


def _images_by_url(tars: list[Path]) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for path in tars:
        members: dict[str, dict[str, bytes]] = {}
        with tarfile.open(path) as tar:
            for m in tar.getmembers():
                f = tar.extractfile(m)
                if f is None:
                    continue
                key, ext = m.name.rsplit("/", 1)[-1].split(".", 1)
                members.setdefault(key, {})[ext] = f.read()
        for parts in members.values():
            if "jpg" in parts and "json" in parts:
                out[json.loads(parts["json"])["url"]] = parts["jpg"]
    return out


def pixel_difference(kiln_dir: str, i2d_dir: str, limit: int = 300) -> dict[str, Any]:
    """Mean |kiln - img2dataset| per pixel channel (0-255) over URLs both sides have."""
    import numpy as np
    from PIL import Image

    ours = _images_by_url(sorted(Path(kiln_dir).glob("shards/*.tar")))
    theirs = _images_by_url(sorted(Path(i2d_dir).glob("*.tar")))
    common = sorted(set(ours) & set(theirs))[:limit]
    diffs, sizes_equal = [], 0
    for url in common:
        a = np.asarray(Image.open(io.BytesIO(ours[url])).convert("RGB"), dtype=np.int16)
        b = np.asarray(Image.open(io.BytesIO(theirs[url])).convert("RGB"), dtype=np.int16)
        if a.shape == b.shape:
            sizes_equal += 1
            diffs.append(float(np.abs(a - b).mean()))
    return {
        "compared": len(common),
        "same_size": sizes_equal,
        "mean_abs_pixel_diff": round(float(np.mean(diffs)), 2) if diffs else None,
    }


# ------------------------------------------------------------------ main


def main() -> None:
    ap = argparse.ArgumentParser(description="kiln download vs img2dataset")
    ap.add_argument("--urls", type=int, default=2000)
    ap.add_argument("--bad-urls", type=int, default=1000)
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--threads", type=int, default=32)
    ap.add_argument("--parts", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--setup", action="store_true", help="only create the img2dataset venv")
    args = ap.parse_args()
    if args.setup or not VENV_PY.exists():
        setup()
        if args.setup:
            return
    if not all(f.is_dir() for f in FOLDERS):
        sys.exit(f"bench_download: the photos are missing: {FOLDERS} (../shared/data)")
    report: dict[str, Any] = {
        "urls": args.urls,
        "processes": args.processes,
        "threads": args.threads,
        "resize": f"{MODE} {SIZE}, JPEG q{QUALITY}",
    }
    with tempfile.TemporaryDirectory(prefix="bench_download_") as tmp:
        root = Path(tmp)
        with photo_server(slow_s=TIMEOUT_S + 1.5) as base:
            write_parts(good_urls(base, args.urls), root / "good", args.parts)
            best: dict[str, dict[str, Any]] = {}
            for r in range(args.rounds):
                for side, fn in (("kiln", run_kiln), ("img2dataset", run_img2dataset)):
                    print(f"[bench_download] round {r + 1}: {side}", file=sys.stderr)
                    res = fn(root / "good", root / f"{side}-{r}", args.processes, args.threads)
                    res["images_per_s"] = round(res["ok"] / res["seconds"], 1)
                    if side not in best or res["images_per_s"] > best[side]["images_per_s"]:
                        best[side] = res
            report["kiln"] = {k: v for k, v in best["kiln"].items() if k != "dataset"}
            report["img2dataset"] = {k: v for k, v in best["img2dataset"].items() if k != "dataset"}
            report["speedup"] = round(
                best["kiln"]["images_per_s"] / best["img2dataset"]["images_per_s"], 2
            )
            report["same_resize"] = pixel_difference(
                best["kiln"]["dataset"], best["img2dataset"]["dataset"]
            )
        with photo_server(slow_s=TIMEOUT_S + 1.5) as base:  # fresh per-path counters
            write_parts(bad_urls(base, args.bad_urls), root / "bad", args.parts)
            ours = run_kiln(root / "bad", root / "kiln-bad", args.processes, args.threads)
        with photo_server(slow_s=TIMEOUT_S + 1.5) as base:
            write_parts(bad_urls(base, args.bad_urls), root / "bad2", args.parts)
            theirs = run_img2dataset(root / "bad2", root / "i2d-bad", args.processes, args.threads)
        report["misbehaving"] = {
            "urls": args.bad_urls,
            "attainable": 0.85,
            "kiln_success_rate": round(ours["ok"] / ours["total"], 3),
            "img2dataset_success_rate": round(theirs["ok"] / theirs["total"], 3),
            "kiln_seconds": round(ours["seconds"], 1),
            "img2dataset_seconds": round(theirs["seconds"], 1),
            "kiln_dropped": ours["dropped"],
        }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
