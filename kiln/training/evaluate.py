"""Evaluation of a trained model, by what its family can do.

- image-text models (CLIP, SigLIP, CoCa): zero-shot classification and image-text
  retrieval from the contrastive embeddings; CoCa also captions a few eval images
  (greedy and beam search) next to their reference captions;
- image-only models (MAE): kNN (leave-one-out) and linear-probe accuracy of the image
  features on the labelled eval set's tasks (`probe`).

The model comes from a weights file (``checkpoints/{tag}/model.pt`` or a ``.safetensors``
export), so evaluation needs neither DeepSpeed nor its sharded optimizer files: its format,
`save_model_file`, `read_model_file` and `load_model_file` live in `kiln.models.weights`
(shared with curation's embed stage) and are re-exported here; `kiln.training.export`
rebuilds the weights of a checkpoint without ``model.pt`` from DeepSpeed's files.

Eval sets are kiln datasets: ``manifest.json`` + ``shards/*.tar`` with ``{uid}.jpg``,
``{uid}.txt``, ``{uid}.json`` members. A zero-shot set adds ``zero_shot.json``::

    {"tasks": [{"name": "color", "label_key": "color", "classnames": ["red", ...],
                "templates": ["a photo of a {} shape.", ...]}]}

and each sample's json holds ``{"labels": {"color": "red", ...}}``. Shards are read member
by member through fsspec (any URL), grouped by key the way webdataset does
(`kiln.storage.tar_samples`).
Samples that cannot be used are counted by reason (``skipped``), never silently lost.
"""

from __future__ import annotations

import json
import os
import posixpath
import tarfile
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import fsspec
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn

from kiln import storage
from kiln.contracts import read_manifest, require_file
from kiln.models.tokenizer import decode, tokenize
from kiln.models.weights import load_model_file, read_model_file, save_model_file
from kiln.training.config import EvalConfig
from kiln.training.transforms import decode_rgb, image_to_tensor

#: A model with ``encode_image`` (and ``encode_text`` for image-text families, ``generate``
#: for CoCa); typed loosely because each family is its own nn.Module.
EvalModel = Any

__all__ = [
    "ZERO_SHOT_NAME",
    "ZeroShotSpec",
    "ZeroShotTask",
    "caption_samples",
    "check_eval_sets",
    "evaluate",
    "iter_samples",
    "knn_accuracy",
    "linear_probe_accuracy",
    "load_model_file",
    "probe",
    "read_model_file",
    "recall_at_k",
    "retrieval",
    "save_model_file",
    "zero_shot",
    "zero_shot_classifier",
]

ZERO_SHOT_NAME = "zero_shot.json"
_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


# --------------------------------------------------------------------------- reading sets


class ZeroShotTask(BaseModel):
    """One classification task of ``zero_shot.json``."""

    model_config = ConfigDict(extra="ignore")

    name: str
    label_key: str = Field(description="key in each sample's json 'labels' object")
    classnames: list[str] = Field(min_length=2)
    templates: list[str] = Field(min_length=1)

    @field_validator("templates")
    @classmethod
    def _has_slot(cls, templates: list[str]) -> list[str]:
        for t in templates:
            if "{}" not in t:
                raise ValueError(f"template {t!r} has no '{{}}' slot for the class name")
        return templates

    @field_validator("classnames")
    @classmethod
    def _unique(cls, names: list[str]) -> list[str]:
        dup = sorted(n for n, c in Counter(names).items() if c > 1)
        if dup:
            raise ValueError(f"classnames repeat {dup}: each class must be listed once")
        return names


class ZeroShotSpec(BaseModel):
    """The whole ``zero_shot.json``."""

    model_config = ConfigDict(extra="ignore")

    tasks: list[ZeroShotTask] = Field(min_length=1)


def _read_zero_shot_spec(eval_dir: str) -> ZeroShotSpec:
    url = eval_dir.rstrip("/") + "/" + ZERO_SHOT_NAME
    fs, path = require_file(
        url,
        f"no {ZERO_SHOT_NAME} at {url!r}: a zero-shot eval set needs it beside "
        "manifest.json (tasks with name, label_key, classnames, templates)",
    )
    with fs.open(path, "rt") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{url!r} is not valid JSON: {e}") from e
    try:
        return ZeroShotSpec.model_validate(data)
    except Exception as e:
        raise ValueError(f"{url!r} is not a valid zero-shot spec: {e}") from e


