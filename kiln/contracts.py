"""Value types shared by curation and training: sample schema, drop reasons, dataset manifest,
and the hashes seeded decisions are made from (so training can redraw them exactly).

`kiln.data_curation` and `kiln.training` never import each other; what crosses between them
is a file on an fsspec URL whose shape is fixed here: curation writes WebDataset shards plus a
`manifest.json`, training reads the manifest (never a glob). Keeping both sides of that
contract in one small module is what lets them evolve independently.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
from typing import Annotated, Any, get_args, get_origin

import fsspec
import numpy as np
import pyarrow as pa
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationInfo

__all__ = [
    "MANIFEST_NAME",
    "PATH_BASE",
    "PATH_NOTES",
    "SAMPLE_SCHEMA",
    "BalanceSidecars",
    "CwdRelative",
    "DatasetManifest",
    "RecipePath",
    "ShardInfo",
    "SidecarFile",
    "StrictModel",
    "absolute_path",
    "binary_buffers",
    "canonical_json",
    "drop_reasons",
    "fnv1a64",
    "fnv1a64_strings",
    "is_path_field",
    "json_sha256",
    "make_uid",
    "mix64",
    "mix64_np",
    "read_manifest",
    "register_drop_reason",
    "require_file",
    "sha256_hex",
    "write_manifest",
]


class StrictModel(BaseModel):
    """Base of every kiln config: unknown fields are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


