"""Shard writing: raw sequential writes vs webdataset's ShardWriter vs kiln, alone and as the
shard step of a curation run.

Samples are the real Flickr8k photos in ../shared/data (repeated with distinct uids to
`--samples`), each with a caption and a JSON member. Measured on the same samples, one
process for the three writers: raw (the members' payload bytes, one write each),
webdataset.ShardWriter, kiln's `write_shards`; then a curation run with an empty plan
(read -> shard) as `kiln curate` runs it on one machine (local executor), whose shard step (sample uids, scatter into uid ranges,
sort, write tars; all on workers) is timed by the runner. Also reports tar overhead: bytes on
disk over payload bytes, for these photos and for caption-only samples.
Prints JSON; ratios are against raw writes. Run: python benchmarks/bench_shard_write.py
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "flickr8k_1k"
WORK = REPO / "runs" / "bench" / "shard-write"


def _samples(n: int, with_images: bool = True) -> pa.Table:
    photos = sorted((DATA / "images").glob("*.jpg"))
    images = [p.read_bytes() for p in photos]
    rows = [
        {
            "uid": f"{i:032x}",
            "text": f"a photo number {i} of something interesting",
            "image": images[i % len(images)] if with_images else None,
            "url": f"https://img.example.org/{i}.jpg",
            "width": 500,
            "height": 375,
        }
        for i in range(n)
    ]
    return pa.Table.from_pylist(rows)


def _payload(table: pa.Table) -> int:
    total = 0
    for row in table.to_pylist():
        total += len(row["image"] or b"") + len(row["text"].encode()) + 120
    return total


def _raw(table: pa.Table, out: Path) -> float:
    start = time.perf_counter()
    with open(out, "wb") as f:
        for row in table.to_pylist():
            if row["image"]:
                f.write(row["image"])
            f.write(row["text"].encode())
            f.write(json.dumps({k: row[k] for k in ("uid", "url", "width", "height")}).encode())
    return time.perf_counter() - start


def _webdataset(table: pa.Table, out: Path, per_shard: int) -> float:
    import webdataset as wds

    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with wds.ShardWriter(str(out / "%06d.tar"), maxcount=per_shard, verbose=0) as sink:
        for row in table.to_pylist():
            sample: dict[str, Any] = {"__key__": row["uid"], "txt": row["text"]}
            if row["image"]:
                sample["jpg"] = row["image"]
            sample["json"] = {k: row[k] for k in ("uid", "url", "width", "height")}
            sink.write(sample)
    return time.perf_counter() - start


def _kiln(table: pa.Table, out: Path, per_shard: int) -> float:
    from kiln.data_curation.shard import write_shards

    start = time.perf_counter()
    write_shards(
        [table.slice(i, 1024) for i in range(0, table.num_rows, 1024)], str(out), per_shard
    )
    return time.perf_counter() - start


def _step(table: pa.Table, per_shard: int) -> dict[str, Any]:
    from kiln.data_curation import run_curation
    from kiln.data_curation.config import CurationConfig

    pool = WORK / "pool"
    pool.mkdir(parents=True, exist_ok=True)
    for i in range(4):
        quarter = table.num_rows // 4
        pq.write_table(table.slice(i * quarter, quarter), pool / f"pool-{i}.parquet")
    cfg = CurationConfig.model_validate(
        {
            "input": {"format": "parquet", "paths": [str(pool)], "image_column": "image"},
            "stages": [],
            "shard": {"samples_per_shard": per_shard},
        }
    )
    result = run_curation(cfg, str(WORK / "run"))  # as `kiln curate` runs it: local executor
    return {"seconds": result.steps["shard"].seconds, "bytes": result.steps["shard"].extra["bytes"]}


def _du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, default=12_000)
    ap.add_argument("--per-shard", type=int, default=1000)
    args = ap.parse_args()
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    table = _samples(args.samples)
    payload = _payload(table)
    raw_s = min(_raw(table, WORK / "raw.bin") for _ in range(2))
    wds_s = min(_webdataset(table, WORK / f"wds{i}", args.per_shard) for i in range(2))
    kiln_s = min(_kiln(table, WORK / f"kiln{i}", args.per_shard) for i in range(2))
    tar_bytes = _du(WORK / "kiln0" / "shards")
    step = _step(table, args.per_shard)
    text_only = _samples(5000, with_images=False)
    _kiln(text_only, WORK / "captions", args.per_shard)
    mb = 2**20
    print(
        json.dumps(
            {
                "benchmark": "shard_write",
                "samples": args.samples,
                "payload_mb": round(payload / mb, 1),
                "raw_mb_per_s": round(payload / mb / raw_s, 1),
                "webdataset_mb_per_s": round(payload / mb / wds_s, 1),
                "kiln_write_shards_mb_per_s": round(payload / mb / kiln_s, 1),
                "kiln_over_webdataset": round(wds_s / kiln_s, 2),
                "shard_step_mb_per_s": round(step["bytes"] / mb / step["seconds"], 1),
                "shard_step_over_raw": round(
                    (step["bytes"] / step["seconds"]) / (payload / raw_s), 3
                ),
                "tar_overhead_photos": round(tar_bytes / payload, 3),
                "tar_overhead_captions": round(
                    _du(WORK / "captions" / "shards") / _payload(text_only), 2
                ),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
