"""Episodic memory of the PET baselines (METHOD.md §3.2): which exemplars to keep, and how often to replay them.

Everything here is a pure function of its inputs and seed, so under DDP one rank (or every rank, identically) can
decide the memory from gathered features and the result does not depend on the world size.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
from scipy.spatial.distance import cdist
from sklearn.cluster import KMeans

from conpet_lightning.policies.sampling import decimal_ceil

SELECTION_METHODS = ("kmeans", "herding", "random")


def select_exemplars(
    features: np.ndarray, labels: np.ndarray, per_class: int, method: str = "kmeans", seed: int = 0
) -> np.ndarray:
    """Pick up to ``per_class`` exemplars of every class; returns sorted row indices into ``features``.

    Args:
        features: ``(n, d)`` one feature vector per sample (EMR: classifier outputs; CRL: mask hidden states).
        labels: ``(n,)`` class of each row.
        per_class: memory size M per class; a class with fewer samples keeps all of them.
        method: ``"kmeans"`` (ConPET: the sample nearest each of M centroids), ``"herding"`` (iCaRL) or ``"random"``.
        seed: KMeans ``random_state`` / random-choice seed.
    """
    if method not in SELECTION_METHODS:
        raise ValueError(f"select_exemplars: unknown method {method!r}; choose one of {', '.join(SELECTION_METHODS)}")
    features, labels = np.asarray(features, dtype=np.float64), np.asarray(labels)
    if features.ndim != 2 or labels.ndim != 1 or len(features) != len(labels):
        raise ValueError(
            f"select_exemplars: need features (n, d) and labels (n,), got {features.shape} and {labels.shape}"
        )
    if per_class < 0:
        raise ValueError(f"select_exemplars: per_class {per_class} must be >= 0")
    rng = np.random.default_rng(np.random.SeedSequence([seed]))
    picked: list[np.ndarray] = []
    for cls in np.unique(labels):
        rows = np.flatnonzero(labels == cls)
        n = min(per_class, len(rows))
        if n == 0:
            continue
        if n == len(rows):
            picked.append(rows)  # keeping the whole class needs no selection (and KMeans with n = size is degenerate)
        elif method == "kmeans":
            picked.append(rows[_kmeans_nearest(features[rows], n, seed)])
        elif method == "herding":
            picked.append(rows[herding_order(features[rows], n)])
        else:
            picked.append(rng.choice(rows, n, replace=False))
    return np.sort(np.concatenate(picked)) if picked else np.empty(0, dtype=np.int64)


def _kmeans_nearest(x: np.ndarray, n: int, seed: int) -> np.ndarray:
    """For each of ``n`` KMeans centroids, the nearest sample not already taken by an earlier centroid."""
    # n_init=10 as the sklearn of ConPET's time did by default: less sensitive to one bad k-means++ start.
    centers = KMeans(n_clusters=n, random_state=seed, n_init=10).fit(x).cluster_centers_
    dist = cdist(centers, x)  # exact Euclidean distances, (n centroids, class size)
    taken = np.zeros(len(x), dtype=bool)
    out = np.empty(n, dtype=np.int64)
    for j in range(n):
        d = np.where(taken, np.inf, dist[j])
        out[j] = int(np.argmin(d))
        taken[out[j]] = True
    return out


def herding_order(features: np.ndarray, n: int) -> np.ndarray:
    """Herding (iCaRL) on L2-normalised features: the first ``n`` picks, in pick order (the first is nearest the mean).

    Each step adds the unpicked sample that brings the mean of the picks closest to the class mean.
    """
    x = np.asarray(features, dtype=np.float64)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    mu, total = x.mean(0), np.zeros(x.shape[1])
    taken = np.zeros(len(x), dtype=bool)
    out = np.empty(min(n, len(x)), dtype=np.int64)
    for k in range(len(out)):
        gap = np.linalg.norm(mu - (total + x) / (k + 1), axis=1)
        gap[taken] = np.inf
        out[k] = int(np.argmin(gap))
        taken[out[k]] = True
        total += x[out[k]]
    return out


class ReservoirBuffer:
    """Uniform sample of at most ``capacity`` items from a stream of any length (Vitter's algorithm R), seeded."""

    def __init__(self, capacity: int, seed: int = 0) -> None:
        if capacity < 0:
            raise ValueError(f"ReservoirBuffer: capacity {capacity} must be >= 0")
        self.capacity = capacity
        self.seen = 0
        self._items: list[int] = []
        self._rng = np.random.default_rng(np.random.SeedSequence([seed]))

    def add(self, indices: Iterable[int]) -> None:
        """Offer every index of the stream once; each seen index stays with probability capacity / seen."""
        for item in indices:
            self.seen += 1
            if len(self._items) < self.capacity:
                self._items.append(int(item))
            else:
                j = int(self._rng.integers(self.seen))
                if j < self.capacity:
                    self._items[j] = int(item)

    @property
    def items(self) -> np.ndarray:
        """The kept indices (a copy)."""
        return np.array(self._items, dtype=np.int64)

    def __len__(self) -> int:
        return len(self._items)

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume the stream exactly, RNG included."""
        return {
            "capacity": self.capacity,
            "seen": self.seen,
            "items": list(self._items),
            "rng": self._rng.bit_generator.state,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a ``state_dict``."""
        self.capacity, self.seen, self._items = state["capacity"], state["seen"], list(state["items"])
        self._rng.bit_generator.state = state["rng"]


def split_memory(
    indices: np.ndarray, labels: np.ndarray, train_fraction: float = 0.8, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """ConPET's 80/20 memory split: per class, ``ceil(train_fraction * n)`` exemplars train, the rest validate.

    ``labels[i]`` is the class of ``indices[i]``. Which exemplars go where is a seeded shuffle per class; both
    returned arrays are sorted.
    """
    indices, labels = np.asarray(indices, dtype=np.int64), np.asarray(labels)
    if indices.shape != labels.shape or indices.ndim != 1:
        raise ValueError(f"split_memory: indices {indices.shape} and labels {labels.shape} must be equal-length 1-D")
    if not 0.0 <= train_fraction <= 1.0:
        raise ValueError(f"split_memory: train_fraction {train_fraction} is not in [0, 1]")
    rng = np.random.default_rng(np.random.SeedSequence([seed]))
    train, valid = [], []
    for cls in np.unique(labels):
        members = rng.permutation(indices[labels == cls])
        cut = decimal_ceil(train_fraction, len(members))
        train.append(members[:cut])
        valid.append(members[cut:])
    empty = np.empty(0, dtype=np.int64)
    return np.sort(np.concatenate(train or [empty])), np.sort(np.concatenate(valid or [empty]))


def emr_replay_frequency(
    batch_limit: int,
    batch_size: int,
    n_new_train: int,
    memory_size_train_per_class: int,
    n_old_classes: int,
    base: int,
    train_fraction: float = 0.8,
) -> int:
    """How many times EMR concatenates its memory into a task's training set, so replay fills the step budget.

    ``room = ceil(train_fraction * batch_limit) * batch_size - n_new_train``; ``room <= 0`` gives ``base`` (the
    new data alone fills the budget), else ``ceil(room / (memory_size_train_per_class * n_old_classes))``. With no
    old classes there is no memory to repeat and the answer is 1.
    """
    if min(batch_limit, batch_size, memory_size_train_per_class, base) < 1 or min(n_new_train, n_old_classes) < 0:
        raise ValueError(
            "emr_replay_frequency: batch_limit, batch_size, memory_size_train_per_class and base must be >= 1, "
            f"n_new_train and n_old_classes >= 0; got {batch_limit}, {batch_size}, {memory_size_train_per_class}, "
            f"{base}, {n_new_train}, {n_old_classes}"
        )
    if n_old_classes == 0:
        return 1
    room = decimal_ceil(train_fraction, batch_limit) * batch_size - n_new_train
    if room <= 0:
        return base
    return -(-room // (memory_size_train_per_class * n_old_classes))
