"""kiln.storage on a local folder and on fsspec's in-memory filesystem (object storage
itself: tests/integration/test_s3_storage.py)."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from kiln import storage


def _mem() -> str:
    return f"memory://kiln-test-{uuid.uuid4().hex[:8]}"


@pytest.mark.parametrize("where", ["local", "memory"])
def test_atomic_writes_leave_only_the_file(where: str, tmp_path: Path) -> None:
    root = str(tmp_path) if where == "local" else _mem()
    url = f"{root}/a/b.json"
    storage.write_json(url, {"x": 1}, durable=True)
    storage.write_json(url, {"x": 2})
    assert storage.read_json(url) == {"x": 2}
    with storage.atomic_path(f"{root}/a/c.bin", durable=True) as tmp:
        Path(tmp).write_bytes(b"payload")
    assert storage.read_text(f"{root}/a/c.bin") == "payload"
    with pytest.raises(RuntimeError), storage.atomic_open(f"{root}/a/d.bin") as f:
        f.write(b"half")
        raise RuntimeError("crash mid-write")
    names = [u.rsplit("/", 1)[-1] for u in storage.list_files(f"{root}/a")]
    assert names == ["b.json", "c.bin"]
    fs, path = storage.fs_path(f"{root}/a")
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)) == names  # no tmp


def test_atomic_path_gives_a_librarys_file_the_usual_mode(tmp_path: Path) -> None:
    """safetensors' `save_file` creates its file 0o600: an exported model was unreadable
    by the rest of a team sharing the run folder, unlike every other file kiln writes."""
    import os

    import torch
    from safetensors.torch import save_file

    storage.write_json(tmp_path / "ref.json", {})  # kiln's own atomic write: open()'s mode
    expected = os.stat(tmp_path / "ref.json")
    with storage.atomic_path(tmp_path / "m.safetensors") as tmp:
        save_file({"w": torch.zeros(2)}, tmp)
    assert os.stat(tmp_path / "m.safetensors").st_mode == expected.st_mode
    old = os.umask(0o077)
    try:
        with storage.atomic_path(tmp_path / "private.safetensors") as tmp:
            save_file({"w": torch.zeros(2)}, tmp)
    finally:
        os.umask(old)
    assert os.stat(tmp_path / "private.safetensors").st_mode & 0o777 == 0o600


def test_upload_and_download_trees_round_trip(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "checkpoints" / "t").mkdir(parents=True)
    (src / "checkpoints" / "t" / "w.pt").write_bytes(b"w")
    (src / "metrics.jsonl").write_text("{}\n")
    (src / "logs").mkdir()
    (src / "logs" / "r0.log").write_text("hi")
    url = _mem()
    storage.upload_tree(src, url, skip=("checkpoints",))
    assert storage.download_tree(url, tmp_path / "back") == ["logs/r0.log", "metrics.jsonl"]
    assert (tmp_path / "back" / "logs" / "r0.log").read_text() == "hi"
    assert storage.download_tree(f"{url}/missing", tmp_path / "none") == []
    assert storage.read_text(f"{url}/missing.txt") is None


def test_remote_urls_and_their_staging_folders(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert storage.is_remote("s3://b/run") and storage.is_remote("memory://x")
    assert not storage.is_remote("/tmp/run") and not storage.is_remote("file:///tmp/run")
    assert not storage.is_remote("runs/s3:x")
    monkeypatch.setenv(storage.STAGING_ENV, str(tmp_path))
    one, other = storage.staging_dir("s3://b/run"), storage.staging_dir("s3://b/run2")
    assert one == storage.staging_dir("s3://b/run/") and one != other
    assert Path(one).parent == tmp_path and "s3:" not in one


def test_check_access_names_the_url_and_what_to_set(tmp_path: Path) -> None:
    storage.check_access(str(tmp_path / "anything"), write=True)  # local: nothing to check
    url = _mem()
    storage.atomic_write(f"{url}/x", b"")
    storage.check_access(f"{url}/run", write=True)
    missing = f"memory://no-such-bucket-{uuid.uuid4().hex[:6]}/run"
    with pytest.raises(storage.StorageError) as e:
        storage.check_access(missing)
    assert missing in str(e.value) and "AWS_ENDPOINT_URL" in str(e.value)
    assert "does not exist" in str(e.value)


def test_a_recipe_on_object_storage_resolves_its_paths_beside_it() -> None:
    from kiln.platform.recipes import load_recipe

    root = _mem()
    storage.atomic_write(
        f"{root}/recipes/train.yaml",
        b"kind: train\nname: t\nrun_dir: ../runs/t\ndata: {dataset: ../data/ds}\n"
        b"eval: {zero_shot: /abs/eval}\n",
    )
    recipe = load_recipe(f"{root}/recipes/train.yaml", ["eval.retrieval=s3://b/ret"])
    assert recipe.run_dir == f"{root}/runs/t"
    assert recipe.data.dataset == f"{root}/data/ds"
    assert (recipe.eval.zero_shot, recipe.eval.retrieval) == ("/abs/eval", "s3://b/ret")
    with pytest.raises(ValueError, match="does not exist"):
        load_recipe(f"{root}/recipes/missing.yaml")


@pytest.mark.parametrize("where", ["local", "memory"])
def test_read_tail_reads_the_end_in_one_request(where: str, tmp_path: Path) -> None:
    root = str(tmp_path) if where == "local" else _mem()
    storage.write_json(f"{root}/x", list(range(100)))
    whole = storage.read_bytes(f"{root}/x")
    assert whole is not None and len(whole) > 10
    assert storage.read_tail(f"{root}/x", 10) == whole[-10:]
    assert storage.read_tail(f"{root}/x", 10**6) == whole  # shorter than asked: all of it
    storage.atomic_write(f"{root}/empty", b"")
    assert storage.read_tail(f"{root}/empty", 10) == b""
    assert storage.read_tail(f"{root}/missing", 10) is None
    with pytest.raises(ValueError, match="nbytes must be positive"):
        storage.read_tail(f"{root}/x", 0)
