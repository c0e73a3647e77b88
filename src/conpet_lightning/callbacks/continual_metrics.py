"""Fills the accuracy matrix R after each task from synced per-task test accuracy."""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch

from conpet_lightning.metrics.task_accuracy import TaskAccuracy


class ContinualMetricsCallback(L.Callback):
    """R[i][j] = accuracy (%) on task j's test set after training task i (j <= i), via torchmetrics.

    Always attached by the task loop: it is how the loop learns the test result. The metric state is summed across
    ranks, so the row is the same under DDP as on one device.
    """

    def __init__(self, num_tasks: int) -> None:
        self.num_tasks = num_tasks
        self.metric = TaskAccuracy(num_tasks)
        self.R: list[list[float | None]] = []
        self.rows_micro: list[float] = []
        self.task = 0

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
        while len(self.R) <= self.task:
            self.R.append([None] * self.num_tasks)
        self.R[self.task] = row
        self.last = {k: _json_safe(v.tolist() if torch.is_tensor(v) else v) for k, v in result.items()}
        pl_module.log("test/acc_macro", float(result["macro"]))
        pl_module.log("test/acc_micro", float(result["micro"]))

    def restore_row(self, task: int, row: list[float | None]) -> None:
        """Put back row ``task`` of R from a finished run's metrics.json (resume)."""
        while len(self.R) <= task:
            self.R.append([None] * self.num_tasks)
        self.R[task] = [*row, *[None] * (self.num_tasks - len(row))]

    def state_dict(self) -> dict[str, Any]:
        """R so far, for resuming."""
        return {"R": self.R}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore R."""
        self.R = state_dict["R"]


def _json_safe(value: Any) -> Any:
    """NaN (the accuracy of a task with no test sample yet) becomes None, so metrics.json stays strict JSON."""
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and math.isnan(value):
        return None
    return value
