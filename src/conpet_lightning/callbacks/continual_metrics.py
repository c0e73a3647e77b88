"""Fills the accuracy matrix R after each task from synced per-task test accuracy."""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch

from conpet_lightning.callbacks.base import TaskCallback
from conpet_lightning.contract import RunContext
from conpet_lightning.metrics.task_accuracy import TaskAccuracy


class ContinualMetricsCallback(TaskCallback):
    """R[i][j] = accuracy (%) on task j's test set after training task i (j <= i), via torchmetrics.

    Always first among the run's callbacks: it fills the run's R (``RunContext.R``, the same list) from the
    end-of-task test. The metric state is summed across ranks, so the row is the same under DDP as on one device.
    """

    def __init__(self, num_tasks: int) -> None:
        self.num_tasks = num_tasks
        self.metric = TaskAccuracy(num_tasks)
        self.R: list[list[float | None]] = []
        self.rows_micro: list[float] = []
        self.task = 0

    def on_run_start(self, ctx: RunContext) -> None:
        """Share R with the run context (rows restored on resume are already in it)."""
        self.R = ctx.R

    def on_task_start(self, ctx: RunContext, task: int) -> None:
        """The next test fills row ``task``."""
        self.task = task

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Fresh state on the module's device."""
        self.metric = self.metric.to(pl_module.device)
        self.metric.reset()

    def on_test_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """Count correct predictions per task."""
        self.metric.update(outputs["preds"], batch["labels"], batch["task_ids"])

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Write row ``self.task`` of R (percent, None above the diagonal)."""
        result = self.metric.compute()
        per_task = torch.atleast_1d(result["per_task"]).tolist()  # torchmetrics squeezes one-element outputs
        row: list[float | None] = [None] * self.num_tasks
        for j in range(self.task + 1):
            row[j] = round(float(per_task[j]), 4)
        del self.R[self.task :]
        self.R.append(row)
        self.last = {k: _json_safe(v.tolist() if torch.is_tensor(v) else v) for k, v in result.items()}
        pl_module.log("test/acc_macro", float(result["macro"]))
        pl_module.log("test/acc_micro", float(result["micro"]))


def _json_safe(value: Any) -> Any:
    """NaN (the accuracy of a task with no test sample yet) becomes None, so metrics.json stays strict JSON."""
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and math.isnan(value):
        return None
    return value
