"""Readers: a raw image-text pool on any fsspec URL -> a Ray Dataset of sample rows.

Every format lands in the same row shape, `READ_SCHEMA`: the columns of
`kiln.contracts.SAMPLE_SCHEMA` plus `source_row` (the row's position in its file, from 0) and
`drop_reason`, so a row can always be traced back to where it came from and ties between
identical rows break on a total order that does not depend on execution.

Reading loses no row silently. A row the reader cannot use comes out with a `drop_reason` (the
read step counts it and writes it to `rejects/read/`): `bad_encoding` (a caption, url, uid or
image path that is not UTF-8), `csv_extra_fields` (more fields than the header: an unquoted
comma), `image_path_outside_dir` (an image path that is a URL, absolute, or leads out of
`input.image_dir`), `link_only_sample` and `member_too_large` (WebDataset). Everything else
is left to the stages: a caption that is not a string becomes null (`empty_text`), a missing
image file a null image (`missing_image`), a 1 MB caption a long one (`text_too_long`).
What cannot be counted row by row is an error naming the file (and the row): a tar cut short
(no end-of-archive marker), a sample whose members are split by another sample, broken csv
quoting, a line that is not JSON, a uid from `input.uid_column` that cannot name a sample.

Reading is deterministic: input files are expanded and sorted once in the driver, each file is
read by one task in file order, and the dataset preserves that order, so `limit` always keeps
the same first rows.
"""

from __future__ import annotations

import csv
import json
import logging
import posixpath
import re
import tarfile
import zlib
from collections.abc import Iterable, Iterator, Sequence
from typing import IO, Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from kiln import storage
from kiln.contracts import SAMPLE_SCHEMA, make_uid, register_drop_reason
from kiln.data_curation.config import InputConfig, missing_folder
from kiln.data_curation.shard import uid_problem

__all__ = [
    "BAD_ENCODING",
    "CSV_EXTRA_FIELDS",
    "FORMAT_SUFFIXES",
    "IMAGE_PATH_OUTSIDE_DIR",
    "LINK_ONLY_SAMPLE",
    "MEMBER_TOO_LARGE",
    "READ_SCHEMA",
    "WDS_IMAGE_EXTENSIONS",
    "WDS_KEY_COLUMN",
    "absolute_url",
    "effective_input",
    "expand_paths",
    "input_files",
    "read_file",
    "read_pool",
]

logger = logging.getLogger(__name__)

#: What every reader yields: the sample schema, the row's index inside its source file, and
#: why the reader could not use the row (null: it could).
READ_SCHEMA = SAMPLE_SCHEMA.append(pa.field("source_row", pa.int64(), nullable=False)).append(
    pa.field("drop_reason", pa.string())
)

BAD_ENCODING = register_drop_reason(
    "bad_encoding",
    "the caption, url, uid or image path is not valid UTF-8 (csv, jsonl, tar members, "
    "binary columns)",
)
CSV_EXTRA_FIELDS = register_drop_reason(
    "csv_extra_fields",
    "a csv row with more fields than the header: an unquoted comma (tab in .tsv) in a value?",
)
IMAGE_PATH_OUTSIDE_DIR = register_drop_reason(
    "image_path_outside_dir",
    "the image path is a URL, an absolute path (see input.allow_absolute_image_paths) or "
    "leads out of input.image_dir with '..'",
)
LINK_ONLY_SAMPLE = register_drop_reason(
    "link_only_sample",
    "every tar member of the webdataset sample is a symlink, hard link or other non-regular "
    "file (links are never followed)",
)
MEMBER_TOO_LARGE = register_drop_reason(
    "member_too_large",
    "a tar member of the webdataset sample is over input.max_member_bytes (after .gz "
    "decompression)",
)

#: File name endings a folder is searched for, per input format (a file named explicitly is
#: read whatever its name).
FORMAT_SUFFIXES: dict[str, tuple[str, ...]] = {
    "parquet": (".parquet",),
    "jsonl": (".jsonl", ".jsonl.gz", ".json", ".ndjson"),
    "csv": (".csv", ".csv.gz", ".tsv"),
    "webdataset": (".tar", ".tgz", ".tar.gz"),
    "synthetic": (".parquet",),
}

#: WebDataset members taken as the sample's image, by extension (first one found wins).
WDS_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")

#: `input.uid_column` value that makes a WebDataset reader use the tar member key as uid.
WDS_KEY_COLUMN = "__key__"

