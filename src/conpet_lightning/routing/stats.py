"""Streaming per-class means and a pooled within-class covariance with shrinkage, for prototype routing.

Why streaming: a router must keep statistics, not samples (constant memory and work per task). The state is one
count and one mean vector per class plus a single ``d x d`` pooled within-class scatter matrix, merged batch by
batch with Chan et al.'s parallel update, which is exact in any batching and numerically stable (float64).

Why this shrinkage: with a few hundred samples per task and ``d`` in the hundreds or thousands, the pooled sample
covariance is ill-conditioned or singular, so its inverse (the Mahalanobis precision) needs shrinkage toward a
scaled identity ``mu * I``. Ledoit and Wolf's (2004) intensity needs fourth moments about the *final* class means,
which a single streaming pass cannot have without a ``d x d`` matrix per class. The Rao-Blackwellised Ledoit-Wolf
estimator (RBLW, Chen, Wiesel, Eldar and Hero 2010, eq. 19) and the Oracle Approximating Shrinkage (OAS, ibid.
eq. 23) need only the scatter matrix, so they are exactly streamable; RBLW is LW's Rao-Blackwell improvement under
Gaussian data and the default here. A fixed intensity ``alpha`` in [0, 1] is the third option.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

Shrinkage = str | float
"""``"rblw"`` (default), ``"oas"`` or a fixed intensity in [0, 1]."""


@dataclass(frozen=True)
class FinalizedStatistics:
    """What a score function needs: class means and one shared covariance with its precision.

    Attributes:
        class_ids: Global class ids ``[C]`` (long), in the order of ``means``' rows.
        counts: Samples per class ``[C]`` (long).
        means: Class means ``[C, d]``.
        covariance: Shrunk pooled within-class covariance ``[d, d]``.
        precision: Its inverse ``[d, d]``.
        cholesky: Lower Cholesky factor ``L`` of ``covariance`` (``L L^T = covariance``), for whitening.
        shrinkage: The intensity ``rho`` used: ``covariance = (1 - rho) S + rho * tr(S)/d * I``.
        logdet: ``log det covariance``, for Gaussian log-likelihoods across feature spaces.
    """

    class_ids: Tensor
    counts: Tensor
    means: Tensor
    covariance: Tensor
    precision: Tensor
    cholesky: Tensor
    shrinkage: float
    logdet: float

    @property
    def dim(self) -> int:
        """Feature dimension ``d``."""
        return int(self.means.shape[1])


def shrinkage_intensity(scatter_cov: Tensor, dof: int, method: Shrinkage) -> float:
    """Shrinkage intensity toward ``tr(S)/d * I`` for a sample covariance ``S`` with ``dof`` degrees of freedom.

    Args:
        scatter_cov: Sample covariance ``S`` ``[d, d]``.
        dof: Degrees of freedom behind ``S`` (samples minus classes for a pooled within-class covariance).
        method: ``"rblw"``, ``"oas"``, or a fixed float in [0, 1].

    Returns:
        ``rho`` in [0, 1].

    Raises:
        ValueError: unknown method or a fixed intensity outside [0, 1].
    """
    if not isinstance(method, str):
        rho = float(method)
        if not 0.0 <= rho <= 1.0:
            raise ValueError(f"fixed shrinkage must lie in [0, 1], got {rho}")
        return rho
    if method not in ("rblw", "oas"):
        raise ValueError(f"shrinkage must be 'rblw', 'oas' or a float in [0, 1], got {method!r}")
    d = scatter_cov.shape[0]
    n = max(int(dof), 1)
    tr = float(torch.trace(scatter_cov))
    tr2 = float((scatter_cov * scatter_cov).sum())  # tr(S^2) for symmetric S
    denom_core = tr2 - tr * tr / d
    if denom_core <= 1e-12 * max(tr2, 1e-300):
        return 1.0  # S is already a multiple of the identity (or zero): shrinking changes nothing
    if method == "rblw":
        rho = ((n - 2) / n * tr2 + tr * tr) / ((n + 2) * denom_core)
    else:
        rho = ((1 - 2 / d) * tr2 + tr * tr) / ((n + 1 - 2 / d) * denom_core)
    return float(min(max(rho, 0.0), 1.0))


class ClassStatistics:
    """Per-class means and a pooled within-class scatter, accumulated from feature batches.

    Memory is ``O(classes x d + d^2)``; ``update`` costs ``O(batch x d^2)``, so the work of a task depends on its own
    data only. Classes may arrive in any batches and in any order; a class seen again later is merged exactly.

    Args:
        dim: Feature dimension ``d``.
        shrinkage: ``"rblw"`` (default), ``"oas"`` or a fixed intensity in [0, 1] (see the module docstring).
        eps: Added to the diagonal before inversion as a floor against a zero covariance.
    """

    def __init__(self, dim: int, shrinkage: Shrinkage = "rblw", eps: float = 1e-6) -> None:
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        shrinkage_intensity(torch.eye(2, dtype=torch.float64), 3, shrinkage)  # validate the option early
        self.dim = dim
        self.shrinkage = shrinkage
        self.eps = eps
        self.class_ids: list[int] = []
        self._index: dict[int, int] = {}
        self.counts = torch.zeros(0, dtype=torch.long)
        self.means = torch.zeros(0, dim, dtype=torch.float64)
        self.scatter = torch.zeros(dim, dim, dtype=torch.float64)
        self._final: FinalizedStatistics | None = None

    @property
    def num_classes(self) -> int:
        """Classes seen so far."""
        return len(self.class_ids)

    @property
    def num_samples(self) -> int:
        """Samples seen so far."""
        return int(self.counts.sum())

    @torch.no_grad()
    def update(self, features: Tensor, labels: Tensor) -> None:
        """Merge a batch of features ``[B, d]`` with their global class ids ``[B]``.

        Raises:
            ValueError: shapes disagree with ``dim`` or with each other.
        """
        if features.ndim != 2 or features.shape[1] != self.dim or labels.shape != features.shape[:1]:
            raise ValueError(
                f"update expects features [B, {self.dim}] and labels [B]; "
                f"got {tuple(features.shape)} and {tuple(labels.shape)}"
            )
        if features.shape[0] == 0:
            return
        x = features.detach().to("cpu", torch.float64)
        y = labels.detach().to("cpu").long()
        for c in torch.unique(y).tolist():
            if c not in self._index:
                self._index[c] = len(self.class_ids)
                self.class_ids.append(c)
                self.counts = torch.cat([self.counts, torch.zeros(1, dtype=torch.long)])
                self.means = torch.cat([self.means, torch.zeros(1, self.dim, dtype=torch.float64)])
        idx = torch.tensor([self._index[c] for c in y.tolist()], dtype=torch.long)
        nb = torch.bincount(idx, minlength=self.num_classes)
        sums = torch.zeros(self.num_classes, self.dim, dtype=torch.float64).index_add_(0, idx, x)
        present = nb > 0
        mb = torch.zeros_like(sums)
        mb[present] = sums[present] / nb[present, None].double()
        centered = x - mb[idx]
        self.scatter += centered.T @ centered
        # Chan et al.: M2 = M2_a + M2_b + delta delta^T * n_a n_b / (n_a + n_b), with delta = mean_b - mean_a.
        na = self.counts.double()
        nbd = nb.double()
        tot = na + nbd
        delta = mb - self.means
        w = torch.where(present, na * nbd / tot.clamp_min(1), torch.zeros_like(tot))
        self.scatter += (delta * w[:, None]).T @ delta
        self.means = torch.where(present[:, None], self.means + delta * (nbd / tot.clamp_min(1))[:, None], self.means)
        self.counts = self.counts + nb
        self.scatter = 0.5 * (self.scatter + self.scatter.T)
        self._final = None

    def covariance_mle(self) -> Tensor:
        """Pooled within-class covariance without shrinkage, ``scatter / (N - C)`` (``[d, d]``)."""
        dof = max(self.num_samples - self.num_classes, 1)
        return self.scatter / dof

    @torch.no_grad()
    def finalize(self) -> FinalizedStatistics:
        """Means, shrunk covariance, precision and Cholesky factor; cached until the next ``update``.

        Raises:
            ValueError: nothing has been accumulated.
        """
        if self._final is not None:
            return self._final
        if self.num_classes == 0:
            raise ValueError("ClassStatistics.finalize called before any update")
        s = self.covariance_mle()
        rho = shrinkage_intensity(s, self.num_samples - self.num_classes, self.shrinkage)
        target = float(torch.trace(s)) / self.dim
        eye = torch.eye(self.dim, dtype=torch.float64)
        floor = self.eps * (target if target > 0 else 1.0)
        cov = (1.0 - rho) * s + rho * target * eye + floor * eye
        chol = torch.linalg.cholesky(cov)
        precision = torch.cholesky_inverse(chol)
        logdet = float(2.0 * torch.log(torch.diagonal(chol)).sum())
        self._final = FinalizedStatistics(
            class_ids=torch.tensor(self.class_ids, dtype=torch.long),
            counts=self.counts.clone(),
            means=self.means.clone(),
            covariance=cov,
            precision=0.5 * (precision + precision.T),
            cholesky=chol,
            shrinkage=rho,
            logdet=logdet,
        )
        return self._final

    def state_dict(self) -> dict[str, Tensor]:
        """Plain tensors, so a run's checkpoint carries the statistics across a resume."""
        return {
            "dim": torch.tensor(self.dim),
            "class_ids": torch.tensor(self.class_ids, dtype=torch.long),
            "counts": self.counts.clone(),
            "means": self.means.clone(),
            "scatter": self.scatter.clone(),
        }

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore what ``state_dict`` returned (the shrinkage option stays the constructor's).

        Raises:
            ValueError: the state's feature dimension differs from ``dim``.
        """
        if int(state["dim"]) != self.dim:
            raise ValueError(f"state has dim {int(state['dim'])}, these statistics have dim {self.dim}")
        self.class_ids = [int(c) for c in state["class_ids"].tolist()]
        self._index = {c: i for i, c in enumerate(self.class_ids)}
        self.counts = state["counts"].clone().long()
        self.means = state["means"].clone().double()
        self.scatter = state["scatter"].clone().double()
        self._final = None


class TaskStatistics:
    """One ``ClassStatistics`` per task, each in its own feature space (e.g. task t's classes under expert t).

    Why per task: an expert's features separate its own classes; TPL-style and per-expert Mahalanobis routing score
    a sample in each expert's space against that task's statistics, with that task's own covariance.

    Args:
        shrinkage: Passed to every task's ``ClassStatistics``.
    """

    def __init__(self, shrinkage: Shrinkage = "rblw") -> None:
        self.shrinkage = shrinkage
        self.tasks: list[ClassStatistics] = []

    def __len__(self) -> int:
        return len(self.tasks)

    def __getitem__(self, task: int) -> ClassStatistics:
        return self.tasks[task]

    def add_task(self, dim: int) -> ClassStatistics:
        """Open the statistics of the next task (its expert's feature dimension ``dim``) and return them."""
        stats = ClassStatistics(dim, shrinkage=self.shrinkage)
        self.tasks.append(stats)
        return stats

    def finalize(self) -> list[FinalizedStatistics]:
        """Every task's finalized statistics, in task order."""
        return [t.finalize() for t in self.tasks]

    def state_dict(self) -> dict[str, Tensor]:
        """Flat plain tensors ``"{task}.{name}"``."""
        out: dict[str, Tensor] = {"num_tasks": torch.tensor(len(self.tasks))}
        for t, stats in enumerate(self.tasks):
            out.update({f"{t}.{k}": v for k, v in stats.state_dict().items()})
        return out

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore what ``state_dict`` returned."""
        self.tasks = []
        for t in range(int(state["num_tasks"])):
            sub = {k.split(".", 1)[1]: v for k, v in state.items() if k.startswith(f"{t}.")}
            stats = ClassStatistics(int(sub["dim"]), shrinkage=self.shrinkage)
            stats.load_state_dict(sub)
            self.tasks.append(stats)


def class_to_task_map(classes_by_task: Sequence[Sequence[int]]) -> Tensor:
    """A long tensor mapping each global class id to its task (``-1`` for ids in no task), from the task splits."""
    n = 1 + max((c for cs in classes_by_task for c in cs), default=-1)
    out = torch.full((n,), -1, dtype=torch.long)
    for t, cs in enumerate(classes_by_task):
        out[torch.as_tensor(list(cs), dtype=torch.long)] = t
    return out
