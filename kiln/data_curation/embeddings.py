"""Embedding columns: the one place that reads, checks and writes them.

Embeddings travel as Arrow fixed-size lists of float32 (`image_embedding`,
`text_embedding`: one vector per row, null on rows that have none), L2-normalized, with the
model that made them in the field's metadata (`kiln.model`). `read_embeddings` turns a
column into a float32 matrix and says which rows are usable: a null, a NaN or infinite
value, a zero vector or (in a variable-length list column) a vector of the wrong length is
a bad row, which the calling stage drops as `bad_embedding` (counted, not lost). A column of
the wrong type or fixed size is an error naming it, since every row would be bad.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

__all__ = [
    "BAD_EMBEDDING",
    "IMAGE_EMBEDDING",
    "MODEL_METADATA_KEY",
    "TEXT_EMBEDDING",
    "embedding_array",
    "embedding_field",
    "l2_normalize",
    "read_embeddings",
]

IMAGE_EMBEDDING = "image_embedding"
TEXT_EMBEDDING = "text_embedding"
#: Drop reason for a row whose embedding cannot be used (registered by the stages).
BAD_EMBEDDING = "bad_embedding"
#: Field metadata key holding the sha256 of the checkpoint that made the embeddings.
MODEL_METADATA_KEY = b"kiln.model"


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows of `x` scaled to unit L2 norm (float32; a zero row stays zero). Row by row, so
    a row's result does not depend on its batch; rows already of unit norm (to 1e-6) are
    left as they are, so normalizing twice changes nothing (and costs no copy)."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.sqrt(np.einsum("ij,ij->i", x, x))
    norms[(np.abs(norms - 1.0) <= 1e-6) | (norms == 0)] = 1.0
    if (norms == 1.0).all():
        return x
    return x / norms[:, None]


def embedding_array(x: np.ndarray, valid: np.ndarray | None = None) -> pa.FixedSizeListArray:
    """A fixed-size list<float32> array of the rows of `x` ([n, d]); null where not `valid`."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"embeddings must be a [rows, dim] matrix, got shape {x.shape}")
    values = pa.array(x.reshape(-1), type=pa.float32())
    mask = None if valid is None else pa.array(~np.asarray(valid, dtype=bool))
    return pa.FixedSizeListArray.from_arrays(values, x.shape[1], mask=mask)


def embedding_field(name: str, dim: int, model_sha256: str | None) -> pa.Field:
    """The schema field of an embedding column, carrying the model hash when there is one."""
    meta = {MODEL_METADATA_KEY: model_sha256.encode()} if model_sha256 else None
    return pa.field(name, pa.list_(pa.float32(), dim), metadata=meta)


def read_embeddings(
    table: pa.Table, column: str, dim: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(`[rows, d]` float32 matrix, bool mask of usable rows) of the embedding `column`.

    Bad rows (null, non-finite, all zero, wrong length) get a zero vector and False in the
    mask. Without bad rows the matrix is a read-only view of the Arrow buffer (no copy). `dim`, when given, is the dimension every vector must have. The column may be a
    fixed-size or variable-length list of floats (DataComp's parquet files hold either).
    """
    if column not in table.column_names:
        raise ValueError(
            f"no column {column!r}: run the embed stage before this one (or name the "
            "precomputed embedding column in the embed stage's precomputed settings)"
        )
    arr = table.column(column).combine_chunks()
    kind = arr.type
    n = len(arr)
    if pa.types.is_fixed_size_list(kind):
        width = kind.list_size
        if dim is not None and width != dim:
            raise ValueError(
                f"column {column!r} holds {width}-dimensional vectors, expected {dim}: the "
                "embeddings come from another model than the one configured (set dim to "
                f"{width} or recompute the embeddings)"
            )
        if not (pa.types.is_floating(kind.value_type) or pa.types.is_integer(kind.value_type)):
            raise ValueError(f"column {column!r} has type {kind}: expected a list of floats")
        flat = arr.flatten()  # the values of the non-null rows, in order
        values = np.asarray(flat.to_numpy(zero_copy_only=False), dtype=np.float32)
        if arr.null_count == 0:
            x = values.reshape(n, width)  # no copy
            valid = np.ones(n, dtype=bool)
        else:
            x = np.zeros((n, width), dtype=np.float32)
            valid = ~np.asarray(arr.is_null().to_numpy(zero_copy_only=False), dtype=bool)
            x[valid] = values.reshape(-1, width)
    elif pa.types.is_list(kind) or pa.types.is_large_list(kind):
        if not (pa.types.is_floating(kind.value_type) or pa.types.is_integer(kind.value_type)):
            raise ValueError(f"column {column!r} has type {kind}: expected a list of floats")
        lengths = pc.list_value_length(arr).fill_null(-1).to_numpy(zero_copy_only=False)
        lengths = np.asarray(lengths, dtype=np.int64)
        width = dim if dim is not None else int(np.max(lengths[lengths > 0], initial=0))
        valid = lengths == width
        x = np.zeros((n, max(width, 0)), dtype=np.float32)
        if valid.any() and width > 0:
            good = arr.filter(pa.array(valid))
            x[valid] = np.asarray(
                pc.list_flatten(good).to_numpy(zero_copy_only=False), dtype=np.float32
            ).reshape(-1, width)
    else:
        raise ValueError(
            f"column {column!r} has type {kind}: expected a fixed-size list of float32 (what "
            "the embed stage writes) or a list of floats"
        )
    with np.errstate(over="ignore", invalid="ignore"):
        sq = np.einsum("ij,ij->i", x, x) if x.shape[1] else np.zeros(n, dtype=np.float32)
    valid = valid & np.isfinite(sq) & (sq > 0)  # one pass: NaN/inf make sq non-finite
    if not valid.all():
        x = np.array(x)  # writable copy
        x[~valid] = 0.0
    return x, valid