def iter_samples(dataset_dir: str) -> Iterator[tuple[str, str, dict[str, bytes]]]:
    """``(shard url, key, {ext: bytes})`` for every sample of the manifest's shards, in
    order (extensions lower-cased: ``.JPG`` is an image too)."""
    manifest = read_manifest(dataset_dir)
    for shard in manifest.shards:
        url = manifest.shard_url(dataset_dir, shard)
        samples = storage.tar_samples(url)
        while True:
            try:
                _, key, members = next(samples)
            except StopIteration:
                break
            except (tarfile.TarError, OSError) as e:
                raise ValueError(f"cannot read shard {url!r} listed in the manifest: {e}") from e
            yield url, key, {ext.lower(): data for ext, data in members.items()}


def image_member(members: Mapping[str, bytes]) -> bytes | None:
    """The encoded image of a sample's members (the first of jpg, jpeg, png, webp)."""
    for ext in _IMAGE_EXTS:
        if ext in members:
            return members[ext]
    return None


@dataclass
class _Embedded:
    """Per-sample outputs of one pass over a dataset."""

    image: torch.Tensor
    text: torch.Tensor | None
    meta: list[dict[str, Any]]
    skipped: Counter[str]


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def _encode_texts(
    model: EvalModel, texts: Sequence[str], context_length: int, batch_size: int
) -> torch.Tensor:
    device = _model_device(model)
    chunks = [
        model.encode_text(tokenize(texts[i : i + batch_size], context_length).to(device)).float()
        for i in range(0, len(texts), batch_size)
    ]
    return torch.cat(chunks).cpu()


@torch.no_grad()
def _embed_dataset(
    model: EvalModel,
    dataset_dir: str,
    *,
    image_size: int,
    context_length: int,
    batch_size: int,
    with_text: bool,
    with_meta: bool,
) -> _Embedded:
    """Image (and caption) embeddings of every usable sample, in dataset order."""
    device = _model_device(model)
    images: list[torch.Tensor] = []
    texts: list[str] = []
    metas: list[dict[str, Any]] = []
    out_img: list[torch.Tensor] = []
    skipped: Counter[str] = Counter()

    def flush() -> None:
        if images:
            out_img.append(model.encode_image(torch.stack(images).to(device)).float().cpu())
            images.clear()

    for _url, key, members in iter_samples(dataset_dir):
        data = image_member(members)
        if data is None:
            skipped["missing_image"] += 1
            continue
        if with_text and "txt" not in members:
            skipped["missing_text"] += 1
            continue
        meta: dict[str, Any] = {}
        if with_meta:
            try:
                meta = json.loads(members["json"]) if "json" in members else {}
            except (json.JSONDecodeError, UnicodeDecodeError):
                skipped["bad_json"] += 1
                continue
            if not isinstance(meta, dict):
                skipped["bad_json"] += 1
                continue
        try:
            pixels = image_to_tensor(decode_rgb(data), image_size, augment=False, rng=None)
        except ValueError:
            skipped["bad_image"] += 1
            continue
        meta.setdefault("uid", key)
        images.append(pixels)
        metas.append(meta)
        if with_text:
            texts.append(members["txt"].decode("utf-8", errors="replace").strip())
        if len(images) == batch_size:
            flush()
    flush()
    if not metas:
        raise ValueError(
            f"dataset {dataset_dir!r} has no usable samples (skipped: {dict(skipped)}): "
            "check that its shards hold image + txt members"
        )
    text_emb = _encode_texts(model, texts, context_length, batch_size) if with_text else None
    return _Embedded(torch.cat(out_img), text_emb, metas, skipped)


class _EvalMode:
    """Put a model in eval mode for a block and restore its previous mode after."""

    def __init__(self, model: nn.Module):
        self.model, self.was_training = model, model.training

    def __enter__(self) -> None:
        self.model.eval()

    def __exit__(self, *exc: object) -> None:
        self.model.train(self.was_training)


# --------------------------------------------------------------------------- zero-shot


@torch.no_grad()
def zero_shot_classifier(
    model: EvalModel, task: ZeroShotTask, *, context_length: int, batch_size: int
) -> torch.Tensor:
    """``[num_classes, D]``: per class, the renormalized mean of its template embeddings."""
    prompts = [t.format(c) for c in task.classnames for t in task.templates]
    emb = _encode_texts(model, prompts, context_length, batch_size)
    emb = emb.reshape(len(task.classnames), len(task.templates), -1).mean(dim=1)
    return torch.nn.functional.normalize(emb, dim=-1)


