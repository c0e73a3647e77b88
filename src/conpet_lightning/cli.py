"""The ``conpet`` command: ``run`` an experiment, ``data stats`` of a benchmark, ``report`` on run folders."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from conpet_lightning.config import ConfigError, load_config
from conpet_lightning.data.records import DataError

if TYPE_CHECKING:
    from conpet_lightning.loop import TaskLoop


def _cmd_run(args: argparse.Namespace) -> int:
    from conpet_lightning.loop import TaskLoop

    cfg = load_config(args.experiment, args.overrides)
    run_id = cfg.run_id or f"{time.strftime('%Y%m%d-%H%M%S')}-s{cfg.seed}"
    run_dir = Path(cfg.output_dir) / cfg.experiment / run_id
    if (run_dir / "metrics.json").exists():
        raise ConfigError(f"run folder {run_dir} already holds results; pick another run_id")
    print(f"[conpet] experiment={cfg.experiment} benchmark={cfg.data.benchmark} -> {run_dir}", flush=True)
    return _run_to_end(TaskLoop(cfg, run_dir))


def _done_line(summary: dict, run_dir: Path | str) -> str:
    """The last line of a run: its final accuracies and where the results are."""
    return f"[conpet] done: acc_macro={summary['acc_macro']:.2f} acc_micro={summary['acc_micro']:.2f} -> {run_dir}"


def _cmd_resume(args: argparse.Namespace) -> int:
    from conpet_lightning.loop import TaskLoop

    loop = TaskLoop.resume(args.run_dir)
    assert loop.finished is not None
    done = len(loop.finished["per_task"])
    print(f"[conpet] resuming {args.run_dir} after {done} finished task(s)", flush=True)
    return _run_to_end(loop)


def _run_to_end(loop: TaskLoop) -> int:
    """Run the loop and print the done line; a SIGTERM ends it with exit code 143 and says how to continue.

    Lightning turns SIGTERM into ``SIGTERMException``, a ``SystemExit`` with no code, so without this a killed run
    would exit with status 0 as if it had finished.
    """
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    try:
        out = loop.run()
    except SIGTERMException:
        print(
            f"conpet: stopped by SIGTERM after {len(loop.per_task)} finished task(s); their results are in "
            f"{loop.run_dir}. Continue with: conpet resume {loop.run_dir}",
            file=sys.stderr,
            flush=True,
        )
        return 128 + signal.SIGTERM
    print(_done_line(out["summary"], loop.run_dir), flush=True)
    return 0


def _cmd_stats(args: argparse.Namespace) -> int:
    from conpet_lightning.data.benchmarks import load_benchmark

    root = Path(args.root)
    if not root.exists():
        root = Path(__file__).resolve().parents[2] / args.root
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
    run = sub.add_parser("run", help="run an experiment (a name in experiments/ or a YAML path)")
    run.add_argument("experiment")
    run.add_argument("overrides", nargs="*", help="key=value config overrides")
    run.set_defaults(func=_cmd_run)
    resume = sub.add_parser("resume", help="continue a killed run from its folder, after its last finished task")
    resume.add_argument("run_dir")
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


def main(argv: list[str] | None = None) -> int:
    """Entry point; bad input ends with one clear line on stderr and exit code 2."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("WANDB_MODE", "offline")
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (ConfigError, DataError, FileNotFoundError, FloatingPointError) as err:
        print(f"conpet: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
