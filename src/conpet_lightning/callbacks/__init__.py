"""Lightning callbacks with task-level hooks, registered by name for YAML."""

from conpet_lightning.callbacks import memory, stage_data  # noqa: F401  (registers episodic_memory, stage_data)
from conpet_lightning.callbacks.base import TaskCallback
from conpet_lightning.callbacks.continual_metrics import ContinualMetricsCallback
from conpet_lightning.callbacks.replay import DynamicReplayCallback
from conpet_lightning.callbacks.routing import TopKRoutingCallback

__all__ = ["ContinualMetricsCallback", "DynamicReplayCallback", "TaskCallback", "TopKRoutingCallback"]
