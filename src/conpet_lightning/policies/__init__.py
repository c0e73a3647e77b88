"""Trainer-free replay policies: what each step samples (dynamic replay) and what the episodic memory keeps."""

from conpet_lightning.policies.memory import (
    SELECTION_METHODS,
    ReservoirBuffer,
    emr_replay_frequency,
    herding_order,
    select_exemplars,
    split_memory,
)
from conpet_lightning.policies.sampling import DynamicReplayPolicy, PlanBatchSampler, replay_composition, shard

__all__ = [
    "SELECTION_METHODS",
    "DynamicReplayPolicy",
    "PlanBatchSampler",
    "ReservoirBuffer",
    "emr_replay_frequency",
    "herding_order",
    "replay_composition",
    "select_exemplars",
    "shard",
    "split_memory",
]
