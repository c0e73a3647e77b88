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

    print(report(args.run_dirs, as_json=args.json))
    if not args.no_figures:
        for run_dir in args.run_dirs:
            render_run_figures(run_dir)
    return 0


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
    rep.add_argument("run_dirs", nargs="+")
    rep.add_argument("--json", action="store_true")
    rep.add_argument("--no-figures", action="store_true", help="do not re-render the PNG figures")
    rep.set_defaults(func=_cmd_report)
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