def zero_shot(
    model: EvalModel, eval_dir: str, *, image_size: int, context_length: int, batch_size: int
) -> dict[str, Any]:
    """Zero-shot accuracy per task of ``{eval_dir}/zero_shot.json``.

    Returns ``{task name: {"top1", "top5" (when more than 5 classes), "chance",
    "num_classes", "num_samples", "per_class": {class: accuracy or None}, "skipped":
    {reason: count}}}``. Samples whose label is missing or not a listed class are counted
    in ``skipped`` and left out of the accuracy.
    """
    spec = _read_zero_shot_spec(eval_dir)
    with _EvalMode(model):
        data = _embed_dataset(
            model,
            eval_dir,
            image_size=image_size,
            context_length=context_length,
            batch_size=batch_size,
            with_text=False,
            with_meta=True,
        )
        results: dict[str, Any] = {}
        for task in spec.tasks:
            classifier = zero_shot_classifier(
                model, task, context_length=context_length, batch_size=batch_size
            )
            results[task.name] = _score_task(task, classifier, data)
    return results


def _score_task(task: ZeroShotTask, classifier: torch.Tensor, data: _Embedded) -> dict[str, Any]:
    index = {c: i for i, c in enumerate(task.classnames)}
    skipped = Counter(data.skipped)
    rows, targets = [], []
    for row, meta in enumerate(data.meta):
        labels = meta.get("labels")
        label = labels.get(task.label_key) if isinstance(labels, dict) else None
        if label is None:
            skipped["missing_label"] += 1
        elif label not in index:
            skipped["unknown_label"] += 1
        else:
            rows.append(row)
            targets.append(index[label])
    k = len(task.classnames)
    result: dict[str, Any] = {
        "num_classes": k,
        "num_samples": len(rows),
        "chance": 1.0 / k,
        "skipped": dict(sorted(skipped.items())),
    }
    if not rows:
        result.update(top1=None, per_class=dict.fromkeys(task.classnames))
        if k > 5:
            result["top5"] = None
        return result
    target = torch.tensor(targets)
    logits = data.image[rows] @ classifier.T
    ranked = logits.argsort(dim=1, descending=True, stable=True)
    correct1 = ranked[:, 0] == target
    result["top1"] = correct1.double().mean().item()
    if k > 5:
        result["top5"] = (ranked[:, :5] == target[:, None]).any(dim=1).double().mean().item()
    per_class: dict[str, float | None] = {}
    for i, name in enumerate(task.classnames):
        mask = target == i
        per_class[name] = correct1[mask].double().mean().item() if mask.any() else None
    result["per_class"] = per_class
    return result


# --------------------------------------------------------------------------- retrieval


def recall_at_k(
    sim: torch.Tensor, gt: Sequence[int | Sequence[int]] | torch.Tensor, ks: Sequence[int]
) -> dict[str, float]:
    """Recall@k of each query row of `sim` ``[N_query, N_candidates]``.

    ``gt[i]`` is the correct candidate index of row ``i`` (or a list of them; a hit on any
    counts). A row's rank is the number of wrong candidates scoring at least its best
    correct one, so ties count against the model: a constant similarity matrix scores 0,
    not 1. Returns ``{"recall@k": fraction of rows whose rank < k}``.
    """
    if sim.ndim != 2:
        raise ValueError(f"recall_at_k: sim must be 2-D [queries, candidates], got {sim.shape}")
    n_q, n_c = sim.shape
    if len(gt) != n_q:
        raise ValueError(f"recall_at_k: {len(gt)} ground-truth entries for {n_q} query rows")
    correct = torch.zeros(n_q, n_c, dtype=torch.bool)
    for i, g in enumerate(gt.tolist() if isinstance(gt, torch.Tensor) else gt):
        idx = [g] if isinstance(g, int) else list(g)
        if not idx or any(not 0 <= j < n_c for j in idx):
            raise ValueError(f"recall_at_k: gt[{i}]={g!r} is not a valid index in [0, {n_c})")
        correct[i, idx] = True
    sim = sim.detach().float().cpu()
    best = sim.masked_fill(~correct, float("-inf")).max(dim=1).values
    rank = ((sim >= best[:, None]) & ~correct).sum(dim=1)
    return {f"recall@{k}": (rank < k).double().mean().item() for k in ks}


