"""Task-level hooks: the same callback objects live across the fresh Trainers of a run.

A callback declares what it needs from the method (``requires``: ``contract`` Protocols, checked on the method class
when the run is composed) and its options (``options_cls``: a dataclass that holds the defaults and checks the values).
Task hooks receive the run's ``RunContext``, not the loop.
"""

from __future__ import annotations

from typing import Any, ClassVar

import lightning as L

from conpet_lightning.config import ConfigError, check_options
from conpet_lightning.contract import RunContext, StageSpec


class TaskCallback(L.Callback):
    """A Lightning callback that the task loop also calls at task and stage boundaries."""

    options_cls: ClassVar[type | None] = None
    requires: ClassVar[tuple[type, ...]] = ()
    """``contract`` Protocols the method class must implement for this callback to work."""
    provides: ClassVar[tuple[str, ...]] = ()
    """Roles this callback fills for the method (``router``), checked by the method's ``check_pairing``."""

    @classmethod
    def parse_options(cls, entry: dict[str, Any], slot: str) -> Any:
        """The validated options of a YAML entry (``name`` plus the fields of ``options_cls``), or None."""
        opts = {k: v for k, v in entry.items() if k != "name"}
        if cls.options_cls is None:
            if opts:
                raise ConfigError(f"callbacks.{slot}: '{entry.get('name')}' takes no options, got {sorted(opts)}")
            return None
        return check_options(cls.options_cls, {"name": entry.get("name"), **opts}, f"callbacks.{slot}")

    @classmethod
    def check_pairing(cls, slot: str, options: Any, method_options: Any) -> None:
        """Cross-field rules between this callback's options and the method's (raise ConfigError)."""

    @classmethod
    def from_options(cls, entry: dict[str, Any], slot: str) -> TaskCallback:
        """Build from a YAML entry."""
        options = cls.parse_options(entry, slot)
        return cls() if options is None else cls(options)  # type: ignore[call-arg]

    def on_run_start(self, ctx: RunContext) -> None:
        """Once, before the first task (the datamodule and method exist)."""

    def on_task_start(self, ctx: RunContext, task: int) -> None:
        """After ``set_task`` on the datamodule and the method, before the first stage."""

    def on_stage_start(self, ctx: RunContext, task: int, stage: StageSpec) -> None:
        """Before the stage's fit (``ctx.fit`` holds its device and precision)."""

    def on_stage_end(self, ctx: RunContext, task: int, stage: StageSpec) -> None:
        """After the stage's best checkpoint is restored (or its saved weights loaded, on resume)."""

    def on_task_end(self, ctx: RunContext, task: int) -> None:
        """After the last stage, before the end-of-task test."""

    def on_task_tested(self, ctx: RunContext, task: int) -> None:
        """Right after the end-of-task test: row ``task`` of ``ctx.R`` is filled (``per_task`` not yet)."""

    def on_task_evaluated(self, ctx: RunContext, task: int) -> None:
        """After the end-of-task test: row ``task`` of R and ``ctx.per_task[task]`` are final and on disk."""

    def on_run_end(self, ctx: RunContext, metrics: dict[str, Any]) -> None:
        """Once, after the last task, with the final metrics.json content."""

    def task_record(self, task: int) -> dict[str, Any]:
        """Extra entries for ``metrics.json`` ``per_task[task]``."""
        return {}
