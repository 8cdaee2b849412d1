"""`kiln submit | status | logs | stop | jobs`: the job verbs' arguments and printing, a thin
layer over `kiln.platform.jobs` (which holds the logic).

What a script wants goes to stdout (the job id on submit, the logs, the tables); kiln's own
`[kiln] ...` lines go to stderr. Ctrl-C while following a job stops the following only.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from kiln.console import say

__all__ = ["JOB_VERBS", "add_job_parsers", "job_command"]

JOB_VERBS = ("submit", "status", "logs", "stop", "jobs")


def _add_address(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--address",
        default=None,
        metavar="URL",
        help="the Ray head's dashboard, e.g. http://HEAD:8265 (default: $KILN_ADDRESS, "
        "else $RAY_ADDRESS)",
    )


def add_job_parsers(sub: Any) -> None:
    """Add the job verbs to the `kiln` parser's subcommands."""
    s = sub.add_parser("submit", help="run a curate/train/eval recipe as a job on a Ray cluster")
    s.add_argument("recipe", help="recipe YAML file (validated here before submitting)")
    s.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe field, e.g. --set max_steps=600 (repeatable)",
    )
    _add_address(s)
    s.add_argument(
        "--wait",
        action="store_true",
        help="follow the job's logs until it ends (Ctrl-C: stop following; the job keeps running)",
    )
    s.add_argument(
        "--python",
        default="python",
        help="the cluster's Python with kiln's dependencies (default: python on its PATH)",
    )
    st = sub.add_parser("status", help="a job's state, times, run dir and dashboard link")
    st.add_argument("job", help="job id (`kiln submit` printed it; `kiln jobs` lists them)")
    st.add_argument("--json", action="store_true", help="print JSON instead of text")
    _add_address(st)
    lg = sub.add_parser("logs", help="what a job printed")
    lg.add_argument("job", help="job id")
    lg.add_argument(
        "-f",
        "--follow",
        action="store_true",
        help="keep printing until the job ends (Ctrl-C: stop following; the job keeps running)",
    )
    _add_address(lg)
    sp = sub.add_parser("stop", help="stop a job (its run records `interrupted`)")
    sp.add_argument("job", help="job id")
    _add_address(sp)
    js = sub.add_parser("jobs", help="the cluster's jobs, newest first")
    js.add_argument("--json", action="store_true", help="print JSON instead of a table")
    _add_address(js)


def _ended(job: Any) -> int:
    """One line on how a followed job ended; its exit code (0: it succeeded)."""
    run = f"; run {job.run_dir}: {job.run_state}" if job.run_state else ""
    say(f"job {job.id} {job.status}{run}", stream=sys.stderr)
    return 0 if job.status == "SUCCEEDED" else 1


def _follow(job_id: str, address: str | None) -> int:
    from kiln.platform import jobs

    def write(chunk: str) -> None:
        sys.stdout.write(chunk)
        sys.stdout.flush()

    try:
        return _ended(jobs.follow_logs(job_id, write, address=address))
    except KeyboardInterrupt:
        say(
            f"stopped following {job_id}; the job keeps running on the cluster "
            f"(`kiln logs {job_id} --follow` to follow again, `kiln stop {job_id}` to stop it)",
            stream=sys.stderr,
        )
        return 130


def job_command(args: argparse.Namespace) -> int:
    """Run one job verb; returns the exit code."""
    from kiln.platform import jobs

    if args.verb == "submit":
        job = jobs.submit(args.recipe, args.overrides, address=args.address, python=args.python)
        print(job.id, flush=True)
        say(
            f"submitted job {job.id}: {job.kind} {job.name!r}, outputs in {job.run_dir}",
            stream=sys.stderr,
        )
        say(f"dashboard: {job.dashboard_url}", stream=sys.stderr)
        if not args.wait:
            say(
                f"follow it: kiln logs {job.id} --follow; stop it: kiln stop {job.id}",
                stream=sys.stderr,
            )
            return 0
        return _follow(job.id, job.dashboard_url.split("/#/")[0])
    if args.verb == "status":
        job = jobs.get_job(args.job, address=args.address)
        print(job.model_dump_json(indent=2) if args.json else jobs.format_job(job))
        return 0
    if args.verb == "logs":
        if args.follow:
            return _follow(args.job, args.address)
        sys.stdout.write(jobs.job_logs(args.job, address=args.address))
        return 0
    if args.verb == "stop":
        job, was_running = jobs.stop_job(args.job, address=args.address)
        if not was_running:
            say(
                f"job {job.id} had already ended ({job.status}): nothing to stop", stream=sys.stderr
            )
        print(jobs.format_job(job))
        return 0
    if args.verb == "jobs":
        found = jobs.list_jobs(address=args.address)
        if args.json:
            print(json.dumps([j.model_dump(mode="json") for j in found], indent=2))
        else:
            print(jobs.format_jobs(found))
        return 0
    raise AssertionError(args.verb)