def retrieval(
    model: EvalModel,
    dataset_dir: str,
    ks: Sequence[int],
    *,
    image_size: int,
    context_length: int,
    batch_size: int,
) -> dict[str, Any]:
    """Image->text and text->image recall@k, each sample being one image and its caption."""
    bad = [k for k in ks if k < 1]
    if bad or not ks:
        raise ValueError(f"recall ks={list(ks)} must be a non-empty list of integers >= 1")
    with _EvalMode(model):
        data = _embed_dataset(
            model,
            dataset_dir,
            image_size=image_size,
            context_length=context_length,
            batch_size=batch_size,
            with_text=True,
            with_meta=False,
        )
    assert data.text is not None
    sim = data.image @ data.text.T
    gt = list(range(sim.shape[0]))
    return {
        "num_samples": sim.shape[0],
        "image_to_text": recall_at_k(sim, gt, ks),
        "text_to_image": recall_at_k(sim.T, gt, ks),
        "skipped": dict(sorted(data.skipped.items())),
    }


# --------------------------------------------------------------------------- entry point


def check_eval_sets(cfg: EvalConfig) -> list[str]:
    """Check, before a model is loaded, that `cfg` names at least one eval set and that
    each is readable (a manifest; a zero-shot set also its tasks); one line per set."""
    if cfg.zero_shot is None and cfg.retrieval is None:
        raise ValueError(
            "eval.zero_shot and eval.retrieval are both unset: set at least one "
            "(e.g. --set eval.zero_shot=PATH_TO_LABELLED_SET)"
        )
    lines = []
    if cfg.zero_shot is not None:
        n = read_manifest(cfg.zero_shot).num_samples
        tasks = [t.name for t in _read_zero_shot_spec(cfg.zero_shot).tasks]
        lines.append(f"eval.zero_shot {cfg.zero_shot}: {n} images, tasks {', '.join(tasks)}")
    if cfg.retrieval is not None:
        n = read_manifest(cfg.retrieval).num_samples
        lines.append(f"eval.retrieval {cfg.retrieval}: {n} samples")
    return lines


def evaluate(model_file: str, cfg: EvalConfig, out_path: str | None = None) -> dict[str, Any]:
    """Run every evaluation `cfg` names on the weights in `model_file`; write JSON if asked.

    Image-text models get zero-shot (``eval.zero_shot``) and retrieval (``eval.retrieval``),
    CoCa also caption samples; image-only models (MAE) get kNN / linear-probe accuracy on
    the labelled set (``eval.zero_shot``) and no retrieval (noted in the report).
    """
    check_eval_sets(cfg)
    model, mcfg, step = load_model_file(model_file)
    report: dict[str, Any] = {"model_file": model_file, "step": step, "arch": mcfg.arch}
    if not mcfg.needs_text:
        if cfg.zero_shot is not None:
            report["probe"] = probe(
                model, cfg.zero_shot, image_size=mcfg.image_size, batch_size=cfg.batch_size
            )
            report["probe_dataset"] = cfg.zero_shot
        if cfg.retrieval is not None:
            report["retrieval_skipped"] = f"a {mcfg.arch} model has no text tower"
        if out_path is not None:
            _write_json(out_path, report)
        return report
    sizes = {
        "image_size": mcfg.image_size,
        "context_length": mcfg.context_length,
        "batch_size": cfg.batch_size,
    }
    if cfg.zero_shot is not None:
        report["zero_shot"] = zero_shot(model, cfg.zero_shot, **sizes)
        report["zero_shot_dataset"] = cfg.zero_shot
    if cfg.retrieval is not None:
        report["retrieval"] = retrieval(model, cfg.retrieval, cfg.recall_k, **sizes)
        report["retrieval_dataset"] = cfg.retrieval
    if hasattr(model, "generate"):
        source = cfg.retrieval or cfg.zero_shot
        assert source is not None
        report["captions"] = caption_samples(model, source, image_size=mcfg.image_size)
    if out_path is not None:
        _write_json(out_path, report)
    return report


# --------------------------------------------------------------------------- image-only


def _labelled_rows(
    task: ZeroShotTask, meta: Sequence[dict[str, Any]]
) -> tuple[list[int], list[int]]:
    index = {c: i for i, c in enumerate(task.classnames)}
    rows, targets = [], []
    for row, m in enumerate(meta):
        labels = m.get("labels")
        label = labels.get(task.label_key) if isinstance(labels, dict) else None
        if label in index:
            rows.append(row)
            targets.append(index[label])
    return rows, targets


