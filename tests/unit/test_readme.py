"""README claims checked against the code and recipes they describe."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from kiln.platform.cli import build_parser
from kiln.platform.recipes import TrainRecipe, load_recipe

REPO = Path(__file__).resolve().parents[2]
README = (REPO / "README.md").read_text()


def _section(title: str) -> str:
    start = README.index(f"## {title}")
    end = README.find("\n## ", start + 1)
    return README[start : end if end > 0 else None]


def test_demo_checkpoint_interval_is_the_recipes() -> None:
    recipe = load_recipe(REPO / "recipes/quickstart/train.yaml")
    assert isinstance(recipe, TrainRecipe)
    claims = re.findall(r"checkpointing every (\d+) steps", README)
    assert claims and {int(c) for c in claims} == {recipe.checkpoint.every_steps}


def test_demo_steps_are_the_ones_the_cli_prints() -> None:
    source = (REPO / "kiln/platform/quickstart.py").read_text()
    printed = sorted({(int(i), int(n)) for i, n in re.findall(r"\[(\d+)/(\d+)\]", source)})
    total = printed[-1][1]
    assert [i for i, _ in printed] == list(range(1, total + 1))
    demo = _section("What `make demo` does")
    numbered = re.findall(r"^(\d+)\. \*\*", demo, flags=re.M)
    assert [int(n) for n in numbered] == list(range(1, total + 1))
    assert f"`[1/{total}]` .. `[{total}/{total}]`" in demo


def test_readme_curate_examples_keep_the_quickstart_dataset() -> None:
    """A `kiln curate` of the quickstart recipe with changed settings writes elsewhere:
    the quickstart's train recipe reads that dataset."""
    quickstart = load_recipe(REPO / "recipes/quickstart/curate.yaml")
    lines = [ln for ln in README.splitlines() if ln.startswith("kiln curate recipes/quickstart/")]
    assert lines
    for line in lines:
        args = shlex.split(line.split("#")[0])
        sets = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
        if sets:
            recipe = load_recipe(REPO / args[2], sets)
            assert recipe.run_dir != quickstart.run_dir, line


def test_help_examples_use_fields_of_their_recipe() -> None:
    """`kiln train --help` shows a train field, `kiln curate --help` a curate one."""
    parser = build_parser()
    verbs = parser._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    for verb in ("train", "curate"):
        help_text = verbs[verb].format_help()
        example = re.search(r"e\.g\. --set (\S+=\S+)", " ".join(help_text.split()))
        assert example, help_text
        recipe = load_recipe(REPO / f"recipes/quickstart/{verb}.yaml", [example.group(1)])
        assert recipe.kind == verb
