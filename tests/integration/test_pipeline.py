"""The curation runner on embedded Ray, on real data: Flickr8k images + captions, LAION
alt-texts (caption-only); determinism across parallelism, resumption, bad input."""

from __future__ import annotations

import json
import re
import shutil
import tarfile
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kiln.contracts import drop_reasons, read_manifest
from kiln.data_curation import CurationResult, inspect_dataset, run_curation
from kiln.data_curation.config import (
    BalanceConfig,
    CurationConfig,
    ExecutionConfig,
    ImageConfig,
    InputConfig,
    MatchConfig,
    ShardConfig,
)
from kiln.data_curation.dataset_info import format_dataset_info
from kiln.data_curation.plan import step_names
from kiln.data_curation.runner import SUCCESS_MARKER

FLICKR_ENTRIES = ["dog", "girl", "boy", "man", "woman", "water", "grass", "ball", "snow", "red"]
LAION_ENTRIES = ["the", "of", "and", "for", "with", "in", "to", "on", "by", "Black", "New"]


def _write_entries(path: Path, entries: list[str]) -> str:
    path.write_text("\n".join(entries) + "\n")
    return str(path)


def _dataset_uids(dataset_dir: str) -> list[str]:
    manifest = read_manifest(dataset_dir)
    uids = []
    for shard in manifest.shards:
        with tarfile.open(manifest.shard_url(dataset_dir, shard)) as tar:
            uids += [n.split(".", 1)[0] for n in tar.getnames() if n.endswith(".json")]
    return uids


def _rejects(run_dir: Path) -> pa.Table | None:
    files = sorted((run_dir / "rejects").rglob("*.parquet"))
    if not files:
        return None
    return pa.concat_tables([pq.read_table(f) for f in files], promote_options="permissive")


def _check_accounting(result: CurationResult) -> None:
    assert result.samples_in == result.samples_out + sum(result.dropped_by_reason.values())
    assert set(result.dropped_by_reason) <= set(drop_reasons())


# --------------------------------------------------------------------------- Flickr8k


