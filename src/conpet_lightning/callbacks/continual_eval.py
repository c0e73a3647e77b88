"""Continual evaluation (De Lange et al. 2023): test all seen tasks every N optimizer steps, for stability-gap curves.

Built by the task loop when ``eval.every_n_steps`` is set. During the **last trained stage** of each task (the last
entry of ``method.stages(task)`` with ``epochs > 0``: ``train`` for the shared-LoRA methods, ``expert`` for Dynamic
ConPET), after every N-th optimizer step it predicts the test sets of all seen tasks with ``method.predict`` and
appends ``{"task": t, "step": s, "acc": [percent per seen task 0..t]}`` to ``loop.eval_curve``. ``step`` is the
optimizer step **within that stage**: its Trainer's ``global_step`` after that step (N, 2N, ...; every Trainer counts
from 0), the counter that ``validate_eval_curve`` asks for: it grows within a task, and entries sort by (task, step).

After each task's end-of-task test the loop calls ``record_task_end``, which appends the test's row of the accuracy
matrix R as one more entry, at the stage's final step. So every task has at least one entry (``min_acc`` needs one per
task), and the last entry of task t is ``R[t][:t+1]`` of the restored best epoch, so WC-ACC's current-task term is
``R[t][t]``. When N divides the stage's step count, the final step has two entries: the last weights, then the
restored best epoch (the curve keeps that order).

How an evaluation runs: the module goes to eval mode (every submodule's mode is restored afterwards), under
``torch.no_grad``, the Trainer's precision context and a forked RNG (so training draws the same random numbers with or
without continual evaluation), over ``datamodule.test_dataloader()`` (this rank's shard; the per-task counts are
summed across ranks by ``TaskAccuracy``). Each batch is first passed to ``on_validation_batch_start`` of the loop's
task callbacks, which is where ``topk_routing`` writes ``batch["route"]`` for Dynamic ConPET (no teacher forcing),
exactly as in validation. Each entry is also logged to the Trainer's loggers (``continual/acc_task{j}``,
``continual/acc_macro``) at Lightning's logger step ``s - 1`` (the step its training metrics of that batch use; on W&B
shifted to the run-level step), and the end-of-task entry at the step of the end-of-task test's metrics.

Skipped: CRL and CRL* (``crl``) predict by the nearest class prototype, and prototypes are computed only in
``end_task``. Mid-training there are none during the first task, and later only the previous task's prototypes,
computed with an encoder that has moved since and with none for the current task's classes, so a mid-training
prediction measures nothing meaningful. Those runs log only the end-of-task entries (a warning says so).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from contextlib import nullcontext
from typing import TYPE_CHECKING, Any

import lightning as L
import torch

from conpet_lightning.callbacks.base import TaskCallback
from conpet_lightning.methods.static.common import batch_to
from conpet_lightning.metrics.task_accuracy import TaskAccuracy

if TYPE_CHECKING:
    from conpet_lightning.loop import TaskLoop
    from conpet_lightning.methods.base import StageSpec


def skip_reason(method: Any) -> str | None:
    """Why mid-training prediction is not meaningful for a method (see the module docstring), or None."""
    from conpet_lightning.methods.static.crl import CRLModule

    if isinstance(method, CRLModule):
        return (
            "CRL predicts by class prototypes, which are computed only at the end of each task: mid-training "
            "evaluation is skipped and eval_curve holds only the end-of-task entries"
        )
    return None


def last_trained_stage(method: Any, task: int) -> str | None:
    """Name of the last stage of ``task`` that the loop fits (``epochs > 0``), or None."""
    names = [s.name for s in method.stages(task) if s.epochs > 0]
    return names[-1] if names else None


class ContinualEvalCallback(TaskCallback):
    """Appends all-seen-task test accuracies to ``loop.eval_curve``; see the module docstring."""

    def __init__(self, every_n_steps: int) -> None:
        self.every_n_steps = every_n_steps
        """N (> 0; the config validates ``eval.every_n_steps``)."""
        self.loop: TaskLoop | None = None
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
    def on_run_start(self, loop: TaskLoop) -> None:
        """Remember the loop (its curve, datamodule and callbacks); warn when the method cannot be evaluated."""
        self.loop = loop
        self.skip = skip_reason(loop.method)
        if self.skip:
            warnings.warn(f"eval.every_n_steps: {self.skip}", stacklevel=2)

    def on_task_start(self, loop: TaskLoop, task: int) -> None:
        """A new task: no stage steps yet."""
        self.task = task
        self.stage_steps = 0

    def on_stage_start(self, loop: TaskLoop, task: int, stage: StageSpec) -> None:
        """Evaluate only during the task's last trained stage."""
        self.task = task
        self.in_last_stage = stage.name == last_trained_stage(loop.method, task)
        self.active = self.in_last_stage and self.skip is None
        self._last_step = -1

    def on_stage_end(self, loop: TaskLoop, task: int, stage: StageSpec) -> None:
        """The stage's Trainer is done."""
        self.in_last_stage = self.active = False

    # ---------------------------------------------------------------------------------------- Lightning hooks
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Every N-th optimizer step of the last stage: evaluate all seen tasks and record the entry."""
        if self.loop is None or not self.in_last_stage:
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
        assert self.loop is not None
        loop, task = self.loop, self.task
        others = [cb for cb in loop.callbacks if cb is not self]
        device = pl_module.device
        metric = TaskAccuracy(loop.benchmark.num_tasks).to(device)
        modes = {m: m.training for m in pl_module.modules()}
        rng_devices = [device] if device.type == "cuda" else []
        precision = getattr(trainer, "precision_plugin", None)
        autocast = precision.forward_context if precision is not None else nullcontext
        pl_module.eval()
        try:
            with torch.random.fork_rng(devices=rng_devices), torch.no_grad():
                for i, batch in enumerate(loop.datamodule.test_dataloader()):
                    batch = batch_to(batch, device)
                    for cb in others:
                        cb.on_validation_batch_start(trainer, pl_module, batch, i)
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
        """Append one entry to ``loop.eval_curve`` and log it; returns the entry."""
        assert self.loop is not None
        entry = {"task": int(task), "step": int(step), "acc": [round(float(a), 4) for a in acc]}
        self.loop.eval_curve.append(entry)
        values = {f"continual/acc_task{j}": a for j, a in enumerate(entry["acc"])}
        values["continual/acc_macro"] = sum(entry["acc"]) / len(entry["acc"])
        for logger in loggers:
            logger.log_metrics(values, step=logger_step)
        return entry

    def record_task_end(self, loop: TaskLoop, task: int) -> dict[str, Any]:
        """After the end-of-task test: row ``task`` of R as the task's final entry (see the module docstring)."""
        self.loop = loop
        row = loop.metrics.R[task][: task + 1]
        acc = [float(v) for v in row if v is not None]
        if len(acc) != task + 1:
            raise RuntimeError(f"continual evaluation: row {task} of R is incomplete after the test: {row}")
        return self.record(task, self.stage_steps, acc, loop.extra_loggers, logger_step=None)
