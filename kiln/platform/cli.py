"""`kiln` command line: a thin layer over `kiln.platform.api`.

Errors a user can fix (a bad recipe, a missing path, a full disk, a training rank that
died) print one clear message and exit 2, with their traceback in the run's `logs/` (on the
terminal with -v); anything else is a bug and keeps its traceback. What the terminal shows
and what goes to `RUN/logs/` is `kiln.platform.logs`.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NoReturn

from kiln.console import say
from kiln.platform import signals
from kiln.process_exit import exit_now
from kiln.resource_fit import WaitTimeout

if TYPE_CHECKING:
    from kiln.platform.recipes import Recipe

__all__ = ["build_parser", "load_job", "main", "run"]

_USER_ERRORS: tuple[type[BaseException], ...] = (
    FileNotFoundError,
    FileExistsError,
    ValueError,
    PermissionError,
    WaitTimeout,  # kiln waited on Ray for something that did not come; the message says what
)
#: Storage failures a user fixes outside kiln (space, quota, a read-only mount).
_STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}


def _storage_message(e: OSError) -> str:
    where = f" writing {e.filename}" if e.filename else ""
    fix = {
        errno.ENOSPC: "free some space",
        errno.EDQUOT: "free some of your quota",
        errno.EROFS: "make it writable or choose another run_dir",
    }.get(e.errno or 0, "fix the storage")
    return (
        f"{e.strerror}{where}: {fix}, then run the same command again. Nothing written so "
        "far is lost: curation reuses its finished steps, training resumes from its latest "
        "complete checkpoint (`kiln resume RUN_DIR`)"
    )


def _add_set(p: argparse.ArgumentParser, example: str = "balance.t=50") -> None:
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"override a recipe field, e.g. --set {example} (repeatable)",
    )


def _add_address(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--address",
        default=None,
        help="Ray cluster address (default: start Ray in-process on 127.0.0.1)",
    )


def _add_launch_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--launcher",
        choices=["ray", "local", "torchrun"],
        default=None,
        help="how ranks start (sets resources.launcher): Ray Train workers, local processes, "
        "or this process is one rank of a torchrun / srun world",
    )
    p.add_argument(
        "--max-restarts",
        type=int,
        default=None,
        metavar="N",
        help="restart every rank from the latest complete checkpoint after a rank dies, up "
        "to N times (sets resources.max_restarts; ray and local launchers)",
    )


def _add_recipe_args(p: argparse.ArgumentParser, example: str) -> None:
    p.add_argument("recipe", help="recipe YAML file")
    _add_set(p, example)
    _add_address(p)
    _add_dry_run(p)


def _add_dry_run(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="run every check the job makes before it starts (paths, dataset, flavor, "
        "resources), print what it would do, and exit: no Ray, nothing written",
    )


class _Version(argparse.Action):
    """`kiln --version`: kiln's version and those of torch, ray, deepspeed (not imported)."""

    def __call__(self, parser: Any, namespace: Any, values: Any, option: Any = None) -> None:
        from kiln.platform.versions import version_text

        print(version_text())
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    """The argparse tree of every verb."""
    parser = argparse.ArgumentParser(
        prog="kiln",
        description="Curate image-text data and train vision(-language) models on it.",
    )
    parser.add_argument(
        "--version", action=_Version, nargs=0, help="print the versions of kiln, torch, ray"
    )
    _add_verbose(parser, False)
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    q = sub.add_parser(
        "quickstart",
        help="generate a pool, curate, train, stop, resume, evaluate: the whole path on CPU",
    )
    q.add_argument("--root", default="runs/quickstart", help="folder for all quickstart runs")
    _add_set(q, "max_steps=40 (applies to the train recipe)")

    c = sub.add_parser("curate", help="curate a raw pool into WebDataset shards")
    _add_recipe_args(c, "stages.metaclip_balance.t=50")
    c.add_argument(
        "--fresh",
        action="store_true",
        help="redo every step instead of reusing finished ones (for inputs changed in a way "
        "their sizes, times and hashes do not show)",
    )
    t = sub.add_parser("train", help="train a model from a train recipe")
    _add_recipe_args(t, "max_steps=600")
    _add_launch_args(t)

    r = sub.add_parser("resume", help="resume a train run from its latest checkpoint")
    r.add_argument("run_dir", help="the run folder a `kiln train` wrote")
    _add_set(r, "max_steps=600")
    _add_address(r)
    _add_launch_args(r)

    e = sub.add_parser("eval", help="evaluate a checkpoint (eval recipe, or a train run dir)")
    e.add_argument("target", help="eval recipe YAML, or a train run dir to evaluate as configured")
    _add_set(e, "eval.recall_k=[1,5]")
    _add_dry_run(e)

    ex = sub.add_parser(
        "experiment",
        help="curate one pool several ways, train each at equal compute, compare their evals",
    )
    ex.add_argument("recipe", help="experiment YAML (kind: experiment)")
    _add_set(ex, "pool.plant.mismatched=0.5")

    x = sub.add_parser(
        "export", help="write a train run's full weights (safetensors), from any checkpoint"
    )
    x.add_argument("run_dir", help="the run folder a `kiln train` wrote")
    x.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    x.add_argument("--format", dest="fmt", choices=["safetensors", "pt"], default="safetensors")
    x.add_argument("--out", default=None, help="file to write (default: RUN/exports/TAG.FMT)")

    ru = sub.add_parser("runs", help="list runs under a folder with status and checkpoints")
    ru.add_argument("root", nargs="?", default="runs")
    ru.add_argument("--json", action="store_true", help="print JSON instead of a table")

    rp = sub.add_parser(
        "report", help="write RUN_DIR/report.html: plots and tables of a curate/train/eval run"
    )
    rp.add_argument("run_dir", help="the run folder a `kiln curate|train|eval` wrote")

    m = sub.add_parser("model", help="model flavors: list them, or show one's size and FLOPs")
    msub = m.add_subparsers(dest="model_verb", required=True, metavar="ACTION")
    mi = msub.add_parser("info", help="parameters per tower and total, FLOPs per sample")
    mi.add_argument("flavor", help="flavor name, e.g. clip-vit-b-16 (see `kiln model list`)")
    mi.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a model field, e.g. --set vision.image_size=160 (repeatable)",
    )
    mi.add_argument("--json", action="store_true", help="print JSON instead of text")
    msub.add_parser("list", help="every flavor name")

    i = sub.add_parser("inspect", help="summarise a curated dataset and show a few samples")
    i.add_argument("dataset_dir", help="folder holding manifest.json")
    i.add_argument("-n", "--samples", type=int, default=3)
    i.add_argument("--json", action="store_true", help="print JSON instead of text")
    _add_metadata(sub)
    _add_recipe_verb(sub)
    _add_jobs(sub)
    for verb_parser in sub.choices.values():  # `kiln -v train ...` and `kiln train -v ...`
        _add_verbose(verb_parser, argparse.SUPPRESS)
    return parser


