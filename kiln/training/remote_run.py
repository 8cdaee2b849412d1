"""A train run dir on object storage (``run_dir: s3://...``): staged locally, mirrored up.

DeepSpeed writes checkpoints to a local folder only, so a run whose `run_dir` is a URL trains
into `kiln.storage.staging_dir(url)` and copies up what it writes:

- each checkpoint, once every rank wrote it (`push_checkpoint`, from `save_checkpoint`):
  the tag's files first (on each node its first rank uploads what that node wrote), then
  the ``COMPLETE`` marker, then ``latest`` and ``metrics.jsonl``; so the remote run dir,
  like a local one, never names a checkpoint that is not whole. Older tags are pruned
  there as they are locally (``checkpoint.keep_last``);
- the run's status.json while it runs (`kiln.platform.runs.heartbeat`), and the rest of the
  run dir (recipe, status, metrics, summary, logs, eval) when the job ends
  (`push_run_files`, from the platform).

Several nodes (torchrun / srun on several hosts): every process stages into its machine's
staging folder (`KILN_STAGING_DIR`, which must be a folder of the node's own, not one
shared between nodes); each node's first rank uploads the checkpoint files its node wrote,
the COMPLETE marker lists every node's files, and only then does rank 0 upload it and
``latest``. At the end each other node uploads its own ``logs/`` (`push_node_logs`). Two
nodes that share one staging folder (a home folder on NFS) would clear and download into
each other's files: each node marks the folder it staged (`mark_node_staging`) and the
run stops with an error naming the fix if one holds another node's mark
(`check_node_staging`).

A resume downloads (`pull_run`, on every node): the staging folder's checkpoints are
cleared (the remote run dir is the truth), then ``metrics.jsonl`` and the newest complete
checkpoint whose files verify against its marker come down, and training resumes from the
staging folder as from any local run dir.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from kiln import storage
from kiln.models.checkpoint_index import (
    CHECKPOINTS_DIR,
    COMPLETE_MARKER,
    LATEST_FILE,
    step_of_tag,
)

__all__ = [
    "RUN_URL_ENV",
    "check_node_staging",
    "complete_remote_checkpoints",
    "mark_node_staging",
    "prune_remote",
    "pull_run",
    "push_checkpoint",
    "push_node_logs",
    "push_run_files",
    "remote_latest",
]

#: Set (by `kiln.platform.api`, for the ranks it starts) to the URL a staged run mirrors to.
RUN_URL_ENV = "KILN_RUN_URL"
_METRICS = "metrics.jsonl"
#: Folder of a staging folder where each node that staged it leaves a mark (not uploaded).
_NODES_DIR = ".kiln-nodes"


def complete_remote_checkpoints(url: str) -> list[str]:
    """Tags under ``{url}/checkpoints`` with a COMPLETE marker, oldest first."""
    root = f"{url.rstrip('/')}/{CHECKPOINTS_DIR}"
    fs, path = storage.fs_path(root)
    if not fs.exists(path):
        return []
    tags = [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)]
    tags = [t for t in tags if step_of_tag(t) is not None]
    complete = [t for t in tags if fs.exists(f"{path}/{t}/{COMPLETE_MARKER}")]
    return sorted(complete, key=lambda t: step_of_tag(t) or 0)


def remote_latest(url: str) -> str | None:
    """The checkpoint a resume of remote run dir `url` starts from: the one ``latest``
    names when it is complete, else the newest complete tag, else None."""
    complete = complete_remote_checkpoints(url)
    named = (storage.read_text(f"{url.rstrip('/')}/{CHECKPOINTS_DIR}/{LATEST_FILE}") or "").strip()
    if named in complete:
        return named
    return complete[-1] if complete else None


def pull_run(url: str, local: str | Path, *, resume: bool, tag: str | None = None) -> str | None:
    """Prepare staging folder `local` for a run into remote `url`; returns the tag it will
    resume from (None: a fresh start). A fresh run refuses a run dir that holds
    checkpoints, as a local one does. `tag`: download that complete checkpoint instead of
    the newest (`kiln export --step`)."""
    from kiln.training.checkpoint import verify_checkpoint

    complete = complete_remote_checkpoints(url)
    if not resume and complete:
        raise FileExistsError(
            f"run dir {url!r} already holds checkpoints: resume it (`kiln resume {url}` / "
            "resume=True) or train into a new run_dir"
        )
    local = Path(local)
    shutil.rmtree(local / CHECKPOINTS_DIR, ignore_errors=True)
    (local / _METRICS).unlink(missing_ok=True)
    if not resume:
        return None
    base = url.rstrip("/")
    if storage.exists(f"{base}/{_METRICS}"):
        storage.download(f"{base}/{_METRICS}", local / _METRICS)
    if tag is not None and tag not in complete:
        raise FileNotFoundError(
            f"{url!r} holds no complete checkpoint {tag}: its complete ones are "
            f"{', '.join(complete) or 'none'}"
        )
    first = tag or remote_latest(url)
    order = [first] if first else []
    order += [t for t in reversed(complete) if t != first and tag is None]
    for candidate in order:
        remote_tag = f"{base}/{CHECKPOINTS_DIR}/{candidate}"
        storage.download_tree(remote_tag, local / CHECKPOINTS_DIR / candidate)
        if verify_checkpoint(local, candidate) is None:
            (local / CHECKPOINTS_DIR / LATEST_FILE).write_text(candidate + "\n")
            return candidate
        # kept: the resume sets it aside as damaged and falls back to an older tag
    return None


def push_checkpoint(local: str | Path, url: str, tag: str, *, files: bool, commit: bool) -> None:
    """Copy checkpoint `tag` of staging folder `local` up to `url`.

    `files`: its files but the COMPLETE marker (each node's first rank, before the commit
    barrier). `commit` (rank 0, after the local marker is written): the marker, then
    ``latest``, then ``metrics.jsonl``.
    """
    base = url.rstrip("/")
    tag_dir = Path(local) / CHECKPOINTS_DIR / tag
    remote_tag = f"{base}/{CHECKPOINTS_DIR}/{tag}"
    if files:
        storage.upload_tree(tag_dir, remote_tag, skip=(COMPLETE_MARKER,))
    if commit:
        storage.upload(tag_dir / COMPLETE_MARKER, f"{remote_tag}/{COMPLETE_MARKER}")
        storage.atomic_write(f"{base}/{CHECKPOINTS_DIR}/{LATEST_FILE}", (tag + "\n").encode())
        metrics = Path(local) / _METRICS
        if metrics.is_file():
            storage.upload(metrics, f"{base}/{_METRICS}")


def prune_remote(url: str, keep_last: int, current: str) -> list[str]:
    """Delete remote tags older than the newest `keep_last` complete ones, and half-written
    ones other than `current`; never the one ``latest`` names. Returns the removed tags."""
    base = f"{url.rstrip('/')}/{CHECKPOINTS_DIR}"
    fs, path = storage.fs_path(base)
    complete = complete_remote_checkpoints(url)
    latest = remote_latest(url)
    keep = set(complete[-keep_last:]) | {current} | ({latest} if latest else set())
    removed = []
    for p in sorted(fs.ls(path, detail=False)):
        tag = p.rstrip("/").rsplit("/", 1)[-1]
        if step_of_tag(tag) is None or tag in keep:
            continue
        fs.rm(p, recursive=True)
        removed.append(tag)
    return removed


def push_run_files(local: str | Path, url: str) -> None:
    """Copy the staging folder's files but its checkpoints (recipe, status, metrics,
    summary, logs, eval, exports) up to `url`. A no-op when `local` does not exist."""
    if os.path.isdir(local):
        storage.upload_tree(local, url, skip=(CHECKPOINTS_DIR, _NODES_DIR))


def push_node_logs(local: str | Path, url: str) -> None:
    """Copy the ``logs/`` of a node's staging folder up to ``{url}/logs`` (a torchrun node
    other than rank 0's: its ranks' log files). Nothing else: that node's copies of the
    run dir's files (metrics downloaded for a resume) are not the run's."""
    logs = Path(local) / "logs"
    if logs.is_dir():
        storage.upload_tree(logs, f"{url.rstrip('/')}/logs")


def mark_node_staging(local: str | Path, rank: int) -> None:
    """Mark staging folder `local` as staged by the node whose first rank is `rank` (each
    node's first rank, as it stages, before the process group is up), the marks of earlier
    launches removed."""
    nodes = Path(local) / _NODES_DIR
    shutil.rmtree(nodes, ignore_errors=True)
    nodes.mkdir(parents=True, exist_ok=True)
    (nodes / f"rank{rank}").touch()


def check_node_staging(local: str | Path, rank: int) -> None:
    """Raise ValueError if staging folder `local` holds another node's mark besides that of
    `rank`'s node: the nodes share it. Each node's first rank calls it once every node has
    staged (after a collective: then whichever node marked last, another one sees it)."""
    nodes = Path(local) / _NODES_DIR
    others = sorted(p.name for p in nodes.glob("rank*") if p.name != f"rank{rank}")
    if others:
        raise ValueError(
            f"staging folder {local} is shared by several nodes (also staged by the node of "
            f"{', '.join(others)}): every node stages an object-storage run dir in a folder of "
            f"its own; set {storage.STAGING_ENV} to a folder on each node's local disk"
        )
