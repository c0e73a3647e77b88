"""Per-stage data for two-stage methods on dynamic replay (CRL*): stage 1 sees the current task alone.

``dynamic_replay`` installs one plan per task. CRL trains its contrastive stage on the current task only and its
replay stage on the replayed history, so this callback, listed *after* the replay callback, keeps the plan that was
installed for the task and, before each stage, serves either the current task alone (stages the method marks
``current`` in ``stage_data``) or that plan again.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

from conpet_lightning.callbacks.base import TaskCallback
from conpet_lightning.contract import RunContext, StageDataSource, StageSpec, stage_data_of
from conpet_lightning.data.datamodule import shuffled_epoch
from conpet_lightning.registry import CALLBACKS


@CALLBACKS.register("stage_data")
class StageDataCallback(TaskCallback):
    """Swaps the task's replay plan for the current task alone in the stages that ask for it."""

    requires: ClassVar[tuple[type, ...]] = (StageDataSource,)

    def __init__(self) -> None:
        self.saved: tuple[Callable[[int], list[list[int]]], list[list[int]], str] | None = None
        self.records: dict[int, dict[str, Any]] = {}

    def on_task_start(self, ctx: RunContext, task: int) -> None:
        """Keep the plan the replay callback installed, as a function: a stage under a step budget draws more epochs."""
        dm = ctx.datamodule
        plan_fn, info = dm.installed_train_plan()
        self.saved = (plan_fn, dm.valid_plan(), info)

    def on_stage_start(self, ctx: RunContext, task: int, stage: StageSpec) -> None:
        """Serve the current task alone, or the kept replay plan, as the method asks."""
        assert self.saved is not None, "on_task_start runs first"
        dm = ctx.datamodule
        kind = stage_data_of(ctx.method, task, stage)
        if kind == "current":
            current, seed, size = dm.indices("train", task), ctx.seed, dm.batch_size
            dm.set_train_plan(lambda epoch: shuffled_epoch(current, size, seed, task, epoch), "current task")
        else:
            plan_fn, _, info = self.saved
            dm.set_train_plan(plan_fn, info)
        dm.set_valid_plan(self.saved[1])
        self.records.setdefault(task, {}).setdefault("stage_data", {})[stage.name] = kind

    def task_record(self, task: int) -> dict[str, Any]:
        """Which data each stage trained on."""
        return self.records.get(task, {})
