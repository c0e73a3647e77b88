"""EMR and EMR* (METHOD.md §3.3): one shared LoRA and one head over all classes, carried from task to task.

The method is the shared-PET model; what makes it EMR or EMR* is the data callback an experiment adds:
``episodic_memory`` (k-means exemplars on the classifier outputs, replayed by the EMR frequency rule) gives EMR,
``dynamic_replay`` (task-balanced replay of the full history on a fixed budget, cached sequence) gives EMR*.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import lightning as L
import torch

from conpet_lightning.config import RunConfig
from conpet_lightning.data.records import Benchmark
from conpet_lightning.methods.shared import SharedPETConfig, SharedPETModule
from conpet_lightning.methods.static.common import FitContext
from conpet_lightning.models.backbone import LoadedBackbone
from conpet_lightning.registry import METHODS

FEATURES = ("logits", "hidden")


@dataclass
class EMRConfig(SharedPETConfig):
    """Options of EMR / EMR* (the shared-PET options; the data pipeline is the callback's)."""

    name: str = "emr"


@METHODS.register("emr")
class EMRModule(SharedPETModule):
    """Shared LoRA + all-class head; the softmax covers all classes (ConPET), prediction the seen ones."""

    options_cls: type = EMRConfig

    def __init__(self, cfg: RunConfig, benchmark: Benchmark, backbone: LoadedBackbone) -> None:
        super().__init__(cfg, benchmark, backbone)
        self.fit_context: FitContext | None = None
        self.datamodule_ref: L.LightningDataModule | None = None

    def on_fit_start(self) -> None:
        """Remember where training runs, for the passes between stages."""
        self.fit_context = FitContext.from_trainer(self.trainer, self)
        self.datamodule_ref = self.trainer.datamodule

    def head_input(self, batch: dict[str, Any]) -> torch.Tensor:
        """What the head reads: the mask hidden state (EA-EMR inserts its alignment here)."""
        return self.represent(batch)

    def logits(self, batch: dict[str, Any]) -> torch.Tensor:
        """Head logits over all classes."""
        return self.head(self.head_input(batch))

    def memory_features(self, batch: dict[str, Any], kind: str) -> torch.Tensor:
        """Features for exemplar selection: the classifier output vector (EMR) or the mask hidden state (CRL)."""
        if kind == "logits":
            return self.logits(batch)
        if kind == "hidden":
            return self.represent(batch)
        raise ValueError(f"memory feature {kind!r} is not one of {FEATURES}")
