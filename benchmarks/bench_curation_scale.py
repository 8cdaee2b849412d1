"""Caption-only curation at scale: 10k .. 10M captions on one machine, ~500k metadata entries.

The pool is made from the real captions in ../shared/data (COCO val2017 captions + LAION
alt-texts), repeated with small variations (bench_matching's) and distinct urls up to N rows,
written once as parquet under runs/bench/pools/; the entries are bench_matching's ~500k built
with `kiln metadata build` (WordNet, Wikipedia unigrams, corpus bigrams, numbers). The plan is the caption-only MetaCLIP plan: text,
text_dedup, metaclip_match, metaclip_balance, then shards.

Per size (each in a fresh process; on the local executor as `kiln curate` runs without a
cluster, or with `--executor ray` on its own embedded Ray) it reports: wall time per step,
total wall, microseconds per sample, peak RSS of the whole process tree (driver + workers,
+ raylet etc. on Ray; sampled every 0.25 s), CPU seconds of the process tree, and the CPU
the stage functions themselves take on the same rows in one process (`stage_cpu_s`: reading,
then `apply` / `key` / `fit` + `merge` + `apply`; the stages' `setup`, e.g. building the
matcher, is not included; the smaller of two measurements), whose ratio is the runner's
fixed cost. Then `per_sample_1m_over_100k` and, with
`--scaling-size`, the speed-up of 2 workers over 1.

Run: python benchmarks/bench_curation_scale.py [--sizes 10000 100000 1000000] [--entries F]
     [--scaling-size 1000000] [--executor local|ray]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
from bench_matching import build_entries, load_captions, vary_captions

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
WORK = REPO / "runs" / "bench"
ROWS_PER_FILE = 250_000
_SUFFIXES = ["", " photo", " image", " in 4k", " (2019)", " - stock photo", " hd", " close up"]


def make_pool(n: int) -> Path:
    """N caption rows (parquet files of 250k rows) with distinct urls; reused when present."""
    root = WORK / "pools" / f"captions-{n}"
    done = root / "_DONE"
    if done.exists():
        return root
    root.mkdir(parents=True, exist_ok=True)
    base = load_captions(DATA)
    for start in range(0, n, ROWS_PER_FILE):
        stop = min(n, start + ROWS_PER_FILE)
        texts = (
            vary_captions(base, stop)[start:]
            if stop <= 4 * len(base)
            else [_variant(base, i) for i in range(start, stop)]
        )
        urls = [f"https://img.example.org/{i:09d}.jpg" for i in range(start, stop)]
        table = pa.table({"url": urls, "text": texts})
        name = f"pool-{start // ROWS_PER_FILE:05d}.parquet"
        pq.write_table(table, root / name, row_group_size=50_000)
    done.write_text(str(n))
    return root


def _variant(base: list[str], i: int) -> str:
    """Row i of a pool larger than the variants: caption i mod B, with a suffix by round."""
    text = base[i % len(base)]
    r = i // len(base)
    return text + _SUFFIXES[r % len(_SUFFIXES)] if r % 3 else text.capitalize()


def default_entries(n_entries: int = 500_000) -> Path:
    """~500k entries from `kiln metadata build` (WordNet + Wikipedia unigrams + the corpus's
    PMI bigrams + "0".."99"), as bench_matching builds them; cached."""
    path = WORK / f"entries-{n_entries}" / "entries.txt"
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    build_entries(load_captions(DATA), n_entries, path.parent)
    return path


def _plan(entries: Path) -> list[dict[str, Any]]:
    return [
        {"stage": "text", "min_chars": 5, "max_chars": 500},
        {"stage": "text_dedup"},
        {"stage": "metaclip_match", "entries": str(entries)},
        {"stage": "metaclip_balance", "t": 1000, "seed": 0},
    ]


_SAMPLER = """
import contextlib, sys, time, psutil
root, me = psutil.Process(int(sys.argv[1])), psutil.Process()
peak = 0
while sys.stdin.readable():
    total = 0
    for p in [root, *root.children(recursive=True)]:
        if p.pid != me.pid:
            with contextlib.suppress(psutil.Error):
                total += p.memory_info().rss
    peak = max(peak, total)
    import select
    if select.select([sys.stdin], [], [], 0.25)[0]:
        break
print(peak, flush=True)
"""


class _Sampler:
    """Peak RSS of this process and all its descendants, sampled every 0.25 s by a separate
    process (a thread here would make the local executor fall back from fork to
    forkserver, measuring something a user of `kiln curate` does not run)."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _SAMPLER, str(os.getpid())],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def stop(self) -> int:
        out, _ = self.proc.communicate("stop\n")
        return int(out.strip() or 0)


def _tree_cpu() -> float:
    """CPU seconds of this process, its finished children (the local executor's workers)
    and its live descendants (Ray's processes), the sampler left out."""
    me = psutil.Process()
    t = me.cpu_times()
    total = t.user + t.system + t.children_user + t.children_system
    for p in me.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if "-c" not in p.cmdline()[:2]:
                total += sum(p.cpu_times()[:2])
    return total


