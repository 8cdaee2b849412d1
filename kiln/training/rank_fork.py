"""A warm process that forks the local launcher's CPU ranks, so a rank does not spend
seconds importing torch before it trains.

A rank started as ``python -m kiln.training.launch`` spends about 2.5 s of CPU importing
torch and as much again importing ``torch._dynamo`` (``torch.optim`` imports it when the
first optimizer is built), on every rank of every launch: a restart after a failure, and
each launch from one Python process (the API in a notebook, a sweep, the test suite) paid
it again. The fork server imports them, kiln's rank code and DeepSpeed once; per rank it
forks a child that becomes that rank: its own session, the rank's environment, working
directory, argv and log file as stdin/stdout/stderr, then ``kiln.training.launch.main``
and the interpreter's normal exit. The child dies with the server (PR_SET_PDEATHSIG), as a rank
started by `subprocess` dies with its launcher.

CPU ranks only: a process that has touched CUDA cannot fork usable CUDA children, so GPU
ranks start as fresh interpreters. ``KILN_FORK_RANKS=0`` starts every rank that way.

One server per (interpreter, working directory, environment without the per-launch
variables): a module that reads the environment when imported (OpenMP reads
OMP_NUM_THREADS as torch loads it) sees in the server what it would in a fresh rank.
kiln's own variables (``KILN_*``, e.g. the fault-injection ones) are read as kiln runs,
never as it is imported, so they do not make another server.
The launching process keeps at most `_KEEP` idle servers; a server ends when its launcher
does (its stdin closes; started from the main thread, the kernel also kills it:
PR_SET_PDEATHSIG), killing its ranks.

Protocol on the server's stdin/stdout (its fd 1 is pointed at its stderr once it has
taken the pipe, for whatever a library prints), JSON lines: the launcher writes
``{"argv", "env", "cwd", "log"}``; the server answers ``{"pid"}`` or ``{"error"}``, and
``{"exit": pid, "code": c}`` when a rank exits, ``c`` as `subprocess.Popen.returncode`
reads (negative: killed by that signal).
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import io
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading
from collections import OrderedDict
from typing import Any, Protocol

from kiln.liveness import die_with_parent

__all__ = [
    "FORK_RANKS_ENV",
    "PER_LAUNCH_ENV",
    "RANK_COMMAND",
    "RankProcess",
    "RankServer",
    "name_process",
    "server_for",
]

#: How a local rank starts as a fresh interpreter (its arguments follow).
RANK_COMMAND = [sys.executable, "-m", "kiln.training.launch"]
#: "0" starts every local rank as a fresh interpreter.
FORK_RANKS_ENV = "KILN_FORK_RANKS"
#: Variables that differ between the ranks and attempts of one launch: not part of the
#: server's identity, and never read at import time.
PER_LAUNCH_ENV = frozenset({"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_PORT"})
#: What the server imports before it forks: torch, torch._dynamo, kiln's rank code and
#: rank 0's TensorBoard writer; DeepSpeed too where it runs on CPU (`_serve`).
_PREIMPORT = (
    "torch",
    "torch._dynamo",
    "torch.distributed",
    "kiln.training.launch",
    "kiln.training.loop",
    "tensorboard.summary.writer.event_file_writer",
    "tensorboard.compat.proto.event_pb2",
    "tensorboard.compat.proto.summary_pb2",
)
_KEEP = 2  # idle servers kept per launching process (e.g. one per world size)
_START_TIMEOUT_S = 600.0  # imports on a slow, loaded machine


class RankProcess(Protocol):
    """What the local launcher needs of a rank: `subprocess.Popen` or a forked rank."""

    pid: int

    def poll(self) -> int | None: ...

    def wait(self, timeout: float | None = None) -> int: ...


def name_process(name: str) -> None:
    """Linux: the name `ps -o comm`, `top` and psutil's `name()` show (15 bytes at most)."""
    with contextlib.suppress(Exception):
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME


# --------------------------------------------------------------------------- launcher side


class ForkedRank:
    """A rank the server forked: `subprocess.Popen`'s pid, poll and wait."""

    def __init__(self, server: RankServer, pid: int, args: list[str]) -> None:
        self.pid, self.args, self._server = pid, args, server
        self.returncode: int | None = None

    def poll(self) -> int | None:
        self.returncode = self._server.exit_code(self.pid)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        code = self._server.wait_exit(self.pid, timeout)
        if code is None:
            raise subprocess.TimeoutExpired(self.args, timeout or 0.0)
        self.returncode = code
        return code


