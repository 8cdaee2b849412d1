"""Build a MetaCLIP-style metadata entries file from public sources, reproducibly.

MetaCLIP's 500,000 English entries come from four sources (their counts in parentheses):
WordNet synsets (86,654), Wikipedia unigrams seen at least 100 times (251,465), Wikipedia
bigrams with high pointwise mutual information (100,646) and Wikipedia article titles
(61,235). Their lists are not downloadable; `build_metadata` rebuilds one from sources a user
can install or point to:

- **numbers**: "0" .. "99", always;
- **WordNet** (Debian `wordnet-base`, `/usr/share/wordnet/data.{noun,verb,adj,adv}`,
  parsed here): one entry per synset, its first lemma name (what MetaCLIP's synset names
  are), underscores turned into spaces, adjective markers such as "(a)" removed, case kept;
  in the order noun, verb, adj, adv, each file in its own (offset) order;
- **unigrams** ("word;count" lines, e.g. PyPI `pywordfreq`'s `word_frequencies.gz` of
  English Wikipedia): words with count >= `min_unigram_count`, by count descending, ties by
  the word (code point order);
- **bigrams** with high PMI from a text column of a parquet / jsonl corpus: captions are
  spaced and split as the matcher sees them (`spacing()`), two adjacent tokens that are not
  punctuation form a bigram; bigrams seen at least `bigram_min_count` times with
  PMI = ln(count(a b) * N / (count(a) * count(b))) >= `bigram_min_pmi` (N: all tokens), by
  PMI descending, then count descending, then text;
- **titles**: a UTF-8 text file, one entry per line, in file order (user lists too).

Rules, as MetaCLIP: each source is cut to its cap (MetaCLIP's counts by default) in its own
order; entries that are a single punctuation character are removed; stopwords are kept;
entries with a tab, CR or newline, or blank ones, are removed (they cannot be written to or
matched from an entries file) and leading/trailing spaces are stripped; then the sources are
concatenated in the order numbers, WordNet, unigrams, bigrams, titles, an entry already
present keeps its first position (so an entry's id only depends on the sources before it)
and the list is cut at `max_total`. Same inputs and options, same bytes: the entries file
and its provenance JSON (sources, versions, input sha256, counts per source, the options;
no timestamps).
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.metadata
import importlib.util
import itertools
import json
import math
import os
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kiln.data_curation.matching import spacing, unmatchable_entries
from kiln.storage import atomic_write

__all__ = [
    "DEFAULT_WORDNET_DIR",
    "INSTALL_HINT",
    "MetadataBuild",
    "MetadataCaps",
    "SourceCounts",
    "build_metadata",
    "default_wordfreq_file",
    "default_wordnet_dir",
    "missing_default_sources",
    "number_entries",
    "pmi_bigrams",
    "read_titles",
    "wordfreq_unigrams",
    "wordnet_entries",
]

DEFAULT_WORDNET_DIR = Path("/usr/share/wordnet")
WORDNET_FILES = ("data.noun", "data.verb", "data.adj", "data.adv")
INSTALL_HINT = (
    "install WordNet with `apt-get install wordnet-base` (files under /usr/share/wordnet) "
    "and the Wikipedia unigram counts with `pip install pywordfreq`, or point to the files "
    "with --wordnet DIR / --wordfreq FILE (or pick other sources: --bigram-corpus, --titles)"
)
_ADJ_MARKER = re.compile(r"\((?:a|p|ip)\)$")
_WRAPPED_PUNCT = frozenset(",.;:?!`")
_FORMAT = "kiln-metadata/1"


@dataclass(frozen=True)
class MetadataCaps:
    """Per-source and total entry caps; defaults are MetaCLIP's English counts."""

    wordnet: int = 86_654
    unigrams: int = 251_465
    bigrams: int = 100_646
    titles: int = 61_235
    total: int = 500_000


