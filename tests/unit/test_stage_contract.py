"""The stage contract without Ray: the registry, plans, each built-in stage on a few rows."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from kiln.contracts import drop_reasons, register_drop_reason
from kiln.data_curation.plan import build_plan, step_names
from kiln.data_curation.stage import (
    MapStage,
    get_stage,
    known_drop_reasons,
    load_plugins,
    register,
    registered_stages,
)
from kiln.data_curation.stages import DROP_COLUMN, mark_dropped
from kiln.data_curation.stages.dedup import duplicate_mask


def test_builtin_stages_are_registered_with_their_drop_reasons() -> None:
    stages = registered_stages()
    assert {
        "text", "text_dedup", "language", "metaclip_match", "metaclip_balance", "image",
        "image_dedup",
    } <= set(stages)  # fmt: skip
    assert {s.kind for s in stages.values()} == {"map", "fit_apply", "keyed"}
    reasons = known_drop_reasons()
    for stage in stages.values():
        assert set(stage.drop_reasons) <= set(reasons)
    assert "language" in reasons and "not_sampled" in reasons


def test_unknown_stage_and_unregistered_reason_are_clear_errors() -> None:
    with pytest.raises(KeyError, match="did you mean 'language'"):
        get_stage("langauge")
    table = pa.table({"uid": ["a"]})
    with pytest.raises(ValueError, match="register it first"):
        mark_dropped(table, np.array([True]), "no_such_reason")
    with pytest.raises(ValueError, match="already registered"):
        register_drop_reason("not_sampled", "something else")
    with pytest.raises(ValueError, match="snake_case"):
        register_drop_reason("Bad Reason", "x")
    with pytest.raises(ValueError, match="cannot be imported"):
        load_plugins(["kiln_no_such_plugin_module"])


def test_a_stage_added_outside_kiln_plugs_into_a_plan() -> None:
    from kiln.contracts import StrictModel

    class ShoutConfig(StrictModel):
        suffix: str = "!"

    class ShoutStage(MapStage[ShoutConfig]):
        name = "shout_test"
        config = ShoutConfig
        drop_reasons = {"too_quiet_test": "caption has no letters"}  # noqa: RUF012

        def apply(self, table: pa.Table, cfg: ShoutConfig, ctx: object) -> pa.Table:
            texts = [t.upper() + cfg.suffix for t in table.column("text").to_pylist()]
            table = table.set_column(table.schema.get_field_index("text"), "text", pa.array(texts))
            quiet = np.array([not any(c.isalpha() for c in t) for t in texts])
            return mark_dropped(table, quiet, "too_quiet_test")

    register(ShoutStage())
    plan = build_plan([{"stage": "text"}, {"stage": "shout_test", "suffix": "?"}])
    assert [s.name for s in plan] == ["text", "shout_test"]
    stage, cfg = plan[1].stage, plan[1].config
    out = stage.apply(pa.table({"text": ["a dog", "123"]}), cfg, None)  # type: ignore[attr-defined]
    assert out.column("text").to_pylist() == ["A DOG?", "123?"]
    assert out.column(DROP_COLUMN).to_pylist() == [None, "too_quiet_test"]
    assert "too_quiet_test" in drop_reasons()


def test_plan_checks_order_names_and_links() -> None:
    plan = build_plan(
        [{"stage": "metaclip_match", "entries": "e.txt"}, {"stage": "metaclip_balance", "t": 3}]
    )
    assert plan[1].config.entries == "e.txt"  # type: ignore[attr-defined]
    assert step_names(plan) == ["read", "metaclip_match", "metaclip_balance", "shard"]
    with pytest.raises(ValueError, match="needs the column"):
        build_plan([{"stage": "metaclip_balance", "entries": "e.txt"}])
    with pytest.raises(ValueError, match=r"stages\[0\] \(image\): unknown field 'min_sise'"):
        build_plan([{"stage": "image", "min_sise": 3}])
    with pytest.raises(ValueError, match="must be a plain word"):
        build_plan([{"stage": "text", "name": "a/b"}])
    assert build_plan([]) == []  # read -> shard: a format converter
    with pytest.raises(ValueError, match=r"resources: field 'num_cpus'"):
        build_plan([{"stage": "text", "resources": {"num_cpus": 0}}])


def test_duplicate_mask_keeps_the_first_of_each_run() -> None:
    keys = pa.array(["a", "a", "b", None, None, "c", "c", "c"])
    assert duplicate_mask(keys).tolist() == [False, True, False, False, False, False, True, True]
    assert duplicate_mask(pa.array([], pa.string())).tolist() == []


def test_text_dedup_groups_keep_the_smallest_uid() -> None:
    stage = get_stage("text_dedup")
    cfg = stage.config()
    table = pa.table({"uid": ["b", "a", "c"], "text": ["x", "x", "y"], "url": ["u", "u", "u"]})
    keyed = table.append_column("_k", stage.key(table, cfg, None))  # type: ignore[attr-defined]
    keyed = keyed.sort_by([("_k", "ascending"), ("uid", "ascending")])  # what the runner does
    marked = stage.apply_groups(keyed, keyed.column("_k"), cfg, None)  # type: ignore[attr-defined]
    reasons = dict(
        zip(marked.column("uid").to_pylist(), marked.column(DROP_COLUMN).to_pylist(), strict=True)
    )
    assert reasons == {"a": None, "b": "duplicate_text", "c": None}


CAPTIONS = {
    "en": "A brown dog is running along the beach in the morning.",
    "de": "Ein brauner Hund läuft am Morgen den Strand entlang.",
    "fr": "Un chien brun court le long de la plage le matin.",
    "zh": "一只棕色的狗早上在海滩上奔跑。",
    "ja": "茶色の犬が朝、浜辺を走っています。",
    "th": "สุนัขสีน้ำตาลกำลังวิ่งไปตามชายหาดในตอนเช้า",
    "ar": "كلب بني يركض على طول الشاطئ في الصباح.",
}


def test_language_stage_tags_and_filters_real_captions() -> None:
    stage = get_stage("language")
    cfg = stage.config(allowed=["en", "de"], min_confidence=0.5)
    ctx = stage.setup(cfg, None)
    table = pa.table({"uid": [*list(CAPTIONS), "none"], "text": [*list(CAPTIONS.values()), None]})
    out = stage.apply(table, cfg, ctx)  # type: ignore[attr-defined]
    found = dict(
        zip(out.column("uid").to_pylist(), out.column("language").to_pylist(), strict=True)
    )
    assert found == {**{k: k for k in CAPTIONS}, "none": None}
    reasons = dict(
        zip(out.column("uid").to_pylist(), out.column(DROP_COLUMN).to_pylist(), strict=True)
    )
    assert reasons == {
        "en": None, "de": None, "fr": "language", "zh": "language", "ja": "language",
        "th": "language", "ar": "language", "none": None,
    }  # fmt: skip
    assert all(0.5 <= s <= 1 for s in out.column("language_score").to_pylist()[:-1])
    summary = stage.summarize(out.filter(pa.array([r is None for r in reasons.values()])), cfg, ctx)
    assert stage.report([summary], cfg, None) == {"languages": {"de": 1, "en": 1, "None": 1}}
