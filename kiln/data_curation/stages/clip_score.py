"""CLIP-score filter (fit + apply), and with a filter model, DFN-style filtering.

Score: the cosine of each row's image and text embeddings (`clip_score: float32`), read
from embedding columns an earlier `embed` step wrote. Keep rule, one of:
- `threshold`: keep rows scoring at least it;
- `top_fraction`: DataComp's rule: `n = int(rows * top_fraction)` (at least 1), the
  threshold is the n-th largest score over the whole pool, and every row scoring at least
  it is kept (ties kept). The fit collects the scores (4 bytes a row) and `finish` picks
  the threshold, so the choice is global and does not depend on tasks or blocks.

The score model is whatever embedded the columns: name any kiln checkpoint in an `embed`
step (its own output columns, e.g. `filter_image_embedding`) and point this stage at them.
That is DFN's recipe: train a filter network on high-quality pairs (`kiln train`), score the
pool with it, keep the top fraction (README: "DFN-style filtering").

`uids_out` writes the uids this step keeps as a DataComp-style sorted `u8,u8` `.npy` index
(`kiln.data_curation.stages.uid_index`), so a selection can be used outside kiln. The
kept uids of every task pass through the driver to be merged (16 bytes a row).

Rows without usable embeddings are dropped as `bad_embedding`; rows under the threshold
as `low_clip_score`.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
from pydantic import Field, model_validator

from kiln.contracts import RecipePath, StrictModel
from kiln.data_curation.embeddings import (
    BAD_EMBEDDING,
    IMAGE_EMBEDDING,
    TEXT_EMBEDDING,
    l2_normalize,
    read_embeddings,
)
from kiln.data_curation.stage import FitApplyStage, register
from kiln.data_curation.stages import alive_mask, mark_dropped, replace_column
from kiln.data_curation.stages.uid_index import uid_pairs, write_uid_index

__all__ = ["CLIP_SCORE_COLUMN", "ClipScoreConfig", "ClipScoreStage", "clip_scores", "top_threshold"]

CLIP_SCORE_COLUMN = "clip_score"
REASON = "low_clip_score"


class ClipScoreConfig(StrictModel):
    """CLIP-score filtering by an absolute threshold or a top fraction of the pool."""

    image_column: str = Field(
        default=IMAGE_EMBEDDING, description="image embedding column (an embed step's output)"
    )
    text_column: str = Field(
        default=TEXT_EMBEDDING, description="text embedding column (an embed step's output)"
    )
    threshold: float | None = Field(
        default=None, ge=-1.0, le=1.0, description="keep rows whose cosine score is at least this"
    )
    top_fraction: float | None = Field(
        default=None,
        gt=0.0,
        le=1.0,
        description="keep the top fraction of the pool by score (DataComp's rule, ties kept)",
    )
    uids_out: RecipePath | None = Field(
        default=None,
        description="write the kept uids here as a sorted u8,u8 .npy (DataComp's format)",
    )

    @model_validator(mode="after")
    def _check(self) -> ClipScoreConfig:
        if self.threshold is not None and self.top_fraction is not None:
            raise ValueError(
                "set threshold or top_fraction, not both (top_fraction picks the threshold "
                "from the pool's scores)"
            )
        return self


def clip_scores(table: pa.Table, cfg: ClipScoreConfig) -> tuple[np.ndarray, np.ndarray]:
    """(cosine score per row, mask of rows with both embeddings usable)."""
    img, ok_i = read_embeddings(table, cfg.image_column)
    txt, ok_t = read_embeddings(table, cfg.text_column)
    if img.shape[1] != txt.shape[1] and ok_i.any() and ok_t.any():
        raise ValueError(
            f"{cfg.image_column!r} has {img.shape[1]} dimensions and {cfg.text_column!r} "
            f"{txt.shape[1]}: score with the image and text embeddings of one model"
        )
    ok = ok_i & ok_t
    scores = np.zeros(table.num_rows, dtype=np.float32)
    if ok.any():
        a = l2_normalize(img[ok]).astype(np.float64)
        b = l2_normalize(txt[ok]).astype(np.float64)
        scores[ok] = np.einsum("ij,ij->i", a, b)
    return scores, ok


def top_threshold(scores: np.ndarray, fraction: float) -> float:
    """DataComp's threshold: the n-th largest score, `n = max(1, int(len * fraction))`."""
    if not len(scores):
        return float("inf")
    n = max(1, int(len(scores) * fraction))
    return float(np.partition(scores, len(scores) - n)[len(scores) - n])


