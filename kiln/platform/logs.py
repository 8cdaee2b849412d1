"""The CLI's output: kiln's own lines on the terminal, the libraries' logs in `RUN/logs/`.

A `kiln` command shows its `[kiln] ...` lines, tables and errors. What Ray, DeepSpeed and
torch log or print is written to the run dir's `logs/` folder and reaches the terminal only
with `kiln -v` / `--verbose`:

- the CLI process: library loggers (`ray`, `ray.train`, DeepSpeed, warnings...) go to
  `RUN/logs/kiln-{time}-{pid}.log` (`configure` at start, `attach_run` once the run dir is
  known, `capture_library_loggers` after a library sets up its own handlers);
- Ray workers (Ray Train's controller and workers, curation tasks): their stdout and stderr
  go to the same file with Ray's `(name pid=N)` prefix; their `[kiln]` lines (rank 0's
  step lines) come to the terminal without it (`route_ray_worker_output`);
- local-launcher ranks write `RUN/logs/trainNNN-rankR.log` (`kiln.training.launch`) and
  torchrun ranks `RUN/logs/torchrun-rankR.log` (`kiln.console.library_output_to`).

Progress bars (Ray Data's, tqdm's) draw only on a terminal; with output redirected they are
off (kiln's own periodic lines remain), and no file gets colour codes. Nothing here is
active unless the CLI calls `configure`: the Python API leaves logging to its caller.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

from kiln.console import KILN_PREFIX, VERBOSE_ENV, kiln_stream, strip_ansi, verbose

__all__ = [
    "LOGS_DIR",
    "attach_run",
    "capture_library_loggers",
    "configure",
    "current_log",
    "error_line",
    "is_configured",
    "outputs_line",
    "process_output_to_log",
    "route_ray_worker_output",
    "write_library_text",
]

LOGS_DIR = "logs"
_PENDING_LINES = 5000  # library lines kept until a run dir is known


class _Sink:
    """The current run log file (or, before there is one, the last lines in memory)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.file: TextIO | None = None
        self.path: Path | None = None
        self.shown_as: str | None = None  # the run dir's URL, when `path` is in its staging
        self.pending: deque[str] = deque(maxlen=_PENDING_LINES)
        self.configured = False

    def write(self, text: str, *, echo: bool = False, is_err: bool = True) -> None:
        clean = strip_ansi(text)
        if not clean.endswith("\n"):
            clean += "\n"
        with self.lock:
            if self.file is None:
                self.pending.append(clean)
            else:
                try:
                    self.file.write(clean)
                    self.file.flush()
                except (OSError, ValueError):  # a full disk: the run reports it, not a log line
                    pass
        if echo:
            stream = sys.stderr if is_err else sys.stdout
            stream.write(text if stream.isatty() else clean)
            stream.flush()

    def attach(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        new = open(path, "a", encoding="utf-8", errors="replace")  # noqa: SIM115 - kept open
        with self.lock:
            old, self.file, self.path = self.file, new, path
            new.writelines(self.pending)
            self.pending.clear()
            new.flush()
        if old is not None:
            old.close()


_sink = _Sink()


class _LibraryHandler(logging.Handler):
    """A library logger's records into the run log (and on stderr with -v)."""

    def __init__(self) -> None:
        super().__init__(logging.NOTSET)
        self.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
        )

    def emit(self, record: logging.LogRecord) -> None:
        try:
            _sink.write(self.format(record), echo=verbose())
        except Exception:  # a log line must never fail the run
            self.handleError(record)


_handler = _LibraryHandler()


class _StderrNow(logging.StreamHandler):
    """kiln's own log lines, to whatever `sys.stderr` is when they are written."""

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, value: TextIO) -> None:
        pass


def is_configured() -> bool:
    """True in a process whose output `configure` arranged (the CLI)."""
    return _sink.configured


def configure(verbose_output: bool = False) -> None:
    """At CLI start: kiln's logger to stderr as `[kiln] ...`, every other logger (and
    Python warnings) to the run log; progress bars off unless stderr is a terminal.
    Exported as environment variables, so processes this one starts do the same."""
    os.environ[VERBOSE_ENV] = "1" if verbose_output else "0"
    if not sys.stderr.isatty():
        os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("TQDM_DISABLE", "1")
    kiln_logger = logging.getLogger("kiln")
    if not kiln_logger.handlers:
        own = _StderrNow()
        own.setFormatter(logging.Formatter(f"{KILN_PREFIX}%(message)s"))
        kiln_logger.addHandler(own)
    kiln_logger.setLevel(logging.INFO)
    kiln_logger.propagate = False
    logging.captureWarnings(True)
    root = logging.getLogger()
    if _handler not in root.handlers:
        root.addHandler(_handler)
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)
    _sink.configured = True
    capture_library_loggers()


def capture_library_loggers() -> None:
    """Move every non-kiln logger's terminal handler to the run log (call after a library
    configured its logging: `ray.init`, `import deepspeed`). No-op unless configured."""
    if not _sink.configured:
        return
    loggers: list[logging.Logger] = [logging.getLogger()]
    loggers += [
        lg
        for name, lg in list(logging.Logger.manager.loggerDict.items())
        if isinstance(lg, logging.Logger) and name != "kiln" and not name.startswith("kiln.")
    ]
    for lg in loggers:
        terminal = [
            h
            for h in lg.handlers
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
        ]
        for h in terminal:
            lg.removeHandler(h)
        if terminal and not lg.propagate and _handler not in lg.handlers:
            lg.addHandler(_handler)


