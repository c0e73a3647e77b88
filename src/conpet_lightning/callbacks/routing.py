"""Top-k routing by the frozen selector, with teacher forcing in training, as a Lightning callback.

It writes ``batch["route"]`` ([B, k] expert ids, best first) before each training, validation and test batch of
the expert stage, caches the frozen selector's ranking per sample key within a task, and measures the selector at
test time: task-id accuracy (macro and micro), top-k hit rate, the routing confusion matrix, and the accuracy that
oracle routing (each sample to its own task's expert) would reach, so the cost of learned routing is visible.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import lightning as L
import torch
from torchmetrics.classification import MulticlassConfusionMatrix

from conpet_lightning.callbacks.base import TaskCallback
from conpet_lightning.metrics.task_accuracy import TaskAccuracy
from conpet_lightning.registry import CALLBACKS

if TYPE_CHECKING:
    from conpet_lightning.loop import TaskLoop
    from conpet_lightning.methods.base import StageSpec


@dataclass
class TopKRoutingOptions:
    """YAML options of ``topk_routing``."""

    name: str = "topk_routing"
    topk: int = 1
    teacher_forcing: bool = True
    """In training, if the gold task is not among the top-k, it replaces the lowest-ranked pick."""


def apply_teacher_forcing(route: torch.Tensor, gold: torch.Tensor) -> torch.Tensor:
    """Put each sample's gold expert into its route, replacing the last pick when it is missing."""
    route = route.clone()
    missing = ~(route == gold[:, None]).any(dim=1)
    route[missing, -1] = gold[missing]
    return route


@CALLBACKS.register("topk_routing")
class TopKRoutingCallback(TaskCallback):
    """Routes every batch of the expert stage; see the module docstring."""

    options_cls = TopKRoutingOptions

    def __init__(self, options: TopKRoutingOptions | None = None) -> None:
        self.options = options or TopKRoutingOptions()
        if self.options.topk < 1:
            raise ValueError(f"callbacks.routing.topk must be >= 1, got {self.options.topk}")
        self.cache: dict[str, torch.Tensor] = {}
        self.records: dict[int, dict[str, Any]] = {}
        self.num_tasks = 1

    # -------------------------------------------------------------------------------------------- task hooks
    def on_run_start(self, loop: TaskLoop) -> None:
        """Check the method can be routed."""
        if not hasattr(loop.method, "selector_logits") or not getattr(loop.method.options, "selector", False):
            raise ValueError(
                "the topk_routing callback needs a method with a selector (dynamic_conpet, selector: true)"
            )
        self.num_tasks = loop.benchmark.num_tasks

    def on_task_start(self, loop: TaskLoop, task: int) -> None:
        """The selector changes with every task: forget cached rankings."""
        self.cache.clear()

    def on_stage_end(self, loop: TaskLoop, task: int, stage: StageSpec) -> None:
        """After the selector stage restores its best epoch, rankings are cached against that frozen selector."""
        self.cache.clear()

    # ---------------------------------------------------------------------------------------------- routing
    def ranking(self, module: Any, batch: dict[str, Any]) -> torch.Tensor:
        """Top-k experts [B, k] by the frozen selector, cached by sample key."""
        k = min(self.options.topk, module.task + 1)
        if module.task == 0:
            return torch.zeros((len(batch["keys"]), 1), dtype=torch.long, device=module.device)
        keys = batch["keys"]
        missing = [i for i, key in enumerate(keys) if key not in self.cache]
        if missing:
            rows = torch.tensor(missing, device=module.device)
            sub = {
                n: (v[rows] if torch.is_tensor(v) else [v[i] for i in missing] if isinstance(v, list) else v)
                for n, v in batch.items()
            }
            top = module.selector_logits(sub).topk(k, dim=-1).indices
            for j, i in enumerate(missing):
                self.cache[keys[i]] = top[j].cpu()
        return torch.stack([self.cache[key] for key in keys]).to(module.device)

    def _route(self, module: Any, batch: dict[str, Any], train: bool) -> None:
        if module.stage != "expert":
            return
        route = self.ranking(module, batch)
        if train and self.options.teacher_forcing:
            route = apply_teacher_forcing(route, batch["task_ids"])
        batch["route"] = route

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        """Route a training batch (teacher forcing)."""
        self._route(pl_module, batch, train=True)

    def on_validation_batch_start(
        self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        """Route a validation batch (no teacher forcing)."""
        self._route(pl_module, batch, train=False)

    # ------------------------------------------------------------------------------------------ test metrics
    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        """Fresh synced metrics for this test."""
        n = self.num_tasks
        self.sel_acc = TaskAccuracy(n).to(pl_module.device)
        self.hit = TaskAccuracy(n).to(pl_module.device)
        self.oracle = TaskAccuracy(n).to(pl_module.device)
        self.actual = TaskAccuracy(n).to(pl_module.device)
        self.confusion = MulticlassConfusionMatrix(num_classes=n).to(pl_module.device)

    def on_test_batch_start(
        self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        """Route a test batch (no teacher forcing)."""
        pl_module.stage = "expert"
        self._route(pl_module, batch, train=False)

    def on_test_batch_end(
        self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        """Selector accuracy, top-k hits, confusion and oracle-routing accuracy of the batch."""
        gold, route = batch["task_ids"], batch["route"]
        self.sel_acc.update(route[:, 0], gold, gold)
        hit = (route == gold[:, None]).any(dim=1)
        self.hit.update(torch.where(hit, gold, -1), gold, gold)
        self.confusion.update(route[:, 0], gold)
        oracle_preds = pl_module.predict_from_route(batch, gold[:, None])
        self.oracle.update(oracle_preds, batch["labels"], gold)
        self.actual.update(outputs["preds"], batch["labels"], gold)

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        """Store the selector panel of this task for metrics.json."""
        task = pl_module.task
        sel, hit, oracle = self.sel_acc.compute(), self.hit.compute(), self.oracle.compute()
        actual = self.actual.compute()
        k = task + 1
        self.records[task] = {
            "selector": {
                "acc_macro": round(float(sel["macro"]), 4),
                "acc_micro": round(float(sel["micro"]), 4),
                "per_task": [round(float(v), 4) for v in torch.atleast_1d(sel["per_task"])[:k]],
                "topk": self.options.topk,
                "topk_hit_rate": round(float(hit["micro"]), 4),
                "confusion": self.confusion.compute().reshape(self.num_tasks, self.num_tasks)[:k, :k].tolist(),
                "oracle_acc_macro": round(float(oracle["macro"]), 4),
                "oracle_acc_micro": round(float(oracle["micro"]), 4),
                "oracle_gap_macro": round(float(oracle["macro"] - actual["macro"]), 4),
                "oracle_gap_micro": round(float(oracle["micro"] - actual["micro"]), 4),
            }
        }

    def task_record(self, task: int) -> dict[str, Any]:
        """The selector panel of a task for metrics.json."""
        return self.records.get(task, {})
