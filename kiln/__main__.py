"""``python -m kiln ...``: the `kiln` command, for starters that run a module (torchrun -m)."""

from kiln.platform.cli import run

run()
