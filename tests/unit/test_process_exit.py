"""`exit_now`: what a normal exit does that anyone can see, without the teardown.

Each case runs a real child interpreter that ends with `exit_now` and checks, from outside,
its exit status, its output (Python's and the C library's, both block-buffered into a
pipe), its atexit handlers, its non-daemon threads and its daemon multiprocessing child
(a DataLoader worker's kind), and that objects still alive at exit were not finalized.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parents[2]

SCRIPT = """
import atexit, ctypes, multiprocessing, sys, threading, time
from pathlib import Path

from kiln.process_exit import exit_now

out = Path(sys.argv[1])
status = eval(sys.argv[2])


def later() -> None:
    time.sleep(0.3)
    (out / "thread").write_text("done")


class Finalized:
    def __del__(self) -> None:
        (out / "finalized").write_text("yes")


def sleep_forever() -> None:
    import os
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)  # not holding the test's pipes open
    os.dup2(1, 2)
    time.sleep(600)


if __name__ == "__main__":
    kept = Finalized()
    atexit.register(lambda: (out / "atexit").write_text("ran"))
    threading.Thread(target=later).start()
    child = multiprocessing.get_context("fork").Process(target=sleep_forever, daemon=True)
    child.start()
    (out / "child").write_text(str(child.pid))
    print("python line", end="")  # no newline: still in the buffer at exit
    ctypes.CDLL(None).printf(b" c line")  # C stdio: still in its buffer too
    exit_now(status)
"""


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _run(tmp_path: Path, status: str) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent(SCRIPT))
    return subprocess.run(
        [sys.executable, str(script), str(tmp_path), status],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(("status", "code"), [("0", 0), ("3", 3), ("None", 0), ("256 + 7", 7)])
def test_exit_does_what_a_normal_exit_shows(tmp_path: Path, status: str, code: int) -> None:
    proc = _run(tmp_path, status)
    assert proc.returncode == code, proc.stderr
    assert proc.stdout == "python line c line"  # both buffers flushed, Python's first
    assert (tmp_path / "atexit").read_text() == "ran"
    assert (tmp_path / "thread").read_text() == "done"  # waited for, as a normal exit does
    child = int((tmp_path / "child").read_text())
    deadline = time.monotonic() + 10  # multiprocessing's atexit handler stopped it
    while _running(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    if _running(child):
        psutil.Process(child).kill()
        pytest.fail("the daemon child outlived its parent")
    # the skipped part: no teardown of what was still alive
    assert not (tmp_path / "finalized").exists()


def test_a_message_is_printed_and_exits_1(tmp_path: Path) -> None:
    proc = _run(tmp_path, "'kiln: something went wrong'")
    assert proc.returncode == 1
    assert proc.stderr.strip().endswith("kiln: something went wrong")