class ClipScoreStage(FitApplyStage[ClipScoreConfig]):
    """CLIP score of each row; keep by threshold or by a top fraction of the pool."""

    name = "clip_score"
    config = ClipScoreConfig
    summary = "CLIP-score filter (threshold or top fraction), any kiln model as the scorer"
    adds = (CLIP_SCORE_COLUMN,)
    drop_reasons: ClassVar[dict[str, str]] = {
        REASON: "the image-text cosine score is under the threshold (or outside the top fraction)",
        BAD_EMBEDDING: "the embedding is missing, not finite, all zero or of the wrong length",
    }

    def link(self, cfg: ClipScoreConfig, earlier: list[tuple[str, Any]]) -> ClipScoreConfig:
        """The embedding columns must come from an earlier embed step."""
        made: set[str] = set()
        for stage, other in earlier:
            if stage == "embed":
                made.update(other.outputs())
        missing = [c for c in (cfg.image_column, cfg.text_column) if c not in made]
        if missing:
            raise ValueError(
                f"clip_score reads {', '.join(missing)}, which no earlier embed step writes: "
                "put an embed step (with the scoring model, image and text on) before it, or "
                "set image_column / text_column to the columns it writes"
            )
        return cfg

    def fit(self, table: pa.Table, cfg: ClipScoreConfig, ctx: Any) -> pa.Table:
        if cfg.top_fraction is None:
            return pa.table({"score": pa.array([], pa.float32())})
        scores, ok = clip_scores(table, cfg)
        return pa.table({"score": pa.array(scores[ok & alive_mask(table)], pa.float32())})

    def merge(self, partials: list[pa.Table], cfg: ClipScoreConfig) -> pa.Table:
        parts = [p for p in partials if p.num_rows]
        return pa.concat_tables(parts) if parts else pa.table({"score": pa.array([], pa.float32())})

    def finish(self, merged: pa.Table, cfg: ClipScoreConfig) -> pa.Table:
        if cfg.top_fraction is not None:
            scores = merged.column("score").to_numpy()
            threshold = top_threshold(scores, cfg.top_fraction)
        else:
            threshold = cfg.threshold if cfg.threshold is not None else float("-inf")
        return pa.table(
            {"threshold": pa.array([threshold], pa.float64()),
             "scored": pa.array([merged.num_rows], pa.int64())}
        )  # fmt: skip

    def setup(self, cfg: ClipScoreConfig, state: pa.Table | None) -> float | None:
        return None if state is None else float(state.column("threshold")[0].as_py())

    def apply(self, table: pa.Table, cfg: ClipScoreConfig, ctx: float) -> pa.Table:
        scores, ok = clip_scores(table, cfg)
        alive = alive_mask(table)
        table = replace_column(table, CLIP_SCORE_COLUMN, pa.array(scores, pa.float32(), mask=~ok))
        table = mark_dropped(table, alive & ~ok, BAD_EMBEDDING)
        # the fit's float32 scores are compared as float32, so a row at the threshold is kept
        return mark_dropped(table, alive & ok & (scores < np.float32(ctx)), REASON)

    def summarize(self, kept: pa.Table, cfg: ClipScoreConfig, ctx: Any) -> pa.Table | None:
        scores = kept.column(CLIP_SCORE_COLUMN).to_numpy(zero_copy_only=False)
        out = {"rows": [kept.num_rows], "score_sum": [float(np.nansum(scores))]}
        table = pa.table(out)
        if cfg.uids_out is not None:
            pairs = np.sort(uid_pairs(kept.column("uid")))
            offsets = pa.array([0, len(pairs)], pa.int32())
            table = pa.table(
                {**out,
                 "hi": pa.ListArray.from_arrays(offsets, pa.array(pairs["f0"], pa.uint64())),
                 "lo": pa.ListArray.from_arrays(offsets, pa.array(pairs["f1"], pa.uint64()))}
            )  # fmt: skip
        return table

    def report(
        self, summaries: list[pa.Table], cfg: ClipScoreConfig, state: pa.Table | None
    ) -> dict[str, Any]:
        rows = sum(s.column("rows")[0].as_py() for s in summaries)
        total = sum(s.column("score_sum")[0].as_py() for s in summaries)
        out: dict[str, Any] = {
            "threshold": state.column("threshold")[0].as_py() if state is not None else None,
            "kept": rows,
            "mean_kept_score": round(total / rows, 6) if rows else None,
        }
        if cfg.uids_out is not None:
            pairs = np.empty(0, dtype=np.dtype("u8,u8"))
            parts = []
            for s in summaries:
                hi = s.column("hi").combine_chunks().flatten().to_numpy()
                lo = s.column("lo").combine_chunks().flatten().to_numpy()
                part = np.empty(len(hi), dtype=np.dtype("u8,u8"))
                part["f0"], part["f1"] = hi, lo
                parts.append(part)
            if parts:
                pairs = np.concatenate(parts)
            out["uids_out"] = cfg.uids_out
            out["uids_written"] = write_uid_index(cfg.uids_out, pairs)
        return out


register(ClipScoreStage())