_GLOB_CHARS = re.compile(r"[*?\[]")
#: WebDataset's own key/extension split: the key is everything up to the first dot of the
#: file name (directories included), the extension everything after it.
_WDS_KEY = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
_CHUNK_ROWS = 256
#: Largest csv field read (the csv module's default is 128 KiB): bigger ones are errors
#: naming the row, as such a field is almost always a quote left open.
_CSV_FIELD_LIMIT = 64 << 20


# --------------------------------------------------------------------------- paths


def _display(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """A path as the user would write it: plain for local files, a full URL otherwise."""
    return path if storage.is_local(fs) else str(fs.unstrip_protocol(path))


def absolute_url(url: str) -> str:
    """`url` with a relative local path made absolute (Ray workers may run in another cwd)."""
    fs, path = fsspec.core.url_to_fs(url)
    return _display(fs, path)


def _is_hidden(path: str, folder: str) -> bool:
    """True for files under `folder` in a hidden or `_`-prefixed folder, or so named."""
    rel = path[len(folder) :] if path.startswith(folder) else path.rsplit("/", 1)[-1]
    return any(part.startswith((".", "_")) for part in rel.split("/") if part)


def expand_paths(paths: Sequence[str], suffixes: Sequence[str]) -> list[str]:
    """Input files named by `paths`: files as given, folders searched recursively, globs.

    A folder contributes its files ending in one of `suffixes`, sorted (hidden and
    `_`-prefixed files and folders inside it, such as `_SUCCESS` or `.cache/`, are skipped); a glob contributes its sorted matches (folders
    it matches are searched too). The result keeps the order of `paths` and lists a file
    once. Any fsspec URL works; local paths come back plain. A path that matches nothing is a
    `FileNotFoundError` naming it.
    """
    out: list[str] = []
    seen: set[str] = set()

    def add(fs: fsspec.AbstractFileSystem, path: str) -> None:
        name = _display(fs, path)
        if name not in seen:
            seen.add(name)
            out.append(name)

    def add_folder(fs: fsspec.AbstractFileSystem, folder: str) -> int:
        found = sorted(
            p for p in fs.find(folder) if p.endswith(tuple(suffixes)) and not _is_hidden(p, folder)
        )
        for p in found:
            add(fs, p)
        return len(found)

    for original in paths:
        fs, path = fsspec.core.url_to_fs(original)
        if _GLOB_CHARS.search(path):
            matches = sorted(fs.glob(path))
            n = 0
            for m in matches:
                if fs.isdir(m):
                    n += add_folder(fs, m)
                else:
                    add(fs, m)
                    n += 1
            if n == 0:
                raise FileNotFoundError(
                    f"input path {original!r} matches no files: check the glob in input.paths"
                )
        elif fs.isdir(path):
            if add_folder(fs, path) == 0:
                raise FileNotFoundError(
                    f"input folder {original!r} holds no files ending in "
                    f"{', '.join(suffixes)}: check input.paths and input.format"
                )
        elif fs.exists(path):
            add(fs, path)
        else:
            raise FileNotFoundError(
                f"input path {original!r} does not exist: fix input.paths (files, folders or "
                "globs on any fsspec URL)"
            )
    return out


# --------------------------------------------------------------------------- values


def _as_text(value: Any) -> str | None:
    """A caption value as str, or None when it is not text (numbers, lists, null).

    Bytes are decoded as UTF-8 with invalid bytes kept as lone surrogates (what csv and jsonl
    files are read with too), so `_bad_utf8` finds them and the row is dropped as
    `bad_encoding` instead of carrying replacement characters."""
    if isinstance(value, str):
        return value
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", errors="surrogateescape")
    return None


def _as_id(value: Any) -> str | None:
    if value is None or isinstance(value, bool | list | dict):
        return None
    text = str(value).strip()
    return text or None


def _bad_utf8(value: str | None) -> bool:
    """True when `value` holds lone surrogates: bytes that were not UTF-8 (or a JSON
    `\\udXXX` escape without its pair), which Arrow cannot store."""
    if value is None or value.isascii():
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _shown(value: str | None) -> str | None:
    """`value` with every undecodable byte as U+FFFD: what the rejects table shows."""
    if not _bad_utf8(value):
        return value
    assert value is not None
    try:
        raw = value.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a surrogate from a JSON escape, not from a byte
        raw = value.encode("utf-8", "surrogatepass")
    return raw.decode("utf-8", "replace")


def _missing_column(column: str, field: str, path: str, have: Iterable[str]) -> ValueError:
    return ValueError(
        f"input.{field}={column!r} is not a column of {path!r} (it has: "
        f"{', '.join(sorted(map(str, have)))}): set input.{field} to one of those"
        + (" or null" if field != "text_column" else "")
    )


class _ImageFolder:
    """Reads image files named by a path column, relative to `input.image_dir`.

    A path must lead inside image_dir: a URL, an absolute path (unless
    `input.allow_absolute_image_paths`) or one that climbs out with '..' is never opened, and
    its row is dropped as `image_path_outside_dir` (the check is on the path as written;
    links the owner of image_dir put inside it are followed). A missing file gives None (the
    image stage drops it as `missing_image`); the last few reads are cached because caption
    tables list one image several times in a row.
    """

    def __init__(self, image_dir: str, *, allow_absolute: bool = False) -> None:
        self.fs, root = fsspec.core.url_to_fs(image_dir)
        self.root = posixpath.normpath(root) if root else "/"
        self.inside = self.root.rstrip("/") + "/"
        self.allow_absolute = allow_absolute
        self._cache: dict[str, bytes | None] = {}

    def locate(self, rel: str) -> str | None:
        """The path `rel` names on image_dir's filesystem; None when it is not allowed."""
        if "://" in rel or "\0" in rel:
            return None
        if rel.startswith("/"):
            return posixpath.normpath(rel) if self.allow_absolute else None
        path = posixpath.normpath(f"{self.root}/{rel}")
        return path if path.startswith(self.inside) else None

    def read(self, rel: str | None) -> tuple[bytes | None, str | None]:
        """(the image's bytes or None when there is no such file, the drop reason or None)."""
        if not rel:
            return None, None
        if rel in self._cache:
            return self._cache[rel], None
        path = self.locate(rel)
        if path is None:
            return None, IMAGE_PATH_OUTSIDE_DIR
        try:
            with self.fs.open(path, "rb") as f:
                data: bytes | None = f.read()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            data = None
        if len(self._cache) >= 64:
            self._cache.clear()
        self._cache[rel] = data
        return data, None


class _Rows:
    """Accumulates sample rows of one file and emits them as `READ_SCHEMA` tables."""

    def __init__(self, source: str, cfg: InputConfig, start: int = 0) -> None:
        self.source = source
        self.cfg = cfg
        self.next_row = start
        self._clear()

    def _clear(self) -> None:
        self.uid: list[str] = []
        self.text: list[str | None] = []
        self.url: list[str | None] = []
        self.image: list[bytes | None] = []
        self.drop: list[str | None] = []

    def add(
        self,
        *,
        uid: str | None,
        text: str | None,
        url: str | None,
        image: bytes | None = None,
        rel: str | None = None,
        images: _ImageFolder | None = None,
        drop: str | None = None,
    ) -> None:
        """Add one row after the reader's checks: text that is not UTF-8, the image path
        `rel` (read from `images`), the uid. A row that fails one keeps its drop reason and
        no image; a uid from `input.uid_column` that cannot name a sample is an error."""
        if drop is None:
            joined = f"{uid}{text}{url}{rel}"  # one check per row: reading is per-row Python
            if not joined.isascii() and _bad_utf8(joined):
                drop = BAD_ENCODING
        if drop is None and images is not None:
            image, drop = images.read(rel)
        if drop is None and uid is not None:
            problem = uid_problem(uid)
            if problem is not None:
                raise ValueError(
                    f"{self.source!r} row {self.next_row + len(self.uid)}: "
                    f"input.uid_column={self.cfg.uid_column!r} gives the uid {uid!r}, which "
                    f"{problem}: fix that column, or set input.uid_column to null (kiln then "
                    "derives each uid from url + caption)"
                )
        if drop is not None:
            image = None
            uid, text, url = _shown(uid), _shown(text), _shown(url)
        self.uid.append(uid or make_uid(url, text))
        self.text.append(text)
        self.url.append(url)
        self.image.append(image)
        self.drop.append(drop)

    def __len__(self) -> int:
        return len(self.uid)

    def flush(self) -> pa.Table:
        n = len(self.uid)
        table = pa.table(
            {
                "uid": pa.array(self.uid, pa.string()),
                "text": pa.array(self.text, pa.string()),
                "url": pa.array(self.url, pa.string()),
                "image": pa.array(self.image, pa.binary()),
                "width": pa.nulls(n, pa.int32()),
                "height": pa.nulls(n, pa.int32()),
                "source": pa.array([self.source] * n, pa.string()),
                "source_row": pa.array(range(self.next_row, self.next_row + n), pa.int64()),
                "drop_reason": pa.array(self.drop, pa.string()),
            },
            schema=READ_SCHEMA,
        )
        self.next_row += n
        self._clear()
        return table


# --------------------------------------------------------------------------- formats


def _check_columns(cfg: InputConfig, path: str, have: Sequence[str]) -> None:
    wanted = [
        ("text_column", cfg.text_column),
        ("url_column", cfg.url_column),
        ("uid_column", cfg.uid_column),
        ("image_column", cfg.image_column),
        ("image_path_column", cfg.image_path_column),
    ]
    for field, column in wanted:
        if column is not None and column not in have:
            raise _missing_column(column, field, path, have)


def _records_to_rows(
    records: Iterable[dict[Any, Any]],
    cfg: InputConfig,
    path: str,
    images: _ImageFolder | None,
    max_rows: int | None,
) -> Iterator[pa.Table]:
    """Rows of a record-per-line file (csv, jsonl), `_CHUNK_ROWS` at a time."""
    rows = _Rows(path, cfg)
    for i, rec in enumerate(records):
        if max_rows is not None and i >= max_rows:
            break
        # csv.DictReader files the fields beyond the header under the key None (empty ones,
        # a trailing delimiter, lose nothing)
        extra = rec.get(None)
        drop = CSV_EXTRA_FIELDS if extra and any(extra) else None
        text = _as_text(rec.get(cfg.text_column))
        url = _as_text(rec.get(cfg.url_column)) if cfg.url_column else None
        rel = None
        if cfg.image_path_column and images is not None:
            rel = _as_text(rec.get(cfg.image_path_column))
            if url is None and not cfg.url_column:
                url = rel  # a local image's locator is its path relative to image_dir
        uid = _as_id(rec.get(cfg.uid_column)) if cfg.uid_column else None
        rows.add(uid=uid, text=text, url=url, rel=rel, images=images, drop=drop)
        if len(rows) >= _CHUNK_ROWS:
            yield rows.flush()
    if len(rows):
        yield rows.flush()


def _csv_error(path: str, row: int | None, line: int, e: csv.Error) -> ValueError:
    """A csv parse error as a message naming the file, the row (from 0, as `source_row`;
    None: the header), the line it starts on and the likely fix."""
    message = str(e)
    if "field limit" in message:
        hint = (
            f"a field is over {_CSV_FIELD_LIMIT:,} bytes: a quote left open swallows the "
            "rows after it; close it (and double quotes inside quoted fields)"
        )
    elif "end of data" in message:
        hint = "the file ends inside a quoted field: a quote is left open (or the file is cut)"
    else:
        hint = (
            "quote a field that holds the delimiter or quotes, and double the quotes inside it "
            '(""), as csv writers do'
        )
    return ValueError(
        f"{path!r} {'header' if row is None else f'row {row}'} (from line {line}) is not "
        f"valid csv ({message}): {hint}"
    )


def _csv_records(reader: csv.DictReader[str], path: str) -> Iterator[dict[Any, Any]]:
    row = 0
    while True:
        line = reader.reader.line_num + 1
        try:
            rec = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            raise _csv_error(path, row, line, e) from e
        yield rec
        row += 1


def _read_csv(
    path: str, cfg: InputConfig, images: _ImageFolder | None, max_rows: int | None
) -> Iterator[pa.Table]:
    delimiter = "\t" if path.endswith((".tsv", ".tsv.gz")) else ","
    csv.field_size_limit(_CSV_FIELD_LIMIT)  # process-wide: the same limit for every read
    # utf-8-sig: a byte-order mark is not part of the first column's name; undecodable
    # bytes become lone surrogates, and their rows `bad_encoding`
    with fsspec.open(
        path,
        "rt",
        compression="infer",
        newline="",
        encoding="utf-8-sig",
        errors="surrogateescape",
    ) as f:
        reader = csv.DictReader(f, delimiter=delimiter, strict=True)
        try:
            fieldnames = reader.fieldnames or []
        except csv.Error as e:
            raise _csv_error(path, None, 1, e) from e
        _check_columns(cfg, path, fieldnames)
        yield from _records_to_rows(_csv_records(reader, path), cfg, path, images, max_rows)


def _jsonl_records(f: IO[str], path: str) -> Iterator[dict[str, Any]]:
    for lineno, line in enumerate(f, start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(
                f"{path!r} line {lineno} is not valid JSON ({e}): input.format jsonl expects "
                "one JSON object per line"
            ) from e
        if not isinstance(rec, dict):
            raise ValueError(
                f"{path!r} line {lineno} is a JSON {type(rec).__name__}, not an object: "
                "input.format jsonl expects one JSON object per line"
            )
        yield rec


def _read_jsonl(
    path: str, cfg: InputConfig, images: _ImageFolder | None, max_rows: int | None
) -> Iterator[pa.Table]:
    with fsspec.open(
        path, "rt", compression="infer", encoding="utf-8-sig", errors="surrogateescape"
    ) as f:
        records = _jsonl_records(f, path)
        first = next(records, None)
        if first is None:
            return
        _check_columns(cfg, path, list(first))

        def chained() -> Iterator[dict[str, Any]]:
            yield first
            yield from records

        yield from _records_to_rows(chained(), cfg, path, images, max_rows)


def _text_values(column: pa.ChunkedArray | pa.Array, name: str, path: str) -> list[str | None]:
    t = column.type
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return column.cast(pa.string()).to_pylist()
    if pa.types.is_binary(t) or pa.types.is_large_binary(t):
        return [_as_text(v) for v in column.to_pylist()]
    if pa.types.is_dictionary(t):
        return [_as_text(v) for v in column.to_pylist()]
    logger.warning(
        "%s: column %r has type %s, not text: its values are read as null", path, name, t
    )
    return [None] * len(column)


def _image_values(column: pa.ChunkedArray | pa.Array, name: str, path: str) -> list[bytes | None]:
    t = column.type
    if pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_binary_view(t):
        return column.cast(pa.binary()).to_pylist()
    if pa.types.is_struct(t) and t.get_field_index("bytes") >= 0:  # Hugging Face Image feature
        values = column.to_pylist()
        return [v.get("bytes") if isinstance(v, dict) else None for v in values]
    raise ValueError(
        f"input.image_column={name!r} in {path!r} has type {t}: expected encoded image bytes "
        "(binary) or a struct with a 'bytes' field; for paths use input.image_path_column"
    )


def _read_parquet(
    path: str,
    cfg: InputConfig,
    images: _ImageFolder | None,
    max_rows: int | None,
    row_groups: tuple[int, int] | None = None,
) -> Iterator[pa.Table]:
    with storage.open_parquet(path) as pf:
        first, stop = row_groups if row_groups is not None else (0, pf.num_row_groups)
        start_row = sum(pf.metadata.row_group(g).num_rows for g in range(first))
        names = pf.schema_arrow.names
        _check_columns(cfg, path, names)
        columns = [
            c
            for c in (
                cfg.text_column,
                cfg.url_column,
                cfg.uid_column,
                cfg.image_column,
                cfg.image_path_column,
            )
            if c is not None
        ]
        rows = _Rows(path, cfg, start=start_row)
        remaining = max_rows
        batches = pf.iter_batches(
            batch_size=_CHUNK_ROWS, columns=sorted(set(columns)), row_groups=range(first, stop)
        )
        for batch in batches:
            if remaining is not None:
                if remaining <= 0:
                    break
                batch = batch.slice(0, remaining)
                remaining -= batch.num_rows
            n = batch.num_rows
            texts = _text_values(batch.column(cfg.text_column), cfg.text_column, path)
            urls = (
                _text_values(batch.column(cfg.url_column), cfg.url_column, path)
                if cfg.url_column
                else [None] * n
            )
            uids = (
                [_as_id(v) for v in batch.column(cfg.uid_column).to_pylist()]
                if cfg.uid_column
                else [None] * n
            )
            imgs: list[bytes | None] = [None] * n
            rels: list[str | None] = [None] * n
            folder = None
            if cfg.image_column:
                imgs = _image_values(batch.column(cfg.image_column), cfg.image_column, path)
            elif cfg.image_path_column and images is not None:
                rels = _text_values(batch.column(cfg.image_path_column), "image_path", path)
                folder = images
                if not cfg.url_column:
                    urls = rels
            for uid, text, url, image, rel in zip(uids, texts, urls, imgs, rels, strict=True):
                rows.add(uid=uid, text=text, url=url, image=image, rel=rel, images=folder)
            yield rows.flush()


class _Header(tarfile.TarInfo):
    """A tar header that, reading the end-of-archive marker, checks it is whole."""

    @classmethod
    def fromtarfile(cls, tar: tarfile.TarFile) -> _Header:
        try:
            return super().fromtarfile(tar)
        except tarfile.HeaderError as e:
            # the first zero block (an `EOFHeaderError`): the second one must follow it
            if type(e).__name__ == "EOFHeaderError" and isinstance(tar, _CheckedTar):
                assert tar.fileobj is not None
                second = tar.fileobj.read(tarfile.BLOCKSIZE)
                tar.complete = second == tarfile.NUL * tarfile.BLOCKSIZE
            raise


class _CheckedTar(tarfile.TarFile):
    """A `TarFile` that knows whether it ended with the end-of-archive marker.

    `tarfile` takes an archive that stops at a member boundary (what a killed writer
    leaves; GNU tar exits 0 on it), a cut header or garbage after a member as its end; only
    `complete` (two zero blocks were read where the next header would be) tells them apart
    from an archive that is whole."""

    tarinfo = _Header
    complete = False


def _open_tar(f: IO[bytes], path: str) -> _CheckedTar:
    """A streaming reader over the (possibly gzipped) tar in `f`; errors name `path`."""
    try:
        return _CheckedTar.open(fileobj=f, mode="r|*")
    except tarfile.TarError as e:
        raise ValueError(f"{path!r} is not a tar archive ({e}): input.format webdataset") from e


def _tar_members(
    f: IO[bytes], path: str, max_bytes: int
) -> Iterator[tuple[tarfile.TarInfo, bytes | None]]:
    """(header, bytes) of each member but folders, in archive order. The bytes are None for
    links and other non-regular members (never followed) and for regular members over
    `max_bytes` (skipped unread). A tar without its end-of-archive marker is an error."""
    with _open_tar(f, path) as tar:
        try:
            for info in tar:
                if info.isdir():
                    continue
                if not info.isfile() or info.size > max_bytes:
                    yield info, None
                    continue
                extracted = tar.extractfile(info)
                yield info, extracted.read() if extracted is not None else b""
        except tarfile.TarError as e:
            raise ValueError(f"{path!r} is a damaged tar archive ({e}): replace the file") from e
        if not tar.complete:
            raise ValueError(
                f"{path!r} ends without the tar end-of-archive marker (two zero blocks): the "
                "file is cut short (what a writer killed between two members leaves) or has "
                "garbage after its last member, so samples may be missing; write it again, or "
                "remove it from input.paths"
            )


def _gunzip(data: bytes, max_bytes: int) -> bytes | None:
    """`data` (one or more gzip members) decompressed, or None when that would be over
    `max_bytes` -- found without inflating more than `max_bytes + 1` bytes. Raises
    `zlib.error` / `EOFError` on bytes that are not (whole) gzip."""
    parts: list[bytes] = []
    total = 0
    rest = data
    while rest:
        inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
        pending = rest
        while not inflater.eof:
            chunk = inflater.decompress(pending, max_bytes + 1 - total)
            if not chunk and pending == inflater.unconsumed_tail:
                raise EOFError("gzip data ends before its end-of-stream marker")
            pending = inflater.unconsumed_tail
            total += len(chunk)
            if total > max_bytes:
                return None
            parts.append(chunk)
        rest = inflater.unused_data
    return b"".join(parts)


def _wds_samples(
    f: IO[bytes], path: str, max_bytes: int
) -> Iterator[tuple[str, dict[str, bytes], str | None]]:
    """(key, {extension: bytes}, drop reason) per sample: consecutive members sharing a key,
    like webdataset.

    Folders and members without an extension are skipped; `.gz` members are decompressed
    (at most `max_bytes`) and their extension shortened (`txt.gz` -> `txt`). A sample with a
    member over `max_bytes` gets `member_too_large`, one whose members are all links (or
    other non-regular files) `link_only_sample`. A key that comes back after another key's
    members is an error: webdataset would read it as two samples.
    """
    key: str | None = None
    members: dict[str, bytes] = {}
    too_large = regular = False
    done: set[str] = set()

    def reason() -> str | None:
        return MEMBER_TOO_LARGE if too_large else None if regular else LINK_ONLY_SAMPLE

    for info, data in _tar_members(f, path, max_bytes):
        m = _WDS_KEY.match(info.name)
        if not m:
            continue
        member_key, ext = m.group(1), m.group(2).lower()
        if member_key != key:
            if key is not None:
                yield key, members, reason()
                done.add(key)
            if member_key in done:
                raise ValueError(
                    f"{path!r}: the members of sample {member_key!r} are not next to each "
                    f"other ({info.name!r} comes after the members of {key!r}): webdataset "
                    "reads a sample from consecutive members; write the tar again with each "
                    "sample's members together (e.g. sorted by name)"
                )
            key, members, too_large, regular = member_key, {}, False, False
        if data is None:
            too_large = too_large or info.isfile()  # a regular member skipped for its size
            continue
        regular = True
        if ext.endswith(".gz"):
            try:
                unzipped = _gunzip(data, max_bytes)
            except (zlib.error, EOFError):
                unzipped = data  # not gzip after all: left as an unknown member
            else:
                ext = ext[: -len(".gz")]
            if unzipped is None:
                too_large = True
                continue
            data = unzipped
        members.setdefault(ext, data)
    if key is not None:
        yield key, members, reason()


def _read_webdataset(
    path: str, cfg: InputConfig, images: _ImageFolder | None, max_rows: int | None
) -> Iterator[pa.Table]:
    rows = _Rows(path, cfg)
    with fsspec.open(path, "rb") as f:
        samples = _wds_samples(f, path, cfg.max_member_bytes)
        for i, (key, members, drop) in enumerate(samples):
            if max_rows is not None and i >= max_rows:
                break
            meta: dict[str, Any] = {}
            if "json" in members:
                try:
                    loaded = json.loads(_as_text(members["json"]) or "")
                    meta = loaded if isinstance(loaded, dict) else {}
                except json.JSONDecodeError:
                    meta = {}
            text = (
                _as_text(members["txt"])
                if "txt" in members
                else _as_text(meta.get(cfg.text_column))
            )
            url = _as_text(meta.get(cfg.url_column)) if cfg.url_column else None
            image = next((members[e] for e in WDS_IMAGE_EXTENSIONS if e in members), None)
            uid: str | None
            if cfg.uid_column == WDS_KEY_COLUMN:
                uid = key
            elif cfg.uid_column:
                uid = _as_id(meta.get(cfg.uid_column))
            else:
                uid = None
            rows.add(uid=uid, text=text, url=url, image=image, drop=drop)
            if len(rows) >= _CHUNK_ROWS:
                yield rows.flush()
    if len(rows):
        yield rows.flush()


_READERS = {
    "parquet": _read_parquet,
    "synthetic": _read_parquet,
    "jsonl": _read_jsonl,
    "csv": _read_csv,
    "webdataset": _read_webdataset,
}


def _check_config(cfg: InputConfig) -> None:
    if cfg.format in ("csv", "jsonl") and cfg.image_column:
        raise ValueError(
            f"input.image_column={cfg.image_column!r} is for parquet pools (encoded bytes): "
            f"for {cfg.format}, set input.image_path_column and input.image_dir instead"
        )


def read_file(
    path: str,
    cfg: InputConfig,
    max_rows: int | None = None,
    *,
    row_groups: tuple[int, int] | None = None,
) -> Iterator[pa.Table]:
    """Sample tables (`READ_SCHEMA`) of one input file, in file order, at most `max_rows` rows.

    `row_groups` (parquet only) reads row groups [first, stop) of the file, with
    `source_row` still counted from the file's first row. Pure and runnable without Ray:
    this is what each read task runs.
    """
    _check_config(cfg)
    if cfg.text_columns:
        yield from _read_text_columns(path, cfg, max_rows, row_groups)
        return
    images = (
        _ImageFolder(cfg.image_dir, allow_absolute=cfg.allow_absolute_image_paths)
        if cfg.image_dir and cfg.image_path_column
        else None
    )
    try:
        if row_groups is not None:
            if cfg.format not in ("parquet", "synthetic"):
                raise ValueError(f"row_groups is for parquet inputs, not {cfg.format}")
            yield from _read_parquet(path, cfg, images, max_rows, row_groups)
            return
        yield from _READERS[cfg.format](path, cfg, images, max_rows)
    except (FileNotFoundError, PermissionError):
        raise
    except Exception as e:
        if path in str(e):
            raise
        raise ValueError(
            f"cannot read {path!r} as {cfg.format}: {type(e).__name__}: {e} "
            "(is input.format right, and is the file complete?)"
        ) from e


def _read_text_columns(
    path: str, cfg: InputConfig, max_rows: int | None, row_groups: tuple[int, int] | None
) -> Iterator[pa.Table]:
    """`input.text_columns`: the file read once per text column, the passes' tables (same
    records, same chunks) interleaved into one row per (record, text), in file order; with
    `uid_column`, each row's uid is the record's plus '#column'."""
    passes = [
        read_file(
            path,
            cfg.model_copy(update={"text_column": c, "text_columns": None}),
            max_rows,
            row_groups=row_groups,
        )
        for c in cfg.text_columns or []
    ]
    aligned = zip(*passes, strict=True)
    while True:
        try:
            tables = next(aligned)
        except StopIteration:
            return
        except ValueError as e:  # a missing column: name the field the user set
            message = str(e).replace("set input.text_column to", "fix input.text_columns with")
            raise ValueError(message.replace("input.text_column=", "input.text_columns: ")) from e
        rows = tables[0].column("source_row")
        if any(not t.column("source_row").equals(rows) for t in tables):
            raise RuntimeError(f"{path!r}: the text_columns passes read different records")
        if cfg.uid_column:
            tables = tuple(
                t.set_column(
                    t.schema.get_field_index("uid"),
                    "uid",
                    pc.binary_join_element_wise(t.column("uid"), f"#{c}", ""),
                )
                for t, c in zip(tables, cfg.text_columns or [], strict=True)
            )
        merged = pa.concat_tables(tables)
        n = tables[0].num_rows
        # row i of pass c is at c * n + i: take record by record
        order = np.arange(len(tables) * n).reshape(len(tables), n).T.ravel()
        yield merged.take(pa.array(order))


def effective_input(cfg: InputConfig) -> InputConfig:
    """The config the read tasks get: absolute image_dir; fixed columns for the synthetic pool."""
    if cfg.format != "synthetic":
        if cfg.image_dir is None:
            return cfg
        return cfg.model_copy(update={"image_dir": absolute_url(cfg.image_dir)})
    return cfg.model_copy(
        update={
            "text_column": "text",
            "url_column": "url",
            "uid_column": None,
            "image_column": "image",
            "image_dir": None,
            "image_path_column": None,
        }
    )


def input_files(cfg: InputConfig) -> list[str]:
    """The sorted input files of `cfg` (generating the synthetic pool first if needed).

    Checks, before any work starts, that every path names files and that `input.image_dir`
    (on any URL) is a folder: `FileNotFoundError` naming the path and the fix otherwise."""
    if cfg.format == "synthetic":
        from kiln.data_curation.synthetic import generate_pool

        root = cfg.paths[0]
        generate_pool(cfg.synthetic, root)
        return expand_paths([root.rstrip("/") + "/pool-*.parquet"], FORMAT_SUFFIXES["parquet"])
    files = expand_paths(cfg.paths, FORMAT_SUFFIXES[cfg.format])
    missing = missing_folder(cfg.image_dir) if cfg.image_dir else None
    if missing:
        raise FileNotFoundError(missing)
    return files


def _read_files(batch: pa.Table, cfg: InputConfig, max_rows: int | None) -> Iterator[pa.Table]:
    """Ray Data UDF: a batch of `path` rows in, the sample tables of those files out."""
    for path in batch.column("path").to_pylist():
        yield from read_file(path, cfg, max_rows)


def read_pool(cfg: InputConfig, *, files: Sequence[str] | None = None) -> Any:
    """The pool named by `cfg` as a `ray.data.Dataset` of `READ_SCHEMA` rows (file order;
    rows the reader could not use carry their `drop_reason`).

    `files` (from `input_files`) skips expanding the paths again. Needs Ray initialised;
    column names are checked per file as it is read (a missing one is a `ValueError` naming
    the column, the file and the columns it has).
    """
    import ray.data

    cfg = effective_input(cfg)
    _check_config(cfg)
    paths = list(files) if files is not None else input_files(cfg)
    items = [{"path": p} for p in paths]
    ds: Any = ray.data.from_items(items, override_num_blocks=max(1, len(items)))
    # Rows come out in file order, so `limit` (and anything else) sees a stable sequence.
    ds.context.execution_options.preserve_order = True
    ds = ds.map_batches(
        _read_files,
        fn_kwargs={"cfg": cfg, "max_rows": cfg.limit},
        batch_size=1,
        batch_format="pyarrow",
    )
    if cfg.limit is not None:
        ds = ds.limit(cfg.limit)
    return ds