def knn_accuracy(features: torch.Tensor, targets: torch.Tensor, k: int, classes: int) -> float:
    """Leave-one-out kNN top-1 of unit-norm `features`: each sample's label is the vote of
    its `k` most similar others, weighted by ``exp(similarity / 0.07)`` (as in DINO)."""
    sim = features @ features.T
    sim.fill_diagonal_(float("-inf"))
    k = min(k, len(features) - 1)
    top, idx = sim.topk(k, dim=1)
    votes = torch.zeros(len(features), classes)
    votes.scatter_add_(1, targets[idx], (top / 0.07).exp())
    return (votes.argmax(dim=1) == targets).double().mean().item()


def linear_probe_accuracy(
    features: torch.Tensor, targets: torch.Tensor, classes: int, *, weight_decay: float = 1e-3
) -> float:
    """Top-1 of a logistic-regression probe (L-BFGS) fit on a random half of the rows
    (fixed seed) and tested on the other half.

    Features are standardized with the training rows' mean and std first: unit-norm
    embeddings differ in small directions, which an L2-penalized probe would not reach.
    """
    gen = torch.Generator().manual_seed(0)
    order = torch.randperm(len(features), generator=gen)
    half = len(features) // 2
    fit, held = order[:half], order[half:]
    mean, std = features[fit].mean(dim=0), features[fit].std(dim=0).clamp(min=1e-6)
    features = (features - mean) / std
    train, test = features[fit], features[held]
    y_train, y_test = targets[fit], targets[held]
    if len(test) == 0:
        return float("nan")
    weight = (0.01 * torch.randn(features.shape[1], classes, generator=gen)).requires_grad_()
    bias = torch.zeros(classes, requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(train @ weight + bias, y_train)
        loss = loss + weight_decay * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        return ((test @ weight + bias).argmax(dim=1) == y_test).double().mean().item()


def probe(
    model: EvalModel, eval_dir: str, *, image_size: int, batch_size: int, k: int = 10
) -> dict[str, Any]:
    """kNN and linear-probe accuracy of the model's image features on each labelled task.

    Returns ``{task: {"knn_top1", "linear_probe_top1", "chance", "num_classes",
    "num_samples", "k"}}``; samples without a listed label are left out.
    """
    spec = _read_zero_shot_spec(eval_dir)
    with _EvalMode(model):
        data = _embed_dataset(
            model,
            eval_dir,
            image_size=image_size,
            context_length=0,
            batch_size=batch_size,
            with_text=False,
            with_meta=True,
        )
    results: dict[str, Any] = {}
    for task in spec.tasks:
        rows, targets = _labelled_rows(task, data.meta)
        n = len(task.classnames)
        entry: dict[str, Any] = {"num_classes": n, "num_samples": len(rows), "chance": 1.0 / n}
        if len(rows) >= 4:
            feats, target = data.image[rows].float(), torch.tensor(targets)
            entry["knn_top1"] = knn_accuracy(feats, target, k, n)
            entry["linear_probe_top1"] = linear_probe_accuracy(feats, target, n)
            entry["k"] = min(k, len(rows) - 1)
        results[task.name] = entry
    return results


# --------------------------------------------------------------------------- captioning


@torch.no_grad()
def caption_samples(
    model: EvalModel, dataset_dir: str, *, image_size: int, num: int = 4, num_beams: int = 3
) -> list[dict[str, str]]:
    """Greedy and beam-search captions of the first `num` images beside their captions."""
    rows: list[dict[str, str]] = []
    images: list[torch.Tensor] = []
    for _url, key, members in iter_samples(dataset_dir):
        data = image_member(members)
        if data is None:
            continue
        try:
            pixels = image_to_tensor(decode_rgb(data), image_size, augment=False, rng=None)
        except ValueError:
            continue
        text = members.get("txt", b"").decode("utf-8", errors="replace").strip()
        rows.append({"uid": posixpath.basename(key), "reference": text})
        images.append(pixels)
        if len(images) == num:
            break
    if not images:
        return []
    with _EvalMode(model):
        batch = torch.stack(images).to(_model_device(model))
        greedy = model.generate(batch, num_beams=1)
        beam = model.generate(batch, num_beams=num_beams)
    for row, g, b in zip(rows, greedy, beam, strict=True):
        row["greedy"], row["beam"] = decode(g), decode(b)
    return rows


def _write_json(url: str, obj: Mapping[str, Any]) -> None:
    fs, path = fsspec.core.url_to_fs(url)
    parent = posixpath.dirname(path)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with fs.open(tmp, "wt") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
    fs.mv(tmp, path)
