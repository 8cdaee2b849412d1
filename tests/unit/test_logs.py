"""Where output goes: kiln's lines to the terminal, library output to the run's logs/."""

from __future__ import annotations

import io
import logging
import subprocess
import sys
import traceback
from collections.abc import Iterator
from pathlib import Path

import pytest

from kiln import console
from kiln.platform import logs
from kiln.training.launch import last_error_line


@pytest.fixture
def configured(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """`logs.configure` as the CLI calls it, undone afterwards (a fresh sink, loggers and
    environment as they were)."""
    monkeypatch.setattr(logs, "_sink", logs._Sink())
    for name in (console.VERBOSE_ENV, "RAY_DATA_DISABLE_PROGRESS_BARS", "TQDM_DISABLE"):
        monkeypatch.delenv(name, raising=False)
    root, kiln_logger = logging.getLogger(), logging.getLogger("kiln")
    saved = (root.level, list(root.handlers), kiln_logger.level, list(kiln_logger.handlers))
    saved_propagate = kiln_logger.propagate
    logs.configure(False)
    yield
    root.setLevel(saved[0])
    root.handlers[:] = saved[1]
    kiln_logger.setLevel(saved[2])
    kiln_logger.handlers[:] = saved[3]
    kiln_logger.propagate = saved_propagate
    logging.captureWarnings(False)


def test_library_logger_goes_to_the_run_log_not_the_terminal(
    configured: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    noisy = logging.getLogger("some.library")
    noisy.addHandler(logging.StreamHandler(sys.stderr))
    noisy.propagate = False
    try:
        logs.capture_library_loggers()
        noisy.warning("before the run dir is known")
        path = logs.attach_run(tmp_path / "run")
        noisy.warning("\x1b[36mcoloured\x1b[0m after")
        logging.getLogger("kiln.curation").info("step read: running")
    finally:
        noisy.handlers.clear()
    assert path is not None and path.parent == tmp_path / "run" / "logs"
    text = path.read_text()
    assert "before the run dir is known" in text and "coloured after" in text
    assert "\x1b" not in text  # no colour codes in files
    err = capsys.readouterr().err
    assert "some.library" not in err and "coloured" not in err
    assert "[kiln] step read: running" in err
    assert "step read" not in text


def test_ray_worker_lines_kiln_to_terminal_rest_to_log(
    configured: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = logs.attach_run(tmp_path)
    assert path is not None
    logs._on_worker_output(
        {
            "pid": 42,
            "actor_name": "RayTrainWorker",
            "is_err": False,
            "lines": [
                "Setting up process group for: env:// [rank=0, world_size=2]",
                "\x1b[32m[kiln] step 2/6 loss 3.1\x1b[0m",
            ],
        }
    )
    out = capsys.readouterr()
    assert out.out == "[kiln] step 2/6 loss 3.1\n" and out.err == ""
    text = path.read_text()
    assert "(RayTrainWorker pid=42) Setting up process group" in text
    assert "(RayTrainWorker pid=42) [kiln] step 2/6" in text


def test_verbose_echoes_library_lines_without_colour(
    configured: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(console.VERBOSE_ENV, "1")
    err = io.StringIO()  # not a terminal: colour codes stripped
    monkeypatch.setattr(sys, "stderr", err)
    logs.attach_run(tmp_path)
    logs._on_worker_output(
        {"pid": 7, "task_name": "read", "is_err": True, "lines": ["\x1b[33mwarn\x1b[0m x"]}
    )
    assert err.getvalue() == "(read pid=7) warn x\n"


def test_library_output_to_moves_c_level_output_and_keeps_kiln_lines(tmp_path: Path) -> None:
    """A child process (as C++ code would) writes straight to fds 1 and 2: the file gets
    it; `say` still reaches the original stdout."""
    script = f"""
import subprocess, sys
from kiln.console import library_output_to, say
with library_output_to({str(tmp_path / "rank0.log")!r}):
    subprocess.run(["sh", "-c", "echo from-fd-1; echo from-fd-2 >&2"], check=True)
    print("python print")
    say("step 1/2")
print("after")
"""
    proc = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env={**__import__("os").environ, console.VERBOSE_ENV: "0"},
        check=True,
    )
    assert proc.stdout == "[kiln] step 1/2\nafter\n" and proc.stderr == ""
    log = (tmp_path / "rank0.log").read_text()
    assert "from-fd-1" in log and "from-fd-2" in log and "python print" in log


def test_last_error_line_finds_the_exception() -> None:
    tail = (
        '[kiln] step 2/6\nTraceback (most recent call last):\n  File "x.py", line 1\n'
        "ray.exceptions.ActorDiedError: The actor died unexpectedly\n\nsome trailing line\n"
    )
    assert last_error_line(tail) == "ray.exceptions.ActorDiedError: The actor died unexpectedly"
    assert last_error_line("no error here\n") is None


def test_ray_train_failure_headline_names_the_dead_rank_or_the_error() -> None:
    """Ray Train's error for a failed group holds every rank's traceback (~285 lines for a
    dead worker); the CLI prints one line: the rank that died (the others then fail on its
    lost connection), else the first rank's own error."""
    from ray.exceptions import ActorDiedError, RayTaskError
    from ray.train import WorkerGroupError

    from kiln.training.launch import _ray_failure

    try:
        raise RuntimeError("Connection reset by peer\nmore detail")
    except RuntimeError as e:
        reset = RayTaskError("train_fn", traceback.format_exc(), e)
    died = WorkerGroupError("...", {0: reset, 1: ActorDiedError()})
    assert _ray_failure(died) == (
        "the worker process of rank 1 died (killed, or out of memory: see the machine's kernel log)"
    )
    assert _ray_failure(WorkerGroupError("...", {0: reset})) == (
        "rank 0: RuntimeError: Connection reset by peer"
    )


def test_ray_driver_error_listener_goes_to_the_log(
    configured: None,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Ray's driver prints errors pushed by the raylet ("A worker died or was killed ...")
    through `print_to_stdstream` directly: routed, they land in the run log only."""
    import ray._private.worker as ray_worker
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    monkeypatch.setattr(ray_worker, "print_to_stdstream", ray_worker.print_to_stdstream)
    monkeypatch.setattr(dispatcher, "handlers", list(dispatcher.handlers))
    path = logs.attach_run(tmp_path)
    assert path is not None and logs.route_ray_worker_output()
    ray_worker.print_to_stdstream(
        {"lines": ["A worker died or was killed"], "pid": "raylet", "is_err": False},
        ignore_prefix=False,
    )
    dispatcher.emit({"lines": ["[kiln] step 1/2"], "pid": 3, "actor_name": "W", "is_err": False})
    assert capsys.readouterr().out == "[kiln] step 1/2\n"
    assert "(raylet) A worker died or was killed" in path.read_text()
