"""Bytes a curation writes per byte of input, for an image pool (Flickr8k, real photos).

Runs the Flickr8k example plan (text, text_dedup, metaclip_match, metaclip_balance, image)
on the 1,000 photos x 5 captions in ../shared/data with embedded Ray, then sums the bytes of
every file the run left (steps/, rejects/, the dataset) and of the input (the captions csv
and the photos), and the bytes the whole process tree wrote (temporary shuffles included,
from the kernel's I/O counters). Steps that do not touch images should not copy them: see
`kiln.data_curation.blobs`. Prints JSON: written bytes by folder and per input byte.
Run: python benchmarks/bench_image_bytes.py
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "flickr8k_1k"


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _tree_write_bytes() -> int:
    """Bytes written to storage so far by this process and its descendants (Ray's too)."""
    import psutil

    total = 0
    for p in [psutil.Process(), *psutil.Process().children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            total += p.io_counters().write_bytes
    return total


def main() -> None:
    from kiln.data_curation import run_curation
    from kiln.data_curation.config import CurationConfig
    from kiln.platform.ray_cluster import ray_session

    run = REPO / "runs" / "bench" / "image-bytes"
    shutil.rmtree(run, ignore_errors=True)
    cfg = CurationConfig.model_validate(
        {
            "input": {
                "format": "csv",
                "paths": [str(DATA / "captions.csv")],
                "text_column": "caption",
                "url_column": "image",
                "image_dir": str(DATA / "images"),
                "image_path_column": "image",
            },
            "stages": [
                {"stage": "text"},
                {"stage": "text_dedup"},
                {
                    "stage": "metaclip_match",
                    "entries": str(REPO / "recipes/examples/metadata/en.txt"),
                },
                {"stage": "metaclip_balance", "t": 150},
                {"stage": "image", "min_size": 64},
            ],
            "shard": {"samples_per_shard": 1000},
        }
    )
    start = time.perf_counter()
    with ray_session():
        before = _tree_write_bytes()
        result = run_curation(cfg, str(run))
        io_written = _tree_write_bytes() - before
    seconds = time.perf_counter() - start
    input_bytes = (DATA / "captions.csv").stat().st_size + _size(DATA / "images")
    written = {d.name: _size(d) for d in sorted(run.iterdir()) if d.is_dir()}
    steps = {d.name: _size(d) for d in sorted((run / "steps").iterdir()) if d.is_dir()}
    total = sum(written.values())
    print(
        json.dumps(
            {
                "benchmark": "image_bytes",
                "samples_in": result.samples_in,
                "samples_out": result.samples_out,
                "seconds": round(seconds, 1),
                "input_bytes": input_bytes,
                "written_bytes": written,
                "written_by_step": steps,
                "written_per_input_byte": round(total / input_bytes, 3),
                "io_write_bytes": io_written,
                "io_written_per_input_byte": round(io_written / input_bytes, 3),
                "dataset_per_input_byte": round(written.get("dataset", 0) / input_bytes, 3),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
