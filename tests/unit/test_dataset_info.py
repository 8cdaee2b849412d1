"""`kiln inspect`: samples show the metadata entries they matched by name."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

from kiln.contracts import read_manifest, write_manifest
from kiln.data_curation.dataset_info import format_dataset_info, inspect_dataset
from tests.helpers_datasets import write_tiny_dataset


def test_inspect_names_the_entries_a_sample_matched(tmp_path: Path) -> None:
    dataset = write_tiny_dataset(tmp_path / "ds", num_samples=13)
    entries = tmp_path / "entries.txt"
    entries.write_text("dog\ncat\nred circle\n")
    manifest = read_manifest(str(dataset))
    recipe = {"stages": [{"stage": "text"}, {"stage": "metaclip_match", "entries": str(entries)}]}
    write_manifest(str(dataset), manifest.model_copy(update={"recipe": recipe}))
    # give the first sample entry ids, as a curated sample's json has them
    shard = dataset / manifest.shards[0].path

    members, first = [], True
    with tarfile.open(shard) as tar:
        for m in tar.getmembers():
            data = tar.extractfile(m).read()  # type: ignore[union-attr]
            if m.name.endswith(".json") and first:
                data = json.dumps({**json.loads(data), "entry_ids": [2, 0]}).encode()
                first = False
            members.append((m, data))
    with tarfile.open(shard, "w", format=tarfile.USTAR_FORMAT) as tar:
        for m, data in members:
            m.size = len(data)
            tar.addfile(m, io.BytesIO(data))

    info = inspect_dataset(str(dataset), num_samples=1)
    assert info["samples"][0]["entry_ids"] == [2, 0]
    assert info["samples"][0]["entries"] == ["red circle", "dog"]
    assert "entries=['red circle', 'dog']" in format_dataset_info(info)

    entries.unlink()  # the file is gone: the ids are all there is
    info = inspect_dataset(str(dataset), num_samples=1)
    assert "entries" not in info["samples"][0]
    assert "entries=[2, 0]" in format_dataset_info(info)