#: Columns every reader produces. Stages add typed columns (`entry_ids: list<int32>`,
#: `sha256`, scores, embeddings) and a dropped row carries `drop_reason`.
SAMPLE_SCHEMA = pa.schema(
    [
        pa.field("uid", pa.string(), nullable=False),
        pa.field("text", pa.string()),
        pa.field("url", pa.string()),
        pa.field("image", pa.binary()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("source", pa.string()),
    ]
)

_DROP_REASONS: dict[str, str] = {}


def register_drop_reason(reason: str, description: str) -> str:
    """Register `reason` (a snake_case name) as a reason a row may be dropped; returns it.

    Stages register the reasons they emit when their module is imported, so reports and
    tests can name them exactly without a closed list that every new stage has to edit.
    Registering the same reason twice with the same description is a no-op; a different
    description for a registered name is an error (two stages would mean different things).
    """
    if not reason or not reason.replace("_", "").isalnum() or reason != reason.lower():
        raise ValueError(f"drop reason {reason!r}: use a lower-case snake_case name")
    known = _DROP_REASONS.get(reason)
    if known is not None and known != description:
        raise ValueError(
            f"drop reason {reason!r} is already registered as {known!r}: pick another name"
        )
    _DROP_REASONS[reason] = description
    return reason


def drop_reasons() -> dict[str, str]:
    """Every registered drop reason and what it means (a copy, in registration order)."""
    return dict(_DROP_REASONS)


MANIFEST_NAME = "manifest.json"


#: The key of pydantic's validation context that holds the folder a `RecipePath` written
#: relative resolves against (`model_validate(data, context={PATH_BASE: folder})`).
PATH_BASE = "path_base"
#: An optional key of that context: a list each resolved `RecipePath` appends
#: `(field name, value as written, absolute path)` to (which paths an error may name).
PATH_NOTES = "path_notes"


class CwdRelative(str):
    """A string typed on the command line (`--set a.b=c`): as a `RecipePath` it is relative
    to the current directory, where the user typed it, not to the recipe file's folder.
    Otherwise it is a plain `str` (validation turns it into one)."""

    __slots__ = ()


def absolute_path(value: str, base: str) -> str:
    """`value` as an absolute local path (`~` expanded) against the folder `base`; URLs
    (``s3://...``, ``file://...``: anything with ``://``) as they are. A relative path
    against a URL `base` (a recipe on object storage) is a URL beside it."""
    if "://" in value or not value:
        return value
    if "://" in base:
        if value.startswith(("/", "~")):
            return os.path.abspath(os.path.expanduser(value))
        protocol, _, rest = base.partition("://")
        return f"{protocol}://{posixpath.normpath(posixpath.join(rest, value))}"
    return os.path.abspath(os.path.join(base, os.path.expanduser(value)))


def _resolve_path(value: Any, info: ValidationInfo) -> Any:
    """`RecipePath`'s validator: with `PATH_BASE` in the validation context, a relative
    value comes back absolute against it (a `CwdRelative` one against the cwd); without
    it, as it is (a config built in code keeps its values; `resolve_paths` resolves them
    against the cwd before a job starts)."""
    if not isinstance(value, str):
        return value  # the str validation names what is wrong
    context = info.context if isinstance(info.context, dict) else {}
    base = context.get(PATH_BASE)
    if base is None:
        return str(value)
    out = absolute_path(value, os.getcwd() if isinstance(value, CwdRelative) else str(base))
    notes = context.get(PATH_NOTES)
    if isinstance(notes, list) and out != value:
        notes.append((info.field_name, str(value), out))
    return out


#: The type of a config field holding a file path or URL (also as `list[RecipePath]`,
#: `dict[str, RecipePath]`, `RecipePath | None`). A relative value resolves itself during
#: validation against the folder in the validation context (`PATH_BASE`): a recipe file's
#: values against its folder, `--set` values (`CwdRelative`) and recipes built in code
#: against the cwd, so Ray workers, which run elsewhere, see the same files. Its JSON schema
#: says it is a path (`kiln_path`, which the recipe reference turns into a note).
RecipePath = Annotated[
    str, BeforeValidator(_resolve_path), Field(json_schema_extra={"kiln_path": True})
]


def _is_path_marker(meta: Any) -> bool:
    return isinstance(meta, BeforeValidator) and meta.func is _resolve_path


def _holds_path(annotation: Any) -> bool:
    """True when `annotation` is `RecipePath` or has one inside (`list[RecipePath]`...)."""
    args = get_args(annotation)
    if get_origin(annotation) is Annotated and any(_is_path_marker(m) for m in args[1:]):
        return True
    return any(_holds_path(a) for a in args)


def is_path_field(info: Any) -> bool:
    """True when pydantic `FieldInfo` `info` holds `RecipePath` values (itself, or inside a
    list, a dict or an optional): what the recipe reference marks as a path."""
    metadata = getattr(info, "metadata", ())
    return any(_is_path_marker(m) for m in metadata) or _holds_path(
        getattr(info, "annotation", None)
    )


def canonical_json(value: Any) -> str:
    """Compact JSON with sorted keys: the byte form every hash in kiln is taken over."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def json_sha256(value: Any) -> str:
    """sha256 of `value`'s canonical JSON (recipe hashes, step fingerprints)."""
    return hashlib.sha256(canonical_json(value).encode()).hexdigest()


def sha256_hex(data: bytes) -> str:
    """Hex sha256 of `data`."""
    return hashlib.sha256(data).hexdigest()


def make_uid(url: str | None, text: str | None) -> str:
    """Stable 32-hex-char sample id from (url, text), used when the source has none.

    The two fields are joined with a NUL so ("ab", "c") and ("a", "bc") differ.
    """
    key = f"{url or ''}\x00{text or ''}".encode()
    return hashlib.sha256(key).hexdigest()[:32]


_MASK64 = (1 << 64) - 1
_FNV_OFFSET = 0xCBF29CE484222325
_FNV_PRIME = 0x100000001B3


def fnv1a64(data: bytes) -> int:
    """64-bit FNV-1a of `data` (the scalar twin of `fnv1a64_strings`)."""
    h = _FNV_OFFSET
    for byte in data:
        h = ((h ^ byte) * _FNV_PRIME) & _MASK64
    return h


def binary_buffers(array: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(offsets as int64 from 0, data bytes) of a string / binary array, without copying the
    data (nulls not masked: a null's slice is whatever the array holds, usually empty)."""
    rows = len(array)
    buffers = array.buffers()
    if len(buffers) < 3 or buffers[1] is None:  # empty, or all null (type null)
        return np.zeros(1, np.int64), np.zeros(0, np.uint8)
    large = pa.types.is_large_string(array.type) or pa.types.is_large_binary(array.type)
    offset_type = np.dtype(np.int64 if large else np.int32)
    offsets = np.frombuffer(
        buffers[1], dtype=offset_type, count=rows + 1, offset=array.offset * offset_type.itemsize
    ).astype(np.int64)
    data = np.zeros(0, np.uint8) if buffers[2] is None else np.frombuffer(buffers[2], np.uint8)
    data = data[offsets[0] : offsets[-1]]
    return offsets - offsets[0], data


def fnv1a64_strings(values: pa.Array | pa.ChunkedArray | list[str]) -> np.ndarray:
    """64-bit FNV-1a of each string's UTF-8 bytes (uint64), vectorized over the Arrow buffer:
    one numpy pass per byte position, over the strings at least that long."""
    arr = pa.array(values, pa.string()) if isinstance(values, list) else values
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    n = len(arr)
    h = np.full(n, _FNV_OFFSET, dtype=np.uint64)
    if n == 0:
        return h
    offsets, data = binary_buffers(arr)
    starts = offsets[:-1]
    lengths = np.diff(offsets)
    prime = np.uint64(_FNV_PRIME)
    width = int(lengths[0])
    if (lengths == width).all() and data.size >= int(starts[0]) + n * width:
        # every string has the same length (hex uids): a strided [n, width] view, by column
        rows = data[int(starts[0]) : int(starts[0]) + n * width].reshape(n, width)
        for j in range(width):
            h ^= rows[:, j]
            h *= prime
        return h
    order = np.argsort(-lengths, kind="stable")  # longest first: the active rows are a prefix
    sorted_len = lengths[order]
    sorted_start = starts[order]
    hs = h[order]
    for j in range(int(sorted_len[0])):
        k = int(np.searchsorted(-sorted_len, -j, side="left"))
        hs[:k] ^= data[sorted_start[:k] + j]
        hs[:k] *= prime
    h[order] = hs
    return h


def mix64(x: int) -> int:
    """splitmix64's finalizer on a Python int (the scalar twin of `mix64_np`)."""
    x &= _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def mix64_np(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer, elementwise (a new uint64 array)."""
    x = np.array(x, dtype=np.uint64)  # a copy: mixed in place below
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return x


class ShardInfo(StrictModel):
    """One WebDataset tar of a dataset, as listed in its manifest."""

    path: str = Field(description="shard path relative to the manifest's folder")
    num_samples: int = Field(ge=0)
    bytes: int = Field(ge=0)
    sha256: str


class SidecarFile(StrictModel):
    """A file beside the manifest that is part of the dataset (not a shard)."""

    path: str = Field(description="path relative to the manifest's folder")
    bytes: int = Field(ge=0)
    sha256: str


class BalanceSidecars(StrictModel):
    """What online balancing (training's `data.balance`) reads beside a manifest: written
    by curation when its plan has a `metaclip_balance` stage (`kiln.balancing` names the
    files and their columns)."""

    t: int | None = Field(
        description="t the dataset was balanced with (null: the matched set, not balanced)"
    )
    seed: int = Field(description="seed of curation's balancing draws")
    entries_sha256: str = Field(description="sha256 of the entries file the entry ids index")
    entry_counts: SidecarFile
    sample_entries: SidecarFile


class DatasetManifest(StrictModel):
    """`manifest.json` beside the shards: what the loader reads instead of globbing."""

    format_version: int = 1
    name: str = ""
    num_samples: int = Field(ge=0)
    shards: list[ShardInfo]
    recipe: dict[str, Any] = Field(default_factory=dict)
    recipe_hash: str = ""
    inputs: list[str] = Field(default_factory=list)
    stats: dict[str, Any] = Field(default_factory=dict)
    extra: dict[str, Any] = Field(default_factory=dict)
    balance: BalanceSidecars | None = Field(
        default=None, description="entry counts and per-sample entries for online balancing"
    )

    def shard_url(self, root: str, shard: ShardInfo) -> str:
        """Absolute URL of `shard` given the folder holding the manifest."""
        return root.rstrip("/") + "/" + shard.path


def _manifest_url(dataset_dir: str) -> str:
    return (
        dataset_dir
        if dataset_dir.endswith(".json")
        else dataset_dir.rstrip("/") + "/" + MANIFEST_NAME
    )


def require_file(url: str, missing: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path) of `url`; FileNotFoundError with the message `missing` (which
    should name the URL and the fix) when there is nothing there."""
    fs, path = fsspec.core.url_to_fs(url)
    if not fs.exists(path):
        raise FileNotFoundError(missing)
    return fs, path


def read_manifest(dataset_dir: str) -> DatasetManifest:
    """Read `{dataset_dir}/manifest.json` (or a path to the json itself); errors name the path."""
    url = _manifest_url(dataset_dir)
    fs, path = require_file(
        url,
        f"no dataset manifest at {url!r}: point at a folder written by `kiln curate` "
        f"(it holds {MANIFEST_NAME} and shards/)",
    )
    with fs.open(path, "rt") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{url!r} is not valid JSON: {e}") from e
    manifest = DatasetManifest.model_validate(data)
    total = sum(s.num_samples for s in manifest.shards)
    if total != manifest.num_samples:
        raise ValueError(
            f"{url!r} is inconsistent: num_samples={manifest.num_samples} but shards sum to {total}"
        )
    return manifest


def write_manifest(dataset_dir: str, manifest: DatasetManifest) -> str:
    """Write the manifest atomically (temp file + rename); returns its URL."""
    from kiln.storage import atomic_write

    url = _manifest_url(dataset_dir)
    text = json.dumps(manifest.model_dump(mode="json"), indent=2, sort_keys=True) + "\n"
    atomic_write(url, text.encode())
    return url
