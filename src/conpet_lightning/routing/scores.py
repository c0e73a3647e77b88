"""Task scores ``[B, num_tasks_seen]`` (higher = more likely the sample's task) from features, statistics or logits.

Every function here is pure and row-wise: a sample's scores depend on that sample and on statistics fitted on
training or validation data, never on the other samples of the batch, so permuting test samples permutes routes
and nothing else. Routing is then ``scores.topk(k).indices``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from conpet_lightning.routing.stats import FinalizedStatistics


# ------------------------------------------------------------------------------------------------ class level
def class_scores(features: Tensor, stats: FinalizedStatistics, metric: str = "mahalanobis") -> Tensor:
    """Per-class score ``-0.5 * squared distance`` of each sample to each class mean, ``[B, C]`` (float64).

    Args:
        features: ``[B, d]``.
        stats: Finalized statistics in the same feature space.
        metric: ``"mahalanobis"`` (shared shrunk covariance) or ``"euclidean"`` (nearest class mean).

    Raises:
        ValueError: unknown metric or a dimension mismatch.
    """
    if features.ndim != 2 or features.shape[1] != stats.dim:
        raise ValueError(f"features must be [B, {stats.dim}], got {tuple(features.shape)}")
    x = features.detach().to(torch.float64)
    mu = stats.means.to(x.device)
    if metric == "mahalanobis":
        chol = stats.cholesky.to(x.device)
        x = torch.linalg.solve_triangular(chol, x.T, upper=False).T  # whitened: ||L^-1 (x - mu)||^2 = maha^2
        mu = torch.linalg.solve_triangular(chol, mu.T, upper=False).T
    elif metric != "euclidean":
        raise ValueError(f"metric must be 'mahalanobis' or 'euclidean', got {metric!r}")
    sq = (x * x).sum(1, keepdim=True) - 2.0 * x @ mu.T + (mu * mu).sum(1)[None, :]
    return -0.5 * sq.clamp_min(0.0)


def reduce_by_task(scores: Tensor, tasks: Tensor, num_tasks: int, reduce: str = "max") -> Tensor:
    """Pool class scores ``[B, C]`` into task scores ``[B, num_tasks]`` by ``max`` or ``logsumexp``.

    A task with no class among the columns gets ``-inf``.

    Raises:
        ValueError: unknown reduction, or a class mapped outside ``[0, num_tasks)``.
    """
    if reduce not in ("max", "logsumexp"):
        raise ValueError(f"reduce must be 'max' or 'logsumexp', got {reduce!r}")
    tasks = tasks.to(scores.device).long()
    if tasks.numel() and (int(tasks.min()) < 0 or int(tasks.max()) >= num_tasks):
        raise ValueError(f"class tasks must lie in [0, {num_tasks}), got [{int(tasks.min())}, {int(tasks.max())}]")
    out = torch.full((scores.shape[0], num_tasks), float("-inf"), dtype=scores.dtype, device=scores.device)
    for t in torch.unique(tasks).tolist():
        cols = scores[:, tasks == t]
        out[:, t] = cols.amax(1) if reduce == "max" else torch.logsumexp(cols, 1)
    return out


# ------------------------------------------------------------------------------------------------ task scores
def mahalanobis_task_scores(
    features: Tensor,
    stats: FinalizedStatistics,
    class_to_task: Tensor,
    metric: str = "mahalanobis",
    reduce: str = "max",
    num_tasks: int | None = None,
) -> Tensor:
    """Prototype routing in one shared feature space (Lee et al. 2018): a task's score pools its classes' scores.

    Args:
        features: ``[B, d]`` from the module the statistics were fitted on (backbone, selector, ...).
        stats: Shared statistics over all seen classes.
        class_to_task: Long ``[num_classes]`` indexed by global class id (see ``class_to_task_map``).
        metric: ``"mahalanobis"`` or ``"euclidean"`` (nearest class mean).
        reduce: ``"max"`` (nearest class) or ``"logsumexp"`` (a soft mixture over the task's classes).
        num_tasks: Columns of the result; default: the last task with statistics, plus one.

    Returns:
        ``[B, num_tasks]`` float64.
    """
    tasks = class_to_task.to(stats.class_ids.device)[stats.class_ids]
    if bool((tasks < 0).any()):
        raise ValueError("class_to_task maps a class with statistics to no task (-1)")
    n = int(tasks.max()) + 1 if num_tasks is None else num_tasks
    return reduce_by_task(class_scores(features, stats, metric), tasks, n, reduce)


def per_expert_mahalanobis_scores(
    features_by_task: Sequence[Tensor],
    stats_by_task: Sequence[FinalizedStatistics],
    loglik: bool = False,
) -> Tensor:
    """Task t's score is the sample's best class score in expert t's space under task t's own covariance.

    Args:
        features_by_task: ``T`` tensors ``[B, d_t]``: the samples through each task's expert.
        stats_by_task: ``T`` statistics, task t's classes in expert t's feature space.
        loglik: Add ``-0.5 * (log det Sigma_t + d_t log 2 pi)``, making the score a Gaussian log-likelihood, which
            is comparable across spaces of different volume; without it, the plain ``-0.5`` min distance.

    Returns:
        ``[B, T]`` float64.
    """
    if len(features_by_task) != len(stats_by_task) or not features_by_task:
        raise ValueError(f"need one feature tensor per task: {len(features_by_task)} vs {len(stats_by_task)}")
    cols = []
    for x, st in zip(features_by_task, stats_by_task):
        s = class_scores(x, st).amax(1)
        if loglik:
            s = s - 0.5 * (st.logdet + st.dim * math.log(2 * math.pi))
        cols.append(s)
    return torch.stack(cols, 1)


def class_level_task_scores(class_logits: Tensor, class_to_task: Tensor, num_tasks: int | None = None) -> Tensor:
    """Class-level selector: a task's score is the log-sum-exp of its classes' logits.

    Args:
        class_logits: ``[B, C]`` over the seen classes, column ``c`` = global class id ``c``.
        class_to_task: Long ``[>= C]`` indexed by global class id.
        num_tasks: Columns of the result; default: the last task among the columns, plus one.
    """
    tasks = class_to_task[: class_logits.shape[1]].to(class_logits.device)
    if tasks.shape[0] != class_logits.shape[1] or bool((tasks < 0).any()):
        raise ValueError("class_to_task must map every logit column to a task")
    n = int(tasks.max()) + 1 if num_tasks is None else num_tasks
    return reduce_by_task(class_logits, tasks, n, "logsumexp")


def energy_scores(
    logits_by_task: Sequence[Tensor],
    temperatures: Sequence[float] | None = None,
    kind: str = "energy",
    energy_temperature: float = 1.0,
) -> Tensor:
    """Expert confidence (Liu et al. 2020): each expert's negative free energy or max logit, after calibration.

    Expert t's logits ``f_t`` are first divided by its fitted temperature ``T_t`` (``fit_temperature`` on its own
    task's validation data), which puts experts trained separately on one scale; then the score is
    ``E * logsumexp(f_t / (T_t E))`` (``kind="energy"``, ``E`` = ``energy_temperature``) or ``max f_t / T_t``.

    Returns:
        ``[B, T]`` in the logits' dtype.
    """
    if kind not in ("energy", "max_logit"):
        raise ValueError(f"kind must be 'energy' or 'max_logit', got {kind!r}")
    temps = [1.0] * len(logits_by_task) if temperatures is None else list(temperatures)
    if len(temps) != len(logits_by_task) or any(t <= 0 for t in temps):
        raise ValueError(f"need one positive temperature per expert, got {temps}")
    cols = []
    for f, t in zip(logits_by_task, temps):
        z = f / t
        cols.append(energy_temperature * torch.logsumexp(z / energy_temperature, 1) if kind == "energy" else z.amax(1))
    return torch.stack(cols, 1)


def fit_temperature(logits: Tensor, labels: Tensor, max_iter: int = 100) -> float:
    """Temperature scaling (Guo et al. 2017): the ``T > 0`` minimising the NLL of ``softmax(logits / T)``.

    Fitted on validation data (never test). Optimises ``log T`` with L-BFGS in float64, so ``T`` stays positive.
    """
    z = logits.detach().to("cpu", torch.float64)
    y = labels.detach().to("cpu").long()
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.5, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(z / log_t.exp(), y)
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return float(log_t.detach().clamp(-10.0, 10.0).exp())


# ------------------------------------------------------------------------------------------------ re-ranking
def likelihood_ratio_score(
    features: Tensor,
    in_stats: FinalizedStatistics,
    out_means: Tensor | None = None,
    energy: Tensor | None = None,
    energy_weight: float = 1.0,
) -> Tensor:
    """TPL-style score of one candidate task t for samples already passed through expert t, ``[n]`` (float64).

    ``log p(x | t) - log p(x | not t)`` is approximated, in expert t's feature space and under task t's covariance,
    by the best class score of task t's classes minus the best score among other tasks' class means there
    (``out_means``, e.g. from replayed samples through expert t), plus ``energy_weight`` times the expert's energy.
    """
    s = class_scores(features, in_stats).amax(1)
    if out_means is not None and out_means.numel():
        other = FinalizedStatistics(
            class_ids=torch.arange(out_means.shape[0]),
            counts=torch.ones(out_means.shape[0], dtype=torch.long),
            means=out_means.to(torch.float64),
            covariance=in_stats.covariance,
            precision=in_stats.precision,
            cholesky=in_stats.cholesky,
            shrinkage=in_stats.shrinkage,
            logdet=in_stats.logdet,
        )
        s = s - class_scores(features, other).amax(1)
    if energy is not None:
        s = s + energy_weight * energy.to(s.device, torch.float64)
    return s


def rerank_topm(
    base_scores: Tensor, m: int, rescore_fn: Callable[[int, Tensor], Tensor], k: int | None = None
) -> Tensor:
    """Re-rank each sample's top-m tasks (TPL, Lin et al. 2024) at the cost of m expert passes per sample.

    Args:
        base_scores: ``[B, T]`` from a cheap router (selector, prototypes).
        m: Candidates per sample (clipped to ``T``); ``m = 1`` returns the base top-1 unchanged.
        rescore_fn: ``rescore_fn(task, rows) -> [len(rows)]`` scores; called once per candidate task with the rows
            (indices into the batch) whose candidates include it, so each expert runs once on its rows.
        k: Columns returned (default ``m``).

    Returns:
        ``[B, k]`` task ids, best first; ties keep the base order.
    """
    if m < 1:
        raise ValueError(f"m must be >= 1, got {m}")
    m = min(m, base_scores.shape[1])
    k = m if k is None else min(k, m)
    cand = base_scores.topk(m, dim=1).indices
    if m == 1:
        return cand[:, :k]
    new = torch.full(cand.shape, float("-inf"), dtype=torch.float64, device=cand.device)
    for t in torch.unique(cand).tolist():
        rows, pos = (cand == t).nonzero(as_tuple=True)
        s = rescore_fn(t, rows).to(new.device, torch.float64)
        if s.shape != rows.shape:
            raise ValueError(f"rescore_fn({t}, rows) returned {tuple(s.shape)}, expected {tuple(rows.shape)}")
        new[rows, pos] = s
    order = torch.sort(new, dim=1, descending=True, stable=True).indices
    return cand.gather(1, order)[:, :k]


def combine(a: Tensor, b: Tensor, weight: float = 1.0) -> Tensor:
    """``z(a) + weight * z(b)``, each z-normalised across tasks within its row, so scales need not match.

    Row-wise (per sample) on purpose: normalising over the batch would make a route depend on the other samples.
    Entries that are ``-inf`` (tasks without statistics) stay ``-inf``.
    """
    if a.shape != b.shape:
        raise ValueError(f"score shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    return _rowwise_z(a) + weight * _rowwise_z(b)


def _rowwise_z(x: Tensor) -> Tensor:
    x = x.to(torch.float64)
    finite = torch.isfinite(x)
    n = finite.sum(1, keepdim=True).clamp_min(1)
    zero = torch.zeros_like(x)
    mean = torch.where(finite, x, zero).sum(1, keepdim=True) / n
    var = torch.where(finite, (x - mean) ** 2, zero).sum(1, keepdim=True) / n
    z = (x - mean) / var.sqrt().clamp_min(1e-12)
    return torch.where(finite, z, torch.full_like(x, float("-inf")))
