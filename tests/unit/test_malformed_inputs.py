"""The malformed-input corpus: one tiny generated input per case, through `run_curation`.

Each case is an input that a raw pool really contains (a tar a killed writer left, a caption
with an unquoted comma, a latin-1 byte, a row naming `/etc/hostname`, a gzip bomb...) and
asserts what kiln does with it: either the exact drop reason the run counts (and the rejects
table row it names), or the exact error naming the file and row. Nothing may vanish: every
run here closes its row accounting. Runs use the local executor (one worker, no Ray).
"""

from __future__ import annotations

import gzip
import io
import json
import re
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from kiln.contracts import drop_reasons
from kiln.data_curation import CurationResult, run_curation
from kiln.data_curation.config import CurationConfig, InputConfig
from kiln.data_curation.readers import read_file
from kiln.data_curation.stages import DROP_COLUMN
from kiln.data_curation.stages.image import ImageConfig, apply_image_checks
from kiln.data_curation.stages.text import TextConfig

MB = 1 << 20


def _jpeg(seed: int = 0, size: int = 24) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=90)
    return out.getvalue()


def _curate(
    tmp_path: Path, input_spec: dict[str, Any], stages: list[dict[str, Any]] | None = None
) -> CurationResult:
    cfg = CurationConfig.model_validate(
        {
            "input": input_spec,
            "stages": stages or [],
            "execution": {"executor": "local", "workers": 1},
        }
    )
    result = run_curation(cfg, str(tmp_path / "run"))
    assert result.samples_in == result.samples_out + sum(result.dropped_by_reason.values())
    assert set(result.dropped_by_reason) <= set(drop_reasons())
    return result


def _rejects(tmp_path: Path, step: str = "read") -> list[tuple[int, str]]:
    """(source_row, drop_reason) of the rows `step` dropped, in row order."""
    files = sorted((tmp_path / "run" / "rejects" / step).glob("*.parquet"))
    if not files:
        return []
    table = pa.concat_tables([pq.read_table(f) for f in files])
    rows = table.column("source_row").to_pylist()
    return sorted(zip(rows, table.column(DROP_COLUMN).to_pylist(), strict=True))


def _csv(tmp_path: Path, body: bytes, name: str = "pool.csv") -> str:
    path = tmp_path / name
    path.write_bytes(body)
    return str(path)


def _error(fn: Callable[[], Any], message: str) -> None:
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        fn()


# --------------------------------------------------------------------------- csv


def test_csv_non_utf8_byte_drops_that_row(tmp_path: Path) -> None:
    path = _csv(tmp_path, b"text,url\na red dog,u0\ncaf\xe9 au lait,u1\na blue cat,u2\n")
    result = _curate(tmp_path, {"format": "csv", "paths": [path]})
    assert result.dropped_by_reason == {"bad_encoding": 1} and result.samples_out == 2
    assert _rejects(tmp_path) == [(1, "bad_encoding")]
    text = pq.read_table(next((tmp_path / "run" / "rejects" / "read").glob("*.parquet")))
    assert text.column("text").to_pylist() == ["caf\ufffd au lait"]  # shown, not lost


def test_csv_with_utf8_bom_reads_its_first_column(tmp_path: Path) -> None:
    path = _csv(tmp_path, b"\xef\xbb\xbfcaption,url\na red dog,u0\n")
    result = _curate(tmp_path, {"format": "csv", "paths": [path], "text_column": "caption"})
    assert result.samples_out == 1 and result.dropped_by_reason == {}


def test_csv_one_megabyte_caption_is_text_too_long(tmp_path: Path) -> None:
    body = b"text,url\na red dog,u0\n" + b"x" * MB + b",u1\n" + b"a blue cat,u2\n"
    path = _csv(tmp_path, body)
    result = _curate(tmp_path, {"format": "csv", "paths": [path]}, [{"stage": "text"}])
    assert result.dropped_by_reason == {"text_too_long": 1} and result.samples_out == 2
    assert _rejects(tmp_path, "text") == [(1, "text_too_long")]


