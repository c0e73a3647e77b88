"""Continual-learning metrics: pure functions over the accuracy matrix R, and a per-task accuracy Metric.

``TaskAccuracy`` is imported on first use: it pulls in torch and torchmetrics (seconds), which the pure matrix
functions and the reports do not need.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from conpet_lightning.metrics.matrix import (
    SUMMARY_KEYS,
    Intransigence,
    acc_macro,
    acc_micro,
    average_forgetting,
    average_incremental_accuracy,
    bwt,
    forgetting,
    fwt,
    intransigence,
    learning_accuracy,
    min_acc,
    summarize,
    validate_eval_curve,
    validate_matrix,
    wc_acc,
)

if TYPE_CHECKING:
    from conpet_lightning.metrics.task_accuracy import TaskAccuracy

__all__ = [
    "SUMMARY_KEYS",
    "Intransigence",
    "TaskAccuracy",
    "acc_macro",
    "acc_micro",
    "average_forgetting",
    "average_incremental_accuracy",
    "bwt",
    "forgetting",
    "fwt",
    "intransigence",
    "learning_accuracy",
    "min_acc",
    "summarize",
    "validate_eval_curve",
    "validate_matrix",
    "wc_acc",
]


def __getattr__(name: str) -> Any:
    if name == "TaskAccuracy":
        from conpet_lightning.metrics.task_accuracy import TaskAccuracy

        return TaskAccuracy
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
