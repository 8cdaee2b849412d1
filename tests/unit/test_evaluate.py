"""Evaluation: recall@k arithmetic, the weights file, zero-shot and retrieval on tiny sets.

The eval sets are generated here in kiln's shard layout (manifest.json + shards/*.tar with
jpg/txt/json members + zero_shot.json). Zero-shot is checked two ways: a tiny CLIP trained
in the test for 40 steps on a trivially separable colour task must score 100%, and an
untrained model's numbers must equal an independent computation of the same definition.
"""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from kiln.contracts import DatasetManifest, ShardInfo, sha256_hex, write_manifest
from kiln.data_curation.synthetic import COLORS as SYNTHETIC_COLORS
from kiln.models.build import build_model
from kiln.models.clip import CLIP
from kiln.models.config import ModelConfig
from kiln.models.tokenizer import tokenize
from kiln.platform.summary import format_eval
from kiln.training.config import EvalConfig
from kiln.training.evaluate import (
    evaluate,
    iter_samples,
    knn_accuracy,
    linear_probe_accuracy,
    load_model_file,
    recall_at_k,
    retrieval,
    save_model_file,
    zero_shot,
)
from kiln.training.transforms import decode_rgb, image_to_tensor
from tests.helpers_training import clip_loss_of, tiny_flavor

COLORS = {k: SYNTHETIC_COLORS[k] for k in ("red", "green", "blue", "yellow", "black", "white")}
NAMES = list(COLORS)
TEMPLATES = ["a photo of a {} shape.", "a {} thing."]
CFG = ModelConfig(
    image_size=16,
    patch_size=8,
    vision_width=32,
    vision_layers=1,
    vision_heads=2,
    text_width=32,
    text_layers=1,
    text_heads=2,
    context_length=32,
    embed_dim=32,
)
SIZES = {"image_size": CFG.image_size, "context_length": CFG.context_length, "batch_size": 5}


# --------------------------------------------------------------------------- fixtures


