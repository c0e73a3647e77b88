"""Where the wall time of a ``make run`` goes: a real run with timers around the loop's phases.

A reduced ``make run`` (``dynamic_conpet`` on FewRel with the CPU default caps, W&B offline, the progress bar on;
``data.num_tasks=3`` by default) runs in a fresh subprocess. Timers wrapped around the framework's functions (no
profiler needed) give *exclusive* seconds per phase: a phase nested in another (a checkpoint written during
validation, the frozen selector's routing forwards inside a training step) is counted once, in the inner phase.
What no timer covers (interpreter start, Lightning's loop bookkeeping between hooks) is ``other``. The phases are
grouped as the issue asks: Trainer construction, W&B, data loading and encoding, forward and backward, evaluation,
figures, other; the per-task deltas let a 10-task run be extrapolated.
"""

from __future__ import annotations

import time

_T0 = time.perf_counter()

import argparse  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
from collections import defaultdict  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

from bench.common import REPO, run_child  # noqa: E402

#: The reduced run of ``make bench`` (the default of ``make run`` is 10 tasks).
DEFAULT_TASKS = {"small": 3, "tiny": 2}
TINY = [
    "model.backbone=tiny-bert",
    "data.max_train_per_class=4",
    "data.max_valid_per_class=2",
    "data.max_test_per_class=2",
    "callbacks.replay.batch_limit=5",
    "method.selector_epochs=1",
    "train.epochs=1",
]
GROUPS = (
    ("trainer_construction", ("trainer construction",)),
    ("wandb", ("wandb",)),
    ("data_loading_and_encoding", ("data:",)),
    ("forward_backward", ("train",)),
    ("evaluation", ("validation", "test")),
    ("figures", ("figures",)),
)
#: Phase-name prefixes that set the context of nested forwards, innermost first.
MAJOR = (("train step", "train"), ("validation", "validation"), ("test", "test"), ("fit:", "train"))


class Phases:
    """Exclusive wall seconds per named phase, from wrapped functions that may nest."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.stack: list[list[Any]] = []
        self.missing: list[str] = []

    def context(self) -> str:
        """The innermost major phase on the stack (train, validation, test), else ``setup``."""
        for name, _, _ in reversed(self.stack):
            for prefix, context in MAJOR:
                if name.startswith(prefix):
                    return context
        return "setup"

    def wrap(self, fn: Callable[..., Any], name: str | Callable[[Phases, tuple[Any, ...]], str]) -> Callable[..., Any]:
        """``fn`` timed under ``name`` (or ``name(self, args)``), exclusive of the phases nested in it."""

        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            label = name(self, args) if callable(name) else name
            self.stack.append([label, time.perf_counter(), 0.0])
            try:
                return fn(*args, **kwargs)
            finally:
                label, start, nested = self.stack.pop()
                spent = time.perf_counter() - start
                self.totals[label] += spent - nested
                self.calls[label] += 1
                if self.stack:
                    self.stack[-1][2] += spent

        return timed

    def patch(self, owner: Any, attr: str, name: str | Callable[[Phases, tuple[Any, ...]], str]) -> None:
        """Replace ``owner.attr`` (a function, method or property getter) by its timed version."""
        current = owner.__dict__.get(attr) if isinstance(owner, type) else getattr(owner, attr, None)
        if current is None:
            self.missing.append(f"{getattr(owner, '__name__', owner)}.{attr}")
            return
        if isinstance(current, property):
            setattr(owner, attr, property(self.wrap(current.fget, name), current.fset, current.fdel))
        else:
            setattr(owner, attr, self.wrap(current, name))

    def snapshot(self) -> dict[str, float]:
        """The totals so far."""
        return dict(self.totals)


def install(phases: Phases) -> None:
    """Wrap the framework's phases (a missing name is recorded, not fatal: the package may have moved it)."""
    import lightning as L
    import torch
    from lightning.pytorch.loggers import WandbLogger
    from lightning.pytorch.loops.evaluation_loop import _EvaluationLoop

    from conpet_lightning import loop as loop_mod
    from conpet_lightning.callbacks import dashboard, replay, routing
    from conpet_lightning.methods import base, dynamic
    from conpet_lightning.reporting import figures

    p = phases.patch
    p(loop_mod, "build_benchmark", "data: benchmark load")
    p(loop_mod.ContinualDataModule, "__init__", "data: encoding")
    p(replay.DynamicReplayCallback, "on_task_start", "data: replay plans")
    selector_prior = "before_fit" if "before_fit" in vars(dynamic.DynamicConPET) else "on_fit_start"
    p(dynamic.DynamicConPET, selector_prior, "data: selector prior")
    p(loop_mod, "load_backbone", "model load")
    p(loop_mod, "build_wandb_logger", "wandb: setup")
    p(WandbLogger, "experiment", "wandb: init and access")
    p(WandbLogger, "log_hyperparams", "wandb: log")
    p(WandbLogger, "after_save_checkpoint", "wandb: log")
    p(loop_mod.RunWandbLogger, "log_metrics", "wandb: log")
    p(loop_mod.RunWandbLogger, "finish", "wandb: finish")
    p(dashboard.DashboardCallback, "task_panels", "wandb: panels")
    p(figures, "render_run_figures", "figures")
    p(L.Trainer, "__init__", "trainer construction")
    p(L.Trainer, "fit", "fit: Lightning loop, batch collate, hooks")
    p(L.Trainer, "test", "test: Lightning loop, hooks")
    p(L.Trainer, "save_checkpoint", "checkpoint I/O")
    p(L.LightningModule, "optimizer_step", "train step (forward, backward, AdamW)")
    p(_EvaluationLoop, "run", lambda ph, args: "test loop" if args[0].trainer.testing else "validation loop")
    p(routing.TopKRoutingCallback, "ranking", lambda ph, args: f"{ph.context()} · selector routing forwards")
    p(dynamic.DynamicConPET, "frozen_expert_logits", lambda ph, args: f"{ph.context()} · frozen expert forwards")
    p(base.ContinualMethod, "restore_trainable", "checkpoint I/O")
    p(torch, "save", "checkpoint I/O")
    p(loop_mod.TaskLoop, "write_metrics", "metrics.json write")


