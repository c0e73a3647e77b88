"""`ContinualMethod`: the LightningModule contract the task loop drives.

A method declares its stages per task (``stages``), what it trains in each (``setup_stage``), and how it predicts
over all seen classes (``predict``). Validation and test share one per-task accuracy metric (synced under DDP), so
best-epoch selection and the accuracy matrix use the same definition (macro = mean over seen tasks).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch

from conpet_lightning.config import RunConfig
from conpet_lightning.data.records import Benchmark
from conpet_lightning.metrics.task_accuracy import TaskAccuracy
from conpet_lightning.models.backbone import LoadedBackbone
from conpet_lightning.models.encoder import MaskEncoder
from conpet_lightning.models.pet import count_parameters, make_lora_config


@contextmanager
def eval_mode(module: torch.nn.Module) -> Iterator[None]:
    """Temporarily switch a module to eval mode (no dropout in frozen forwards; peft's ``adapter_names`` needs it)."""
    was = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was)


@dataclass
class StageSpec:
    """One fit of a fresh Trainer within a task."""

    name: str
    epochs: int
    monitor: str = "val/acc_macro"
    """Metric that picks the best epoch (maximised)."""
    grad_clip: float | None = None


class ContinualMethod(L.LightningModule, ABC):
    """Base of every continual method: one encoder with named LoRA adapters, heads, and the seen-class bookkeeping."""

    #: Which training data the default plan serves: the current task only, or every seen task (joint).
    train_scope: str = "current"

    def __init__(self, cfg: RunConfig, benchmark: Benchmark, backbone: LoadedBackbone, first_adapter: str = "shared"):
        super().__init__()
        self.cfg = cfg
        self.task_classes: list[list[int]] = [list(c) for c in benchmark.tasks]
        self.num_classes = benchmark.num_classes
        self.num_tasks = benchmark.num_tasks
        lora = cfg.model.lora
        self.encoder = MaskEncoder(
            backbone,
            make_lora_config(lora.r, lora.alpha, lora.dropout, lora.target_modules, model=backbone.model),
            first_adapter=first_adapter,
        )
        self.hidden_size = int(backbone.model.config.hidden_size)
        self.task = 0
        self.stage = ""
        self.val_acc = TaskAccuracy(self.num_tasks)

    # ------------------------------------------------------------------------------------------- task bookkeeping
    @property
    def seen_classes(self) -> list[int]:
        """All class ids of tasks 0..current."""
        return [c for t in range(self.task + 1) for c in self.task_classes[t]]

    def seen_class_mask(self, device: torch.device | None = None) -> torch.Tensor:
        """Boolean [num_classes] mask of the seen classes."""
        mask = torch.zeros(self.num_classes, dtype=torch.bool, device=device)
        mask[self.seen_classes] = True
        return mask

    def setup_task(self, task: int) -> None:
        """Called by the loop when task ``task`` (0-based) starts."""
        self.task = task

    def stages(self, task: int) -> list[StageSpec]:
        """The stages of a task, in order; each is fitted by a fresh Trainer."""
        return [StageSpec("train", self.cfg.train.epochs, grad_clip=self.cfg.train.grad_clip)]

    def setup_stage(self, task: int, stage: StageSpec) -> None:
        """Prepare trainable parameters for a stage (HF models load in eval mode; training wants train mode)."""
        self.stage = stage.name
        self.train()

    def end_stage(self, task: int, stage: StageSpec) -> None:
        """Called after the best checkpoint of a stage is restored."""

    def end_task(self, task: int) -> None:
        """Called after the last stage of a task (before its test)."""

    # --------------------------------------------------------------------------------------------- model pieces
    def represent(self, batch: dict[str, Any], adapter_names: list[str] | None = None) -> torch.Tensor:
        """Hidden state at the mask position, with the active adapter (or per-sample adapters)."""
        return self.encoder(batch["input_ids"], batch["attention_mask"], batch["mask_pos"], adapter_names=adapter_names)

    @abstractmethod
    def predict(self, batch: dict[str, Any]) -> torch.Tensor:
        """Predicted global class id per sample, over the seen classes only."""

    @abstractmethod
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        """One optimisation step's loss."""

    def parameter_report(self) -> dict[str, int]:
        """Trainable vs total parameters of the whole module right now."""
        trainable, total = count_parameters(self)
        return {"trainable": trainable, "total": total}

    # ------------------------------------------------------------------------------------------- eval and optim
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Accumulate per-task accuracy of the validation batch."""
        self.val_acc.update(self.predict(batch), batch["labels"], batch["task_ids"])

    def on_validation_epoch_end(self) -> None:
        """Log macro/micro validation accuracy over the seen tasks (synced by torchmetrics)."""
        result = self.val_acc.compute()
        self.log("val/acc_macro", float(result["macro"]), prog_bar=True, sync_dist=False)
        self.log("val/acc_micro", float(result["micro"]), sync_dist=False)
        self.val_acc.reset()

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, torch.Tensor]:
        """Predictions for the continual-metrics callback (which fills the accuracy matrix)."""
        return {"preds": self.predict(batch)}

    def on_before_backward(self, loss: torch.Tensor) -> None:
        """Stop at once on a non-finite loss, naming where; finished tasks are already on disk."""
        if not torch.isfinite(loss).all():
            raise FloatingPointError(
                f"non-finite loss ({float(loss.detach())}) at task {self.task + 1}, stage '{self.stage}', "
                f"step {self.global_step}: lower train.lr, or check the data of this task"
            )

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """AdamW over the parameters this stage trains (ConPET: wd 0.01, no scheduler)."""
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            raise RuntimeError(f"stage '{self.stage}' of task {self.task} has no trainable parameters")
        t = self.cfg.train
        return torch.optim.AdamW(params, lr=t.lr_for(self.task), weight_decay=t.weight_decay, eps=t.adam_eps)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The tensors this stage trains (the frozen backbone and frozen experts never change)."""
        trainable = {n for n, p in self.named_parameters() if p.requires_grad}
        return {k: v.detach().cpu().clone() for k, v in self.state_dict().items() if k in trainable}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep only what this stage trains: the frozen backbone and frozen experts never change."""
        trainable = {n for n, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}

    def restore_trainable(self, path: str) -> None:
        """Load a stage checkpoint written by ``on_save_checkpoint`` (a partial state dict)."""
        state = torch.load(path, map_location=self.device, weights_only=True)["state_dict"]
        missing = set(state) - set(self.state_dict())
        if missing:
            raise KeyError(f"checkpoint {path} has keys this module lacks: {sorted(missing)[:5]}")
        self.load_state_dict(state, strict=False)