class RankServer:
    """One fork server process, as its launcher sees it."""

    def __init__(self, env: dict[str, str], cwd: str) -> None:
        # its stderr (the reason when it fails), closed with the server
        self._log = tempfile.TemporaryFile()  # noqa: SIM115
        self.env = env
        self._proc = subprocess.Popen(
            [sys.executable, "-m", __name__],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            env=env,
            cwd=cwd,
            start_new_session=True,  # Ctrl-C goes to the launcher, which stops the ranks
            # the kernel's parent death is the death of the *thread* that started it: a
            # server started from another thread outlives it, ending at its stdin's close
            preexec_fn=functools.partial(die_with_parent, os.getpid())
            if threading.current_thread() is threading.main_thread()
            else None,
        )
        self._lock = threading.Lock()  # one spawn at a time
        self._changed = threading.Condition()
        self._codes: dict[int, int] = {}
        self._live: set[int] = set()
        self._replies: list[dict[str, Any]] = []
        self._gone = False
        threading.Thread(target=self._read, name="kiln-rank-fork", daemon=True).start()

    def _read(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            try:
                msg = json.loads(line)
            except ValueError:  # not an answer (the server writes only answers there)
                continue
            with self._changed:
                if "exit" in msg:
                    self._codes[msg["exit"]] = msg["code"]
                    self._live.discard(msg["exit"])
                else:
                    self._replies.append(msg)
                self._changed.notify_all()
        self._proc.wait()
        with self._changed:  # its ranks die with it (PR_SET_PDEATHSIG)
            self._gone = True
            for pid in self._live:
                self._codes.setdefault(pid, -signal.SIGKILL)
            self._live.clear()
            self._changed.notify_all()

    @property
    def alive(self) -> bool:
        return not self._gone

    @property
    def busy(self) -> bool:
        return bool(self._live)

    def error(self) -> str:
        """The last line the server wrote to stderr (why it ended), or its exit status."""
        self._log.seek(0)
        lines = self._log.read().decode(errors="replace").strip().splitlines()
        return lines[-1] if lines else f"exit status {self._proc.poll()}"

    def spawn(self, cmd: list[str], env: dict[str, str], log: str) -> ForkedRank:
        """Fork the rank `subprocess.Popen(cmd, env=env)` would start, `cmd` being
        ``python -m kiln.training.launch ARGS``, with `log` as its stdout and stderr;
        raises RuntimeError (naming why) when the server cannot."""
        if cmd[:3] != RANK_COMMAND:
            raise ValueError(f"{cmd[:3]} is not a rank's command ({RANK_COMMAND})")
        request = {"argv": cmd[3:], "env": env, "cwd": os.getcwd(), "log": log}
        with self._lock:
            assert self._proc.stdin is not None
            try:
                self._proc.stdin.write((json.dumps(request) + "\n").encode())
                self._proc.stdin.flush()
            except OSError as e:
                raise RuntimeError(f"the rank fork server is gone ({self.error()})") from e
            with self._changed:
                self._changed.wait_for(lambda: self._replies or self._gone, _START_TIMEOUT_S)
                if not self._replies:
                    raise RuntimeError(
                        f"the rank fork server did not answer ({self.error()})"
                        if self._gone
                        else f"the rank fork server did not answer in {_START_TIMEOUT_S:.0f}s"
                    )
                reply = self._replies.pop(0)
                if "error" in reply:
                    raise RuntimeError(f"the rank fork server could not fork: {reply['error']}")
                pid = int(reply["pid"])
                if pid not in self._codes:
                    self._live.add(pid)
        return ForkedRank(self, pid, cmd)

    def exit_code(self, pid: int) -> int | None:
        with self._changed:
            return self._codes.get(pid)

    def wait_exit(self, pid: int, timeout: float | None) -> int | None:
        with self._changed:
            self._changed.wait_for(lambda: pid in self._codes, timeout)
            return self._codes.get(pid)

    def close(self) -> None:
        """End the server (a server still running ranks kills their process groups as its
        stdin closes, and is given 10 s for that)."""
        with contextlib.suppress(OSError):
            if self._proc.stdin is not None:
                self._proc.stdin.close()
        try:
            self._proc.wait(timeout=10 if self.busy else 0)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._log.close()


_servers: OrderedDict[tuple[str, ...], RankServer] = OrderedDict()
_servers_lock = threading.Lock()


def server_for(env: dict[str, str]) -> RankServer | None:
    """The fork server for ranks of `env` started from this working directory (started on
    first use); None when KILN_FORK_RANKS=0. Servers this process no longer uses end as
    newer ones start, and all of them at its exit."""
    if env.get(FORK_RANKS_ENV, os.environ.get(FORK_RANKS_ENV, "1")) == "0":
        return None
    base = {k: v for k, v in env.items() if k not in PER_LAUNCH_ENV}
    imported_with = sorted(f"{k}={v}" for k, v in base.items() if not k.startswith("KILN_"))
    key = (sys.executable, os.getcwd(), *imported_with)
    with _servers_lock:
        server = _servers.get(key)
        if server is not None and not server.alive:
            del _servers[key]
            server = None
        if server is None:
            server = _servers[key] = RankServer(base, os.getcwd())
        _servers.move_to_end(key)
        idle = [k for k, s in _servers.items() if k != key and not s.busy]
        for old in idle[: max(0, len(_servers) - _KEEP)]:
            _servers.pop(old).close()
        return server


@atexit.register
def _close_all() -> None:
    with _servers_lock:
        while _servers:
            _servers.popitem()[1].close()


# --------------------------------------------------------------------------- server side


def _send(replies: int, msg: dict[str, Any]) -> None:
    data = (json.dumps(msg) + "\n").encode()
    while data:
        data = data[os.write(replies, data) :]


def _serve() -> dict[str, Any]:
    """Answer requests until stdin closes (then kill the ranks and exit); returns only in a
    forked child, with the request it is to run."""
    import importlib

    name_process("kiln-forkserver")
    # the answers go to the launcher's pipe; fd 1 becomes stderr, so that a library that
    # prints as it is imported cannot corrupt them
    replies = os.dup(1)
    os.dup2(2, 1)
    for module in _PREIMPORT:
        importlib.import_module(module)
    if os.environ.get("DS_ACCELERATOR") == "cpu":
        # elsewhere DeepSpeed's import probes for CUDA, which a forked child cannot use
        from kiln.training.engine import import_deepspeed

        import_deepspeed()
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.set_wakeup_fd(wake_w)
    me, buffer, ranks = os.getpid(), b"", set[int]()
    while True:
        readable, _, _ = select.select([0, wake_r], [], [])
        if wake_r in readable:
            with contextlib.suppress(BlockingIOError):
                os.read(wake_r, 4096)
        while ranks:  # reap
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            ranks.discard(pid)
            _send(replies, {"exit": pid, "code": os.waitstatus_to_exitcode(status)})
        if 0 not in readable:
            continue
        chunk = os.read(0, 65536)
        if not chunk:  # the launcher is gone: so are its ranks
            for pid in ranks:
                with contextlib.suppress(OSError):
                    os.killpg(pid, signal.SIGKILL)
            os._exit(0)
        buffer += chunk
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            request = json.loads(line)
            try:
                pid = os.fork()
            except OSError as e:
                _send(replies, {"error": str(e)})
                continue
            if pid == 0:
                signal.set_wakeup_fd(-1)
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                for fd in (wake_r, wake_w, replies):
                    os.close(fd)
                _become(request, me)
                return dict(request)
            ranks.add(pid)
            _send(replies, {"pid": pid})


def _become(request: dict[str, Any], server: int) -> None:
    """In the forked child: the process ``python -m kiln.training.launch`` would be."""
    os.setsid()
    die_with_parent(server)
    name_process("kiln-rank" + request["env"].get("RANK", ""))
    stdin = os.open(os.devnull, os.O_RDONLY)
    log = os.open(request["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    for src, fd in ((stdin, 0), (log, 1), (log, 2)):
        os.dup2(src, fd)
    os.close(stdin)
    os.close(log)
    for name, fd, errors in (("stdout", 1, "strict"), ("stderr", 2, "backslashreplace")):
        stream = io.TextIOWrapper(
            io.FileIO(fd, "w", closefd=False), encoding="utf-8", errors=errors, write_through=True
        )
        setattr(sys, name, stream)
        setattr(sys, f"__{name}__", stream)
    sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False))
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])


if __name__ == "__main__":
    _request = _serve()
    from kiln.process_exit import exit_now
    from kiln.training.launch import main

    sys.argv = [sys.modules["kiln.training.launch"].__file__ or "", *_request["argv"]]
    exit_now(main(_request["argv"]))
