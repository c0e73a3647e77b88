"""Per-task accuracy as a torchmetrics ``Metric``: the counts behind one row of the accuracy matrix R."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric


class TaskAccuracy(Metric):
    """Correct/total counts per task, from which per-task, macro and micro accuracy (percent) are computed.

    The states are integer count vectors of shape ``[num_tasks]`` reduced with ``sum``, so under DDP every rank's
    counts add up exactly (no averaging of averages) and uneven shards are handled. Counting uses ``bincount``
    without weights, which is deterministic on CUDA, so ``torch.use_deterministic_algorithms(True)`` is fine.

    Args:
        num_tasks: Number of tasks the task ids index (e.g. the benchmark's task count).
        **kwargs: Passed to ``torchmetrics.Metric`` (e.g. ``sync_on_compute``).
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    correct: Tensor
    total: Tensor

    def __init__(self, num_tasks: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not isinstance(num_tasks, int) or isinstance(num_tasks, bool) or num_tasks < 1:
            raise ValueError(f"num_tasks must be a positive integer, got {num_tasks!r}")
        self.num_tasks = num_tasks
        self.add_state("correct", default=torch.zeros(num_tasks, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", default=torch.zeros(num_tasks, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor, task_ids: Tensor) -> None:
        """Count one batch.

        Args:
            preds: Predicted class ids ``[N]``, or scores ``[N, C]`` (argmax is taken).
            target: Gold class ids ``[N]``.
            task_ids: The task each sample's gold class belongs to, ``[N]``, in ``[0, num_tasks)``.

        Raises:
            ValueError: shapes disagree or a task id is out of range.
        """
        if preds.ndim == 2:
            preds = preds.argmax(dim=-1)
        if preds.ndim != 1 or target.shape != preds.shape or task_ids.shape != preds.shape:
            raise ValueError(
                "TaskAccuracy.update expects preds [N] (or scores [N, C]), target [N] and task_ids [N]; got "
                f"preds {tuple(preds.shape)}, target {tuple(target.shape)}, task_ids {tuple(task_ids.shape)}"
            )
        if task_ids.numel() == 0:
            return
        task_ids = task_ids.long()
        lo, hi = int(task_ids.min()), int(task_ids.max())
        if lo < 0 or hi >= self.num_tasks:
            raise ValueError(f"task_ids must lie in [0, {self.num_tasks}), got values in [{lo}, {hi}]")
        hit = preds == target
        self.total += torch.bincount(task_ids, minlength=self.num_tasks)
        self.correct += torch.bincount(task_ids[hit], minlength=self.num_tasks)

    def compute(self) -> dict[str, Tensor]:
        """Accuracies in percent from the (synced) counts.

        Returns:
            ``per_task`` ``[num_tasks]`` (NaN for tasks without samples), ``macro`` (mean over tasks with samples,
            ConPET's ``accuracy``), ``micro`` (correct / total, ConPET's ``total_accuracy``), and the raw
            ``correct`` and ``counts`` (= total) per task. Scalars are NaN when nothing was counted.
        """
        seen = self.total > 0
        per_task = torch.full((self.num_tasks,), float("nan"), device=self.total.device)
        per_task[seen] = 100.0 * self.correct[seen].float() / self.total[seen].float()
        nan = torch.tensor(float("nan"), device=self.total.device)
        macro = per_task[seen].mean() if bool(seen.any()) else nan
        n = self.total.sum()
        micro = 100.0 * self.correct.sum().float() / n.float() if int(n) > 0 else nan
        return {"per_task": per_task, "macro": macro, "micro": micro, "correct": self.correct, "counts": self.total}
