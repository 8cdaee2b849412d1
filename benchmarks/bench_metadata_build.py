"""`kiln metadata build` at MetaCLIP's full size: wall time and peak RSS of a 500,000-entry
list with every source at its MetaCLIP cap (86,654 WordNet, 251,465 unigrams, 100,646
bigrams, 61,235 titles; 500,000 total).

Sources: WordNet (Debian `wordnet-base`) and the English Wikipedia unigrams of PyPI
`pywordfreq` are the real ones (the benchmark stops with how to install them when missing).
Unigrams WordNet already gave are duplicates, so the unigram cap is raised by the shortfall,
and pywordfreq's count threshold (`min_unigram_count`, 100) halved when it has no more
words above it, rebuilding until the list holds 500,000; the timed build is the last one.
MetaCLIP's Wikipedia bigram corpus and title list are not obtainable, so those two are
synthetic, of the right sizes: the bigram corpus is the shared data's real COCO + LAION
captions plus generated captions in which `--bigrams` word pairs (drawn from the unigram
vocabulary) each occur `bigram_min_count` times among random filler words, so the PMI pass
reads a corpus of ~1M captions and finds more than the bigram cap; titles are `--titles`
generated "word word (word)" lines. The inputs are written first; then `build_metadata`
runs in a child process, whose wall time and peak RSS (`ru_maxrss` of the child alone)
are the figures. Also checked: a second build of the same inputs gives the same bytes.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from kiln.data_curation.metadata_build import (
    INSTALL_HINT,
    MetadataCaps,
    build_metadata,
    default_wordfreq_file,
    missing_default_sources,
    wordfreq_unigrams,
)

__all__ = ["main", "write_inputs"]

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
BIGRAM_MIN_COUNT = 5


def _real_captions(data: Path) -> list[str]:
    path = data / "coco_captions_val2017" / "captions_val2017.json"
    if not path.is_file():
        return []
    with path.open() as f:
        captions = [a["caption"] for a in json.load(f)["annotations"]]
    laion = data / "laion_alttext" / "test_10000.parquet"
    if laion.is_file():
        texts = pq.read_table(laion, columns=["TEXT"]).column("TEXT").to_pylist()
        captions += [t for t in texts if isinstance(t, str)]
    return captions


def write_inputs(folder: Path, *, bigrams: int, titles: int, data: Path) -> dict[str, Any]:
    """Write the synthetic bigram corpus and titles file into `folder` (deterministic)."""
    wordfreq = default_wordfreq_file()
    assert wordfreq is not None
    vocab = [w for w in wordfreq_unigrams(wordfreq, min_count=100) if w.isalpha()][:200_000]
    rng = np.random.default_rng(0)
    real = _real_captions(data)
    pairs = rng.integers(0, len(vocab), (bigrams, 2))
    filler = rng.integers(0, len(vocab), (bigrams * BIGRAM_MIN_COUNT, 4))
    generated = []
    for k in range(bigrams * BIGRAM_MIN_COUNT):
        a, b = pairs[k % bigrams]
        f = filler[k]
        generated.append(f"{vocab[f[0]]} {vocab[f[1]]} {vocab[a]} {vocab[b]} {vocab[f[2]]}")
    corpus = folder / "bigram_corpus.parquet"
    pq.write_table(pa.table({"text": real + generated}), corpus)
    words = rng.integers(0, len(vocab), (titles, 3))
    lines = [f"{vocab[a].title()} {vocab[b]} ({vocab[c]})" for a, b, c in words]
    (folder / "titles.txt").write_text("".join(f"{line}\n" for line in lines))
    return {
        "bigram_corpus_captions": len(real) + len(generated),
        "bigram_corpus_real_captions": len(real),
        "titles_lines": len(lines),
    }


def _child(folder: Path) -> None:
    """Build the list (in the child process) and print its per-source counts as JSON."""
    caps = MetadataCaps()
    min_count = 100  # `kiln metadata build`'s default
    for _ in range(4):
        start = time.perf_counter()
        built = build_metadata(
            folder / "entries.txt",
            wordnet="auto",
            wordfreq="auto",
            bigram_corpus=folder / "bigram_corpus.parquet",
            bigram_column="text",
            titles=folder / "titles.txt",
            caps=caps,
            bigram_min_count=BIGRAM_MIN_COUNT,
            min_unigram_count=min_count,
        )
        if built.entries >= caps.total:
            break
        # unigrams that WordNet already gave count against MetaCLIP's cap here: take more,
        # and when pywordfreq has no more above the count threshold, lower the threshold
        unigrams = next(s for s in built.sources if s.name == "unigrams")
        if unigrams.cut_by_source_cap == 0:
            min_count //= 2
        caps = replace(caps, unigrams=caps.unigrams + caps.total - built.entries)
    print(
        json.dumps(
            {
                "seconds": time.perf_counter() - start,
                "unigram_cap": caps.unigrams,
                "min_unigram_count": min_count,
                "entries": built.entries,
                "sha256": built.sha256,
                "sources": {
                    s.name: {"offered": s.candidates, "added": s.added} for s in built.sources
                },
            }
        )
    )


def _run_child(folder: Path) -> tuple[dict[str, Any], float, float]:
    start = time.perf_counter()
    out = subprocess.run(
        [sys.executable, __file__, "--child", str(folder)],
        check=True,
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return json.loads(out.stdout.strip().splitlines()[-1]), wall, peak / 1024


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=SHARED_DATA, help="shared data folder")
    parser.add_argument("--bigrams", type=int, default=110_000, help="planted bigrams")
    parser.add_argument("--titles", type=int, default=61_235, help="synthetic title lines")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        _child(args.child)
        return 0
    missing = missing_default_sources()
    if missing:
        print(
            f"bench_metadata_build: {' and '.join(missing)} missing: {INSTALL_HINT}",
            file=sys.stderr,
        )
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        start = time.perf_counter()
        inputs = write_inputs(folder, bigrams=args.bigrams, titles=args.titles, data=args.data)
        inputs_s = time.perf_counter() - start
        first, wall, rss_mb = _run_child(folder)
        second, wall2, _ = _run_child(folder)
        entries_mb = (folder / "entries.txt").stat().st_size / 2**20
    report = {
        "benchmark": "metadata_build",
        "sources": "WordNet + pywordfreq unigrams (real); bigram corpus and titles synthetic "
        "(MetaCLIP's are not obtainable), sized to the caps",
        "inputs": inputs,
        "inputs_write_s": round(inputs_s, 1),
        "entries": first["entries"],
        "entries_file_mb": round(entries_mb, 2),
        "per_source": first["sources"],
        "unigram_cap": first["unigram_cap"],
        "build_s": round(first["seconds"], 2),
        "child_wall_s": [round(wall, 2), round(wall2, 2)],
        "peak_rss_mb": round(rss_mb),
        "same_bytes_twice": first["sha256"] == second["sha256"],
    }
    print(json.dumps(report, indent=1))
    return 0 if report["same_bytes_twice"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
