"""One shared LoRA plus one head over all classes: the ``naive`` lower bound and the ``joint`` upper bound.

This is also the model of the EMR family (ConPET's static variants): the training softmax runs over all classes of the
dataset, future ones included (ConPET's choice; ``mask_unseen`` turns that off), and prediction is an argmax over the
classes seen so far.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from conpet_lightning.config import RunConfig
from conpet_lightning.data.records import Benchmark
from conpet_lightning.methods.base import ContinualMethod
from conpet_lightning.models.backbone import LoadedBackbone
from conpet_lightning.registry import METHODS


@dataclass
class SharedPETConfig:
    """Options of the shared-LoRA methods."""

    name: str = "naive"
    mask_unseen: bool = False
    """Restrict the training softmax to seen classes (ConPET does not)."""


class SharedPETModule(ContinualMethod):
    """A single adapter and an all-class head, carried from task to task."""

    options_cls: type = SharedPETConfig

    def __init__(self, cfg: RunConfig, benchmark: Benchmark, backbone: LoadedBackbone) -> None:
        super().__init__(cfg, benchmark, backbone, first_adapter="shared")
        self.head = torch.nn.Linear(self.hidden_size, self.num_classes)
        self.encoder.activate("shared")

    def head_input(self, batch: dict[str, Any]) -> torch.Tensor:
        """What the head reads: the mask hidden state (EA-EMR inserts its alignment here)."""
        return self.represent(batch)

    def logits(self, batch: dict[str, Any]) -> torch.Tensor:
        """Head logits over all classes."""
        return self.head(self.head_input(batch))

    def memory_features(self, batch: dict[str, Any], kind: str) -> torch.Tensor:
        """Features for exemplar selection (``contract.MemoryFeatureSource``): classifier outputs or hidden state."""
        if kind == "logits":
            return self.logits(batch)
        if kind == "hidden":
            return self.represent(batch)
        raise ValueError(f"memory feature {kind!r} is not one of logits, hidden")

    def predict(self, batch: dict[str, Any]) -> torch.Tensor:
        """Argmax over the seen classes."""
        logits = self.logits(batch)
        return logits.masked_fill(~self.seen_class_mask(logits.device), float("-inf")).argmax(-1)

    def classification_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy over all classes (or the seen ones with ``mask_unseen``)."""
        if self.options.mask_unseen:
            logits = logits.masked_fill(~self.seen_class_mask(logits.device), float("-inf"))
        return F.cross_entropy(logits, labels)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        """Cross-entropy on the batch."""
        loss = self.classification_loss(self.logits(batch), batch["labels"])
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["labels"]))
        return loss


@METHODS.register("naive")
class NaiveModule(SharedPETModule):
    """Sequential fine-tuning of one LoRA on the current task only: the forgetting lower bound."""


@METHODS.register("joint")
class JointModule(SharedPETModule):
    """Trained on every seen task's data at each task: the upper bound (and the reference for intransigence)."""

    train_scope = "seen"