@dataclass
class SourceCounts:
    """What one source contributed (lands in the provenance file)."""

    name: str
    path: str | None = None
    version: str | None = None
    sha256: str | None = None
    candidates: int = 0  # distinct valid entries the source offered, before its cap
    repeated_in_source: int = 0
    removed_single_punctuation: int = 0
    removed_invalid: int = 0  # blank, or a tab / CR / newline inside
    cut_by_source_cap: int = 0
    duplicates: int = 0  # already given by an earlier source
    cut_by_total_cap: int = 0
    added: int = 0


@dataclass
class MetadataBuild:
    """The result of `build_metadata`: where it wrote, what, and counts per source."""

    entries_path: Path
    provenance_path: Path
    entries: int
    sha256: str
    sources: list[SourceCounts] = field(default_factory=list)
    never_match: int = 0

    def summary(self) -> str:
        """A small table of counts per source, for the CLI."""
        lines = [f"{'source':10s} {'offered':>9s} {'added':>9s} {'dups':>8s} {'capped':>8s}"]
        for s in self.sources:
            capped = s.cut_by_source_cap + s.cut_by_total_cap
            lines.append(
                f"{s.name:10s} {s.candidates:9d} {s.added:9d} {s.duplicates:8d} {capped:8d}"
            )
        lines.append(f"{'total':10s} {'':9s} {self.entries:9d}")
        lines.append(f"wrote {self.entries_path} (sha256 {self.sha256[:16]}...)")
        lines.append(f"wrote {self.provenance_path}")
        if self.never_match:
            lines.append(
                f"note: {self.never_match} entries (kept, as MetaCLIP does) can never match a "
                "caption, e.g. glued punctuation as in 'St. Louis'; see the provenance file"
            )
        return "\n".join(lines)


def default_wordnet_dir() -> Path | None:
    """WordNet's dictionary folder if installed (`$WNSEARCHDIR`, else Debian's path)."""
    for candidate in (os.environ.get("WNSEARCHDIR"), DEFAULT_WORDNET_DIR):
        if candidate and (Path(candidate) / "data.noun").is_file():
            return Path(candidate)
    return None


def default_wordfreq_file() -> Path | None:
    """`word_frequencies.gz` of the installed PyPI `pywordfreq` package, if any."""
    spec = importlib.util.find_spec("pywordfreq")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = Path(folder) / "word_frequencies.gz"
        if path.is_file():
            return path
    return None


def missing_default_sources() -> list[str]:
    """The default sources (WordNet, pywordfreq) that are not installed here."""
    found = (("WordNet", default_wordnet_dir()), ("pywordfreq", default_wordfreq_file()))
    return [name for name, where in found if where is None]


def number_entries() -> list[str]:
    """'0' .. '99'."""
    return [str(i) for i in range(100)]


def _open_text(path: Path, what: str, fix: str) -> Iterator[str]:
    """Lines of a UTF-8 (optionally gzip) text file; clear errors naming it and the fix."""
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist: {fix}")
    try:
        with path.open("rb") as raw:
            gzipped = raw.read(2) == b"\x1f\x8b"
        opener = gzip.open if gzipped else open
        with opener(path, "rt", encoding="utf-8") as f:
            yield from f
    except (OSError, UnicodeDecodeError, EOFError) as e:
        raise ValueError(f"{what} {path} cannot be read ({e}): {fix}") from e


def wordnet_entries(folder: Path, *, all_lemmas: bool = False) -> list[str]:
    """WordNet synset names (first lemma of each synset; every lemma with `all_lemmas`),
    underscores as spaces, in noun, verb, adj, adv file order; duplicates kept (removed
    later by the builder)."""
    fix = "install Debian's `wordnet-base` (apt-get install wordnet-base) or pass --wordnet DIR"
    names: list[str] = []
    for name in WORDNET_FILES:
        path = folder / name
        for lineno, line in enumerate(_open_text(path, "WordNet file", fix), start=1):
            if line.startswith("  "):  # licence header
                continue
            fields = line.split(" ")
            try:
                count = int(fields[3], 16)
                lemmas = [fields[4 + 2 * i] for i in range(count if all_lemmas else 1)]
            except (IndexError, ValueError) as e:
                raise ValueError(
                    f"WordNet file {path} line {lineno} is not in WordNet's data format "
                    f"(offset lex_filenum ss_type w_cnt word lex_id ...): {fix}"
                ) from e
            names += [_ADJ_MARKER.sub("", lemma).replace("_", " ") for lemma in lemmas]
    return names


