"""Shared helpers of the benchmarks: sizes, side-by-side timing, ratio entries, run conditions, the results file.

Every figure of ``make bench`` is a *ratio* of two things measured in the same process run, interleaved and
repeated (median of the repeats), so the machine's speed and most of its load cancel out. A ratio entry carries its
target and whether it holds; a missed target is a result, never an error.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tests.helpers import TINY  # noqa: E402  (the environment above is set before any heavy import)

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parents[1]

#: Overrides per bench size. ``small``: the packaged MiniLM with small caps (what ``make bench`` runs; the figures
#: mean something). ``tiny``: a random 2-layer BERT, for the smoke test of the harness (the figures mean nothing).
SIZES: dict[str, tuple[str, ...]] = {
    "small": (
        "model.backbone=minilm",
        "data.max_train_per_class=16",
        "data.max_valid_per_class=4",
        "data.max_test_per_class=4",
        "train.epochs=1",
        "train.steps_per_task=null",  # each bench states its own steps (epochs over its caps), not the CPU default's
        "logging.progress_bar=false",
        "logging.wandb=false",
    ),
    # the test suite's tiny configuration (tests/helpers.py), without its thread count: the bench sets its own
    "tiny": tuple(o for o in TINY if not o.startswith("train.num_threads")),
}


def size_overrides(size: str, threads: int) -> list[str]:
    """The config overrides of a bench size, with the torch thread count."""
    if size not in SIZES:
        raise ValueError(f"unknown bench size {size!r}; one of {sorted(SIZES)}")
    return [*SIZES[size], f"train.num_threads={threads}"]


def run_experiment(experiment: str, *overrides: str) -> dict[str, Any]:
    """Run an experiment through the real task loop in a temporary folder; returns its metrics.json content."""
    from conpet_lightning.config import load_config
    from conpet_lightning.loop import TaskLoop

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(experiment, [f"output_dir={tmp}", "logging.progress_bar=false", *overrides])
        return TaskLoop(cfg, Path(tmp) / experiment / "bench").run()


def hook_target(loop: Any) -> Any:
    """What the callbacks' task hooks receive: the loop's ``RunContext`` (or the loop itself, before it had one)."""
    return getattr(loop, "ctx", loop)


@contextlib.contextmanager
def built_loop(experiment: str, overrides: list[str]) -> Iterator[Any]:
    """A constructed (not run) ``TaskLoop`` in a temporary folder; its callbacks have seen ``on_run_start``."""
    from conpet_lightning.config import load_config
    from conpet_lightning.loop import TaskLoop

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(experiment, [f"output_dir={tmp}", *overrides])
        loop = TaskLoop(cfg, Path(tmp) / experiment / "bench")
        for cb in loop.callbacks:
            cb.on_run_start(hook_target(loop))
        try:
            yield loop
        finally:
            if loop.wandb_logger is not None:
                loop.wandb_logger.finish()


def begin_task(loop: Any, task: int) -> None:
    """What the loop does when a task starts: the datamodule's task, the method's, the callbacks' hook."""
    loop.datamodule.set_task(task, loop.method.train_scope)
    loop.method.setup_task(task)
    for cb in loop.callbacks:
        cb.on_task_start(hook_target(loop), task)


def begin_stage(loop: Any, task: int, stage: Any) -> None:
    """What ``TaskLoop.train_task`` does before a stage's fit: stage setup, the stage's Trainer context, the
    callbacks' hook, ``before_fit`` (no fit)."""
    from conpet_lightning.contract import FitContext

    loop.method.setup_stage(task, stage)
    trainer = loop.make_trainer(task, stage, loop.stage_checkpoints(task, stage))
    loop.ctx.fit = FitContext(trainer.strategy.root_device, trainer.precision_plugin)
    for cb in loop.callbacks:
        cb.on_stage_start(loop.ctx, task, stage)
    loop.ctx.fit.epochs = loop.plan_epochs(stage) if hasattr(loop, "plan_epochs") else max(stage.epochs, 1)
    loop.method.before_fit(task, stage, loop.ctx.fit, loop.datamodule)


def unfreeze_first_expert(method: Any) -> None:
    """Undo ``end_task(0)`` of Dynamic ConPET, so that task 1 can be trained again from its start (bench only)."""
    method.encoder._frozen.discard("expert0")
    method.frozen_experts.discard(0)
    method.expert_cache.clear()