def _add_recipe_verb(sub: Any) -> None:
    rc = sub.add_parser("recipe", help="print a resolved recipe, or write the field reference")
    rsub = rc.add_subparsers(dest="recipe_verb", required=True, metavar="ACTION")
    show = rsub.add_parser("show", help="the recipe as it runs: every default, paths absolute")
    show.add_argument("recipe", help="recipe YAML file")
    _add_set(show)
    docs = rsub.add_parser(
        "docs", help="write docs/recipes.md and docs/schema/*.schema.json from the models"
    )
    docs.add_argument("--out", default=None, help="folder to write (default: the repo's docs/)")


def _add_verbose(p: argparse.ArgumentParser, default: object) -> None:
    p.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=default,
        help="also show Ray's, DeepSpeed's and torch's logs (always kept in RUN/logs/)",
    )


def _add_jobs(sub: Any) -> None:
    """`kiln submit | status | logs | stop | jobs`: jobs on a Ray cluster."""
    from kiln.platform.jobs_cli import add_job_parsers

    add_job_parsers(sub)


def _add_metadata(sub: Any) -> None:
    m = sub.add_parser("metadata", help="build MetaCLIP-style metadata (entry lists)")
    msub = m.add_subparsers(dest="metadata_verb", required=True, metavar="ACTION")
    b = msub.add_parser(
        "build",
        help="write an entries file + FILE.provenance.json from WordNet, Wikipedia unigrams, "
        "corpus bigrams, titles (with no source flags: WordNet + pywordfreq)",
    )
    b.add_argument("--out", required=True, help="entries file to write (one entry per line)")
    b.add_argument(
        "--wordnet",
        nargs="?",
        const="auto",
        metavar="DIR",
        help="WordNet dict folder with data.noun etc. (no DIR: the installed wordnet-base)",
    )
    b.add_argument(
        "--wordfreq",
        nargs="?",
        const="auto",
        metavar="FILE",
        help="'word;count' unigram file, .gz or plain (no FILE: pywordfreq's Wikipedia counts)",
    )
    b.add_argument("--bigram-corpus", metavar="FILE", help="parquet or jsonl corpus for bigrams")
    b.add_argument("--bigram-column", metavar="COL", help="its text column")
    b.add_argument("--titles", metavar="FILE", help="text file of extra entries, one per line")
    for name, default in (
        ("wordnet", 86_654),
        ("unigrams", 251_465),
        ("bigrams", 100_646),
        ("titles", 61_235),
        ("total", 500_000),
    ):
        b.add_argument(
            f"--max-{name}",
            type=int,
            default=default,
            metavar="N",
            help=f"cap on {name} entries (default: MetaCLIP's {default:,})",
        )
    b.add_argument("--min-unigram-count", type=int, default=100, metavar="N", help="default: 100")
    b.add_argument(
        "--bigram-min-count", type=int, default=5, metavar="N", help="default: 5 occurrences"
    )
    b.add_argument(
        "--bigram-min-pmi", type=float, default=0.0, metavar="X", help="natural log; default 0"
    )
    b.add_argument(
        "--wordnet-all-lemmas",
        action="store_true",
        help="every lemma name of a synset, not only its first (MetaCLIP uses synset names)",
    )


