"""Text stage: normalization, junk detection, filters and dedup keys on a handful of rows."""

from __future__ import annotations

from collections.abc import Sequence

import pyarrow as pa
import pytest

from kiln.contracts import make_uid
from kiln.data_curation.config import TextConfig
from kiln.data_curation.stages import DROP_COLUMN, mark_dropped
from kiln.data_curation.stages.text import (
    apply_text_filters,
    is_junk,
    normalize_text,
    text_dedup_key,
)


def test_normalize_text() -> None:
    assert normalize_text("  a\tdog \n\n on   the\u00a0beach ") == "a dog on the beach"
    # NFC: "e" + combining acute becomes one code point
    assert normalize_text("cafe\u0301") == "caf\u00e9"
    assert normalize_text(" \t\n ") == ""


@pytest.mark.parametrize(
    "text",
    [
        "IMG_2041.jpg",
        "DSC00012",
        "DSC_0042",
        "image.png",
        "my holiday photo.JPG",
        "P1010203",
        "https://example.com/a/b.jpg",
        "www.example.com",
        "click here",
        "Click Here!",
        "image",
        "Photo",
        "untitled",
        "thumbnail",
        "placeholder",
        "logo",
        "image 3",
        "548c06b07fa745ec8bbfcf01beee89e0",
        "12345",
    ],
)
def test_is_junk_flags_non_captions(text: str) -> None:
    assert is_junk(text)


@pytest.mark.parametrize(
    "text",
    [
        "a photo of a dog on the beach",
        "image of the day: sunset over the lake",
        "Logo design for a coffee shop",
        "click here to see a red barn",  # a longer sentence is left to other filters
        "A Honda motorcycle parked in a grass driveway",
        "2019 Ford Mustang GT",
        "",  # blank is reported as empty_text, not junk
    ],
)
def test_is_junk_keeps_real_captions(text: str) -> None:
    assert not is_junk(text)


def _table(texts: Sequence[object], urls: Sequence[str | None] | None = None) -> pa.Table:
    n = len(texts)
    return pa.table(
        {
            "uid": [f"{i:032x}" for i in range(n)],
            "text": pa.array(list(texts), type=pa.string()),
            "url": list(urls) if urls is not None else [f"http://x/{i}" for i in range(n)],
        }
    )


def test_apply_text_filters_reasons_and_normalization() -> None:
    texts = [
        "  a red\tcircle  on grass ",
        None,
        "   ",
        "x",
        "word " * 300,
        "IMG_2041.jpg",
        "a photo of a dog on the beach",
    ]
    out = apply_text_filters(_table(texts), TextConfig(min_chars=2, max_chars=100))
    assert out.column(DROP_COLUMN).to_pylist() == [
        None,
        "empty_text",
        "empty_text",
        "text_too_short",
        "text_too_long",
        "junk_text",
        None,
    ]
    assert out.column("text")[0].as_py() == "a red circle on grass"
    assert out.num_rows == len(texts)


def test_min_words_and_disabled_options() -> None:
    texts = ["sunset", "  two  words ", "IMG_2041.jpg"]
    cfg = TextConfig(min_words=2, normalize=False, drop_junk=False)
    out = apply_text_filters(_table(texts), cfg)
    assert out.column(DROP_COLUMN).to_pylist() == ["text_too_short", None, "text_too_short"]
    # normalize=False keeps the stored text as it was
    assert out.column("text")[1].as_py() == "  two  words "


def test_non_string_text_column_is_empty_text() -> None:
    table = pa.table({"uid": ["a", "b"], "text": pa.array([1, None], type=pa.int64())})
    out = apply_text_filters(table, TextConfig())
    assert out.column(DROP_COLUMN).to_pylist() == ["empty_text", "empty_text"]
    assert out.schema.field("text").type == pa.string()


def test_already_dropped_rows_are_untouched() -> None:
    table = _table(["  keep   me  ", "x"])
    table = mark_dropped(table, pa.array([True, False]).to_numpy(zero_copy_only=False), "bad_image")
    out = apply_text_filters(table, TextConfig())
    assert out.column(DROP_COLUMN).to_pylist() == ["bad_image", "text_too_short"]
    assert out.column("text")[0].as_py() == "  keep   me  "


def test_missing_text_column_names_the_fix() -> None:
    with pytest.raises(ValueError, match="text_column"):
        apply_text_filters(pa.table({"caption": ["a"]}), TextConfig())


def test_dedup_key_uses_normalized_url_and_text() -> None:
    table = _table(["a  dog", "a dog", "a dog"], urls=["u", "u", None])
    out = apply_text_filters(table, TextConfig())
    keys = text_dedup_key(out).to_pylist()
    assert keys[0] == keys[1] == make_uid("u", "a dog")
    assert keys[2] == make_uid(None, "a dog") != keys[0]
    no_url = pa.table({"text": ["a dog"]})
    assert text_dedup_key(no_url).to_pylist() == [make_uid(None, "a dog")]
