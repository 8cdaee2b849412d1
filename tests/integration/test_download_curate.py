"""The download stage in whole curation runs (local executor, no Ray): the example recipe
turns a URL list into shards, and a download step killed half-way refetches only the tasks
it had not finished -- served by a real HTTP server on 127.0.0.1 with the Flickr8k photos."""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from kiln.contracts import read_manifest
from kiln.data_curation import run_curation
from kiln.data_curation.config import CurationConfig
from kiln.platform.api import run_curate
from kiln.platform.recipes import CurateRecipe, load_recipe
from tests.helpers_http import PhotoServer, serve_photos

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def server(shared_data: Path) -> Iterator[PhotoServer]:
    with serve_photos(shared_data / "flickr8k_1k" / "images") as s:
        yield s


def _samples(dataset_dir: str) -> dict[str, dict[str, bytes]]:
    out: dict[str, dict[str, bytes]] = {}
    manifest = read_manifest(dataset_dir)
    for shard in manifest.shards:
        with tarfile.open(manifest.shard_url(dataset_dir, shard)) as tar:
            for m in tar.getmembers():
                uid, ext = m.name.split(".", 1)
                f = tar.extractfile(m)
                assert f is not None
                out.setdefault(uid, {})[ext] = f.read()
    return out


def test_example_recipe_downloads_only_the_kept_rows_into_shards(
    server: PhotoServer, tmp_path: Path
) -> None:
    server.reset()
    recipe = load_recipe(
        REPO / "recipes" / "examples" / "download_curate.yaml",
        [
            f"run_dir={tmp_path / 'run'}",
            "input.limit=600",
            f"stages.download.base_url={server.base}/img/",
            "execution.executor=local",
            "execution.workers=2",
        ],
    )
    assert isinstance(recipe, CurateRecipe)
    result = run_curate(recipe)
    download = result.steps["download"]
    assert download.rows_in > 0 and download.dropped == {}
    samples = _samples(result.dataset_dir)
    assert len(samples) == result.samples_out == download.rows_out
    fetched = set(server.requests)
    wanted = set()
    for sample in samples.values():
        meta = json.loads(sample["json"])
        assert meta["download_status"] == 200 and meta["resize_mode"] == "center_crop"
        assert meta["final_url"] == f"{server.base}/img/{meta['url']}"
        image = Image.open(io.BytesIO(sample["jpg"]))
        assert image.format == "JPEG" and image.size == (256, 256)
        assert (meta["width"], meta["height"]) == (256, 256)
        wanted.add(f"/img/{meta['url']}")
    # balancing ran first: only the kept rows' photos were fetched, each once
    assert fetched == wanted and len(server.requests) == len(wanted)
    balanced = result.steps["metaclip_balance"]
    assert balanced.rows_out == download.rows_in < result.steps["read"].rows_out


def _url_list(root: Path, server: PhotoServer, names: list[str]) -> list[Path]:
    """Three csv files (three tasks per step) of photo URLs, a few of them bad on purpose."""
    files = []
    for k in range(3):
        lines = ["url,caption"]
        for i, name in enumerate(names[k * 12 : (k + 1) * 12]):
            lines.append(f"{server.base}/img/{name},photo {k} {i} of a dog in a park")
        lines.append(f"{server.base}/status/404/{k}.jpg,a missing photo {k}")
        lines.append(f"{server.base}/notimage?{k},a page that is no photo {k}")
        lines.append(f"{server.base}/flaky/1/{names[40 + k]},a flaky photo {k}")
        path = root / f"urls-{k}.csv"
        path.write_text("\n".join(lines) + "\n")
        files.append(path)
    return files


def test_a_killed_download_step_refetches_only_its_unfinished_tasks(
    server: PhotoServer, shared_data: Path, tmp_path: Path
) -> None:
    names = sorted(p.name for p in (shared_data / "flickr8k_1k" / "images").glob("*.jpg"))
    files = _url_list(tmp_path, server, names)
    spec = {
        "input": {"format": "csv", "paths": [str(f) for f in files], "text_column": "caption"},
        "stages": [
            {"stage": "text"},
            {
                "stage": "download",
                "allow_loopback": True,
                "resize_mode": "keep_ratio",
                "image_size": 64,
                "backoff_s": 0.01,
            },
        ],
        "shard": {"samples_per_shard": 10},
        "execution": {"executor": "local", "workers": 2},
    }
    cfg = CurationConfig.model_validate(spec)
    run = tmp_path / "run"
    server.reset()
    first = run_curation(cfg, str(run))
    step = first.steps["download"]
    assert step.tasks == 3 and step.rows_out == 3 * 13
    assert step.dropped == {"http_404": 3, "not_an_image": 3}
    shas = [s.sha256 for s in read_manifest(first.dataset_dir).shards]

    # as if the run died while task 1 of the download step was running
    folder = run / "steps" / "download"
    (folder / "_SUCCESS").unlink()
    (folder / "_tasks" / "apply-00001.json").unlink()
    (folder / "part-00001.parquet").unlink()
    server.reset()
    again = run_curation(cfg, str(run))
    redo = again.steps["download"]
    assert not redo.reused and redo.tasks_reused == 2 and again.steps["text"].reused
    task1 = pq.read_table(folder / "part-00001.parquet").column("url").to_pylist()
    fetched = {f"{server.base}{p}" for p in server.requests}
    expected = {*task1, f"{server.base}/status/404/1.jpg", f"{server.base}/notimage?1"}
    assert fetched == expected, "a finished task's URLs were fetched again"
    assert [s.sha256 for s in read_manifest(again.dataset_dir).shards] == shas