def _print_result(result: Any) -> None:
    from kiln.platform.summary import format_result

    if getattr(result, "rank", 0) != 0:
        return  # under torchrun / srun every rank runs the command; rank 0 reports
    print(format_result(result))


def _overrides(args: argparse.Namespace) -> list[str]:
    """`--set` items plus --address, --launcher, --max-restarts as overrides, so those land
    in the recorded recipe like any other field."""
    overrides = list(getattr(args, "overrides", []))
    for flag, field in (
        ("address", "ray.address"),
        ("launcher", "resources.launcher"),
        ("max_restarts", "resources.max_restarts"),
    ):
        if getattr(args, flag, None) is not None:
            overrides.append(f"{field}={getattr(args, flag)}")
    return overrides


def load_job(args: argparse.Namespace) -> Recipe:
    """The validated recipe that a parsed `kiln curate|train|eval RECIPE` command line runs,
    its overrides applied and its kind checked against the verb; nothing runs.

    One function for the CLI and for whatever checks a command line without running it
    (tests/unit/test_infra.py validates the command lines of infra/ with it).
    """
    from kiln.platform.recipes import RecipeError, load_recipe

    path = args.recipe if args.verb in ("curate", "train") else args.target
    recipe = load_recipe(path, _overrides(args))
    if recipe.kind != args.verb:
        how = (
            "`kiln eval` takes an eval recipe or a train run dir"
            if args.verb == "eval"
            else f"run it with `kiln {recipe.kind} {path}`"
        )
        raise RecipeError(f"{path} is a `kind: {recipe.kind}` recipe: {how}")
    return recipe


def _print_dry_run(recipe: Any, lines: list[str]) -> int:
    what = recipe if isinstance(recipe, str) else f"{recipe.kind} {recipe.name!r}"
    print(f"recipe OK: {what}; nothing was started or written")
    for line in lines:
        print(f"  {line}")
    return 0


