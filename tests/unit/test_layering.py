"""DESIGN.md's layering, enforced: platform -> {data_curation, training} -> {models,
storage, contracts}; data_curation and training never import each other.

Every module is parsed with `ast` (nothing is imported), and every import counts: at the
top, inside a function (the lazy imports kiln uses to keep startup light), under
``TYPE_CHECKING``, and a module path written as a whole string (``import_module`` calls,
lazy-export tables).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

#: package folder -> packages its modules must not import.
FORBIDDEN: dict[str, tuple[str, ...]] = {
    "kiln/data_curation": ("kiln.training", "kiln.platform", "kiln.inference"),
    "kiln/training": ("kiln.data_curation", "kiln.platform", "kiln.inference"),
    "kiln/models": ("kiln.training", "kiln.data_curation", "kiln.platform", "kiln.inference"),
}

_MODULE_PATH = re.compile(r"kiln(\.[A-Za-z_][A-Za-z0-9_]*)+")


def _imported(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, module) of every import in `tree`, and of every string that is a kiln
    module path."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
        elif (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and _MODULE_PATH.fullmatch(node.value)
        ):
            found.append((node.lineno, node.value))
    return found


def violations(source: str, forbidden: tuple[str, ...], name: str = "<string>") -> list[str]:
    """``name:line imports module`` for each import of `source` inside `forbidden`."""
    out = []
    for line, module in _imported(ast.parse(source, filename=name)):
        if any(module == f or module.startswith(f + ".") for f in forbidden):
            out.append(f"{name}:{line} imports {module}")
    return sorted(set(out))


def test_the_checker_sees_every_kind_of_import() -> None:
    bad = ("kiln.training",)
    source = (
        "import kiln.training.export\n"
        "from kiln.training import evaluate\n"
        "def f():\n"
        "    from kiln.training.transforms import decode_rgb\n"
        "_HOMES = {'x': 'kiln.training.evaluate'}\n"
        "'''a docstring naming kiln.training.export in prose'''\n"
        "from kiln.models.weights import load_weights\n"
        "import kiln.trainingx\n"
    )
    assert violations(source, bad) == [
        "<string>:1 imports kiln.training.export",
        "<string>:2 imports kiln.training",
        "<string>:2 imports kiln.training.evaluate",
        "<string>:4 imports kiln.training.transforms",
        "<string>:4 imports kiln.training.transforms.decode_rgb",
        "<string>:5 imports kiln.training.evaluate",
    ]


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_only_what_the_layering_allows(package: str) -> None:
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"{package} has no modules: the layering test looks in the wrong place"
    found = []
    for path in files:
        name = str(path.relative_to(ROOT))
        found += violations(path.read_text(encoding="utf-8"), FORBIDDEN[package], name)
    assert not found, (
        f"{package} breaks DESIGN.md's layering (platform -> {{data_curation, training}} -> "
        "{models, storage, contracts}): move what both need into kiln/models, kiln/storage "
        "or kiln/contracts:\n" + "\n".join(found)
    )