def test_csv_extra_unquoted_fields_drop_that_row(tmp_path: Path) -> None:
    path = _csv(tmp_path, b"text,url\na red dog,u0\na dog, a cat and a bird,u1\n")
    result = _curate(tmp_path, {"format": "csv", "paths": [path]})
    assert result.dropped_by_reason == {"csv_extra_fields": 1} and result.samples_out == 1
    assert _rejects(tmp_path) == [(1, "csv_extra_fields")]


def test_csv_trailing_delimiter_loses_nothing(tmp_path: Path) -> None:
    path = _csv(tmp_path, b"text,url\na red dog,u0,\na blue cat,u1,\n")
    result = _curate(tmp_path, {"format": "csv", "paths": [path]})
    assert result.samples_out == 2 and result.dropped_by_reason == {}


def test_csv_quote_left_open_names_the_row(tmp_path: Path) -> None:
    path = _csv(tmp_path, b'text,url\na red dog,u0\n"an open quote,u1\na blue cat,u2\n')
    _error(
        lambda: _curate(tmp_path, {"format": "csv", "paths": [path]}),
        f"{path!r} row 1 (from line 3) is not valid csv (unexpected end of data): the file "
        "ends inside a quoted field: a quote is left open (or the file is cut)",
    )


def test_csv_field_over_the_field_limit_names_the_row(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kiln.data_curation import readers

    # the real limit is 64 MiB: the same check on a smaller field, in this process
    monkeypatch.setattr(readers, "_CSV_FIELD_LIMIT", 1000)
    path = _csv(tmp_path, b'text,url\nok,u0\nfine,u1\n"' + b"y" * 5000 + b'",u2\n')
    cfg = InputConfig(format="csv", paths=[path])
    try:
        _error(
            lambda: list(read_file(path, cfg)),
            f"{path!r} row 2 (from line 4) is not valid csv (field larger than field limit "
            "(1000)): a field is over 1,000 bytes: a quote left open swallows the rows after "
            "it; close it (and double quotes inside quoted fields)",
        )
    finally:
        readers.csv.field_size_limit(64 << 20)


# --------------------------------------------------------------------------- jsonl


def _jsonl(tmp_path: Path, lines: list[bytes]) -> str:
    path = tmp_path / "pool.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return str(path)


def test_jsonl_non_utf8_byte_drops_that_row(tmp_path: Path) -> None:
    path = _jsonl(
        tmp_path,
        [b'{"text": "a red dog", "url": "u0"}', b'{"text": "caf\xe9", "url": "u1"}'],
    )
    result = _curate(tmp_path, {"format": "jsonl", "paths": [path]})
    assert result.dropped_by_reason == {"bad_encoding": 1} and result.samples_out == 1
    assert _rejects(tmp_path) == [(1, "bad_encoding")]


def test_jsonl_lone_surrogate_escape_drops_that_row(tmp_path: Path) -> None:
    path = _jsonl(
        tmp_path, [b'{"text": "a red dog", "url": "u0"}', b'{"text": "half \\ud83d", "url": "u1"}']
    )
    result = _curate(tmp_path, {"format": "jsonl", "paths": [path]})
    assert result.dropped_by_reason == {"bad_encoding": 1}
    assert _rejects(tmp_path) == [(1, "bad_encoding")]


def test_jsonl_with_utf8_bom_reads(tmp_path: Path) -> None:
    path = _jsonl(tmp_path, [b'\xef\xbb\xbf{"text": "a red dog", "url": "u0"}'])
    result = _curate(tmp_path, {"format": "jsonl", "paths": [path]})
    assert result.samples_out == 1 and result.dropped_by_reason == {}


def test_jsonl_one_megabyte_caption_is_text_too_long(tmp_path: Path) -> None:
    big = json.dumps({"text": "x" * MB, "url": "u1"}).encode()
    path = _jsonl(tmp_path, [b'{"text": "a red dog", "url": "u0"}', big])
    result = _curate(tmp_path, {"format": "jsonl", "paths": [path]}, [{"stage": "text"}])
    assert result.dropped_by_reason == {"text_too_long": 1}
    assert _rejects(tmp_path, "text") == [(1, "text_too_long")]


def test_jsonl_line_that_is_not_json_names_the_line(tmp_path: Path) -> None:
    path = _jsonl(tmp_path, [b'{"text": "a red dog", "url": "u0"}', b'{"text": "cut'])
    _error(
        lambda: _curate(tmp_path, {"format": "jsonl", "paths": [path]}),
        f"{path!r} line 2 is not valid JSON (Invalid control character at: line 1 column 14 "
        "(char 13)): input.format jsonl expects one JSON object per line",
    )


# --------------------------------------------------------------------------- parquet


def test_parquet_binary_caption_not_utf8_drops_that_row(tmp_path: Path) -> None:
    path = tmp_path / "pool.parquet"
    texts = pa.array([b"a red dog", b"caf\xe9"], pa.binary())
    pq.write_table(pa.table({"text": texts, "url": ["u0", "u1"]}), path)
    result = _curate(tmp_path, {"format": "parquet", "paths": [str(path)]})
    assert result.dropped_by_reason == {"bad_encoding": 1}
    assert _rejects(tmp_path) == [(1, "bad_encoding")]


def test_parquet_one_megabyte_caption_is_text_too_long(tmp_path: Path) -> None:
    path = tmp_path / "pool.parquet"
    pq.write_table(pa.table({"text": ["a red dog", "x" * MB], "url": ["u0", "u1"]}), path)
    result = _curate(tmp_path, {"format": "parquet", "paths": [str(path)]}, [{"stage": "text"}])
    assert result.dropped_by_reason == {"text_too_long": 1}


# --------------------------------------------------------------------------- uids


def test_duplicate_uids_are_counted_before_any_other_step(tmp_path: Path) -> None:
    path = _csv(tmp_path, b"id,text,url\nk1,a red dog,u0\nk2,a cat,u1\nk1,a red dog again,u2\n")
    result = _curate(
        tmp_path, {"format": "csv", "paths": [path], "uid_column": "id"}, [{"stage": "text"}]
    )
    assert list(result.steps) == ["read", "uid_dedup", "text", "shard"]
    assert result.dropped_by_reason == {"duplicate_uid": 1} and result.samples_out == 2
    assert _rejects(tmp_path, "uid_dedup") == [(2, "duplicate_uid")]  # the later copy


def test_dotted_uid_names_file_row_and_uid(tmp_path: Path) -> None:
    path = _csv(tmp_path, b"id,text,url\nk1,a red dog,u0\nimg.002,a cat,u1\n")
    _error(
        lambda: _curate(tmp_path, {"format": "csv", "paths": [path], "uid_column": "id"}),
        f"{path!r} row 1: input.uid_column='id' gives the uid 'img.002', which contains '.', "
        "'/' or '\\': WebDataset splits member names at the first dot, so uids must be plain "
        "ids: fix that column, or set input.uid_column to null (kiln then derives each uid "
        "from url + caption)",
    )


# --------------------------------------------------------------------------- recipe checks


def test_missing_image_dir_is_refused_at_validation(tmp_path: Path) -> None:
    from kiln.platform.recipes import parse_recipe

    missing = str(tmp_path / "no_such_images")
    recipe = {
        "kind": "curate",
        "name": "x",
        "run_dir": str(tmp_path / "run"),
        "input": {
            "format": "csv",
            "paths": ["pool.csv"],
            "image_dir": missing,
            "image_path_column": "image",
        },
        "stages": [],
    }
    _error(
        lambda: parse_recipe(recipe),
        f"recipe: input.image_dir={missing!r} does not exist: set it to the folder the "
        "paths in input.image_path_column are relative to",
    )


def test_min_chars_over_max_chars_is_refused_at_validation() -> None:
    from kiln.data_curation.plan import build_plan

    _error(
        lambda: build_plan([{"stage": "text", "min_chars": 50, "max_chars": 10}]),
        "stages[0] (text): min_chars=50 is above max_chars=10, so every caption would be "
        "dropped: lower min_chars or raise max_chars",
    )
    with pytest.raises(ValueError, match="lower min_chars or raise max_chars"):
        TextConfig(min_chars=50, max_chars=10)


# --------------------------------------------------------------------------- image paths


@pytest.fixture
def image_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "in.jpg").write_bytes(_jpeg(0))
    (tmp_path / "outside.jpg").write_bytes(_jpeg(1))
    return folder