def attach_run(run_dir: str | Path, *, shown_as: str | None = None) -> Path | None:
    """From now on this process's library output goes to `RUN/logs/kiln-{time}-{pid}.log`
    (with whatever was logged before a run dir was known); returns that path. No-op (None)
    unless configured. `shown_as`: the URL that local folder `run_dir` stages (a run dir on
    object storage), which the job's last lines name instead."""
    if not _sink.configured:
        return None
    _sink.shown_as = shown_as
    name = f"kiln-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    path = Path(run_dir) / LOGS_DIR / name
    try:
        _sink.attach(path)
    except OSError:  # an unwritable run dir is reported by the job itself
        return None
    return path


def current_log() -> Path | None:
    """The run log this process writes, if any."""
    return _sink.path


@contextlib.contextmanager
def process_output_to_log() -> Iterator[None]:
    """Point this process's stdout and stderr file descriptors at the run log for a block
    (`ray.init`): processes started in it (Ray's raylet, GCS, dashboard) inherit the log
    instead of the terminal, and so does what C++ code prints meanwhile. No-op with -v, or
    unless configured with a run log attached."""
    path = _sink.path
    if not _sink.configured or verbose() or path is None:
        yield
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    log_fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        for fd in saved:
            os.dup2(log_fd, fd)
        yield
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        for fd, copy in saved.items():
            os.dup2(copy, fd)
            os.close(copy)
        os.close(log_fd)


def write_library_text(text: str, *, is_err: bool = True) -> None:
    """Add library output (a traceback, a worker's lines) to the run log; shown with -v."""
    _sink.write(text, echo=verbose(), is_err=is_err)


def _on_worker_output(data: dict[str, Any]) -> None:
    pid = data.get("pid")
    if pid in ("autoscaler", "raylet"):
        prefix = f"({pid}) "
    else:
        name = data.get("actor_name") or data.get("task_name") or ""
        prefix = f"({name} pid={pid}) " if name else f"(pid={pid}) "
    is_err = bool(data.get("is_err"))
    show_all = verbose()
    lines = data.get("lines") or []
    if pid == "autoscaler":  # its status dump every few seconds; keep its events, as Ray does
        try:
            from ray._private.worker import filter_autoscaler_events

            lines = list(filter_autoscaler_events(lines))
        except ImportError:
            pass
    for line in lines:
        clean = strip_ansi(line)
        at = clean.find(KILN_PREFIX)
        _sink.write(prefix + clean, echo=show_all and at < 0, is_err=is_err)
        if at >= 0:
            stream = kiln_stream()
            stream.write(clean[at:] + "\n")
            stream.flush()


def route_ray_worker_output() -> bool:
    """Send Ray workers' stdout / stderr to the run log and their `[kiln]` lines to the
    terminal, instead of Ray printing everything with coloured prefixes. Call after
    `ray.init` (log_to_driver on); returns False where this Ray has no such hook (its
    default printing then stays) or when not configured."""
    if not _sink.configured:
        return False
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        return False
    if not hasattr(dispatcher, "remove_handler") or not hasattr(dispatcher, "add_handler"):
        return False
    dispatcher.remove_handler("ray_print_logs")
    dispatcher.remove_handler("kiln_worker_output")
    dispatcher.add_handler("kiln_worker_output", _on_worker_output)
    # the driver's error listener ("A worker died or was killed ...") prints through this
    # function directly, not through the dispatcher
    import ray._private.worker as ray_worker

    if hasattr(ray_worker, "print_to_stdstream"):
        ray_worker.print_to_stdstream = _print_to_stdstream
    return True


def _print_to_stdstream(data: dict[str, Any], ignore_prefix: bool = False) -> None:
    _on_worker_output(data)


def error_line(verb: str, message: str, *, kept: bool = False) -> str:
    """kiln's one-line error for the exception being handled: its traceback (Ray's
    included) goes to the run log, which the line names (shown on the terminal only with
    -v); `kept` adds what the failed job keeps, once it has a run dir."""
    write_library_text(traceback.format_exc())
    log = current_log()
    note = ""
    if kept and log is not None:
        run = _sink.shown_as or log.parent.parent
        if verb == "curate":
            note = (
                f". Nothing written so far in {run} is lost: once fixed, the same command "
                "reuses its finished steps"
            )
        elif verb in ("train", "resume"):
            note = (
                f". Nothing written so far in {run} is lost: `kiln resume {run}` continues "
                "from its latest complete checkpoint"
            )
    where = f" (details: {log})" if log is not None and not verbose() else ""
    return f"kiln {verb}: error: {message}{note}{where}"


def outputs_line(verb: str, result: Any) -> str | None:
    """The last line of a job: where its outputs are (None outside a run, and on every
    torchrun rank but 0)."""
    log = current_log()
    if log is None or getattr(result, "rank", 0) != 0:
        return None
    run = log.parent.parent  # what the job wrote here is (a copy of) what it names
    shown = (_sink.shown_as or str(run)).rstrip("/")
    r = result.model_dump(mode="json") if hasattr(result, "model_dump") else result
    r = r if isinstance(r, dict) else {}
    parts = []
    if r.get("dataset_dir"):
        parts.append(f"dataset {r['dataset_dir']}")
    if r.get("latest_checkpoint"):
        parts.append(f"checkpoints {shown}/checkpoints")
    if (run / "eval.json").is_file() and (verb == "eval" or r.get("eval")):
        parts.append(f"eval {shown}/eval.json")
    if (run / "report.html").is_file():
        parts.append(f"report {shown}/report.html")
    parts.append(f"logs {shown}/{log.parent.name}")
    return f"outputs in {shown}: {', '.join(parts)}"