class GoldRouter:
    """Top-1 routing with teacher forcing in training routes every sample to its own task's expert."""

    def route(self, method: Any, batch: dict[str, Any], *, train: bool) -> Any:
        """The gold task of every sample, ``[B, 1]``."""
        return batch["task_ids"][:, None]


def route_by_gold(method: Any, batch: dict[str, Any]) -> None:
    """Make ``method`` route ``batch`` to the gold experts (whichever routing interface the method has)."""
    batch["route"] = batch["task_ids"][:, None]
    if hasattr(method, "attach_router"):
        method.attach_router(GoldRouter())


def interleaved(sides: dict[str, Callable[[], float]], repeats: int) -> dict[str, list[float]]:
    """Call every side ``repeats`` times, alternating the order each round (ABBA...); each call returns seconds."""
    names = list(sides)
    out: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            out[name].append(float(sides[name]()))
    return out


def median(values: list[float]) -> float:
    """Median of a non-empty list."""
    return float(statistics.median(values))


def paired_ratio(times: dict[str, list[float]], num: str, den: str) -> float:
    """Median over rounds of ``times[num][i] / times[den][i]``: each round's two sides ran back to back, so a load
    that drifts during the bench cancels within a round (a ratio of medians would mix rounds)."""
    return median([a / b for a, b in zip(times[num], times[den], strict=True)])


def peak_rss_mb() -> float:
    """This process's peak resident set size so far (VmHWM), in MiB; ru_maxrss where /proc is missing."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class _MallInfo2(ctypes.Structure):
    """glibc's ``struct mallinfo2``: ten ``size_t`` fields, in this order."""

    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def heap_in_use_mb() -> float | None:
    """Bytes malloc hands out to live objects (glibc ``mallinfo2``: in-use heap chunks plus mmapped chunks), in MiB.

    Unlike VmHWM it leaves out the freed memory the allocator keeps for reuse, so it shows what the process holds;
    None where glibc's ``mallinfo2`` (2.33+) is missing.
    """
    try:
        mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return None
    mallinfo2.restype = _MallInfo2
    info = mallinfo2()
    return (info.uordblks + info.hblkhd) / 2**20


def ratio_entry(
    name: str,
    value: float,
    target: float,
    op: str,
    *,
    what: str,
    conditions: dict[str, Any],
    details: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One row of the table: ``value`` against ``target`` (``op`` is ``>=`` or ``<=``), with how it was measured."""
    if op not in (">=", "<="):
        raise ValueError(f"op must be '>=' or '<=', not {op!r}")
    holds = value >= target if op == ">=" else value <= target
    return {
        "name": name,
        "what": what,
        "ratio": round(float(value), 4),
        "target": f"{op} {target}",
        "holds": bool(holds),
        "verdict": "holds" if holds else "MISSED",
        "conditions": conditions,
        "details": details or {},
    }


def machine_conditions() -> dict[str, Any]:
    """Where and when the bench ran: CPU, load, threads, commit (the load says whether the machine was shared)."""
    import torch

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=False
        ).stdout.strip()
    except OSError:
        commit = ""
    load = os.getloadavg() if hasattr(os, "getloadavg") else (0.0, 0.0, 0.0)
    return {
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_average_1_5_15": [round(x, 2) for x in load],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.cuda.is_available(),
        "commit": commit,
    }


def child_env(threads: int) -> dict[str, str]:
    """Environment of a benchmark subprocess: offline, quiet, the same thread count."""
    env = dict(os.environ)
    env.update(
        {
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "OMP_NUM_THREADS": str(threads),
            "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p),
        }
    )
    env.setdefault("WANDB_MODE", "disabled")
    return env


def run_child(
    module: str, args: list[str], threads: int, timeout: float = 1800, env: dict[str, str] | None = None
) -> dict[str, Any]:
    """Run ``python -m <module> --child OUT <args>`` in a fresh process; returns the JSON it wrote to OUT.

    Raises:
        RuntimeError: the child failed (its stderr tail is in the message).
    """
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "child.json"
        start = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", module, "--child", str(out), *args],
            cwd=REPO,
            env={**child_env(threads), **(env or {})},
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        wall = time.perf_counter() - start
        if proc.returncode != 0 or not out.is_file():
            raise RuntimeError(f"{module} child failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        result = json.loads(out.read_text())
        result["process_wall_seconds"] = round(wall, 3)
        return result


def write_result(name: str, result: dict[str, Any]) -> Path:
    """Write ``bench/results/<name>.json`` with the machine it ran on and when."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{name}.json"
    out.write_text(json.dumps({"benchmark": name, **machine_conditions(), **result}, indent=2))
    return out