def _image_rows(tmp_path: Path, image_dir: Path, rel: str, **extra: Any) -> CurationResult:
    path = _csv(tmp_path, f"image,text\nin.jpg,a red dog\n{rel},a blue cat\n".encode())
    spec = {
        "format": "csv",
        "paths": [path],
        "url_column": None,
        "text_column": "text",
        "image_dir": str(image_dir),
        "image_path_column": "image",
        **extra,
    }
    return _curate(tmp_path, spec, [{"stage": "image"}])


@pytest.mark.parametrize(
    "rel",
    [
        "../outside.jpg",
        "sub/../../outside.jpg",
        "OUTSIDE_ABSOLUTE",
        "http://127.0.0.1:9/in.jpg",
        "file:///etc/hostname",
    ],
)
def test_image_path_outside_image_dir_is_dropped(tmp_path: Path, image_dir: Path, rel: str) -> None:
    rel = rel.replace("OUTSIDE_ABSOLUTE", str(tmp_path / "outside.jpg"))
    result = _image_rows(tmp_path, image_dir, rel)
    assert result.dropped_by_reason == {"image_path_outside_dir": 1} and result.samples_out == 1
    assert _rejects(tmp_path) == [(1, "image_path_outside_dir")]


def test_absolute_image_path_is_read_when_allowed(tmp_path: Path, image_dir: Path) -> None:
    result = _image_rows(
        tmp_path, image_dir, str(tmp_path / "outside.jpg"), allow_absolute_image_paths=True
    )
    assert result.samples_out == 2 and result.dropped_by_reason == {}


