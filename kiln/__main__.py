"""``python -m kiln ...``: the `kiln` command, for starters that run a module (torchrun -m)."""

import sys

from kiln.platform.cli import main

sys.exit(main())
