"""EMR and EMR* (METHOD.md §3.3): one shared LoRA and one head over all classes, carried from task to task.

The method is the shared-PET model; what makes it EMR or EMR* is the data callback an experiment adds:
``episodic_memory`` (k-means exemplars on the classifier outputs, replayed by the EMR frequency rule) gives EMR,
``dynamic_replay`` (task-balanced replay of the full history on a fixed budget, cached sequence) gives EMR*.
"""

from __future__ import annotations

from dataclasses import dataclass

from conpet_lightning.methods.shared import SharedPETConfig, SharedPETModule
from conpet_lightning.registry import METHODS


@dataclass
class EMRConfig(SharedPETConfig):
    """Options of EMR / EMR* (the shared-PET options; the data pipeline is the callback's)."""

    name: str = "emr"


@METHODS.register("emr")
class EMRModule(SharedPETModule):
    """Shared LoRA + all-class head; the softmax covers all classes (ConPET), prediction the seen ones."""

    options_cls: type = EMRConfig
