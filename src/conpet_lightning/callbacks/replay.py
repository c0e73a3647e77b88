"""Dynamic replay (ConPET's data pipeline) as a callback: it installs the task's batch plan on the datamodule."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from conpet_lightning.callbacks.base import TaskCallback
from conpet_lightning.config import ConfigError, OptionError, require_choice, require_range
from conpet_lightning.contract import RunContext, StageSpec, stream_seed
from conpet_lightning.policies.sampling import DynamicReplayPolicy, replay_composition
from conpet_lightning.registry import CALLBACKS


@dataclass
class DynamicReplayOptions:
    """YAML options of ``dynamic_replay`` (METHOD.md §3.1)."""

    name: str = "dynamic_replay"
    policy: int = 2
    """0 = no budget (every epoch passes over the full history: Limitless, joint), 1 = (k+1) x limit, 2 = fixed."""
    batch_limit: int = 50
    """Batches per epoch (train + valid) under policy 1/2."""
    train_fraction: float = 0.8
    new_old_ratio: float = 1.0
    resample_every_epoch: bool = True
    """False = ConPET's cache mode (EMR*, EA-EMR*): one sequence of all epochs drawn per task and replayed."""
    redraw_per_stage: bool = False
    """Each stage of a task draws its own batches (ConPET: the loader resamples for the selector and the expert
    stage); False: every stage of a task sees the same plan."""
    valid_batch_size: int | None = None
    """Validation batch size of the mixed plan (default: data.eval_batch_size; ConPET: 32)."""
    balanced_stages: list[str] = field(default_factory=list)
    """Stages (by name, e.g. ``[selector]``) that train on a task-balanced plan of their own: every seen task, the new
    one included, gets the same share of the same number of batches (``DynamicReplayPolicy.task_balanced``). Empty:
    ConPET, every stage on the new/old mix of ``new_old_ratio``."""

    def __post_init__(self) -> None:
        require_choice("policy", self.policy, (0, 1, 2))
        require_range("batch_limit", self.batch_limit, low=1)
        require_range("train_fraction", self.train_fraction, low=0.0, high=1.0, open_low=True)
        require_range("valid_batch_size", self.valid_batch_size, low=1)
        if self.balanced_stages and self.policy == 0:
            raise OptionError("balanced_stages", self.balanced_stages, "only with a budget (policy 1 or 2)")


@CALLBACKS.register("dynamic_replay")
class DynamicReplayCallback(TaskCallback):
    """Per task, a fixed budget of batches that mix new samples with task-balanced samples of the full history.

    Task 1 always trains on its full data. The plan is a pure function of (seed, task, epoch), so every DDP rank
    derives the same global batches and takes its shard.
    """

    options_cls = DynamicReplayOptions
    provides: ClassVar[tuple[str, ...]] = ("replay",)

    def __init__(self, options: DynamicReplayOptions | None = None) -> None:
        self.options = options or DynamicReplayOptions()
        self.records: dict[int, dict[str, Any]] = {}

    def policy(self, seed: int, task_balanced: bool = False) -> DynamicReplayPolicy:
        """The Trainer-free sampling policy of these options, rooted at ``seed``."""
        o = self.options
        return DynamicReplayPolicy(
            policy=o.policy,
            batch_limit=o.batch_limit,
            train_fraction=o.train_fraction,
            new_old_ratio=o.new_old_ratio,
            resample_every_epoch=o.resample_every_epoch,
            seed=seed,
            task_balanced=task_balanced,
        )

    def describe(self, *notes: str) -> str:
        """The plan's one-line description for metrics.json (``train_data``)."""
        o = self.options
        head = f"dynamic replay (policy {o.policy}, limit {o.batch_limit}, ratio {o.new_old_ratio}"
        return ", ".join([head, *notes]) + ")"

    def pools(self, ctx: RunContext, part: str, task: int) -> list[np.ndarray]:
        """The stored pool: every seen task's records of ``part`` (the full history, not a memory)."""
        return [ctx.datamodule.indices(part, t) for t in range(task + 1)]

    def on_run_start(self, ctx: RunContext) -> None:
        """A balanced stage must be one of the method's stages: a misspelt name would silently balance nothing."""
        names = {s.name for t in range(min(2, ctx.num_tasks)) for s in ctx.method.stages(t)}
        unknown = sorted(set(self.options.balanced_stages) - names)
        if unknown:
            raise ConfigError(
                f"callbacks.replay.balanced_stages: {unknown} are not stages of this method "
                f"(its stages: {sorted(names)})"
            )

    def on_task_start(self, ctx: RunContext, task: int) -> None:
        """Install the task's training plan and fixed validation plan."""
        o, dm = self.options, ctx.datamodule
        policy = self.policy(ctx.seed)
        train_pools, valid_pools = self.pools(ctx, "train", task), self.pools(ctx, "valid", task)
        batch_size = dm.batch_size
        dm.set_train_plan(lambda epoch: policy.train_plan(task, train_pools, batch_size, epoch), self.describe())
        if task > 0:
            dm.set_valid_plan(policy.valid_plan(task, valid_pools, o.valid_batch_size or dm.eval_batch_size))
        first = policy.train_plan(task, train_pools, batch_size, 0)
        comp = replay_composition(first, train_pools)
        self.records[task] = {
            "replay": {
                "policy": o.policy,
                "train_batches_per_epoch": len(first),
                "samples_per_epoch": comp["samples"],
                "new_per_epoch": comp["new"],
                "old_per_epoch": comp["old"],
                "old_per_task": {str(k): v for k, v in comp["old_per_task"].items()},
                "valid_samples": int(sum(len(b) for b in dm.valid_plan())),
            }
        }

    def on_stage_start(self, ctx: RunContext, task: int, stage: StageSpec) -> None:
        """A stage-drawn plan (``redraw_per_stage``, or a task-balanced stage); else the task's plan (fixed valid)."""
        o, dm = self.options, ctx.datamodule
        balanced = stage.name in o.balanced_stages
        if not (balanced or o.redraw_per_stage or o.balanced_stages):
            return  # the plan installed at the task's start serves every stage
        pools, batch_size = self.pools(ctx, "train", task), dm.batch_size
        if balanced or o.redraw_per_stage:
            policy = self.policy(stream_seed(ctx.seed, task, stage.name), task_balanced=balanced)
            notes = [n for n, on in (("task-balanced", balanced), ("drawn per stage", True)) if on]
        else:  # another stage took a balanced plan before this one: serve the task's own plan again
            policy, notes = self.policy(ctx.seed), []
        dm.set_train_plan(lambda epoch: policy.train_plan(task, pools, batch_size, epoch), self.describe(*notes))

    def task_record(self, task: int) -> dict[str, Any]:
        """Replay composition of the task (first epoch) for metrics.json."""
        return self.records.get(task, {})