def _dispatch(args: argparse.Namespace) -> int:
    if args.verb == "runs":  # before importing the API: listing runs stays under a second
        from kiln.platform.runs import format_runs, list_runs

        runs = list_runs(args.root)
        if args.json:
            print(json.dumps([r.model_dump(mode="json") for r in runs], indent=2))
        else:
            print(format_runs(runs))
        return 0
    if args.verb == "report":  # reads the run dir only: no Ray, no job
        from kiln.platform.report import write_run_report

        print(f"report: {write_run_report(args.run_dir)}")
        return 0
    from kiln.platform.jobs_cli import JOB_VERBS, job_command

    if args.verb in JOB_VERBS:  # jobs on a Ray cluster: nothing of the API runs here
        return job_command(args)
    from kiln.platform import api

    if args.verb == "quickstart":
        from kiln.platform.quickstart import run_quickstart

        return run_quickstart(args.root, overrides=args.overrides)
    if args.verb == "experiment":
        from kiln.platform.experiment import experiment

        experiment(args.recipe, args.overrides)
        return 0
    if args.verb in ("curate", "train"):
        recipe = load_job(args)
        if args.dry_run:
            return _print_dry_run(recipe, api.dry_run(recipe))
        result = api.run_job(recipe, fresh=getattr(args, "fresh", False))
        _print_result(result)
        _outputs(args, result)
        return 0
    if args.verb == "resume":
        result = api.resume_run(args.run_dir, _overrides(args))
        _print_result(result)
        _outputs(args, result)
        return 0
    if args.verb == "eval":
        from kiln import storage

        if os.path.isdir(args.target) or storage.is_remote(args.target):
            result = api.eval_run_dir(args.target, args.overrides, check_only=args.dry_run)
            if args.dry_run:
                return _print_dry_run(args.target, result)
        else:
            recipe = load_job(args)
            if args.dry_run:
                return _print_dry_run(recipe, api.dry_run(recipe))
            result = api.run_job(recipe)
        _print_result(result)
        _outputs(args, result)
        return 0
    if args.verb == "export":
        path = api.export(args.run_dir, args.out, step=args.step, fmt=args.fmt)
        from kiln.training.export import load_weights

        state, cfg, step = load_weights(path)
        params = sum(t.numel() for t in state.values())
        print(f"exported {cfg.flavor} at step {step} ({params:,} values) to {path}")
        return 0
    if args.verb == "metadata":
        from kiln.data_curation.metadata_build import MetadataCaps, build_metadata

        built = build_metadata(
            args.out,
            wordnet=args.wordnet,
            wordfreq=args.wordfreq,
            bigram_corpus=args.bigram_corpus,
            bigram_column=args.bigram_column,
            titles=args.titles,
            caps=MetadataCaps(
                wordnet=args.max_wordnet,
                unigrams=args.max_unigrams,
                bigrams=args.max_bigrams,
                titles=args.max_titles,
                total=args.max_total,
            ),
            min_unigram_count=args.min_unigram_count,
            bigram_min_count=args.bigram_min_count,
            bigram_min_pmi=args.bigram_min_pmi,
            wordnet_all_lemmas=args.wordnet_all_lemmas,
        )
        print(built.summary())
        return 0
    if args.verb == "model":
        return _model_command(args)
    if args.verb == "recipe":
        from kiln.platform.recipe_docs import recipe_command

        return recipe_command(args)
    if args.verb == "inspect":
        from kiln.data_curation import format_dataset_info, inspect_dataset

        info = inspect_dataset(args.dataset_dir, num_samples=args.samples)
        print(json.dumps(info, indent=2, default=str) if args.json else format_dataset_info(info))
        return 0
    raise AssertionError(args.verb)


