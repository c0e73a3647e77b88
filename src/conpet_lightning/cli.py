"""The ``conpet`` command: ``run`` an experiment, ``data stats`` of a benchmark, ``report`` on run folders."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from conpet_lightning.config import ConfigError, load_config
from conpet_lightning.data.records import DataError
from conpet_lightning.resume_overrides import check_resume_overrides, record_resume_overrides
from conpet_lightning.runfiles import (
    DiskFullError,
    RunFileError,
    RunLock,
    clean_temp_files,
    create_run_dir,
    read_json,
)

if TYPE_CHECKING:
    from conpet_lightning.loop import TaskLoop

#: Environment variable holding the run folder rank 0 created, for the DDP ranks that re-run the command.
RUN_DIR_ENV = "CONPET_RUN_DIR"


def _is_launched_rank() -> bool:
    """A process Lightning's DDP launcher started for rank > 0: it re-runs this command line in the parent's folder."""
    return os.environ.get("LOCAL_RANK", "0") != "0" or os.environ.get("NODE_RANK", "0") != "0"


def _finished_on_disk(run_dir: Path) -> int | None:
    """Tasks recorded in the folder's metrics.json (0 without one); None if it holds something to resume from.

    None means "keep the folder": an unreadable metrics.json, or a trained stage or epoch of the first task (a run
    killed inside a stage continues from its last completed epoch).
    """
    path = run_dir / "metrics.json"
    if any((run_dir / "checkpoints").glob("*/*/*.ckpt")) or any((run_dir / "checkpoints").glob("*/*/final.pt")):
        return None
    if not path.is_file():
        return 0
    try:
        return len(json.loads(path.read_text(encoding="utf-8")).get("per_task", []))
    except (OSError, ValueError, AttributeError):
        return None


def _cmd_run(args: argparse.Namespace) -> int:
    """Run an experiment in a new folder; one that fails before its first task finishes leaves no folder behind."""
    cfg = load_config(args.experiment, args.overrides)  # every option checked before the heavy imports
    from conpet_lightning.loop import TaskLoop

    base = Path(cfg.output_dir) / cfg.experiment
    if _is_launched_rank() and os.environ.get(RUN_DIR_ENV):
        return _run_to_end(TaskLoop(cfg, Path(os.environ[RUN_DIR_ENV])))  # rank 0 holds the folder and its lock
    fresh = cfg.run_id is None or not (base / cfg.run_id).exists()
    run_dir = create_run_dir(base, cfg.run_id, seed=cfg.seed)
    os.environ[RUN_DIR_ENV] = str(run_dir)  # for the other DDP ranks, which re-run this command
    print(f"[conpet] experiment={cfg.experiment} benchmark={cfg.data.benchmark} -> {run_dir}", flush=True)
    with RunLock(run_dir):
        try:
            return _run_to_end(TaskLoop(cfg, run_dir), discard=run_dir if fresh else None)
        except BaseException as err:
            if fresh and _finished_on_disk(run_dir) == 0:
                shutil.rmtree(run_dir, ignore_errors=True)
                if isinstance(err, DiskFullError):  # its advice to resume does not hold for a removed folder
                    raise RunFileError(
                        f"the disk is full: could not write {err.path}; no task had finished, so {run_dir} was removed"
                    ) from err
            raise


def _done_line(summary: dict, run_dir: Path | str) -> str:
    """The last line of a run: its final accuracies and where the results are."""
    return f"[conpet] done: acc_macro={summary['acc_macro']:.2f} acc_micro={summary['acc_micro']:.2f} -> {run_dir}"


def _cmd_resume(args: argparse.Namespace) -> int:
    """Continue a run from its folder; ``key=value`` overrides that cannot change finished tasks are recorded."""
    from conpet_lightning.loop import TaskLoop

    accepted = check_resume_overrides(args.overrides)
    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"cannot resume {run_dir}: no such folder")
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"cannot resume {run_dir}: it is not a run folder (no config.yaml)")
    if (run_dir / "metrics.json").is_file():
        read_json(run_dir / "metrics.json", "the finished tasks' results")  # a corrupt file: one line naming it
    launched = _is_launched_rank()
    with contextlib.ExitStack() as stack:
        if not launched:
            stack.enter_context(RunLock(run_dir))
            clean_temp_files(run_dir)  # half-written files of the killed process
        loop = TaskLoop.resume(run_dir, overrides=accepted)
        if accepted and not launched:
            record_resume_overrides(run_dir, accepted)
        done = len(loop.finished["per_task"]) if loop.finished else 0
        print(f"[conpet] resuming {run_dir} after {done} finished task(s)", flush=True)
        return _run_to_end(loop)


def _finished_tasks(loop: TaskLoop) -> int:
    """Tasks whose results are on disk: a resumed run counts the ones it had before, even while replaying them."""
    before = len(loop.finished["per_task"]) if loop.finished else 0
    return max(len(loop.per_task), before)


def _is_ctrl_c(err: BaseException) -> bool:
    """Ctrl-C, also as Lightning reports it inside a Trainer call: ``sys.exit(1)`` while handling KeyboardInterrupt."""
    if isinstance(err, KeyboardInterrupt):
        return True
    return isinstance(err, SystemExit) and err.code == 1 and isinstance(err.__context__, KeyboardInterrupt)


def _run_to_end(loop: TaskLoop, discard: Path | None = None) -> int:
    """Run the loop and print the done line; Ctrl-C and SIGTERM stop it with 130 and 143 and say how to continue.

    Lightning turns SIGTERM into ``SIGTERMException``, a ``SystemExit`` with no code, so without this a killed run
    would exit with status 0 as if it had finished. ``discard`` is the folder of a new run: it is removed when the
    run stops before its first task finished (nothing to resume), and the message says so.
    """
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    try:
        out = loop.run()
    except (SIGTERMException, KeyboardInterrupt, SystemExit) as err:
        sigterm = isinstance(err, SIGTERMException)
        if not sigterm and not _is_ctrl_c(err):
            raise
        what, code = ("stopped by SIGTERM", 128 + signal.SIGTERM) if sigterm else ("interrupted", 128 + signal.SIGINT)
        done = _finished_tasks(loop)
        if done == 0 and discard is not None and _finished_on_disk(discard) == 0:
            shutil.rmtree(discard, ignore_errors=True)
            line = f"conpet: {what} before the first task finished; nothing was kept ({discard} removed)"
        else:
            line = (
                f"conpet: {what} after {done} finished task(s); their results are in {loop.run_dir}. "
                f"Continue with: conpet resume {loop.run_dir}"
            )
        print(line, file=sys.stderr, flush=True)
        return code
    print(_done_line(out["summary"], loop.run_dir), flush=True)
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    """Print the resolved, validated configuration with each option's doc and default."""
    from conpet_lightning.describe import describe_config

    print(describe_config(load_config(args.experiment, args.overrides)), end="")
    return 0


