"""`kiln metadata build`: sources parsed from tiny generated files in their real formats,
MetaCLIP's rules (caps, dedup, order, single punctuation), byte-reproducibility, provenance,
and errors that name the file and the fix."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kiln.data_curation import metadata_build
from kiln.data_curation.matching import load_entries
from kiln.data_curation.metadata_build import (
    MetadataCaps,
    build_metadata,
    pmi_bigrams,
    wordfreq_unigrams,
    wordnet_entries,
)
from kiln.platform.cli import main

_HEADER = "  1 This software and database is being provided to you, the LICENSEE, by  \n"
_HEADER += "  2 WordNet 3.0 Copyright 2006 by Princeton University.  All rights reserved.  \n"
_SYNSETS = {
    "noun": [
        "00001740 03 n 01 entity 0 003 ~ 00001930 n 0000 | that which is perceived  \n",
        "02084071 05 n 03 dog 0 domestic_dog 0 Canis_familiaris 0 001 @ 02083346 n 0000 | a dog  \n",
        "09044862 15 n 02 United_States 0 U.S. 0 000 | a country  \n",
        "04199027 06 n 01 red 0 000 | a colour  \n",
    ],
    "verb": ["01835496 38 v 02 run 0 go 0 000 | move fast  \n"],
    "adj": [
        "00001740 00 a 02 able(a) 0 capable 0 000 | able to do  \n",
        "00373209 00 s 01 red 0 000 | duplicate of the noun  \n",
    ],
    "adv": ["00001740 02 r 01 a_cappella 0 000 | without accompaniment  \n"],
}


def _wordnet(tmp_path: Path) -> Path:
    folder = tmp_path / "wordnet"
    folder.mkdir()
    for pos, lines in _SYNSETS.items():
        (folder / f"data.{pos}").write_text(_HEADER + "".join(lines), encoding="utf-8")
    return folder


def _wordfreq(tmp_path: Path, lines: list[str] | None = None) -> Path:
    path = tmp_path / "word_frequencies.gz"
    rows = lines or ["the;900", ";800", "dog;700", ",;650", "zebra;300", "cat;300", "rare;50"]
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("\n".join(rows) + "\n")
    return path


def test_wordnet_first_lemma_per_synset_in_pos_order(tmp_path: Path) -> None:
    folder = _wordnet(tmp_path)
    assert wordnet_entries(folder) == [
        "entity",
        "dog",
        "United States",
        "red",
        "run",
        "able",
        "red",
        "a cappella",
    ]
    every = wordnet_entries(folder, all_lemmas=True)
    assert "Canis familiaris" in every and "U.S." in every and "capable" in every


def test_wordfreq_by_count_then_word_above_threshold(tmp_path: Path) -> None:
    words = wordfreq_unigrams(_wordfreq(tmp_path), min_count=100)
    assert words == ["the", "dog", ",", "cat", "zebra"]


def test_pmi_bigrams_rank_and_respect_matcher_tokens() -> None:
    texts: list[str | None] = ["new york city", "new york", "new york.", "a new car", "a car"]
    texts += ["york, new"]
    texts += ["big  dog"] * 5 + [None]  # a double space: "big dog" never matches these
    # N = 26 tokens; PMI(a car) = PMI(york city) = ln(26/4) > PMI(new york) = ln(78/20) >
    # PMI(a new) = PMI(new car) = ln(26/10); ties by count, then text; "york , new" is cut
    assert pmi_bigrams(texts, min_count=1) == ["a car", "york city", "new york", "a new", "new car"]
    assert pmi_bigrams(texts, min_count=1, min_pmi=1.5) == ["a car", "york city"]
    assert pmi_bigrams(texts, min_count=2) == ["new york"]


def test_build_rules_order_caps_and_provenance(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(
        "".join(json.dumps({"caption": t}) + "\n" for t in ["hot dog", "a hot dog", "hot dog!"]),
        encoding="utf-8",
    )
    titles = tmp_path / "titles.txt"
    titles.write_text("Eiffel Tower\n?\n  dog \n\nthe\nLouvre\n", encoding="utf-8")
    out = tmp_path / "entries.txt"
    result = build_metadata(
        out,
        wordnet=_wordnet(tmp_path),
        wordfreq=_wordfreq(tmp_path),
        bigram_corpus=corpus,
        bigram_column="caption",
        titles=titles,
        caps=MetadataCaps(wordnet=6, unigrams=10, bigrams=5, titles=2, total=200),
        bigram_min_count=2,
    )
    entries = load_entries(str(out))
    numbers = [str(i) for i in range(100)]
    wordnet = ["entity", "dog", "United States", "red", "run", "able"]  # cut at 6
    unigrams = ["the", "cat", "zebra"]  # "dog" seen, "," single punctuation, "" skipped
    assert entries == [*numbers, *wordnet, *unigrams, "hot dog", "Eiffel Tower"]
    provenance = json.loads(result.provenance_path.read_text())
    by_name = {s["name"]: s for s in provenance["sources"]}
    assert by_name["wordnet"]["version"] == "3.0"
    assert by_name["wordnet"]["repeated_in_source"] == 1  # "red": noun and adjective
    assert by_name["wordnet"]["cut_by_source_cap"] == 1  # "a cappella"
    assert by_name["wordnet"]["duplicates"] == 0
    assert by_name["unigrams"]["removed_single_punctuation"] == 1
    assert by_name["unigrams"]["duplicates"] == 1 and by_name["unigrams"]["added"] == 3
    # titles: "?" removed, blank removed, cap 2 keeps "Eiffel Tower" and "dog" (a duplicate)
    assert by_name["titles"]["removed_single_punctuation"] == 1
    assert by_name["titles"]["added"] == 1 and by_name["titles"]["duplicates"] == 1
    assert provenance["entries"] == len(entries) == result.entries
    assert provenance["sha256"] == result.sha256
    assert provenance["never_match"]["examples"] == []


def test_total_cap_and_same_inputs_same_bytes(tmp_path: Path) -> None:
    wordnet, wordfreq = _wordnet(tmp_path), _wordfreq(tmp_path)
    first, second = tmp_path / "a" / "m.txt", tmp_path / "b" / "m.txt"
    for out in (first, second):
        out.parent.mkdir()
        build_metadata(out, wordnet=wordnet, wordfreq=wordfreq, caps=MetadataCaps(total=103))
    assert first.read_bytes() == second.read_bytes()
    assert first.read_text().splitlines()[-3:] == ["entity", "dog", "United States"]
    prov = [Path(f"{p}.provenance.json").read_bytes() for p in (first, second)]
    assert prov[0] == prov[1]
    counts = {s["name"]: s for s in json.loads(prov[0])["sources"]}
    assert counts["wordnet"]["cut_by_total_cap"] == 4  # red, run, able, a cappella
    assert counts["unigrams"]["cut_by_total_cap"] == 3  # the, cat, zebra ("dog" is a duplicate)


def test_missing_and_bad_inputs_name_the_file_and_fix(tmp_path: Path) -> None:
    out = tmp_path / "m.txt"
    with pytest.raises(FileNotFoundError, match=r"nowhere/data.noun.*wordnet-base"):
        build_metadata(out, wordnet=tmp_path / "nowhere")
    bad_gz = tmp_path / "broken.gz"
    bad_gz.write_bytes(b"\x1f\x8b\x08\x00garbage")
    with pytest.raises(ValueError, match=r"broken.gz cannot be read.*pywordfreq"):
        build_metadata(out, wordfreq=bad_gz)
    with pytest.raises(ValueError, match=r"line 2 is 'no count here'"):
        build_metadata(out, wordfreq=_wordfreq(tmp_path, ["a;5", "no count here"]))
    corpus = tmp_path / "c.parquet"
    pq.write_table(pa.table({"text": ["a b"]}), corpus)
    with pytest.raises(ValueError, match=r"no column 'caption' \(columns: \['text'\]\)"):
        build_metadata(out, bigram_corpus=corpus, bigram_column="caption")
    with pytest.raises(ValueError, match="--max-total is -1"):
        build_metadata(out, wordfreq=_wordfreq(tmp_path), caps=MetadataCaps(total=-1))
    with pytest.raises(ValueError, match="go together"):
        build_metadata(out, bigram_corpus=corpus)
    with pytest.raises(FileNotFoundError, match="output folder"):
        build_metadata(tmp_path / "no" / "m.txt", wordfreq=_wordfreq(tmp_path))
    assert not out.exists()


def test_no_sources_and_nothing_installed_says_how_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(metadata_build, "default_wordnet_dir", lambda: None)
    monkeypatch.setattr(metadata_build, "default_wordfreq_file", lambda: None)
    code = main(["metadata", "build", "--out", str(tmp_path / "m.txt")])
    err = capsys.readouterr().err
    assert code == 2
    assert "WordNet and pywordfreq not installed" in err and "apt-get install wordnet-base" in err
    assert "pip install pywordfreq" in err and "Traceback" not in err


def test_cli_builds_from_given_sources(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "m.txt"
    args = ["metadata", "build", "--out", str(out), "--wordnet", str(_wordnet(tmp_path))]
    assert main([*args, "--wordfreq", str(_wordfreq(tmp_path)), "--max-unigrams", "2"]) == 0
    printed = capsys.readouterr().out
    assert "unigrams" in printed and str(out) in printed
    assert load_entries(str(out))[-1] == "the"  # "the", then "dog" (already from WordNet)
    assert main(["metadata", "build", "--out", str(out), "--titles", str(tmp_path / "x")]) == 2
    assert "titles file" in capsys.readouterr().err


@pytest.mark.skipif(
    metadata_build.default_wordnet_dir() is None or metadata_build.default_wordfreq_file() is None,
    reason="real WordNet (apt-get install wordnet-base) or pywordfreq (pip install) missing",
)
def test_real_sources_give_metaclip_sized_lists(tmp_path: Path) -> None:
    result = build_metadata(tmp_path / "m.txt")
    counts = {s.name: s for s in result.sources}
    assert counts["wordnet"].added == 86_654  # MetaCLIP's WordNet count, after dedup
    assert counts["unigrams"].candidates > 251_465  # capped at MetaCLIP's unigram count
    assert 300_000 < result.entries <= 500_000
    entries = load_entries(str(result.entries_path))
    assert entries[:3] == ["0", "1", "2"] and "dog" in entries and "ice cream" in entries
