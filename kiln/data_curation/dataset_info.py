"""Dataset inspection: what `kiln inspect DATASET` prints about a curated dataset.

Reads the manifest (never globs) and the first few samples of the first shard, so a user
can check a dataset (name, size, provenance, what the samples look like) without writing
code. Named `dataset_info` rather than `inspect` so it can never shadow the standard
library's `inspect` module.
"""

from __future__ import annotations

import json
from typing import Any

import fsspec

from kiln import storage
from kiln.contracts import MANIFEST_NAME, read_manifest

__all__ = ["format_dataset_info", "inspect_dataset"]

_JSON_FIELDS = ("width", "height", "entry_ids", "url", "keep_prob")


def _first_samples(url: str, num_samples: int) -> list[dict[str, Any]]:
    """The first `num_samples` samples of the shard at `url` (members grouped by key)."""
    samples: list[dict[str, Any]] = []
    for _, key, members in storage.tar_samples(url):
        if len(samples) >= num_samples:
            break
        sample: dict[str, Any] = {"uid": key, "text": None, "image_bytes": 0}
        for ext, data in members.items():
            if ext == "txt":
                sample["text"] = data.decode("utf-8", errors="replace")
            elif ext == "json":
                meta = json.loads(data)
                for field in _JSON_FIELDS:
                    if field in meta:
                        sample[field] = meta[field]
            elif ext in ("jpg", "jpeg", "png", "webp"):
                sample["image_bytes"] = len(data)
        samples.append(sample)
    return samples


def _entries_file(recipe: dict[str, Any]) -> str | None:
    """The MetaCLIP entries file a dataset was matched against, from its recorded recipe
    (a `metaclip_match` stage, or the pre-plan `match:` section); None when there is none
    (worldwide matching has one list per language)."""
    for spec in recipe.get("stages") or []:
        if isinstance(spec, dict) and spec.get("stage") == "metaclip_match":
            return spec.get("entries") if isinstance(spec.get("entries"), str) else None
    match = recipe.get("match")
    return match.get("entries") if isinstance(match, dict) else None


def _with_entry_names(samples: list[dict[str, Any]], recipe: dict[str, Any]) -> None:
    """Add `entries` (the entry strings of `entry_ids`) to each sample, when the entries
    file the dataset was matched against is still readable."""
    url = _entries_file(recipe)
    if not url or not any(s.get("entry_ids") for s in samples):
        return
    from kiln.data_curation.matching import load_entries

    try:
        names = load_entries(url)
    except (OSError, ValueError):
        return  # moved or changed since: the ids are all there is
    for s in samples:
        ids = s.get("entry_ids") or []
        if all(0 <= i < len(names) for i in ids):
            s["entries"] = [names[i] for i in ids]


def inspect_dataset(dataset_dir: str, num_samples: int = 3) -> dict[str, Any]:
    """Summary of the dataset at `dataset_dir` (a folder with `manifest.json`, any fsspec URL;
    a curation run folder works too).

    Keys: path, name, num_samples, num_shards, bytes, recipe_hash, inputs, stats, shards
    (path, samples, bytes, sha256 each) and `samples`: the first `num_samples` samples
    (uid, text, width/height, entry_ids, url, image_bytes; `entries`: the entry strings of
    entry_ids, when the entries file the dataset was matched against is readable).
    """
    root = dataset_dir[: -len(MANIFEST_NAME)] if dataset_dir.endswith(".json") else dataset_dir
    root = root.rstrip("/")
    fs, path = fsspec.core.url_to_fs(root)
    if not fs.exists(f"{path}/{MANIFEST_NAME}") and fs.exists(f"{path}/dataset/{MANIFEST_NAME}"):
        root += "/dataset"  # a curation run folder: its dataset lives in dataset/
    manifest = read_manifest(root)
    samples: list[dict[str, Any]] = []
    for shard in manifest.shards:
        if len(samples) >= num_samples:
            break
        samples += _first_samples(manifest.shard_url(root, shard), num_samples - len(samples))
    _with_entry_names(samples, manifest.recipe or {})
    return {
        "path": root,
        "name": manifest.name,
        "num_samples": manifest.num_samples,
        "num_shards": len(manifest.shards),
        "bytes": sum(s.bytes for s in manifest.shards),
        "recipe_hash": manifest.recipe_hash,
        "inputs": list(manifest.inputs),
        "stats": dict(manifest.stats),
        "shards": [s.model_dump(mode="json") for s in manifest.shards],
        "samples": samples,
    }


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def format_dataset_info(info: dict[str, Any]) -> str:
    """Human-readable text of an `inspect_dataset` result, for the CLI."""
    lines = [
        f"dataset     {info['name'] or '(unnamed)'}  ({info['path']})",
        f"samples     {info['num_samples']} in {info['num_shards']} shards, "
        f"{_human_bytes(info['bytes'])}",
        f"recipe hash {info['recipe_hash'][:16] or '-'}",
    ]
    inputs = info.get("inputs") or []
    if inputs:
        shown = ", ".join(inputs[:3]) + (f" (+{len(inputs) - 3} more)" if len(inputs) > 3 else "")
        lines.append(f"inputs      {shown}")
    stats = info.get("stats") or {}
    if stats:
        scalars = [f"{k}={v}" for k, v in stats.items() if not isinstance(v, dict)]
        if scalars:
            lines.append(f"stats       {', '.join(scalars)}")
        for k, v in stats.items():
            if isinstance(v, dict) and v:
                lines.append(f"  {k}: " + ", ".join(f"{r}={n}" for r, n in v.items()))
    for s in info.get("samples", []):
        size = (
            f"{s['width']}x{s['height']}"
            if s.get("width") is not None and s.get("height") is not None
            else "no image"
        )
        text = (s.get("text") or "").replace("\n", " ")
        if len(text) > 70:
            text = text[:67] + "..."
        entries = s.get("entries") or s.get("entry_ids")  # names when the file is there
        lines.append(f"  {s['uid']}  {size:>9}  entries={entries}  {text!r}")
    return "\n".join(lines)