def test_image_path_inside_image_dir_with_dots_is_read(tmp_path: Path, image_dir: Path) -> None:
    (image_dir / "sub").mkdir()
    result = _image_rows(tmp_path, image_dir, "sub/../in.jpg")
    assert result.samples_out == 2 and result.dropped_by_reason == {}


# --------------------------------------------------------------------------- webdataset


def _member(name: str, data: bytes, kind: bytes = tarfile.REGTYPE, link: str = "") -> Any:
    info = tarfile.TarInfo(name)
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    info.type = kind
    info.linkname = link
    info.mtime = 0
    return info, (io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def _tar(members: list[tuple[str, bytes]] | list[Any]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for m in members:
            info, data = _member(*m) if isinstance(m[0], str) else m
            tar.addfile(info, data)
    return out.getvalue()


def _samples(n: int) -> list[tuple[str, bytes]]:
    members: list[tuple[str, bytes]] = []
    for i in range(n):
        members += [(f"{i:04d}.jpg", _jpeg(i)), (f"{i:04d}.txt", f"caption {i}".encode())]
    return members


def _wds(tmp_path: Path, data: bytes, **extra: Any) -> tuple[str, dict[str, Any]]:
    path = tmp_path / "shard.tar"
    path.write_bytes(data)
    return str(path), {"format": "webdataset", "paths": [str(path)], **extra}


def _member_offsets(data: bytes) -> list[tuple[int, int]]:
    """(header offset, end of data padded to 512) of each member."""
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return [(m.offset, m.offset_data + -(-m.size // 512) * 512) for m in tar.getmembers()]


def test_wds_whole_tar_reads_every_sample(tmp_path: Path) -> None:
    _, spec = _wds(tmp_path, _tar(_samples(4)))
    assert _curate(tmp_path, spec).samples_out == 4


def test_wds_tar_cut_at_a_member_boundary_names_the_file(tmp_path: Path) -> None:
    full = _tar(_samples(4))
    cut = _member_offsets(full)[4][0]  # before the third sample's first member
    path, spec = _wds(tmp_path, full[:cut])
    _error(
        lambda: _curate(tmp_path, spec),
        f"{path!r} ends without the tar end-of-archive marker (two zero blocks): the file is "
        "cut short (what a writer killed between two members leaves) or has garbage after "
        "its last member, so samples may be missing; write it again, or remove it from "
        "input.paths",
    )


def test_wds_tar_with_one_zero_block_names_the_file(tmp_path: Path) -> None:
    full = _tar(_samples(2))
    end = _member_offsets(full)[-1][1]
    path, spec = _wds(tmp_path, full[:end] + bytes(512))
    with pytest.raises(ValueError, match=re.escape(f"{path!r} ends without the tar end")):
        _curate(tmp_path, spec)


def test_wds_garbage_after_the_last_member_names_the_file(tmp_path: Path) -> None:
    full = _tar(_samples(2))
    end = _member_offsets(full)[-1][1]
    path, spec = _wds(tmp_path, full[:end] + b"\x17garbage" * 200)
    with pytest.raises(ValueError, match=re.escape(f"{path!r} ends without the tar end")):
        _curate(tmp_path, spec)


def test_wds_tar_cut_inside_a_member_names_the_file(tmp_path: Path) -> None:
    full = _tar(_samples(3))
    header = _member_offsets(full)[2][0]
    path, spec = _wds(tmp_path, full[: header + 512 + 100])
    _error(
        lambda: _curate(tmp_path, spec),
        f"{path!r} is a damaged tar archive (unexpected end of data): replace the file",
    )


def test_wds_gzipped_tar_cut_short_names_the_file(tmp_path: Path) -> None:
    full = _tar(_samples(4))
    cut = _member_offsets(full)[4][0]
    path = tmp_path / "shard.tar.gz"
    path.write_bytes(gzip.compress(full[:cut], mtime=0))
    spec = {"format": "webdataset", "paths": [str(path)]}
    with pytest.raises(ValueError, match=re.escape(f"{str(path)!r} ends without the tar end")):
        _curate(tmp_path, spec)


def test_wds_sample_of_symlinks_only_is_counted(tmp_path: Path) -> None:
    members: list[Any] = [_member(*m) for m in _samples(2)]
    members += [
        _member("0002.jpg", b"", tarfile.SYMTYPE, "/etc/hostname"),
        _member("0002.txt", b"", tarfile.SYMTYPE, "0000.txt"),
    ]
    members += [_member(*m) for m in _samples(4)[6:]]
    _, spec = _wds(tmp_path, _tar(members))
    result = _curate(tmp_path, spec)
    assert result.samples_in == 4 and result.samples_out == 3
    assert result.dropped_by_reason == {"link_only_sample": 1}
    assert _rejects(tmp_path) == [(2, "link_only_sample")]


def test_wds_key_split_by_another_key_names_file_and_key(tmp_path: Path) -> None:
    members = [("a.jpg", _jpeg(0)), ("b.jpg", _jpeg(1)), ("a.txt", b"a caption")]
    path, spec = _wds(tmp_path, _tar(members))
    _error(
        lambda: _curate(tmp_path, spec),
        f"{path!r}: the members of sample 'a' are not next to each other ('a.txt' comes "
        "after the members of 'b'): webdataset reads a sample from consecutive members; "
        "write the tar again with each sample's members together (e.g. sorted by name)",
    )


def test_wds_gzip_bomb_member_is_counted_not_inflated(tmp_path: Path) -> None:
    bomb = gzip.compress(b"\0" * (8 * MB), mtime=0)  # ~8 KB that inflates to 8 MB
    members = [*_samples(2), ("0002.jpg", _jpeg(2)), ("0002.txt.gz", bomb)]
    _, spec = _wds(tmp_path, _tar(members), max_member_bytes=MB)
    result = _curate(tmp_path, spec)
    assert result.dropped_by_reason == {"member_too_large": 1} and result.samples_out == 2
    assert _rejects(tmp_path) == [(2, "member_too_large")]


def test_wds_gzip_member_up_to_the_cap_is_read(tmp_path: Path) -> None:
    text = b"a red dog " * 10  # 100 bytes, ~35 gzipped
    members = [("0000.txt.gz", gzip.compress(text, mtime=0)), ("0000.json", b"{}")]
    for cap, expected, reason in ((100, text.decode(), None), (99, None, "member_too_large")):
        path, spec = _wds(tmp_path, _tar(members), max_member_bytes=cap)
        rows = [r for t in read_file(path, InputConfig(**spec)) for r in t.to_pylist()]
        assert (rows[0]["text"], rows[0]["drop_reason"]) == (expected, reason), cap


def test_wds_plain_member_over_the_cap_is_counted(tmp_path: Path) -> None:
    members = [*_samples(1), ("0001.jpg", b"\xff" * 3000), ("0001.txt", b"big")]
    _, spec = _wds(tmp_path, _tar(members), max_member_bytes=2000)
    result = _curate(tmp_path, spec)
    assert result.dropped_by_reason == {"member_too_large": 1}


def test_wds_key_with_a_folder_as_uid_names_the_sample(tmp_path: Path) -> None:
    members = [("part/0000.jpg", _jpeg(0)), ("part/0000.txt", b"a red dog")]
    path, spec = _wds(tmp_path, _tar(members), uid_column="__key__")
    _error(
        lambda: _curate(tmp_path, spec),
        f"{path!r} row 0: input.uid_column='__key__' gives the uid 'part/0000', which "
        "contains '.', '/' or '\\': WebDataset splits member names at the first dot, so uids "
        "must be plain ids: fix that column, or set input.uid_column to null (kiln then "
        "derives each uid from url + caption)",
    )


def test_wds_caption_not_utf8_drops_that_sample(tmp_path: Path) -> None:
    members = [*_samples(1), ("0001.jpg", _jpeg(1)), ("0001.txt", b"caf\xe9")]
    _, spec = _wds(tmp_path, _tar(members))
    result = _curate(tmp_path, spec)
    assert result.dropped_by_reason == {"bad_encoding": 1}
    assert _rejects(tmp_path) == [(1, "bad_encoding")]


# --------------------------------------------------------------------------- images


def test_decompression_bomb_image_is_dropped_even_with_pillows_guard_off(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # 10,000 x 9,000 one-bit pixels: an 11 KB PNG whose RGB decode would take 270 MB
    out = io.BytesIO()
    Image.new("1", (10_000, 9_000)).save(out, format="PNG")
    bomb = out.getvalue()
    assert len(bomb) < 200_000
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # what some libraries do on import
    table = pa.table({"uid": ["a"], "image": pa.array([bomb], pa.binary())})
    out_table = apply_image_checks(table, ImageConfig())
    assert out_table.column(DROP_COLUMN).to_pylist() == ["bad_image"]


# --------------------------------------------------------------------------- limit


def test_limit_counts_rows_the_reader_dropped(tmp_path: Path) -> None:
    a = _csv(tmp_path, b"text,url\nr0,u0\ncaf\xe9,u1\nr2,u2\n", "a.csv")
    _csv(tmp_path, b"text,url\ncaf\xe9,u3\nr4,u4\nr5,u5\nr6,x,y\n", "b.csv")
    spec = {"format": "csv", "paths": [str(Path(a).parent / "*.csv")]}
    # limit 4: all of a.csv, then b.csv's first row (read again, cut to that row)
    for limit, out, dropped in (
        (2, 1, {"bad_encoding": 1}),
        (4, 2, {"bad_encoding": 2}),
        (5, 3, {"bad_encoding": 2}),
        (5, 3, {"bad_encoding": 2}),  # a rerun reuses the cut
        (None, 4, {"bad_encoding": 2, "csv_extra_fields": 1}),
    ):
        result = _curate(tmp_path, {**spec, "limit": limit})
        assert (result.samples_out, result.dropped_by_reason) == (out, dropped), limit
        assert result.samples_in == (limit or 7)
    assert result.steps["read"].reused is False
