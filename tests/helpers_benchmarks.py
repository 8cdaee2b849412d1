"""Running a script of `benchmarks/` the way a user does, for the tests of its CPU path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

from tests.conftest import REPO

__all__ = ["run_benchmark"]


def run_benchmark(script: str, *args: str) -> tuple[list[str], dict[str, Any]]:
    """Run ``benchmarks/<script>`` with `args` in a fresh interpreter (the repository on
    PYTHONPATH); its stdout lines and the JSON figures of its last line. Fails the test,
    with the script's output, when it exits non-zero."""
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    )
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / script), *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    return lines, json.loads(lines[-1])
