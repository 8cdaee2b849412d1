"""Curation: raw image-text pools in, curated WebDataset shards + manifest out, on Ray Data.

Public API (imported lazily, so `kiln.data_curation.config` stays cheap to import and does
not pull in Ray):

- `run_curation(cfg, run_dir)` -> `CurationResult`: the resumable plan runner;
- `read_pool(input_cfg)` -> `ray.data.Dataset` of sample rows;
- `write_shards(tables, out_dir, ...)` -> `DatasetManifest`: deterministic WebDataset tars;
- `inspect_dataset(dataset_dir)` / `format_dataset_info(info)`: what `kiln inspect` shows.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kiln.data_curation.dataset_info import format_dataset_info, inspect_dataset
    from kiln.data_curation.readers import read_pool
    from kiln.data_curation.runner import CurationResult, run_curation
    from kiln.data_curation.shard import write_shards

__all__ = [
    "CurationResult",
    "format_dataset_info",
    "inspect_dataset",
    "read_pool",
    "run_curation",
    "write_shards",
]

_HOMES = {
    "CurationResult": "kiln.data_curation.runner",
    "run_curation": "kiln.data_curation.runner",
    "read_pool": "kiln.data_curation.readers",
    "write_shards": "kiln.data_curation.shard",
    "inspect_dataset": "kiln.data_curation.dataset_info",
    "format_dataset_info": "kiln.data_curation.dataset_info",
}


def __getattr__(name: str) -> Any:
    """Import a public name from its module on first use (PEP 562)."""
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'kiln.data_curation' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value
