"""Routing metrics for every router, as pure functions of routes, gold tasks and predictions.

Why these: class-incremental accuracy factors into task-id accuracy times within-task accuracy (Kim et al. 2022),
so a run should show how often routing is right (macro and micro), where it goes wrong (the confusion matrix and
the recency bias toward the newest expert, the usual failure of a selector trained on a small replay budget), and
what it costs (the oracle gap: the accuracy the same experts would reach with each sample at its own expert).
Percentages throughout, like ``metrics.task_accuracy``; NaN where nothing was counted.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor


def _check(route_top1: Tensor, gold_task: Tensor, num_tasks: int) -> tuple[Tensor, Tensor]:
    r, g = route_top1.detach().cpu().long().reshape(-1), gold_task.detach().cpu().long().reshape(-1)
    if r.shape != g.shape:
        raise ValueError(f"route and gold must have the same length, got {tuple(r.shape)} and {tuple(g.shape)}")
    for name, v in (("route", r), ("gold", g)):
        if v.numel() and (int(v.min()) < 0 or int(v.max()) >= num_tasks):
            raise ValueError(f"{name} task ids must lie in [0, {num_tasks})")
    return r, g


def accuracy_by_task(hit: Tensor, gold_task: Tensor, num_tasks: int) -> dict[str, Any]:
    """Per-task, macro (mean over tasks with samples) and micro accuracy (%) of boolean hits ``[N]``."""
    g = gold_task.detach().cpu().long().reshape(-1)
    h = hit.detach().cpu().bool().reshape(-1)
    total = torch.bincount(g, minlength=num_tasks)
    correct = torch.bincount(g[h], minlength=num_tasks)
    seen = total > 0
    per_task = [100.0 * int(c) / int(n) if n > 0 else math.nan for c, n in zip(correct, total)]
    macro = sum(p for p, s in zip(per_task, seen) if s) / int(seen.sum()) if bool(seen.any()) else math.nan
    micro = 100.0 * int(correct.sum()) / int(total.sum()) if int(total.sum()) else math.nan
    return {"macro": macro, "micro": micro, "per_task": per_task}


def task_id_accuracy(route_top1: Tensor, gold_task: Tensor, num_tasks: int) -> dict[str, Any]:
    """How often the top-1 route is the sample's own task: ``macro``, ``micro`` and ``per_task`` (%)."""
    r, g = _check(route_top1, gold_task, num_tasks)
    return accuracy_by_task(r == g, g, num_tasks)


def routing_confusion(route_top1: Tensor, gold_task: Tensor, num_tasks: int) -> Tensor:
    """Counts ``[num_tasks, num_tasks]``: row = gold task, column = routed task."""
    r, g = _check(route_top1, gold_task, num_tasks)
    return torch.bincount(g * num_tasks + r, minlength=num_tasks * num_tasks).reshape(num_tasks, num_tasks)


def recency_bias(route_top1: Tensor, gold_task: Tensor, newest: int) -> float:
    """Share (%) of old-task samples (gold task < ``newest``) routed to the newest task; NaN without old samples."""
    r, g = _check(route_top1, gold_task, newest + 1)
    old = g < newest
    return 100.0 * int((r[old] == newest).sum()) / int(old.sum()) if bool(old.any()) else math.nan


def topk_hit_rate(route: Tensor, gold_task: Tensor) -> float:
    """Share (%) of samples whose gold task is among their routed tasks ``[N, k]``."""
    hit = (route.detach().cpu().long() == gold_task.detach().cpu().long().reshape(-1, 1)).any(1)
    return 100.0 * float(hit.double().mean()) if hit.numel() else math.nan


def oracle_gap(
    preds_routed: Tensor, preds_oracle: Tensor, labels: Tensor, gold_task: Tensor, num_tasks: int
) -> dict[str, float]:
    """Accuracy (%) under routing and under oracle routing, macro and micro, and the gaps (oracle minus routed)."""
    y = labels.detach().cpu().long().reshape(-1)
    routed = accuracy_by_task(preds_routed.detach().cpu().reshape(-1) == y, gold_task, num_tasks)
    oracle = accuracy_by_task(preds_oracle.detach().cpu().reshape(-1) == y, gold_task, num_tasks)
    return {
        "acc_macro": routed["macro"],
        "acc_micro": routed["micro"],
        "oracle_acc_macro": oracle["macro"],
        "oracle_acc_micro": oracle["micro"],
        "oracle_gap_macro": oracle["macro"] - routed["macro"],
        "oracle_gap_micro": oracle["micro"] - routed["micro"],
    }


def routing_report(
    route: Tensor,
    gold_task: Tensor,
    num_tasks: int,
    preds_routed: Tensor | None = None,
    preds_oracle: Tensor | None = None,
    labels: Tensor | None = None,
) -> dict[str, Any]:
    """The routing panel of one test: every metric above, JSON-ready (lists and floats).

    Args:
        route: ``[N, k]`` routed tasks, best first (or ``[N]`` for top-1).
        gold_task: ``[N]`` gold tasks.
        num_tasks: Tasks seen (the newest is ``num_tasks - 1``).
        preds_routed: Class predictions under this routing (optional, with the next two).
        preds_oracle: Class predictions with every sample at its own task's expert.
        labels: Gold class ids.
    """
    route = route.reshape(route.shape[0], -1)
    tid = task_id_accuracy(route[:, 0], gold_task, num_tasks)
    out: dict[str, Any] = {
        "task_id_acc_macro": tid["macro"],
        "task_id_acc_micro": tid["micro"],
        "task_id_acc_per_task": tid["per_task"],
        "topk": int(route.shape[1]),
        "topk_hit_rate": topk_hit_rate(route, gold_task),
        "confusion": routing_confusion(route[:, 0], gold_task, num_tasks).tolist(),
        "recency_bias": recency_bias(route[:, 0], gold_task, num_tasks - 1),
    }
    if preds_routed is not None and preds_oracle is not None and labels is not None:
        out.update(oracle_gap(preds_routed, preds_oracle, labels, gold_task, num_tasks))
    return out