def _wordnet_version(folder: Path) -> str | None:
    with (folder / "data.noun").open(encoding="utf-8", errors="replace") as f:
        for _, line in zip(range(40), f, strict=False):
            found = re.search(r"WordNet (\d+(?:\.\d+)*)", line)
            if found:
                return found.group(1)
    return None


def wordfreq_unigrams(path: Path, *, min_count: int = 100) -> list[str]:
    """Words of a "word;count" file with count >= `min_count`, by count descending, then
    word. The empty word (pywordfreq lists one) is skipped."""
    fix = "install it with `pip install pywordfreq` or pass --wordfreq FILE (word;count lines)"
    counted: list[tuple[int, str]] = []
    for lineno, line in enumerate(_open_text(path, "word frequency file", fix), start=1):
        line = line.rstrip("\r\n")
        if not line:
            continue
        word, sep, count_text = line.rpartition(";")
        if not sep or not count_text.strip().isdigit():
            raise ValueError(
                f"word frequency file {path} line {lineno} is {line[:80]!r}, not 'word;count': "
                f"{fix}"
            )
        count = int(count_text)
        if count >= min_count and word:
            counted.append((-count, word))
    counted.sort()
    return [word for _, word in counted]


def _read_column(path: Path, column: str) -> Iterator[Any]:
    """Values of `column` from a parquet or JSON-lines file."""
    fix = "pass --bigram-corpus a .parquet or .jsonl file and --bigram-column one of its columns"
    if not path.is_file():
        raise FileNotFoundError(f"bigram corpus {path} does not exist: {fix}")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            names = pq.read_schema(path).names
            if column not in names:
                raise ValueError(
                    f"bigram corpus {path} has no column {column!r} (columns: {names}): {fix}"
                )
            table = pq.read_table(path, columns=[column])
        except OSError as e:
            raise ValueError(f"bigram corpus {path} cannot be read as parquet ({e}): {fix}") from e
        for batch in table.column(column).chunks:
            yield from batch.to_pylist()
        return
    if path.suffix not in (".jsonl", ".ndjson", ".json"):
        raise ValueError(f"bigram corpus {path}: unknown file type {path.suffix!r}: {fix}")
    seen_column = False
    for lineno, line in enumerate(_open_text(path, "bigram corpus", fix), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"bigram corpus {path} line {lineno} is not JSON ({e}): {fix}") from e
        if isinstance(row, dict) and column in row:
            seen_column = True
            yield row[column]
    if not seen_column:
        raise ValueError(f"bigram corpus {path} has no rows with the field {column!r}: {fix}")


def pmi_bigrams(texts: Iterable[Any], *, min_count: int = 5, min_pmi: float = 0.0) -> list[str]:
    """Bigrams of adjacent non-punctuation tokens (as the matcher splits captions) seen at
    least `min_count` times with PMI >= `min_pmi`, by PMI descending, count descending,
    text. Non-string values are skipped."""
    unigrams: Counter[str] = Counter()
    bigrams: Counter[tuple[str, str]] = Counter()
    for text in texts:
        if not isinstance(text, str):
            continue
        tokens = spacing(text)[1:-1].split(" ")  # empty tokens stand for double spaces
        unigrams.update(t for t in tokens if t)
        for a, b in itertools.pairwise(tokens):
            if a and b and a not in _WRAPPED_PUNCT and b not in _WRAPPED_PUNCT:
                bigrams[(a, b)] += 1
    total = sum(unigrams.values())
    ranked = []
    for (a, b), count in bigrams.items():
        if count < min_count:
            continue
        pmi = math.log(count * total / (unigrams[a] * unigrams[b]))
        if pmi >= min_pmi:
            ranked.append((-round(pmi, 9), -count, f"{a} {b}"))
    ranked.sort()
    return [text for _, _, text in ranked]