def _experiments_epilog() -> str:
    from conpet_lightning.describe import experiment_summaries

    rows = "\n".join(f"  {name:<22} {doc}" for name, doc in experiment_summaries())
    return f"experiments:\n{rows}\n\nsee every option of one: conpet config EXPERIMENT [key=value ...]"


def _cmd_stats(args: argparse.Namespace) -> int:
    from conpet_lightning.data.benchmarks import load_benchmark
    from conpet_lightning.paths import in_project

    root = in_project(args.root)
    bench = load_benchmark(
        args.benchmark, root=root, seed=args.seed, local_path=args.local_path, conpet_dataset=args.conpet_dataset
    )
    stats = bench.stats()
    if args.json:
        print(json.dumps(stats))
        return 0
    print(f"{stats['benchmark']}: {stats['num_classes']} classes, {len(stats['tasks'])} tasks")
    print(f"{'task':>4} {'classes':>7} {'train':>7} {'valid':>7} {'test':>7}")
    for i, t in enumerate(stats["tasks"]):
        print(f"{i + 1:>4} {len(t['classes']):>7} {t['train']:>7} {t['valid']:>7} {t['test']:>7}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from conpet_lightning.reporting.figures import render_run_figures
    from conpet_lightning.reporting.report import report

    if args.group_by or args.compare:
        from conpet_lightning.reporting.aggregate import report_aggregate

        fields = [f.strip() for f in (args.group_by or "experiment,benchmark").split(",") if f.strip()]
        compare = tuple(args.compare) if args.compare else None
        print(report_aggregate(args.run_dirs, fields, compare, as_json=args.json), end="")
        return 0
    print(report(args.run_dirs, as_json=args.json))
    if not args.no_figures:
        for run_dir in args.run_dirs:
            render_run_figures(run_dir)
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    """Test a run's trained experts again with another router or inference option, without training."""
    from conpet_lightning.evaluate import EVALS, eval_name, evaluate_run

    name = args.name or eval_name(args.overrides)
    out = evaluate_run(args.run_dir, args.overrides, name=name)
    acc = out["summary"].get("acc_macro", float("nan"))
    print(f"[conpet] eval {name}: acc_macro={acc:.2f} -> {Path(args.run_dir) / EVALS / name}", flush=True)
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    """Run, dry-run or export a sweep; exit 1 when a point failed (the index says which)."""
    from conpet_lightning.sweep import emit, lane_threads, load_sweep, run_sweep

    sweep = load_sweep(args.sweep_file)
    if args.emit:
        print(f"[sweep] wrote {emit(sweep, args.emit, args.out)} ({len(sweep.points)} grid points)")
        return 0
    only = None
    if args.point is not None:
        if not 0 <= args.point < len(sweep.points):
            raise ConfigError(f"--point {args.point} is outside the grid 0..{len(sweep.points) - 1}")
        only = [args.point]
    print(f"[sweep] {args.lanes} lane(s), train.num_threads={lane_threads(args.lanes)} per run", flush=True)
    statuses = run_sweep(sweep, lanes=args.lanes, dry_run=args.dry_run, only=only)
    return 1 if "failed" in statuses.values() else 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``conpet``."""
    parser = argparse.ArgumentParser(prog="conpet", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser(
        "run",
        help="run an experiment (a name in experiments/ or a YAML path)",
        epilog=_experiments_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument("experiment")
    run.add_argument("overrides", nargs="*", help="key=value config overrides")
    run.set_defaults(func=_cmd_run)
    conf = sub.add_parser("config", help="print an experiment's resolved configuration, each option with its doc")
    conf.add_argument("experiment")
    conf.add_argument("overrides", nargs="*", help="key=value config overrides")
    conf.set_defaults(func=_cmd_config)
    resume = sub.add_parser("resume", help="continue a killed run from its folder, after its last finished task")
    resume.add_argument("run_dir")
    resume.add_argument(
        "overrides",
        nargs="*",
        help="key=value overrides that cannot change finished tasks (train.lr, train.epochs, ...)",
    )
    resume.set_defaults(func=_cmd_resume)
    data = sub.add_parser("data", help="data utilities").add_subparsers(dest="data_command", required=True)
    stats = data.add_parser("stats", help="per-task class and record counts of a benchmark")
    stats.add_argument("benchmark")
    stats.add_argument("--json", action="store_true")
    stats.add_argument("--root", default="data")
    stats.add_argument("--seed", type=int, default=100)
    stats.add_argument("--local-path", default=None)
    stats.add_argument("--conpet-dataset", default=None)
    stats.set_defaults(func=_cmd_stats)
    ev = sub.add_parser("eval", help="test a finished run again with another router, without training")
    ev.add_argument("run_dir")
    ev.add_argument(
        "overrides", nargs="*", help="callbacks.routing=<preset>, callbacks.routing.<option>, eval.*, logging.*"
    )
    ev.add_argument("--name", default=None, help="folder under RUN_DIR/evals/ (default: from the overrides)")
    ev.set_defaults(func=_cmd_eval)
    rep = sub.add_parser("report", help="recompute summaries and figures of run folders and compare them")
    rep.add_argument("run_dirs", nargs="+", help="run folders, globs, or a sweep folder / its index.json")
    rep.add_argument("--json", action="store_true")
    rep.add_argument("--no-figures", action="store_true", help="do not re-render the PNG figures")
    rep.add_argument(
        "--group-by", default=None, help="aggregate over seeds/orders by fields, e.g. experiment,benchmark or train.lr"
    )
    rep.add_argument("--compare", nargs=2, metavar=("A", "B"), help="paired difference A - B by benchmark/seed/order")
    rep.set_defaults(func=_cmd_report)
    swp = sub.add_parser("sweep", help="run a grid of experiments x benchmarks x seeds x task orders (resumable)")
    swp.add_argument("sweep_file")
    swp.add_argument("--lanes", type=int, default=1, help="runs at a time; each gets cores // lanes threads")
    swp.add_argument("--dry-run", action="store_true", help="print each point's command and status, run nothing")
    swp.add_argument("--point", type=int, default=None, help="run only grid point I (a job-array task)")
    swp.add_argument("--emit", choices=("slurm", "wandb"), help="write a SLURM array script or a W&B sweep config")
    swp.add_argument("--out", default=None, help="where --emit writes (default: in the sweep folder)")
    swp.set_defaults(func=_cmd_sweep)
    return parser


#: Errors a user can cause (bad config, data, paths, run files, a diverging run): one line and exit status 2.
USER_ERRORS: tuple[type[BaseException], ...] = (
    ConfigError,
    DataError,
    RunFileError,
    FileNotFoundError,
    FloatingPointError,
    OSError,
)


def _one_line(err: BaseException) -> str:
    """An error message on one line (a few messages, e.g. omegaconf's, span several)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return "; ".join(lines) or type(err).__name__


def main(argv: list[str] | None = None) -> int:
    """Entry point; a user error ends with one ``conpet: error:`` line on stderr and exit code 2, Ctrl-C with 130.

    Anything else is a bug and keeps its traceback.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("WANDB_MODE", "offline")
    parser = build_parser()
    # key=value overrides may follow an option (conpet eval RUN --name X key=value): argparse leaves them over
    args, extra = parser.parse_known_args(argv)
    overrides = vars(args).get("overrides")
    if extra:
        if overrides is None or any(e.startswith("-") or "=" not in e for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*overrides, *extra]
    try:
        return int(args.func(args))
    except USER_ERRORS as err:
        print(f"conpet: error: {_one_line(err)}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:  # before the loop ran (a running loop reports its own interruption)
        if args.command == "resume":
            line = f"conpet: interrupted during start-up. Continue with: conpet resume {args.run_dir}"
        else:
            line = "conpet: interrupted during start-up; nothing was run"
        print(line, file=sys.stderr, flush=True)
        return 128 + signal.SIGINT


if __name__ == "__main__":
    sys.exit(main())