def _model_command(args: argparse.Namespace) -> int:
    from kiln.models.flavors import FLAVORS, flavor_names

    if args.model_verb == "list":
        for name in flavor_names():
            arch = FLAVORS[name]["arch"] if name in FLAVORS else "alias"
            print(f"{name:<20} {arch}")
        return 0
    import yaml
    from pydantic import ValidationError

    from kiln.models.config import ModelConfig
    from kiln.models.info import format_model_info, model_info

    fields: dict[str, Any] = {"flavor": args.flavor}
    for item in args.overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set {item!r} is not KEY=VALUE, e.g. vision.image_size=160")
        node = fields
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(value)
    try:
        cfg = ModelConfig.model_validate(fields)
    except ValidationError as e:
        msgs = [str(err["msg"]).removeprefix("Value error, ") for err in e.errors()]
        raise ValueError("; ".join(msgs)) from e
    info = model_info(cfg)
    print(json.dumps(info, indent=2) if args.json else format_model_info(info))
    return 0


def _root_cause(e: BaseException) -> BaseException:
    """The user's error inside Ray's wrappers (a task error carries the worker's traceback
    in its message; its `cause` is the exception the worker raised)."""
    seen = 0
    while seen < 10 and getattr(e, "cause", None) is not None:
        e = e.cause  # type: ignore[attr-defined]
        seen += 1
    return e


def _interrupted_run_dir(args: argparse.Namespace) -> str | None:
    """The run dir of an interrupted `kiln train` (its status says how to resume)."""
    if args.verb != "train":
        return None
    from kiln.platform.recipes import load_recipe

    try:
        return str(load_recipe(args.recipe, list(args.overrides)).run_dir)
    except Exception:
        return None


def _fail(args: argparse.Namespace, message: str, kept: bool = False) -> int:
    from kiln.platform import logs

    print(logs.error_line(args.verb, message, kept=kept), file=sys.stderr)
    return 2


def _outputs(args: argparse.Namespace, result: Any) -> None:
    from kiln.platform import logs

    line = logs.outputs_line(args.verb, result)
    if line:
        print(line)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `kiln` console script."""
    args = build_parser().parse_args(argv)
    from kiln.platform import logs

    logs.configure(args.verbose)
    signals.install()  # SIGTERM: stop as Ctrl-C does (ranks stopped, run `interrupted`)
    try:
        return _dispatch(args)
    except _USER_ERRORS as e:
        from kiln.platform.recipes import missing_path_hint

        target = getattr(args, "target", None)  # `kiln eval`: a recipe file or a run dir
        recipe_file = getattr(args, "recipe", None) or (
            target if target and os.path.isfile(target) else None
        )
        overrides = getattr(args, "overrides", None)
        message = missing_path_hint(str(_root_cause(e)), recipe_file, overrides)
        return _fail(args, message, kept=True)
    except BrokenPipeError:  # `kiln runs | head`: the reader left, nothing is wrong
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as e:  # (after BrokenPipeError, an OSError too)
        cause = _root_cause(e)
        if not isinstance(cause, OSError) or cause.errno not in _STORAGE_ERRNOS:
            raise
        return _fail(args, _storage_message(cause))
    except RuntimeError as e:  # a rank or Ray Train failed: its story is in the logs
        launch = sys.modules.get("kiln.training.launch")
        if launch is None or not isinstance(e, launch.TrainLaunchError):
            raise
        log = f"; the failing rank's log: {e.log}" if e.log else ""
        return _fail(args, f"{e.headline}{log}", kept=True)
    except KeyboardInterrupt:
        run_dir = getattr(args, "run_dir", None) or _interrupted_run_dir(args)
        hint = f"; resume with `kiln resume {run_dir}`" if run_dir else ""
        how = "terminated (SIGTERM)" if signals.terminated() else "interrupted"
        print(f"kiln {args.verb}: {how}{hint}", file=sys.stderr)
        return 143 if signals.terminated() else 130  # 128 + the signal, as a shell says


def run() -> NoReturn:
    """The `kiln` console script and ``python -m kiln``: `main`, then the process ends
    without the interpreter's teardown of torch, DeepSpeed and Ray (`kiln.process_exit`);
    as one rank of a multi-node torchrun world, in the order torchrun's agents need
    (`kiln.training.torchrun.leave_in_order`)."""
    code = main()
    last = None
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE"):  # only torchrun's ranks import torch here
        from kiln.training.torchrun import leave_in_order

        last = leave_in_order(say=say)
    exit_now(code, last)


if __name__ == "__main__":
    run()
