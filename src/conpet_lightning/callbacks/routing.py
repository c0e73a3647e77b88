"""Top-k routing by the frozen selector, with teacher forcing in training, as a Lightning callback.

The callback is the run's router (``contract.Router``): at run start it attaches itself to the method
(``contract.Routable.attach_router``), which asks it for the experts of every batch it routes. It caches the frozen
selector's ranking per sample key within a task, and measures the selector at test time: task-id accuracy (macro and
micro), top-k hit rate, the routing confusion matrix, and the accuracy that oracle routing (each sample to its own
task's expert) would reach, so the cost of learned routing is visible.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, ClassVar

import lightning as L
import torch
from torchmetrics.classification import MulticlassConfusionMatrix

from conpet_lightning.callbacks.base import TaskCallback
from conpet_lightning.config import ConfigError, require_range
from conpet_lightning.contract import Batch, Routable, RunContext, StageSpec, as_capability
from conpet_lightning.metrics.task_accuracy import TaskAccuracy
from conpet_lightning.passes import take_rows
from conpet_lightning.registry import CALLBACKS


@dataclass
class TopKRoutingOptions:
    """YAML options of ``topk_routing``."""

    name: str = "topk_routing"
    topk: int = 1
    teacher_forcing: bool = True
    """In training, if the gold task is not among the top-k, it replaces the lowest-ranked pick."""

    def __post_init__(self) -> None:
        require_range("topk", self.topk, low=1)


def apply_teacher_forcing(route: torch.Tensor, gold: torch.Tensor) -> torch.Tensor:
    """Put each sample's gold expert into its route, replacing the last pick when it is missing."""
    route = route.clone()
    missing = ~(route == gold[:, None]).any(dim=1)
    route[missing, -1] = gold[missing]
    return route


@CALLBACKS.register("topk_routing")
class TopKRoutingCallback(TaskCallback):
    """Routes every batch of the expert stage and of tests; see the module docstring."""

    options_cls = TopKRoutingOptions
    requires: ClassVar[tuple[type, ...]] = (Routable,)
    provides: ClassVar[tuple[str, ...]] = ("router",)

    @classmethod
    def check_pairing(cls, slot: str, options: Any, method_options: Any) -> None:
        """Top-k routing ranks experts by a learned selector: the method must have one."""
        if not method_options.has_selector():
            raise ConfigError(f"callbacks.{slot}: topk_routing needs method.selector=true (a selector to rank experts)")

    def __init__(self, options: TopKRoutingOptions | None = None) -> None:
        self.options = options or TopKRoutingOptions()
        self.cache: dict[str, torch.Tensor] = {}
        self.records: dict[int, dict[str, Any]] = {}
        self.num_tasks = 1

    # -------------------------------------------------------------------------------------------- task hooks
    def on_run_start(self, ctx: RunContext) -> None:
        """Become the method's router."""
        as_capability(ctx.method, Routable, "topk_routing").attach_router(self)
        self.num_tasks = ctx.num_tasks

    def on_task_start(self, ctx: RunContext, task: int) -> None:
        """The selector changes with every task: forget cached rankings."""
        self.cache.clear()

    def on_stage_end(self, ctx: RunContext, task: int, stage: StageSpec) -> None:
        """After the selector stage restores its best epoch, rankings are cached against that frozen selector."""
        self.cache.clear()

    # ---------------------------------------------------------------------------------------------- routing
    def ranking(self, method: Routable, batch: Batch) -> torch.Tensor:
        """Top-k experts [B, k] by the frozen selector, cached by sample key."""
        device = batch["input_ids"].device
        keys = batch["keys"]
        if not method.routing_active():  # task 1: one expert, nothing to rank
            return torch.zeros((len(keys), 1), dtype=torch.long, device=device)
        missing = [i for i, key in enumerate(keys) if key not in self.cache]
        if missing:
            scores = method.task_scores(take_rows(batch, torch.tensor(missing, device=device)))
            top = scores.topk(min(self.options.topk, scores.shape[-1]), dim=-1).indices
            for j, i in enumerate(missing):
                self.cache[keys[i]] = top[j].cpu()
        return torch.stack([self.cache[key] for key in keys]).to(device)

    def route(self, method: Routable, batch: Batch, *, train: bool) -> torch.Tensor:
        """The experts of a batch (``contract.Router``); teacher forcing in training."""
        if train and self.options.teacher_forcing and self.options.topk == 1:
            return batch["task_ids"][:, None]  # the gold expert replaces the only pick: no selector pass needed
        route = self.ranking(method, batch)
        if train and self.options.teacher_forcing:
            route = apply_teacher_forcing(route, batch["task_ids"])
        return route

    # ------------------------------------------------------------------------------------------ test metrics
    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        """Fresh synced metrics for this test."""
        n = self.num_tasks
        self.sel_acc = TaskAccuracy(n).to(pl_module.device)
        self.hit = TaskAccuracy(n).to(pl_module.device)
        self.oracle = TaskAccuracy(n).to(pl_module.device)
        self.actual = TaskAccuracy(n).to(pl_module.device)
        self.confusion = MulticlassConfusionMatrix(num_classes=max(n, 2)).to(pl_module.device)  # torchmetrics: >= 2
        self.started = time.perf_counter()

    def on_test_batch_end(
        self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        """Selector accuracy, top-k hits, confusion and oracle-routing accuracy of the batch."""
        gold, route = batch["task_ids"], self.ranking(pl_module, batch)
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
        seconds = time.perf_counter() - self.started
        confusion = self.confusion.compute()[:k, :k]
        old = confusion[:task]  # rows of old-task samples: the share sent to the newest expert is the recency bias
        recency = round(100.0 * float(old[:, task].sum()) / float(old.sum()), 4) if task > 0 and old.sum() > 0 else None
        self.records[task] = {
            "selector": {
                "acc_macro": round(float(sel["macro"]), 4),
                "acc_micro": round(float(sel["micro"]), 4),
                "per_task": [round(float(v), 4) for v in torch.atleast_1d(sel["per_task"])[:k]],
                "topk": self.options.topk,
                "topk_hit_rate": round(float(hit["micro"]), 4),
                "confusion": confusion.tolist(),
                "recency_bias": recency,
                "oracle_acc_macro": round(float(oracle["macro"]), 4),
                "oracle_acc_micro": round(float(oracle["micro"]), 4),
                "oracle_gap_macro": round(float(oracle["macro"] - actual["macro"]), 4),
                "oracle_gap_micro": round(float(oracle["micro"] - actual["micro"]), 4),
                # one selector pass and k expert passes from task 2 on (an upper bound: expert outputs are cached)
                "passes_per_sample": float(1 + min(self.options.topk, k)) if task > 0 else 1.0,
                "test_samples_per_s": round(float(confusion.sum()) / seconds, 2) if seconds > 0 else None,
            }
        }

    def task_record(self, task: int) -> dict[str, Any]:
        """The selector panel of a task for metrics.json."""
        return self.records.get(task, {})