def group(totals: dict[str, float], wall: float) -> dict[str, float]:
    """The issue's categories from the fine phases; ``other`` takes the rest of the wall time."""
    out: dict[str, float] = {}
    for key, prefixes in GROUPS:
        out[key] = sum(v for k, v in totals.items() if k.startswith(prefixes))
    out["other"] = wall - sum(out.values())
    return {k: round(v, 2) for k, v in out.items()}


def child(out: Path, overrides: list[str]) -> None:
    """Run the reduced experiment under the timers and write the breakdown to ``out``."""
    start_imports = time.perf_counter()
    import tempfile

    from conpet_lightning.callbacks.base import TaskCallback
    from conpet_lightning.config import load_config
    from conpet_lightning.loop import TaskLoop

    phases = Phases()
    phases.totals["imports"] = time.perf_counter() - start_imports
    install(phases)
    per_task: list[dict[str, float]] = []

    class Snapshots(TaskCallback):
        def on_task_evaluated(self, loop: TaskLoop, task: int) -> None:
            per_task.append(phases.snapshot())

    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        cfg = load_config("dynamic_conpet", [f"output_dir={tmp}", *overrides])
        phases.totals["config"] += time.perf_counter() - t
        loop = phases.wrap(TaskLoop, "setup: method, callbacks, run folder")(cfg, Path(tmp) / "run")
        loop.callbacks.append(Snapshots())
        metrics = phases.wrap(loop.run, "run: task-loop bookkeeping")()
    wall = time.perf_counter() - _T0
    totals = {k: round(v, 3) for k, v in sorted(phases.totals.items(), key=lambda kv: -kv[1])}
    deltas, previous = [], {"": 0.0}
    for snap in per_task:
        deltas.append(
            {k: round(v - previous.get(k, 0.0), 2) for k, v in snap.items() if v - previous.get(k, 0.0) > 0.05}
        )
        previous = snap
    out.write_text(
        json.dumps(
            {
                "wall_seconds_in_process": round(wall, 2),
                "groups": group(phases.totals, wall),
                "phases_exclusive_seconds": totals,
                "calls": dict(phases.calls),
                "per_task_phase_seconds": deltas,
                "train_seconds": [t["train_seconds"] for t in metrics["per_task"]],
                "train_steps": [t["train_steps"] for t in metrics["per_task"]],
                "acc_macro": metrics["summary"].get("acc_macro"),
                "not_patched": phases.missing,
            }
        )
    )


def run(size: str = "small", threads: int = 2, tasks: int | None = None) -> dict[str, Any]:
    """Profile the reduced run in a subprocess; returns the breakdown with its conditions."""
    tasks = tasks or DEFAULT_TASKS[size]
    overrides = [f"data.num_tasks={tasks}", f"train.num_threads={threads}"]
    if size == "tiny":
        overrides += [*TINY, "logging.progress_bar=false"]
    result = run_child("bench.profile_run", overrides, threads, env={"WANDB_MODE": "offline"})
    result["conditions"] = {
        "size": size,
        "run": "make run (dynamic_conpet, FewRel, CPU defaults), reduced by the overrides",
        "overrides": overrides,
        "torch_threads": threads,
        "wandb_mode": "offline",
        "process": "one fresh subprocess; process_wall_seconds includes interpreter start and exit",
    }
    return result


def main() -> None:
    """``--child OUT overrides...``: the subprocess side; otherwise profile and print the breakdown."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", type=Path)
    parser.add_argument("--size", default="small", choices=("small", "tiny"))
    parser.add_argument("--tasks", type=int)
    parser.add_argument("--threads", type=int, default=2)
    args, rest = parser.parse_known_args()
    if args.child is not None:
        child(args.child, rest)
    else:
        print(json.dumps(run(args.size, args.threads, args.tasks), indent=2))


if __name__ == "__main__":
    assert REPO.is_dir()
    main()
