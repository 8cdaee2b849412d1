"""Plain-text tables for the terminal: the one formatter every kiln summary uses."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["format_kv", "format_table"]


def format_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Left-aligned columns separated by two spaces, a rule under the header."""
    cells = [[str(c) for c in header], *[["-" if c is None else str(c) for c in r] for r in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]

    def line(row: list[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()

    return "\n".join([line(cells[0]), line(["-" * w for w in widths]), *map(line, cells[1:])])


def format_kv(pairs: Sequence[tuple[str, object]], title: str = "") -> str:
    """A two-column key/value table, optionally under a title."""
    table = format_table(("", ""), pairs)
    body = "\n".join(table.splitlines()[2:])
    return f"{title}\n{body}" if title else body