@pytest.fixture(scope="module")
def flickr_pool(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """First 300 captions (60 images x 5) of Flickr8k, split over 4 csv files."""
    root = tmp_path_factory.mktemp("flickr_pool")
    lines = (shared_data / "flickr8k_1k" / "captions.csv").read_text().splitlines()
    header, body = lines[0], lines[1:301]
    for i in range(4):
        (root / f"captions-{i}.csv").write_text(
            "\n".join([header, *body[i * 75 : (i + 1) * 75]]) + "\n"
        )
    return {
        "dir": str(root),
        "images": str(shared_data / "flickr8k_1k" / "images"),
        "entries": _write_entries(root / "entries.txt", FLICKR_ENTRIES),
    }


def _flickr_cfg(pool: dict[str, Any], execution: ExecutionConfig) -> CurationConfig:
    return CurationConfig(
        input=InputConfig(
            format="csv",
            paths=[pool["dir"]],
            text_column="caption",
            url_column=None,
            image_dir=pool["images"],
            image_path_column="image",
        ),
        match=MatchConfig(entries=pool["entries"]),
        balance=BalanceConfig(t=15, seed=3),
        image=ImageConfig(max_size=128),
        shard=ShardConfig(samples_per_shard=16),
        execution=execution,
    )


@pytest.fixture(scope="module")
def flickr_run(
    ray_session: None, flickr_pool: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, CurationResult]:
    run_dir = tmp_path_factory.mktemp("flickr_run")
    execution = ExecutionConfig(batch_size=64, key_buckets=2)
    result = run_curation(_flickr_cfg(flickr_pool, execution), str(run_dir), name="flickr")
    return run_dir, result


def test_flickr_run_counts_every_row(
    flickr_run: tuple[Path, CurationResult], flickr_pool: dict[str, Any]
) -> None:
    run_dir, result = flickr_run
    _check_accounting(result)
    assert result.samples_in == 300
    assert 0 < result.matched < 300
    assert result.kept_after_balance < result.matched
    assert result.dropped_by_reason["no_metadata_match"] == 300 - result.matched
    # 5 captions per picture: exact image dedup keeps one row per picture.
    assert result.dropped_by_reason.get("duplicate_image", 0) > 0
    assert result.deduped == result.dropped_by_reason.get(
        "duplicate_text", 0
    ) + result.dropped_by_reason.get("duplicate_image", 0)
    assert 0 < result.samples_out <= 60
    names = step_names(_flickr_cfg(flickr_pool, ExecutionConfig()).plan())
    assert list(result.steps) == names
    assert names == [
        "read", "text", "text_dedup", "metaclip_match", "metaclip_balance", "image",
        "image_dedup", "shard",
    ]  # fmt: skip
    for name in names:
        marker = json.loads((run_dir / "steps" / name / SUCCESS_MARKER).read_text())
        assert marker["stats"]["rows_out"] == result.steps[name].rows_out
    saved = CurationResult.model_validate_json((run_dir / "curation_stats.json").read_text())
    assert saved == result


def test_flickr_dataset_shards_and_rejects(flickr_run: tuple[Path, CurationResult]) -> None:
    import ray.data

    run_dir, result = flickr_run
    manifest = read_manifest(result.dataset_dir)
    assert manifest.num_samples == result.samples_out
    assert len(manifest.shards) == result.num_shards == -(-result.samples_out // 16)
    assert manifest.name == "flickr" and manifest.inputs == sorted(manifest.inputs)
    assert manifest.stats["samples_out"] == result.samples_out
    uids = _dataset_uids(result.dataset_dir)
    assert uids == sorted(uids) and len(set(uids)) == len(uids) == result.samples_out
    urls = [manifest.shard_url(result.dataset_dir, s) for s in manifest.shards]
    rows = ray.data.read_webdataset(urls, decoder=None).take_all()
    assert sorted(r["__key__"] for r in rows) == uids
    meta = json.loads(rows[0]["json"])
    assert meta["entry_ids"] and 0 < meta["keep_prob"] <= 1
    assert max(meta["width"], meta["height"]) <= 128
    assert rows[0]["jpg"][:2] == b"\xff\xd8"
    rejects = _rejects(run_dir)
    assert rejects is not None and "image" not in rejects.column_names
    assert rejects.num_rows == sum(result.dropped_by_reason.values())
    counts: dict[str, int] = {}
    for reason in rejects.column("drop_reason").to_pylist():
        counts[reason] = counts.get(reason, 0) + 1
    assert counts == result.dropped_by_reason
    assert {"uid", "text", "url", "source", "source_row"} <= set(rejects.column_names)
    info = inspect_dataset(result.dataset_dir, num_samples=2)
    assert info["num_samples"] == result.samples_out and len(info["samples"]) == 2
    assert info["samples"][0]["uid"] == uids[0] and info["samples"][0]["width"] > 0
    text = format_dataset_info(info)
    assert "flickr" in text and uids[0] in text


def test_flickr_result_does_not_depend_on_parallelism(
    flickr_run: tuple[Path, CurationResult],
    flickr_pool: dict[str, Any],
    tmp_path: Path,
) -> None:
    _, first = flickr_run
    execution = ExecutionConfig(batch_size=17, key_buckets=5, shard_rows_per_task=7)
    second = run_curation(_flickr_cfg(flickr_pool, execution), str(tmp_path), name="flickr")
    assert _dataset_uids(second.dataset_dir) == _dataset_uids(first.dataset_dir)
    a, b = read_manifest(first.dataset_dir), read_manifest(second.dataset_dir)
    assert [s.sha256 for s in a.shards] == [s.sha256 for s in b.shards]
    assert second.dropped_by_reason == first.dropped_by_reason
    assert second.matched == first.matched


# --------------------------------------------------------------------------- LAION, caption-only


def test_laion_caption_only_and_resume(
    ray_session: None, shared_data: Path, tmp_path: Path
) -> None:
    cfg = CurationConfig(
        input=InputConfig(
            format="parquet",
            paths=[str(shared_data / "laion_alttext" / "test_1000.parquet")],
            text_column="TEXT",
            url_column="URL",
            limit=300,
        ),
        match=MatchConfig(entries=_write_entries(tmp_path / "entries.txt", LAION_ENTRIES)),
        balance=BalanceConfig(t=8),
        image=ImageConfig(required=False),
        shard=ShardConfig(samples_per_shard=100),
    )
    run_dir = tmp_path / "run"
    first = run_curation(cfg, str(run_dir), name="laion")
    _check_accounting(first)
    assert first.samples_in == 300
    assert first.dropped_by_reason.get("not_sampled", 0) > 0
    assert "missing_image" not in first.dropped_by_reason
    manifest = read_manifest(first.dataset_dir)
    for shard in manifest.shards:
        with tarfile.open(manifest.shard_url(first.dataset_dir, shard)) as tar:
            names = tar.getnames()
        assert names and not [n for n in names if n.endswith(".jpg")]
        assert len(names) == 2 * shard.num_samples

    again = run_curation(cfg, str(run_dir), name="laion")
    assert all(s.reused for s in again.steps.values())
    assert read_manifest(again.dataset_dir) == manifest

    cfg.balance.t = 3  # what `--set balance.t=3` does
    changed = run_curation(cfg, str(run_dir), name="laion")
    reused = [n for n, s in changed.steps.items() if s.reused]
    assert reused == ["read", "text", "text_dedup", "metaclip_match"]
    assert changed.kept_after_balance < first.kept_after_balance
    assert changed.samples_out == read_manifest(changed.dataset_dir).num_samples
    _check_accounting(changed)


# --------------------------------------------------------------------------- bad input


def test_bad_input_is_dropped_and_counted(
    ray_session: None, shared_data: Path, tmp_path: Path
) -> None:
    images = tmp_path / "images"
    images.mkdir()
    real = sorted((shared_data / "flickr8k_1k" / "images").glob("*.jpg"))[:3]
    for i, src in enumerate(real):
        shutil.copy(src, images / f"img{i}.jpg")
    (images / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    records: list[dict[str, Any]] = [
        {"image": "img0.jpg", "caption": "A dog runs on the grass ."},
        {"image": "img1.jpg", "caption": "A girl in a red dress ."},
        {"image": "img2.jpg", "caption": ""},
        {"image": "img2.jpg", "caption": 42},
        {"image": "img2.jpg", "caption": None},
        {"image": "bad.jpg", "caption": "A dog with a ball ."},
        {"image": "missing.jpg", "caption": "A man on a beach ."},
        {"image": "img0.jpg", "caption": "A dog  runs on the grass ."},  # same after normalizing
        {"image": "img2.jpg", "caption": "Nothing that matches here ."},
    ]
    pool = tmp_path / "pool.jsonl"
    pool.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    cfg = CurationConfig(
        input=InputConfig(
            format="jsonl",
            paths=[str(pool)],
            text_column="caption",
            url_column=None,
            image_dir=str(images),
            image_path_column="image",
        ),
        match=MatchConfig(entries=_write_entries(tmp_path / "entries.txt", FLICKR_ENTRIES)),
        balance=BalanceConfig(t=1000),
    )
    result = run_curation(cfg, str(tmp_path / "run"))
    _check_accounting(result)
    assert result.dropped_by_reason == {
        "bad_image": 1,
        "duplicate_text": 1,
        "empty_text": 3,
        "missing_image": 1,
        "no_metadata_match": 1,
    }
    assert result.samples_out == 2
    rejects = _rejects(tmp_path / "run")
    assert rejects is not None
    by_row = dict(
        zip(
            rejects.column("source_row").to_pylist(),
            rejects.column("drop_reason").to_pylist(),
            strict=True,
        )
    )
    assert by_row == {
        2: "empty_text",
        3: "empty_text",
        4: "empty_text",
        5: "bad_image",
        6: "missing_image",
        7: "duplicate_text",
        8: "no_metadata_match",
    }


def test_missing_input_path_is_named(ray_session: None, tmp_path: Path) -> None:
    cfg = CurationConfig(
        input=InputConfig(format="csv", paths=[str(tmp_path / "no_such_pool.csv")]),
        match=MatchConfig(entries=_write_entries(tmp_path / "entries.txt", ["dog"])),
    )
    with pytest.raises(FileNotFoundError, match=re.escape("no_such_pool.csv")):
        run_curation(cfg, str(tmp_path / "run"))
    assert not (tmp_path / "run" / "steps").exists()


# --------------------------------------------------------------------------- language stage


def test_laion_english_example_drops_other_languages(
    ray_session: None, shared_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """recipes/examples/laion_language_curate.yaml on 400 of the real multilingual alt-texts."""
    from kiln.platform.recipes import load_recipe, resolve_paths

    repo = Path(__file__).resolve().parents[2]
    monkeypatch.chdir(repo)
    recipe = resolve_paths(
        load_recipe(
            repo / "recipes" / "examples" / "laion_language_curate.yaml",
            [
                f"input.paths=[{shared_data / 'laion_alttext' / 'test_1000.parquet'}]",
                "input.limit=400",
            ],
        )
    )
    cfg = CurationConfig.model_validate(recipe.model_dump(include=set(CurationConfig.model_fields)))
    result = run_curation(cfg, str(tmp_path / "run"))
    _check_accounting(result)
    assert result.dropped_by_reason.get("language", 0) > 10
    languages = result.steps["language"].extra["languages"]
    assert list(languages) == ["en"] and languages["en"] == result.steps["language"].rows_out


# --------------------------------------------------------------------------- worldwide


def test_laion_worldwide_example_counts_languages(
    ray_session: None, shared_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """recipes/examples/laion_worldwide_curate.yaml on the 1,000 real multilingual alt-texts:
    the languages found, matched and kept per language, t per language."""
    from kiln.platform.recipes import load_recipe, resolve_paths
    from kiln.platform.summary import format_curation

    repo = Path(__file__).resolve().parents[2]
    monkeypatch.chdir(repo)
    recipe = resolve_paths(
        load_recipe(
            repo / "recipes" / "examples" / "laion_worldwide_curate.yaml",
            [f"input.paths=[{shared_data / 'laion_alttext' / 'test_1000.parquet'}]"],
        )
    )
    cfg = CurationConfig.model_validate(recipe.model_dump(include=set(CurationConfig.model_fields)))
    result = run_curation(cfg, str(tmp_path / "run"))
    _check_accounting(result)
    found = result.steps["language"].extra["languages"]
    assert len(found) >= 15 and max(found, key=found.get) == "en"
    matched = result.steps["worldwide_match"].extra["matched_by_language"]
    balance = result.steps["worldwide_balance"].extra
    listed = set(cfg.plan()[3].config.entries)  # type: ignore[attr-defined]
    assert set(matched) <= listed and len(matched) >= 4 and sum(matched.values()) == result.matched
    assert set(balance["kept_by_language"]) <= set(matched)
    assert sum(balance["kept_by_language"].values()) == result.kept_after_balance
    assert balance["t_by_language"]["en"] == 100
    assert all(1 <= t <= 100 for t in balance["t_by_language"].values())
    unlisted = sum(n for code, n in found.items() if code not in listed)
    assert result.dropped_by_reason["no_metadata_for_language"] >= unlisted > 0
    assert "language  matched  t" in format_curation(result.model_dump(mode="json"))


def test_multi_caption_records_each_or_one_picked(ray_session: None, tmp_path: Path) -> None:
    """input.text_columns: MetaCLIP 1 tests each text as its own pair; with caption_pick
    (MetaCLIP 2) one matched text per record survives, the same one on a rerun."""
    records = [
        {"id": f"r{i}", "alt": f"a dog number {i}", "title": t, "url": f"http://x/{i}.jpg"}
        for i, t in enumerate(["red dog", None, "no match here", "a red cat", "dog"] * 8)
    ]
    pool = tmp_path / "pool.parquet"
    pq.write_table(pa.Table.from_pylist(records), pool)
    entries = _write_entries(tmp_path / "entries.txt", ["dog", "red", "cat"])

    def run(name: str, pick: bool) -> CurationResult:
        stages: list[dict[str, Any]] = [
            {"stage": "text"},
            {"stage": "metaclip_match", "entries": entries},
        ]
        if pick:
            stages.append({"stage": "caption_pick", "seed": 7})
        stages.append({"stage": "metaclip_balance", "t": 1000})
        cfg = CurationConfig(
            input=InputConfig(
                format="parquet", paths=[str(pool)], text_columns=["alt", "title"], uid_column="id"
            ),
            stages=stages,
        )
        return run_curation(cfg, str(tmp_path / name))

    each = run("each", pick=False)
    _check_accounting(each)
    assert each.samples_in == 80
    # every alt matches; titles: "red dog", "a red cat", "dog" match, None / "no match" do not
    assert each.samples_out == 40 + 24
    assert each.dropped_by_reason == {"empty_text": 8, "no_metadata_match": 8}
    one = run("one", pick=True)
    _check_accounting(one)
    assert one.samples_out == 40
    assert one.dropped_by_reason["caption_not_picked"] == 24
    uids = _dataset_uids(one.dataset_dir)
    assert sorted(u.split("#")[0] for u in uids) == sorted(r["id"] for r in records)
    picked_titles = sum(u.endswith("#title") for u in uids)
    assert 4 <= picked_titles <= 20  # about half of the 24 two-text records
    again = run("again", pick=True)
    assert _dataset_uids(again.dataset_dir) == uids
