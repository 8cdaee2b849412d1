"""Text stage: caption normalization, length filters, junk alt-text detection, dedup keys.

Web alt-texts are noisy: whitespace runs, file names the CMS put in place of a caption
("IMG_2041.jpg"), and boilerplate ("click here"). These rows carry no description of the
image, so they are dropped before matching (they would only add noise to the metadata
counts). Filters judge the normalized text whatever `TextConfig.normalize` says; the flag
only decides whether the stored `text` column is replaced by its normalized form.

Drop reasons, in order: `empty_text` (null, non-string or blank), `text_too_short`,
`text_too_long`, `junk_text`.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
from pydantic import Field, model_validator

from kiln.contracts import StrictModel, make_uid
from kiln.data_curation.stage import MapStage, register
from kiln.data_curation.stages import alive_mask, mark_dropped, replace_column

__all__ = [
    "BOILERPLATE_PHRASES",
    "TextConfig",
    "TextStage",
    "apply_text_filters",
    "is_junk",
    "normalize_text",
    "text_dedup_key",
]


class TextConfig(StrictModel):
    """Caption normalization and filters.

    `normalize: true` (default) stores the caption NFC-normalized with every whitespace run
    (Unicode spaces included) collapsed to one ASCII space, and that is what later stages,
    MetaCLIP matching included, see. `normalize: false` keeps the raw caption, which is what
    MetaCLIP's reference code matches against; the filters judge the normalized form either
    way.
    """

    normalize: bool = Field(default=True, description="Unicode NFC, strip, collapse whitespace")
    min_chars: int = Field(
        default=2, ge=0, description="shorter captions are dropped as text_too_short"
    )
    max_chars: int = Field(
        default=1000, ge=1, description="longer captions are dropped as text_too_long"
    )
    min_words: int = Field(
        default=1, ge=0, description="captions with fewer words are dropped as text_too_short"
    )
    drop_junk: bool = Field(
        default=True, description="drop filename-like and boilerplate alt-texts ('IMG_2041.jpg')"
    )

    @model_validator(mode="after")
    def _check_lengths(self) -> TextConfig:
        if self.min_chars > self.max_chars:
            raise ValueError(
                f"min_chars={self.min_chars} is above max_chars={self.max_chars}, so every "
                "caption would be dropped: lower min_chars or raise max_chars"
            )
        return self


_WHITESPACE = re.compile(r"\s+")

#: Whole alt-texts that describe nothing (compared lower-cased, ignoring surrounding
#: punctuation and a trailing number such as "image 3"). Only exact matches of the whole
#: text count, so "a photo of a dog on the beach" is a caption, "photo" is junk.
BOILERPLATE_PHRASES: frozenset[str] = frozenset(
    {
        "click here",
        "click to enlarge",
        "read more",
        "more info",
        "download",
        "image",
        "images",
        "img",
        "pic",
        "picture",
        "photo",
        "photos",
        "untitled",
        "untitled design",
        "thumbnail",
        "thumb",
        "placeholder",
        "logo",
        "icon",
        "banner",
        "spacer",
        "no image",
        "no image available",
        "image not found",
        "image unavailable",
        "default",
        "null",
        "none",
        "n/a",
        "undefined",
        "loading",
        "advertisement",
    }
)

_IMAGE_EXTENSIONS = r"(?:jpe?g|png|gif|webp|bmp|tiff?|heic|svg|avif)"
#: A bare file name ("IMG_2041.jpg", "image.png", "my holiday photo.JPG").
_FILENAME = re.compile(rf"^[\w\-.() ]+\.{_IMAGE_EXTENSIONS}$", re.IGNORECASE)
#: Camera / scanner default names without an extension ("DSC00012", "DSC_0042", "P1010203").
_CAMERA_NAME = re.compile(
    r"^(?:img|dsc|dscn|dscf|dcim|pict?|pxl|mvc|sam|gopr|dji|p|screenshot|photo|image)"
    r"[\s_\-]?\d{3,}[\w\-]*$",
    re.IGNORECASE,
)
#: A bare URL or path.
_URL = re.compile(r"^(?:(?:https?|ftp)://|www\.)\S+$|^/\S+/\S+$", re.IGNORECASE)
#: Only digits / hex / separators: ids and hashes ("1234567", "548c06b07fa745ec").
_ID_LIKE = re.compile(r"^(?:\d+|[0-9a-f]{16,}|[0-9a-f\-]{32,})$", re.IGNORECASE)
#: Boilerplate with a trailing counter ("image 3", "photo #12").
_NUMBERED = re.compile(r"^(?P<word>[a-z /]+?)\s*[#\-_]?\s*\d*$")


def normalize_text(s: str) -> str:
    """Unicode NFC, strip, and collapse every whitespace run (tabs, newlines too) to a space."""
    return _WHITESPACE.sub(" ", unicodedata.normalize("NFC", s)).strip()


def is_junk(s: str) -> bool:
    """True for alt-texts that are not captions: file names, camera ids, URLs, boilerplate.

    Checked on the normalized text: a bare image file name, a camera default name
    (`_CAMERA_NAME`), a bare URL, a numeric/hex id, or one of `BOILERPLATE_PHRASES` (whole
    text, case-insensitive, surrounding punctuation and a trailing counter ignored).
    Blank text is not junk here; `apply_text_filters` reports it as `empty_text`.
    """
    text = normalize_text(s)
    if not text:
        return False
    if _FILENAME.match(text) or _CAMERA_NAME.match(text) or _URL.match(text):
        return True
    if _ID_LIKE.match(text):
        return True
    bare = text.lower().strip(" .,:;!?-_*\"'()[]|")
    if bare in BOILERPLATE_PHRASES:
        return True
    numbered = _NUMBERED.match(bare)
    return bool(numbered and numbered.group("word").strip() in BOILERPLATE_PHRASES)


def _text_column(table: pa.Table) -> list[object]:
    if "text" not in table.column_names:
        raise ValueError(
            f"table has no 'text' column (columns: {table.column_names}): map the caption "
            "column with input.text_column"
        )
    return table.column("text").to_pylist()


def apply_text_filters(table: pa.Table, cfg: TextConfig) -> pa.Table:
    """Mark rows with empty, too short, too long or junk captions; normalize `text` if asked.

    Rows already dropped are left untouched (text included). The `text` column comes back as
    Arrow `string`; a non-string value becomes null (its row is dropped as `empty_text`).
    """
    values = _text_column(table)
    alive = alive_mask(table)
    n = table.num_rows
    empty = np.zeros(n, dtype=bool)
    short = np.zeros(n, dtype=bool)
    long_ = np.zeros(n, dtype=bool)
    junk = np.zeros(n, dtype=bool)
    out: list[str | None] = []
    for i, value in enumerate(values):
        if not isinstance(value, str):
            out.append(None)
            empty[i] = alive[i]
            continue
        if not alive[i]:
            out.append(value)
            continue
        norm = normalize_text(value)
        out.append(norm if cfg.normalize else value)
        if not norm:
            empty[i] = True
        elif len(norm) < cfg.min_chars or len(norm.split(" ")) < cfg.min_words:
            short[i] = True
        elif len(norm) > cfg.max_chars:
            long_[i] = True
        elif cfg.drop_junk and is_junk(norm):
            junk[i] = True
    table = replace_column(table, "text", pa.array(out, type=pa.string()))
    table = mark_dropped(table, empty, "empty_text")
    table = mark_dropped(table, short, "text_too_short")
    table = mark_dropped(table, long_, "text_too_long")
    return mark_dropped(table, junk, "junk_text")


def text_dedup_key(table: pa.Table) -> pa.Array:
    """Per-row key `make_uid(url, text)` for exact (url, text) dedup; url may be absent."""
    texts = _text_column(table)
    urls = table.column("url").to_pylist() if "url" in table.column_names else [None] * len(texts)
    keys = [
        make_uid(u if isinstance(u, str) else None, t if isinstance(t, str) else None)
        for u, t in zip(urls, texts, strict=True)
    ]
    return pa.array(keys, type=pa.string())


class TextStage(MapStage[TextConfig]):
    """Caption normalization, length filters and junk alt-text detection."""

    name = "text"
    config = TextConfig
    summary = "normalize captions; drop empty, too short/long and junk alt-texts"
    drop_reasons: ClassVar[dict[str, str]] = {
        "empty_text": "no caption (null, not a string, or blank)",
        "text_too_short": "caption shorter than text.min_chars / min_words",
        "text_too_long": "caption longer than text.max_chars",
        "junk_text": "file name, camera id, URL, id or boilerplate instead of a caption",
    }

    def apply(self, table: pa.Table, cfg: TextConfig, ctx: Any) -> pa.Table:
        return apply_text_filters(table, cfg)


register(TextStage())
