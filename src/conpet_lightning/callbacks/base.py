"""Task-level hooks: the same callback objects live across the fresh Trainers of a run."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import lightning as L

from conpet_lightning.config import check_options

if TYPE_CHECKING:
    from conpet_lightning.loop import TaskLoop
    from conpet_lightning.methods.base import StageSpec


class TaskCallback(L.Callback):
    """A Lightning callback that the task loop also calls at task and stage boundaries.

    Subclasses set ``options_cls`` (a dataclass) so their YAML entry is validated strictly.
    """

    options_cls: type | None = None

    @classmethod
    def from_options(cls, options: dict[str, Any], slot: str) -> TaskCallback:
        """Build from a YAML entry (``name`` plus the options of ``options_cls``)."""
        opts = {k: v for k, v in options.items() if k != "name"}
        if cls.options_cls is None:
            if opts:
                raise ValueError(f"callbacks.{slot}: '{options.get('name')}' takes no options, got {sorted(opts)}")
            return cls()
        return cls(check_options(cls.options_cls, opts, f"callbacks.{slot}"))  # type: ignore[call-arg]

    def on_run_start(self, loop: TaskLoop) -> None:
        """Once, before the first task (the datamodule and method exist)."""

    def on_task_start(self, loop: TaskLoop, task: int) -> None:
        """After ``set_task`` on the datamodule and the method, before the first stage."""

    def on_stage_start(self, loop: TaskLoop, task: int, stage: StageSpec) -> None:
        """Before the stage's Trainer is built."""

    def on_stage_end(self, loop: TaskLoop, task: int, stage: StageSpec) -> None:
        """After the stage's best checkpoint is restored."""

    def on_task_end(self, loop: TaskLoop, task: int) -> None:
        """After the last stage, before the end-of-task test."""

    def on_task_evaluated(self, loop: TaskLoop, task: int) -> None:
        """After the end-of-task test: row ``task`` of R and ``loop.per_task[task]`` are final and on disk."""

    def on_run_end(self, loop: TaskLoop, metrics: dict[str, Any]) -> None:
        """Once, after the last task, with the final metrics.json content."""

    def task_record(self, task: int) -> dict[str, Any]:
        """Extra entries for ``metrics.json`` ``per_task[task]``."""
        return {}
