"""Continual evaluation (De Lange et al. 2023): test all seen tasks every N optimizer steps, for stability-gap curves.

Added to the run's callbacks by the task loop when ``eval.every_n_steps`` is set. During the **last trained stage** of
each task (the last entry of ``method.stages(task)`` with ``epochs > 0``: ``train`` for the shared-LoRA methods,
``expert`` for Dynamic ConPET), after every N-th optimizer step it predicts the test sets of all seen tasks with
``method.predict`` and appends ``{"task": t, "step": s, "acc": [percent per seen task 0..t]}`` to the run's
``eval_curve``. ``step`` is the optimizer step **within that stage**: its Trainer's ``global_step`` after that step
(N, 2N, ...; every Trainer counts from 0), the counter that ``validate_eval_curve`` asks for: it grows within a task,
and entries sort by (task, step).

After each task's end-of-task test (``on_task_tested``) it appends the test's row of the accuracy
matrix R as one more entry, at the stage's final step. So every task has at least one entry (``min_acc`` needs one per
task), and the last entry of task t is ``R[t][:t+1]`` of the restored best epoch, so WC-ACC's current-task term is
``R[t][t]``. When N divides the stage's step count, the final step has two entries: the last weights, then the
restored best epoch (the curve keeps that order).

How an evaluation runs: the module goes to eval mode (every submodule's mode is restored afterwards), under
``torch.no_grad``, the Trainer's precision context and a forked RNG (so training draws the same random numbers with or
without continual evaluation), over ``datamodule.test_dataloader()`` (this rank's shard; the per-task counts are
summed across ranks by ``TaskAccuracy``). A routed method (Dynamic ConPET) asks its attached router, as in
validation (no teacher forcing). Each entry is also logged to the Trainer's loggers (``continual/acc_task{j}``,
``continual/acc_macro``) at Lightning's logger step ``s - 1`` (the step its training metrics of that batch use; on W&B
shifted to the run-level step), and the end-of-task entry at the step of the end-of-task test's metrics.

Skipped when the method says a mid-training prediction measures nothing (``midtraining_eval_blocker``, e.g. CRL,
whose prototypes exist only at task end): those runs log only the end-of-task entries (a warning says so).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any, ClassVar

import lightning as L
import torch

from conpet_lightning.callbacks.base import TaskCallback
from conpet_lightning.contract import MidTrainingEvaluable, RunContext, StageSpec
from conpet_lightning.metrics.task_accuracy import TaskAccuracy
from conpet_lightning.passes import batch_to


def last_trained_stage(method: Any, task: int) -> str | None:
    """Name of the last stage of ``task`` that the loop fits (``epochs > 0``), or None."""
    names = [s.name for s in method.stages(task) if s.epochs > 0]
    return names[-1] if names else None


class ContinualEvalCallback(TaskCallback):
    """Appends all-seen-task test accuracies to the run's ``eval_curve``; see the module docstring."""

    requires: ClassVar[tuple[type, ...]] = (MidTrainingEvaluable,)

    def __init__(self, every_n_steps: int) -> None:
        self.every_n_steps = every_n_steps
        """N (> 0; the config validates ``eval.every_n_steps``)."""
        self.run: RunContext | None = None
        self.skip: str | None = None
        self.in_last_stage = False
        """True during the last trained stage of the current task."""
        self.active = False
        """True during the last trained stage when the method can predict mid-training (evaluations run)."""
        self.task = 0
        self.stage_steps = 0
        """Optimizer steps of the current task's last trained stage so far (its final count once it ended)."""
        self._last_step = -1

    # -------------------------------------------------------------------------------------------- task hooks
    def on_run_start(self, ctx: RunContext) -> None:
        """Remember the run (its curve and datamodule); warn when the method cannot be evaluated mid-training."""
        self.run = ctx
        self.skip = ctx.method.midtraining_eval_blocker()
        if self.skip:
            warnings.warn(f"eval.every_n_steps: {self.skip}", stacklevel=2)

    def on_task_start(self, ctx: RunContext, task: int) -> None:
        """A new task: no stage steps yet."""
        self.task = task
        self.stage_steps = 0

    def on_stage_start(self, ctx: RunContext, task: int, stage: StageSpec) -> None:
        """Evaluate only during the task's last trained stage."""
        self.task = task
        self.in_last_stage = stage.name == last_trained_stage(ctx.method, task)
        self.active = self.in_last_stage and self.skip is None
        self._last_step = -1

    def on_stage_end(self, ctx: RunContext, task: int, stage: StageSpec) -> None:
        """The stage's Trainer is done."""
        self.in_last_stage = self.active = False

    # ---------------------------------------------------------------------------------------- Lightning hooks
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Every N-th optimizer step of the last stage: evaluate all seen tasks and record the entry."""
        if self.run is None or not self.in_last_stage:
            return
        step = int(trainer.global_step)
        self.stage_steps = step
        if not self.active or step == self._last_step or step == 0 or step % self.every_n_steps:
            return
        self._last_step = step
        acc = self.evaluate(trainer, pl_module)
        # Lightning logs everything after the s-th optimizer step (that batch's training metrics, and validation at
        # the end of an epoch) at logger step s - 1; the entry is logged at that step too, next to the validation
        # of the same weights.
        self.record(self.task, step, acc, trainer.loggers, logger_step=step - 1)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Keep the last stage's final step count, for the end-of-task entry."""
        if self.in_last_stage:
            self.stage_steps = int(trainer.global_step)

    # ------------------------------------------------------------------------------------------- evaluation
    def evaluate(self, trainer: L.Trainer, pl_module: Any) -> list[float]:
        """Percent accuracy on each seen task's test set (0..current) with ``pl_module.predict``; no side effects."""
        assert self.run is not None
        run, task = self.run, self.task
        device = pl_module.device
        metric = TaskAccuracy(run.num_tasks).to(device)
        modes = {m: m.training for m in pl_module.modules()}
        rng_devices = [device] if device.type == "cuda" else []
        autocast = trainer.precision_plugin.forward_context
        pl_module.eval()
        try:
            with torch.random.fork_rng(devices=rng_devices), torch.no_grad():
                for batch in run.datamodule.test_dataloader():
                    batch = batch_to(batch, device)
                    with autocast():
                        preds = pl_module.predict(batch)
                    metric.update(preds, batch["labels"], batch["task_ids"])
            per_task = torch.atleast_1d(metric.compute()["per_task"]).tolist()
        finally:
            for m, mode in modes.items():
                m.training = mode
        return [float(per_task[j]) for j in range(task + 1)]

    def record(
        self, task: int, step: int, acc: Sequence[float], loggers: Sequence[Any], logger_step: int | None
    ) -> dict[str, Any]:
        """Append one entry to the run's ``eval_curve`` and log it; returns the entry."""
        assert self.run is not None
        entry = {"task": int(task), "step": int(step), "acc": [round(float(a), 4) for a in acc]}
        self.run.eval_curve.append(entry)
        values = {f"continual/acc_task{j}": a for j, a in enumerate(entry["acc"])}
        values["continual/acc_macro"] = sum(entry["acc"]) / len(entry["acc"])
        for logger in loggers:
            logger.log_metrics(values, step=logger_step)
        return entry

    def on_task_tested(self, ctx: RunContext, task: int) -> None:
        """After the end-of-task test: row ``task`` of R as the task's final entry (see the module docstring)."""
        self.run = ctx
        row = ctx.R[task][: task + 1]
        acc = [float(v) for v in row if v is not None]
        if len(acc) != task + 1:
            raise RuntimeError(f"continual evaluation: row {task} of R is incomplete after the test: {row}")
        self.record(task, self.stage_steps, acc, ctx.loggers, logger_step=None)