def read_titles(path: Path) -> list[str]:
    """One entry per line of a UTF-8 text file, in file order."""
    fix = "pass --titles a UTF-8 text file with one entry per line"
    return [line.rstrip("\r\n") for line in _open_text(path, "titles file", fix)]


def _sha256_files(paths: Iterable[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        file_digest = hashlib.sha256(path.read_bytes()).hexdigest()
        digest.update(f"{path.name}:{file_digest}\n".encode())
    return digest.hexdigest()


def _is_single_punctuation(entry: str) -> bool:
    return len(entry) == 1 and (unicodedata.category(entry).startswith("P") or entry == "`")


def _add_source(
    counts: SourceCounts,
    candidates: Iterable[str],
    cap: int | None,
    entries: list[str],
    seen: set[str],
    total_cap: int,
) -> None:
    """Clean, cap and append one source's candidates to `entries` (first position wins)."""
    offered: list[str] = []
    offered_set: set[str] = set()
    for raw in candidates:
        entry = raw.strip(" ")
        if not entry.strip() or any(c in entry for c in "\t\r\n"):
            counts.removed_invalid += 1
        elif _is_single_punctuation(entry):
            counts.removed_single_punctuation += 1
        elif entry in offered_set:
            counts.repeated_in_source += 1
        else:
            offered_set.add(entry)
            offered.append(entry)
    counts.candidates = len(offered)
    if cap is not None and len(offered) > cap:
        counts.cut_by_source_cap = len(offered) - cap
        offered = offered[:cap]
    for entry in offered:
        if entry in seen:
            counts.duplicates += 1
        elif len(entries) >= total_cap:
            counts.cut_by_total_cap += 1
        else:
            seen.add(entry)
            entries.append(entry)
            counts.added += 1


def build_metadata(
    out: str | os.PathLike[str],
    *,
    wordnet: str | os.PathLike[str] | None = None,
    wordfreq: str | os.PathLike[str] | None = None,
    bigram_corpus: str | os.PathLike[str] | None = None,
    bigram_column: str | None = None,
    titles: str | os.PathLike[str] | None = None,
    caps: MetadataCaps | None = None,
    min_unigram_count: int = 100,
    bigram_min_count: int = 5,
    bigram_min_pmi: float = 0.0,
    wordnet_all_lemmas: bool = False,
) -> MetadataBuild:
    """Write the entries file `out` and `out + ".provenance.json"`; see the module doc.

    `wordnet` / `wordfreq` may be "auto" (the installed WordNet / pywordfreq). With no
    source at all, both are "auto" and must be installed (the error says how).
    """
    caps = caps or MetadataCaps()
    for name, value in asdict(caps).items():
        if value < 0:
            raise ValueError(f"--max-{name} is {value}: a cap must be 0 or more")
    if min_unigram_count < 1 or bigram_min_count < 1:
        raise ValueError(
            f"--min-unigram-count ({min_unigram_count}) and --bigram-min-count "
            f"({bigram_min_count}) must be at least 1"
        )
    if wordnet is None and wordfreq is None and bigram_corpus is None and titles is None:
        wordnet = wordfreq = "auto"
        missing = missing_default_sources()
        if missing:
            raise FileNotFoundError(
                f"no metadata sources given and {' and '.join(missing)} not installed: "
                f"{INSTALL_HINT}"
            )
    if (bigram_corpus is None) != (bigram_column is None):
        raise ValueError("--bigram-corpus and --bigram-column go together: give both or neither")

    entries: list[str] = []
    seen: set[str] = set()
    sources: list[SourceCounts] = []

    def add(counts: SourceCounts, candidates: Iterable[str], cap: int | None) -> None:
        _add_source(counts, candidates, cap, entries, seen, caps.total)
        sources.append(counts)

    add(SourceCounts(name="numbers"), number_entries(), None)
    if wordnet is not None:
        folder = default_wordnet_dir() if wordnet == "auto" else Path(wordnet)
        if folder is None:
            raise FileNotFoundError(f"WordNet is not installed: {INSTALL_HINT}")
        names = wordnet_entries(folder, all_lemmas=wordnet_all_lemmas)
        counts = SourceCounts(
            name="wordnet",
            path=str(folder),
            version=_wordnet_version(folder),
            sha256=_sha256_files(folder / n for n in WORDNET_FILES),
        )
        add(counts, names, caps.wordnet)
    if wordfreq is not None:
        path = default_wordfreq_file() if wordfreq == "auto" else Path(wordfreq)
        if path is None:
            raise FileNotFoundError(f"pywordfreq is not installed: {INSTALL_HINT}")
        words = wordfreq_unigrams(path, min_count=min_unigram_count)
        version = None
        if wordfreq == "auto":
            version = f"pywordfreq {importlib.metadata.version('pywordfreq')}"
        counts = SourceCounts(
            name="unigrams", path=str(path), version=version, sha256=_sha256_files([path])
        )
        add(counts, words, caps.unigrams)
    if bigram_corpus is not None and bigram_column is not None:
        path = Path(bigram_corpus)
        found = pmi_bigrams(
            _read_column(path, bigram_column), min_count=bigram_min_count, min_pmi=bigram_min_pmi
        )
        counts = SourceCounts(name="bigrams", path=str(path), sha256=_sha256_files([path]))
        add(counts, found, caps.bigrams)
    if titles is not None:
        path = Path(titles)
        lines = read_titles(path)
        counts = SourceCounts(name="titles", path=str(path), sha256=_sha256_files([path]))
        add(counts, lines, caps.titles)

    out_path = Path(out)
    payload = "".join(f"{entry}\n" for entry in entries).encode("utf-8")
    sha = hashlib.sha256(payload).hexdigest()
    never = unmatchable_entries(entries, normalized=False)
    provenance = {
        "format": _FORMAT,
        "entries_file": out_path.name,
        "entries": len(entries),
        "sha256": sha,
        "order": "numbers, wordnet, unigrams, bigrams, titles; first position wins",
        "options": {
            "caps": asdict(caps),
            "min_unigram_count": min_unigram_count,
            "bigram_column": bigram_column,
            "bigram_min_count": bigram_min_count,
            "bigram_min_pmi": bigram_min_pmi,
            "wordnet_all_lemmas": wordnet_all_lemmas,
        },
        "sources": [asdict(s) for s in sources],
        "never_match": {
            "count": len(never),
            "examples": [entry for _, entry, _ in never[:20]],
            "why": "glued punctuation or a tab/newline; kept as MetaCLIP keeps them",
        },
    }
    provenance_path = out_path.with_name(out_path.name + ".provenance.json")
    _atomic_write(out_path, payload)
    _atomic_write(
        provenance_path, (json.dumps(provenance, indent=2, sort_keys=True) + "\n").encode()
    )
    return MetadataBuild(
        entries_path=out_path,
        provenance_path=provenance_path,
        entries=len(entries),
        sha256=sha,
        sources=sources,
        never_match=len(never),
    )


def _atomic_write(path: Path, data: bytes) -> None:
    """kiln's one atomic write, after checking the output folder exists (no silent mkdir)."""
    if path.parent and not path.parent.is_dir():
        raise FileNotFoundError(
            f"output folder {path.parent} does not exist: create it or pick another --out"
        )
    atomic_write(str(path), data)
