"""The `kiln` command lines written in infra/ (manifests, scripts, their example comments and
infra/README.md), found and checked without running anything: each is parsed by kiln's own
argparse tree, and a curate / train / eval recipe it names is loaded and validated by
kiln's loader with the command's overrides (`kiln.platform.cli.load_job`), as `kiln` does
before any work. What is checked is the same argv the cluster runs, with the image's
install folder (the Dockerfile's WORKDIR) mapped to this checkout.

Where commands are looked for: every string value of a YAML manifest; every code line of a
shell script or Dockerfile (backslash continuations joined, heredoc bodies skipped); the
```bash blocks of a README; and, in all of them, example comment lines, which by this
folder's convention start with `#` and at least two spaces (`#   kubectl apply ...`; prose
comments have one). A command is `kiln ...` or `python -m kiln ...` in command position,
also inside a quoted command (`bash -c '...'`, `ray exec CFG '...'`), after `--` or after
the kiln image in `docker run ... kiln:TAG kiln ...`.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "KilnCommand",
    "check_kiln_argv",
    "dockerfile_workdir",
    "find_kiln_commands",
    "kiln_argvs",
]

_EXAMPLE_COMMENT = re.compile(r"^\s*#\s{2,}(\S.*)$")
_ASSIGNMENT = re.compile(r"^\s*([A-Za-z_]\w*)=(.*)$")
_HEREDOC = re.compile(r"<<-?\s*['\"]?(\w+)['\"]?")
_SEPARATOR = re.compile(r"^[;&|]+$")
_REDIRECT = re.compile(r"^\d*[<>]")


@dataclass(frozen=True)
class KilnCommand:
    """One `kiln` command line: where it is written and its argv after `kiln`."""

    where: str
    argv: tuple[str, ...]


def _logical_lines(text: str) -> Iterator[tuple[int, str, bool]]:
    """(line number, text, is an example comment) with backslash continuations joined;
    prose comments and heredoc bodies left out."""
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        start = i
        raw = lines[i]
        example = _EXAMPLE_COMMENT.match(raw)
        if raw.lstrip().startswith("#") and not example:
            i += 1
            continue
        parts = [example.group(1) if example else raw]
        while parts[-1].rstrip().endswith("\\") and i + 1 < len(lines):
            i += 1
            nxt = lines[i]
            more = _EXAMPLE_COMMENT.match(nxt) if example else None
            parts[-1] = parts[-1].rstrip()[:-1]
            parts.append(more.group(1) if more else nxt)
        line = " ".join(p.strip() for p in parts)
        yield start + 1, line, bool(example)
        heredoc = None if example else _HEREDOC.search(line)
        i += 1
        if heredoc:  # skip the body up to its terminator
            while i < len(lines) and lines[i].strip() != heredoc.group(1):
                i += 1
            i += 1


def _assignments(text: str) -> dict[str, str]:
    """`name=value` lines of a shell script (the values, outer double quotes removed)."""
    out: dict[str, str] = {}
    for _, line, example in _logical_lines(text):
        m = None if example else _ASSIGNMENT.match(line)
        if m:
            value = m.group(2).strip()
            if len(value) >= 2 and value[0] == value[-1] == '"':
                value = value[1:-1]
            out[m.group(1)] = value
    return out


def _expand(text: str, assigned: Mapping[str, str], depth: int = 0) -> str:
    """Shell expansions a static reading can resolve: `"$@"` (extra arguments) dropped,
    `${NAME-default}` / `${NAME:-default}` -> the script's value or the default, `$NAME` /
    `${NAME}` -> the script's value or the placeholder NAME, `$(...)` -> CMD."""
    if depth > 8:
        return text
    text = text.replace('"$@"', "").replace("$@", "")
    text = re.sub(r"\$\([^()]*\)", "CMD", text)

    def with_default(m: re.Match[str]) -> str:
        name, default = m.group(1), m.group(3)
        return _expand(assigned[name], assigned, depth + 1) if name in assigned else default

    def plain(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        return _expand(assigned[name], assigned, depth + 1) if name in assigned else name

    text = re.sub(r"\$\{(\w+)(:?-)([^}]*)\}", with_default, text)
    return re.sub(r"\$\{(\w+)\}|\$([A-Za-z_]\w*)", plain, text)


def _is_python(token: str) -> bool:
    return re.fullmatch(r"python(3(\.\d+)?)?", os.path.basename(token)) is not None


def kiln_argvs(command: str, assigned: Mapping[str, str] | None = None) -> list[list[str]]:
    """The argv after `kiln` of every kiln command in one shell command line."""
    command = _expand(command, assigned or {})
    lexer = shlex.shlex(command, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    lexer.commenters = "#"
    tokens = list(lexer)
    found: list[list[str]] = []
    segment: list[str] = []
    for token in [*tokens, ";"]:
        if not _SEPARATOR.match(token):
            segment.append(token)
            continue
        found.extend(_segment_argvs(segment, assigned or {}))
        segment = []
    return found


def _segment_argvs(segment: list[str], assigned: Mapping[str, str]) -> list[list[str]]:
    i = 0
    while i < len(segment) and _ASSIGNMENT.match(segment[i]):
        i += 1  # NAME=value prefixes
    for j in range(i, len(segment)):
        # command position: first word, after `--`, or after the kiln image in `docker run`
        at_start = j == i or re.fullmatch(r"--|\S*kiln:[\w.-]+", segment[j - 1]) is not None
        rest = None
        if at_start and (segment[j] == "kiln" or segment[j].endswith("/bin/kiln")):
            rest = segment[j + 1 :]
        elif at_start and _is_python(segment[j]) and segment[j + 1 : j + 3] == ["-m", "kiln"]:
            rest = segment[j + 3 :]
        if rest is not None:
            cut = next((k for k, t in enumerate(rest) if _REDIRECT.match(t)), len(rest))
            return [rest[:cut]]
    found: list[list[str]] = []
    for token in segment[i:]:
        if any(c.isspace() for c in token):  # a quoted command: bash -c '...', ray exec '...'
            found.extend(kiln_argvs(token, assigned))
    return found


def _yaml_strings(node: Any) -> Iterator[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for value in node.values():
            yield from _yaml_strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from _yaml_strings(value)


def _bash_blocks(text: str) -> str:
    """The ```bash blocks of a Markdown file, other lines blanked (line numbers kept)."""
    out, inside = [], False
    for line in text.splitlines():
        fence = line.strip().startswith("```")
        if fence:
            inside = not inside and line.strip() in ("```bash", "```sh", "```shell")
        out.append(line if inside and not fence else "")
    return "\n".join(out)


def find_kiln_commands(path: Path, root: Path) -> list[KilnCommand]:
    """Every kiln command written in one infra file (see the module docstring for where)."""
    text = path.read_text()
    rel = path.relative_to(root).as_posix()
    is_yaml = path.suffix in (".yaml", ".yml")
    if path.suffix == ".md":
        text = _bash_blocks(text)
    assigned = {} if is_yaml else _assignments(text)
    commands: list[KilnCommand] = []

    def add(where: str, line: str) -> None:
        try:
            argvs = kiln_argvs(line, assigned)
        except ValueError as e:  # unbalanced quotes: only a problem on a kiln line
            if re.search(r"(^|[\s'\"])kiln\s", line):
                raise ValueError(f"{where}: cannot parse {line!r} as a shell line: {e}") from e
            return
        commands.extend(KilnCommand(where, tuple(argv)) for argv in argvs)

    for number, line, example in _logical_lines(text):
        if not is_yaml or example:
            add(f"{rel}:{number}", line)
    if is_yaml:
        for doc in yaml.safe_load_all(path.read_text()):
            for value in _yaml_strings(doc):
                if any(c.isspace() for c in value.strip()):  # a name is not a command line
                    add(f"{rel} (value)", value)
    return commands


def dockerfile_workdir(dockerfile: Path) -> str:
    """The image's kiln folder: the Dockerfile's one WORKDIR."""
    workdirs = re.findall(r"^WORKDIR\s+(\S+)\s*$", dockerfile.read_text(), flags=re.M)
    if len(workdirs) != 1:
        raise ValueError(f"{dockerfile}: expected one WORKDIR (kiln's folder), found {workdirs}")
    return workdirs[0].rstrip("/")


def check_kiln_argv(argv: tuple[str, ...], *, image_root: str, repo: Path) -> str | None:
    """None when `kiln ARGV` is a real command whose recipe validates; else what is wrong.

    Paths under the image's kiln folder are read from `repo`; relative paths resolve
    against the current directory, which the caller makes the repo root (the image's
    working directory)."""
    from kiln.platform.cli import build_parser, load_job

    mapped = [
        str(repo / a[len(image_root) + 1 :]) if a.startswith(image_root + "/") else a for a in argv
    ]
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            args = build_parser().parse_args(mapped)
        except SystemExit as e:
            if e.code == 0:  # --help
                return None
            lines = err.getvalue().strip().splitlines()
            return lines[-1] if lines else f"argparse exited with {e.code}"
    needs_recipe = args.verb in ("curate", "train") or (
        args.verb == "eval" and not os.path.isdir(args.target)
    )
    if needs_recipe:
        try:
            load_job(args)
        except (ValueError, OSError) as e:
            return f"{type(e).__name__}: {e}"
    return None