def stage_cpu(pool: Path, entries: Path) -> float:
    """CPU seconds of the stage functions alone, in this process, on the pool's rows."""
    from kiln.data_curation.config import InputConfig
    from kiln.data_curation.plan import build_plan
    from kiln.data_curation.readers import read_file

    plan = build_plan(_plan(entries))
    cfg = InputConfig(format="parquet", paths=[str(pool)])
    contexts = [(s.stage, s.config, s.stage.setup(s.config, None)) for s in plan]
    start = time.process_time()
    tables = []
    for f in sorted(pool.glob("*.parquet")):
        for t in read_file(str(f), cfg):
            tables.append(t)
    partials = []
    done = []
    for t in tables:
        for stage, c, ctx in contexts:
            if stage.kind == "map":
                t = stage.apply(t, c, ctx)  # type: ignore[attr-defined]
            elif stage.kind == "keyed":
                stage.key(t, c, ctx)  # type: ignore[attr-defined]
            else:
                partials.append(stage.fit(t, c, ctx))  # type: ignore[attr-defined]
                break
        done.append(t)
    stage, c, _ = contexts[-1]
    state = stage.merge(partials, c)  # type: ignore[attr-defined]
    ctx = stage.setup(c, state)
    for t in done:
        stage.apply(t, c, ctx)  # type: ignore[attr-defined]
    return time.process_time() - start


def one(n: int, workers: int, entries: Path, executor: str) -> dict[str, Any]:
    from kiln.data_curation import run_curation
    from kiln.data_curation.config import CurationConfig

    pool = make_pool(n)
    run = WORK / "runs" / f"scale-{n}-w{workers}-{executor}"
    subprocess.run(["rm", "-rf", str(run)], check=True)
    sampler = _Sampler()
    t0 = time.perf_counter()
    ray_start = 0.0
    if executor == "ray":
        from kiln.platform.ray_cluster import start_ray

        start_ray(num_cpus=workers, dashboard=False)  # as `kiln curate` starts it
        ray_start = time.perf_counter() - t0
    cfg = CurationConfig.model_validate(
        {
            "input": {"format": "parquet", "paths": [str(pool)]},
            "stages": _plan(entries),
            "shard": {"samples_per_shard": 10_000},
            "write_rejects": True,
            "execution": {"executor": executor, "workers": workers},
        }
    )
    result = run_curation(cfg, str(run))
    wall = time.perf_counter() - t0
    cpu = _tree_cpu()
    peak = sampler.stop()
    if executor == "ray":
        import ray

        ray.shutdown()
    # the smaller of two measurements: CPU time of the same work varies run to run here
    own = min(stage_cpu(pool, entries) for _ in range(2)) if n <= 1_000_000 else None
    return {
        "rows": n,
        "workers": workers,
        "executor": executor,
        "wall_s": round(wall, 2),
        "ray_start_s": round(ray_start, 2),
        "us_per_sample": round(wall / n * 1e6, 2),
        "steps_s": {k: s.seconds for k, s in result.steps.items()},
        "samples_out": result.samples_out,
        "peak_rss_mb": round(peak / 2**20),
        "cpu_total_s": round(cpu, 2),
        "stage_cpu_s": round(own, 2) if own is not None else None,
        "cpu_over_stage_cpu": round(cpu / own, 2) if own else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--entries", type=Path, default=None, help="entries file (default: built)")
    ap.add_argument("--scaling-size", type=int, default=None, help="also run it on 1 worker")
    ap.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--workers", type=int, default=2, help=argparse.SUPPRESS)
    ap.add_argument(
        "--executor",
        choices=["local", "ray"],
        default="local",
        help="where the tasks run (local: what `kiln curate` uses without a cluster)",
    )
    args = ap.parse_args()
    entries = args.entries or default_entries()
    if args.one is not None:
        print(json.dumps(one(args.one, args.workers, entries, args.executor)))
        return
    results = []
    runs = [(n, 2) for n in args.sizes]
    if args.scaling_size:
        runs.append((args.scaling_size, 1))
    for n, w in runs:
        make_pool(n)
        env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
        cmd = [
            sys.executable,
            __file__,
            "--one",
            str(n),
            "--workers",
            str(w),
            "--entries",
            str(entries),
            "--executor",
            args.executor,
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode:
            raise SystemExit(f"{n} rows failed:\n{proc.stderr[-3000:]}")
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        print(json.dumps(res), file=sys.stderr)
        results.append(res)
    by = {(r["rows"], r["workers"]): r for r in results}
    out: dict[str, Any] = {
        "benchmark": "curation_scale",
        "executor": args.executor,
        "entries": str(entries),
        "runs": results,
    }
    if (100_000, 2) in by and (1_000_000, 2) in by:
        out["per_sample_1m_over_100k"] = round(
            by[(1_000_000, 2)]["us_per_sample"] / by[(100_000, 2)]["us_per_sample"], 3
        )
    if args.scaling_size and (args.scaling_size, 1) in by and (args.scaling_size, 2) in by:
        out["speedup_2_over_1_workers"] = round(
            by[(args.scaling_size, 1)]["wall_s"] / by[(args.scaling_size, 2)]["wall_s"], 3
        )
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