def _jpg(rgb: tuple[int, int, int], rng: np.random.Generator) -> bytes:
    noise = rng.integers(-20, 21, (16, 16, 3))
    arr = np.clip(np.asarray(rgb)[None, None, :] + noise, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@dataclass
class _Sample:
    uid: str
    members: dict[str, bytes] = field(default_factory=dict)


def _sample(uid: str, image: bytes | None, text: str, labels: dict[str, str]) -> _Sample:
    s = _Sample(uid)
    if image is not None:
        s.members["jpg"] = image
    s.members["txt"] = text.encode()
    s.members["json"] = json.dumps({"uid": uid, "labels": labels}).encode()
    return s


def _write_set(root: Path, samples: list[_Sample], per_shard: int, tasks: Any = None) -> str:
    (root / "shards").mkdir(parents=True)
    shards = []
    for index in range(0, len(samples), per_shard):
        rel = f"shards/{index // per_shard:06d}.tar"
        chunk = samples[index : index + per_shard]
        with tarfile.open(root / rel, "w", format=tarfile.USTAR_FORMAT) as tar:
            for s in chunk:
                for ext, data in s.members.items():
                    info = tarfile.TarInfo(f"{s.uid}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        data = (root / rel).read_bytes()
        shards.append(
            ShardInfo(path=rel, num_samples=len(chunk), bytes=len(data), sha256=sha256_hex(data))
        )
    write_manifest(str(root), DatasetManifest(num_samples=len(samples), shards=shards))
    if tasks is not None:
        (root / "zero_shot.json").write_text(json.dumps({"tasks": tasks}))
    return str(root)


COLOR_TASK = {"name": "color", "label_key": "color", "classnames": NAMES, "templates": TEMPLATES}
TONE_TASK = {
    "name": "tone",
    "label_key": "tone",
    "classnames": ["dark", "light"],
    "templates": ["a {} picture."],
}


@pytest.fixture(scope="module")
def eval_set(tmp_path_factory: pytest.TempPathFactory) -> str:
    """4 samples per colour over 3 shards, plus three unusable or unlabelled samples."""
    rng = np.random.default_rng(1)
    samples = []
    for i in range(4):
        for name in NAMES:
            labels = {"color": name}
            if name in ("black", "white"):
                labels["tone"] = "dark" if name == "black" else "light"
            samples.append(
                _sample(f"{name}{i}", _jpg(COLORS[name], rng), f"a {name} thing.", labels)
            )
    samples.append(_sample("broken", b"\xff\xd8 not really a jpeg", "x", {"color": "red"}))
    samples.append(_sample("noimage", None, "y", {"color": "red"}))
    samples.append(_sample("purple", _jpg((140, 40, 180), rng), "z", {"color": "purple"}))
    root = tmp_path_factory.mktemp("zs")
    return _write_set(root, samples, per_shard=10, tasks=[COLOR_TASK, TONE_TASK])


@pytest.fixture(scope="module")
def trained() -> CLIP:
    """A tiny CLIP trained for 40 Adam steps to match solid colours with their names."""
    rng = np.random.default_rng(0)
    pool = {
        name: [
            image_to_tensor(decode_rgb(_jpg(rgb, rng)), 16, augment=False, rng=None)
            for _ in range(4)
        ]
        for name, rgb in COLORS.items()
    }
    torch.manual_seed(0)
    model = build_model(CFG)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(40):
        images = torch.stack([pool[name][step % 4] for name in NAMES])
        tokens = tokenize([TEMPLATES[step % 2].format(n) for n in NAMES], CFG.context_length)
        loss = clip_loss_of(model(images, tokens))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1
    return model.eval()


def _untrained() -> CLIP:
    torch.manual_seed(123)
    return build_model(CFG).eval()


# --------------------------------------------------------------------------- recall@k


def test_recall_at_k_handcrafted() -> None:
    sim = torch.tensor([[0.9, 0.1, 0.3], [0.2, 0.5, 0.8], [0.4, 0.4, 0.1]])
    # Ranks of the correct column: row 0 -> 0, row 1 -> 1 (0.8 beats 0.5), row 2 -> 2.
    assert recall_at_k(sim, [0, 1, 2], [1, 2, 3]) == {
        "recall@1": pytest.approx(1 / 3),
        "recall@2": pytest.approx(2 / 3),
        "recall@3": 1.0,
    }
    # Transposed (text -> image): column 0 -> rank 0, column 1 -> rank 0 (0.5 beats 0.1 and
    # 0.4), column 2 -> rank 2 (its 0.1 is beaten by 0.3 and 0.8).
    assert recall_at_k(sim.T, torch.tensor([0, 1, 2]), [1, 2, 3]) == {
        "recall@1": pytest.approx(2 / 3),
        "recall@2": pytest.approx(2 / 3),
        "recall@3": 1.0,
    }
    assert recall_at_k(sim.T, [0, 1, 2], [1]) == recall_at_k(sim.T, torch.arange(3), [1])


def test_recall_at_k_ties_count_against_the_model() -> None:
    assert recall_at_k(torch.ones(4, 4), [0, 1, 2, 3], [1, 3, 4]) == {
        "recall@1": 0.0,
        "recall@3": 0.0,
        "recall@4": 1.0,
    }
    tie = torch.tensor([[0.4, 0.4, 0.0]])
    assert recall_at_k(tie, [0], [1, 2]) == {"recall@1": 0.0, "recall@2": 1.0}


def test_recall_at_k_several_correct_candidates() -> None:
    sim = torch.tensor([[0.1, 0.9, 0.5, 0.7], [0.8, 0.2, 0.6, 0.3]])
    # Row 0: correct {0, 2}; best correct 0.5, beaten by 0.9 and 0.7 -> rank 2.
    # Row 1: correct {1, 3}; best correct 0.3, beaten by 0.8 and 0.6 -> rank 2.
    assert recall_at_k(sim, [[0, 2], [1, 3]], [2, 3]) == {"recall@2": 0.0, "recall@3": 1.0}
    assert recall_at_k(sim, [[1, 2], [0]], [1]) == {"recall@1": 1.0}


def test_recall_at_k_rejects_bad_ground_truth() -> None:
    with pytest.raises(ValueError, match="2 ground-truth entries for 3"):
        recall_at_k(torch.zeros(3, 3), [0, 1], [1])
    with pytest.raises(ValueError, match=r"gt\[1\]=5"):
        recall_at_k(torch.zeros(2, 3), [0, 5], [1])


# --------------------------------------------------------------------------- weights file


def test_save_load_round_trip(tmp_path: Path) -> None:
    model = _untrained()
    path = tmp_path / "checkpoints" / "step-7" / "model.pt"
    assert save_model_file(str(path), model, CFG, step=7) == str(path)
    assert [p.name for p in path.parent.iterdir()] == ["model.pt"]  # no temp file left

    loaded, cfg, step = load_model_file(str(path))
    assert cfg == CFG and step == 7 and not loaded.training
    images = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    tokens = tokenize(["red", "green", "blue"], CFG.context_length)
    with torch.no_grad():
        ours, theirs = model(images, tokens), loaded(images, tokens)
        assert ours.keys() == theirs.keys()
        for key, value in ours.items():
            assert torch.equal(value, theirs[key]), key

    # A state dict works too (what a ZeRO-3 run consolidates), and overwriting is atomic.
    save_model_file(str(path), model.state_dict(), CFG, step=9)
    assert load_model_file(str(path))[2] == 9
    payload = torch.load(path, weights_only=True)
    assert set(payload) == {"model_config", "state_dict", "step"}
    assert all(t.dtype == torch.float32 for t in payload["state_dict"].values())


def test_load_model_file_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"model\.pt"):
        load_model_file(str(tmp_path / "model.pt"))
    torch.save({"state_dict": {}}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=r"missing keys \['model_config', 'step'\]"):
        load_model_file(str(tmp_path / "bad.pt"))


def test_truncated_weights_files_get_a_clear_error(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    model = build_model(CFG)
    good = save_model_file(str(tmp_path / "model.pt"), model, CFG, step=3)
    data = Path(good).read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cut\.pt.* truncated or damaged"):
        load_model_file(str(tmp_path / "cut.pt"))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "m.st")
    data = (tmp_path / "m.st").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cut\.safetensors.* truncated or damaged"):
        load_model_file(str(tmp_path / "cut.safetensors"))


# --------------------------------------------------------------------------- zero-shot


def test_zero_shot_trained_model_is_perfect(eval_set: str, trained: CLIP) -> None:
    result = zero_shot(trained, eval_set, **SIZES)
    color = result["color"]
    assert color["top1"] == 1.0 and color["top5"] == 1.0
    assert color["num_classes"] == 6 and color["num_samples"] == 24
    assert color["chance"] == pytest.approx(1 / 6)
    assert color["per_class"] == dict.fromkeys(NAMES, 1.0)
    assert color["skipped"] == {"bad_image": 1, "missing_image": 1, "unknown_label": 1}
    tone = result["tone"]
    assert tone["num_samples"] == 8 and "top5" not in tone and tone["chance"] == 0.5
    assert tone["skipped"] == {"bad_image": 1, "missing_image": 1, "missing_label": 17}


def test_zero_shot_matches_an_independent_computation(eval_set: str) -> None:
    """An untrained model's per-class accuracy equals the definition computed by hand."""
    model = _untrained()
    got = zero_shot(model, eval_set, **SIZES)["color"]

    images, labels = [], []
    for _, _, members in iter_samples(eval_set):
        meta = json.loads(members["json"])
        if "jpg" not in members or meta["labels"]["color"] not in NAMES:
            continue
        try:
            img = decode_rgb(members["jpg"])
        except ValueError:
            continue
        images.append(image_to_tensor(img, 16, augment=False, rng=None))
        labels.append(NAMES.index(meta["labels"]["color"]))
    with torch.no_grad():
        emb = model.encode_image(torch.stack(images))
        classes = []
        for name in NAMES:
            t = model.encode_text(tokenize([t.format(name) for t in TEMPLATES], 32)).mean(0)
            classes.append(t / t.norm())
        pred = (emb @ torch.stack(classes).T).argmax(dim=1)
    target = torch.tensor(labels)
    assert got["top1"] == pytest.approx((pred == target).float().mean().item())
    for i, name in enumerate(NAMES):
        mask = target == i
        assert got["per_class"][name] == pytest.approx((pred[mask] == i).float().mean().item())
    assert got["top1"] < 1.0  # untrained: the trained model's 100% is not a given


def test_zero_shot_spec_errors_name_the_file(tmp_path: Path) -> None:
    bad_task = dict(COLOR_TASK, templates=["no slot here"])
    root = _write_set(
        tmp_path / "bad",
        [_sample("a", _jpg((0, 0, 0), np.random.default_rng(0)), "t", {"color": "red"})],
        per_shard=1,
        tasks=[bad_task],
    )
    with pytest.raises(ValueError, match=r"(?s)zero_shot.json.*no '\{\}' slot"):
        zero_shot(_untrained(), root, **SIZES)
    (tmp_path / "bad" / "zero_shot.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"zero_shot\.json"):
        zero_shot(_untrained(), root, **SIZES)


# --------------------------------------------------------------------------- retrieval


def _retrieval_set(root: Path, shift: int) -> str:
    rng = np.random.default_rng(2)
    samples = [
        _sample(f"s{i}", _jpg(COLORS[name], rng), f"a {NAMES[(i + shift) % 6]} thing.", {})
        for i, name in enumerate(NAMES)
    ]
    return _write_set(root, samples, per_shard=4)


def test_retrieval_pairs_each_image_with_its_caption(tmp_path: Path, trained: CLIP) -> None:
    matched = retrieval(trained, _retrieval_set(tmp_path / "ok", 0), [1, 5], **SIZES)
    assert matched["num_samples"] == 6 and matched["skipped"] == {}
    assert matched["image_to_text"] == {"recall@1": 1.0, "recall@5": 1.0}
    assert matched["text_to_image"] == {"recall@1": 1.0, "recall@5": 1.0}
    # Captions shifted by one sample: every top-1 now points at the wrong pair.
    shifted = retrieval(trained, _retrieval_set(tmp_path / "shift", 1), [1], **SIZES)
    assert shifted["image_to_text"] == {"recall@1": 0.0}
    assert shifted["text_to_image"] == {"recall@1": 0.0}
    assert trained.training is False


def test_retrieval_reads_a_real_shard(tmp_path: Path, shared_data: Path) -> None:
    """A WebDataset shard written by other tooling (cc12m, 32 web photos) reads cleanly."""
    src = shared_data / "cc12m_wds_shard" / "cc12m-train-0000.tar"
    with tarfile.open(src) as tar:
        keys = {m.name.split(".")[0] for m in tar.getmembers() if m.name.endswith(".jpg")}
    (tmp_path / "shards").mkdir()
    shutil.copy(src, tmp_path / "shards" / "000000.tar")
    data = (tmp_path / "shards" / "000000.tar").read_bytes()
    shard = ShardInfo(
        path="shards/000000.tar", num_samples=len(keys), bytes=len(data), sha256=sha256_hex(data)
    )
    write_manifest(str(tmp_path), DatasetManifest(num_samples=len(keys), shards=[shard]))
    result = retrieval(_untrained(), str(tmp_path), [1, 10], **SIZES)
    assert result["num_samples"] == len(keys) > 20 and result["skipped"] == {}
    assert 0.0 <= result["image_to_text"]["recall@1"] <= result["image_to_text"]["recall@10"]


# --------------------------------------------------------------------------- evaluate()


def test_evaluate_writes_the_report(tmp_path: Path, eval_set: str, trained: CLIP) -> None:
    model_file = str(tmp_path / "model.pt")
    save_model_file(model_file, trained, CFG, step=40)
    cfg = EvalConfig(zero_shot=eval_set, retrieval=eval_set, recall_k=[1, 5], batch_size=7)
    out = tmp_path / "eval" / "results.json"
    report = evaluate(model_file, cfg, str(out))
    assert json.loads(out.read_text()) == report
    assert report["step"] == 40
    assert report["zero_shot"]["color"]["top1"] == 1.0
    # Four identical-colour captions per colour tie, and ties count against the model.
    assert report["retrieval"]["num_samples"] == 25
    assert report["retrieval"]["image_to_text"]["recall@1"] < 1.0
    with pytest.raises(ValueError, match=r"eval\.zero_shot and eval\.retrieval are both unset"):
        evaluate(model_file, EvalConfig(), None)


# --------------------------------------------------------------------------- other families


def test_knn_and_linear_probe_on_separable_and_random_labels() -> None:
    gen = torch.Generator().manual_seed(0)
    centers = torch.nn.functional.normalize(torch.randn(4, 8, generator=gen), dim=-1)
    targets = torch.arange(80) % 4
    feats = torch.nn.functional.normalize(
        centers[targets] + 0.05 * torch.randn(80, 8, generator=gen), dim=-1
    )
    assert knn_accuracy(feats, targets, k=5, classes=4) == 1.0
    assert linear_probe_accuracy(feats, targets, classes=4) == 1.0
    shuffled = targets[torch.randperm(80, generator=gen)]
    assert knn_accuracy(feats, shuffled, k=5, classes=4) < 0.6
    assert linear_probe_accuracy(feats, shuffled, classes=4) < 0.6


def test_evaluate_image_only_and_captioning_models(tmp_path: Path, eval_set: str) -> None:
    """MAE: probe accuracies, no retrieval (noted); CoCa: zero-shot, retrieval, captions."""
    cfg = EvalConfig(zero_shot=eval_set, retrieval=eval_set, batch_size=8)
    for arch in ("mae", "coca"):
        mcfg = ModelConfig.model_validate(tiny_flavor(arch))
        torch.manual_seed(0)
        path = save_model_file(str(tmp_path / f"{arch}.pt"), build_model(mcfg), mcfg, step=1)
        report = evaluate(path, cfg)
        assert report["arch"] == arch
        if arch == "mae":
            color = report["probe"]["color"]
            assert 0 <= color["knn_top1"] <= 1 and 0 <= color["linear_probe_top1"] <= 1
            assert color["num_samples"] == 24 and "retrieval" not in report
            assert "no text tower" in report["retrieval_skipped"]
        else:
            assert set(report) >= {"zero_shot", "retrieval", "captions"}
            first = report["captions"][0]
            assert first["reference"] and isinstance(first["greedy"], str)
            assert isinstance(first["beam"], str)
        assert format_eval(report).count("\n") >= 3


def test_model_file_of_an_older_kiln_loads(tmp_path: Path) -> None:
    """Weights files written before flavors carry the flat model config: still loadable."""
    flat = {
        "arch": "clip",
        "image_size": 16,
        "patch_size": 8,
        "vision_width": 32,
        "vision_layers": 1,
        "vision_heads": 2,
        "text_width": 32,
        "text_layers": 1,
        "text_heads": 2,
        "context_length": 32,
        "embed_dim": 32,
        "init_logit_scale": 2.6593,
    }
    model = _untrained()
    path = tmp_path / "old.pt"
    state = {k: v.clone() for k, v in model.state_dict().items()}
    torch.save({"model_config": flat, "state_dict": state, "step": 3}, path)
    loaded, cfg, step = load_model_file(str(path))
    assert cfg == CFG and step == 3
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in state.items())
