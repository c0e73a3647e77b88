"""ConPET's dynamic replay (METHOD.md §3.1) as global batch *plans* that DDP ranks shard.

A plan is a list of global batches, each a list of flat dataset indices. It is a pure function of the seed, the task,
the epoch and the pools, never of the world size or of global RNG state, so every rank derives the same plan and takes
its own contiguous slice of each batch (DESIGN.md, DDP decision): the data seen does not depend on the number of ranks.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np
import torch

_TRAIN, _VALID, _TRAIN_CACHED = 0, 1, 2  # RNG streams, so train, valid and cached plans never share random numbers


def decimal_floor(x: float, n: int) -> int:
    """``floor(x * n)`` with ``x`` read as the decimal it was written as (0.2 * 400 is 80, not 79)."""
    return math.floor(Fraction(repr(float(x))) * n)


def decimal_ceil(x: float, n: int) -> int:
    """``ceil(x * n)`` with ``x`` read as the decimal it was written as (0.8 * 35 is 28, not 29)."""
    return math.ceil(Fraction(repr(float(x))) * n)


def _as_pools(pools: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Check and convert pools to 1-D int64 arrays; a bad pool is named by its position."""
    if len(pools) == 0:
        raise ValueError("pools: need at least one pool (the current task's)")
    out = []
    for t, pool in enumerate(pools):
        arr = np.asarray(pool)
        if arr.ndim != 1:
            raise ValueError(f"pools[{t}]: expected a 1-D array of dataset indices, got shape {arr.shape}")
        if arr.size and not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"pools[{t}]: expected integer dataset indices, got dtype {arr.dtype}")
        if arr.size and arr.min() < 0:
            raise ValueError(f"pools[{t}]: negative dataset index {int(arr.min())}")
        out.append(arr.astype(np.int64, copy=False))
    return out


def _rng(*words: int) -> np.random.Generator:
    """A generator seeded from integers only (seed, task, stream, epoch): no hidden global state."""
    return np.random.default_rng(np.random.SeedSequence([int(w) for w in words]))


@dataclass(kw_only=True)
class DynamicReplayPolicy:
    """Which samples each step sees: ConPET's fixed step budget with task-balanced replay of old tasks.

    Plans depend only on ``(seed, task, epoch)`` (fresh mode) or on ``(seed, task)`` plus the epoch's position in one
    cached sequence (cache mode); both are deterministic, so re-iterating a loader for the same epoch replays it.
    """

    policy: int
    """0: no budget (a shuffled epoch over the union of the pools); 1: ``(k+1) x batch_limit``; 2: ``batch_limit``."""
    batch_limit: int
    """Batches per epoch, split ``train_fraction`` / ``1 - train_fraction`` between training and validation (no
    default here: the ``dynamic_replay`` callback options hold it)."""
    train_fraction: float = 0.8
    """Share of ``batch_limit`` that is training batches (ConPET's 80/20)."""
    new_old_ratio: float = 1.0
    """new = floor(B*r/(r+1)), old = B - new; r < 0 reads |r| as old:new; r = 0 makes every slot old."""
    resample_every_epoch: bool = True
    """False is ConPET's cache mode: one sequence of all epochs is drawn per task and replayed identically (EA-EMR*)."""
    seed: int = 0
    """Root of every plan. Give each stage of a task its own seed to make their plans differ."""
    drop_last: bool = False
    """Drop the short last batch of a full-epoch plan (task 0, policy 0), e.g. so that every batch shards evenly."""
    task_balanced: bool = False
    """Budgeted epochs give every seen task, the new one included, the same share of the epoch's slots (within one
    sample), e.g. for a task classifier such as the selector. The per-batch split cannot: ``new_old_ratio = 1/k``
    rounds the new task's slots down to none once ``B / (k + 1) < 1`` (B = 8 from the 9th task on)."""
    _cache: dict[tuple, tuple[np.random.Generator, list]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        if self.policy not in (0, 1, 2):
            raise ValueError(
                f"DynamicReplayPolicy.policy: {self.policy!r} is not one of 0 (no budget), 1 ((k+1) x limit), "
                "2 (fixed limit); ConPET's policy 3 ('limit + weight') is unimplemented there too"
            )
        if not 0.0 < self.train_fraction <= 1.0:
            raise ValueError(f"DynamicReplayPolicy.train_fraction: {self.train_fraction} is not in (0, 1]")
        if self.batch_limit < 1:
            raise ValueError(f"DynamicReplayPolicy.batch_limit: {self.batch_limit} must be >= 1")
        if self.policy > 0 and decimal_floor(self.train_fraction, self.batch_limit) < 1:
            raise ValueError(
                f"DynamicReplayPolicy: train_fraction * batch_limit = {self.train_fraction} * {self.batch_limit} "
                "gives no training batch"
            )
        if not math.isfinite(self.new_old_ratio):
            raise ValueError(f"DynamicReplayPolicy.new_old_ratio: {self.new_old_ratio} is not finite")
        if self.seed < 0:
            raise ValueError(f"DynamicReplayPolicy.seed: {self.seed} must be >= 0")

    def composition(self, batch_size: int) -> tuple[int, int]:
        """Return ``(new, old)`` slots of a batch: B=8 gives (4, 4) at r=1, (6, 2) at r=3, (2, 6) at r=-3."""
        if batch_size < 1:
            raise ValueError(f"batch_size: {batch_size} must be >= 1")
        r = Fraction(repr(float(self.new_old_ratio)))
        new = math.floor(batch_size * r / (r + 1)) if r >= 0 else math.floor(batch_size / (1 - r))
        return new, batch_size - new

    def _full_epoch(self, task: int, pools: list[np.ndarray]) -> bool:
        """Whether this task gets a normal epoch: task 0, a single pool, or policy 0."""
        if task == 0 and len(pools) != 1:
            raise ValueError(f"task 0 has no old tasks, so it takes exactly one pool, got {len(pools)}")
        return task == 0 or len(pools) == 1 or self.policy == 0

    def num_train_batches(self, task: int, pools: Sequence[np.ndarray], batch_size: int | None = None) -> int:
        """Training batches per epoch; ``batch_size`` is needed only for full epochs (task 0, policy 0)."""
        pools = _as_pools(pools)
        if self._full_epoch(task, pools):
            if batch_size is None:
                raise ValueError("num_train_batches: a full epoch (task 0 or policy 0) needs batch_size")
            n = sum(len(p) for p in pools)
            return n // batch_size if self.drop_last else math.ceil(n / batch_size)
        return decimal_floor(self.train_fraction, self.batch_limit * (task + 1 if self.policy == 1 else 1))

    def num_valid_batches(self) -> int:
        """Validation batches of a budgeted task: ``floor((1 - train_fraction) * batch_limit)``, whatever the task."""
        return math.floor((1 - Fraction(repr(float(self.train_fraction)))) * self.batch_limit)

    def train_plan(self, task: int, pools: Sequence[np.ndarray], batch_size: int, epoch: int) -> list[list[int]]:
        """Global training batches of ``epoch`` for ``task`` (0-based); the last pool is the current task."""
        pools = _as_pools(pools)
        if task < 0 or epoch < 0:
            raise ValueError(f"train_plan: task ({task}) and epoch ({epoch}) must be >= 0")
        if self.resample_every_epoch:
            plan = self._draw_epoch(_rng(self.seed, task, _TRAIN, epoch), task, pools, batch_size)
        else:
            plan = self._cached_epoch(task, pools, batch_size, epoch)
        if not plan:
            raise ValueError(f"train_plan: task {task} has no training samples (pool sizes {[len(p) for p in pools]})")
        return plan

    def valid_plan(self, task: int, pools: Sequence[np.ndarray], batch_size: int) -> list[list[int]]:
        """Global validation batches of ``task``, fixed within the task so that best-epoch selection is fair."""
        pools = _as_pools(pools)
        rng = _rng(self.seed, task, _VALID)
        if self._full_epoch(task, pools):
            # validation never drops samples: every held-out example counts once
            return _epoch_batches(rng, pools, batch_size, drop_last=False)
        return self._mixed_batches(rng, pools, batch_size, self.num_valid_batches())

    def _draw_epoch(
        self, rng: np.random.Generator, task: int, pools: list[np.ndarray], batch_size: int
    ) -> list[list[int]]:
        if self._full_epoch(task, pools):
            return _epoch_batches(rng, pools, batch_size, self.drop_last)
        return self._mixed_batches(rng, pools, batch_size, self.num_train_batches(task, pools))

    def _cached_epoch(self, task: int, pools: list[np.ndarray], batch_size: int, epoch: int) -> list[list[int]]:
        """Cache mode: epochs are consecutive draws of one (seed, task) stream, memoised so replays are identical."""
        key = (task, batch_size, _fingerprint(pools))
        if key not in self._cache:
            self._cache.clear()  # one task at a time: old tasks' sequences are never replayed
            self._cache[key] = (_rng(self.seed, task, _TRAIN_CACHED), [])
        rng, epochs = self._cache[key]
        while len(epochs) <= epoch:
            epochs.append(self._draw_epoch(rng, task, pools, batch_size))
        return epochs[epoch]

    def _mixed_batches(
        self, rng: np.random.Generator, pools: list[np.ndarray], batch_size: int, n_batches: int
    ) -> list[list[int]]:
        """Independent batches of ``new`` current-task samples and ``old`` task-balanced replayed samples."""
        if self.task_balanced:
            return _balanced_batches(rng, pools, batch_size, n_batches)
        current, olds = pools[-1], [p for p in pools[:-1] if len(p)]  # empty old pools are skipped
        n_new, n_old = self.composition(batch_size)
        if not olds:
            n_new, n_old = batch_size, 0
        if n_new and not len(current):
            raise ValueError("the current task's pool (the last) is empty but the batch asks for new samples")
        # Old slots are spread evenly through the batch so contiguous DDP shards get a balanced mix.
        is_old = np.zeros(batch_size, dtype=bool)
        if n_old:
            is_old[(np.arange(n_old) * batch_size) // n_old] = True
        plan = np.empty((n_batches, batch_size), dtype=np.int64)
        if n_old:
            sizes = np.array([len(p) for p in olds])
            starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
            which = rng.integers(len(olds), size=(n_batches, n_old))  # task first, uniformly: task-balanced replay
            plan[:, is_old] = np.concatenate(olds)[starts[which] + rng.integers(0, sizes[which])]
        if n_new:
            # A pool smaller than `new` cannot fill a batch without repeats, so it is drawn with replacement.
            replace = len(current) < n_new
            for b in range(n_batches):
                plan[b, ~is_old] = current[rng.choice(len(current), n_new, replace=replace)]
        return plan.tolist()


def _balanced_batches(
    rng: np.random.Generator, pools: list[np.ndarray], batch_size: int, n_batches: int
) -> list[list[int]]:
    """``n_batches`` batches whose slots split evenly over the non-empty pools (the remainder to random pools).

    A pool gives distinct samples while it has enough, and whole shuffled passes plus a remainder when it has fewer
    samples than slots (every sample at least once); the slots are then shuffled over the batches.
    """
    filled = [p for p in pools if len(p)]
    if not filled:
        raise ValueError("task-balanced plan: every pool is empty")
    slots = n_batches * batch_size
    counts = np.full(len(filled), slots // len(filled))
    counts[rng.choice(len(filled), slots % len(filled), replace=False)] += 1
    items = np.concatenate([_cover(rng, pool, c) for pool, c in zip(filled, counts.tolist(), strict=True)])
    return rng.permutation(items).reshape(n_batches, batch_size).tolist()


def _cover(rng: np.random.Generator, pool: np.ndarray, n: int) -> np.ndarray:
    """``n`` items of ``pool``: whole shuffled passes while ``n`` exceeds the pool, then distinct items."""
    passes, rest = divmod(n, len(pool))
    return np.concatenate([*(rng.permutation(pool) for _ in range(passes)), rng.choice(pool, rest, replace=False)])


def _epoch_batches(
    rng: np.random.Generator, pools: list[np.ndarray], batch_size: int, drop_last: bool
) -> list[list[int]]:
    """A shuffled pass over every item of every pool once, cut into batches (the last one may be short)."""
    if batch_size < 1:
        raise ValueError(f"batch_size: {batch_size} must be >= 1")
    order = rng.permutation(np.concatenate(pools)).tolist()
    stop = len(order) - len(order) % batch_size if drop_last else len(order)
    return [order[i : i + batch_size] for i in range(0, stop, batch_size)]


def _fingerprint(pools: list[np.ndarray]) -> str:
    """Content hash of the pools, so a cached sequence is never replayed over different data."""
    h = hashlib.blake2b(digest_size=16)
    for p in pools:
        h.update(np.int64(len(p)).tobytes())
        h.update(np.ascontiguousarray(p).tobytes())
    return h.hexdigest()


def shard(batch: list[int], rank: int, world_size: int) -> list[int]:
    """This rank's contiguous, equal slice of a global batch; the slices of all ranks concatenate to the batch."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"shard: rank {rank} is not in [0, world_size={world_size})")
    if len(batch) % world_size:
        raise ValueError(
            f"shard: a global batch of {len(batch)} samples does not split evenly over {world_size} ranks; "
            "use a batch size divisible by the world size (and drop_last=True for full-epoch plans)"
        )
    size = len(batch) // world_size
    return list(batch[rank * size : (rank + 1) * size])


class PlanBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Batch sampler yielding this rank's shard of each global batch of ``plan_fn(epoch)``.

    Pass it as ``DataLoader(batch_sampler=...)`` with the Trainer's ``use_distributed_sampler=False``: the sharding is
    done here, from the rank and world size given. Lightning calls ``set_epoch`` only on ``dataloader.sampler`` and
    ``dataloader.batch_sampler.sampler``, so ``self.sampler`` is a small hook that forwards ``set_epoch`` here.
    """

    def __init__(self, plan_fn: Callable[[int], list[list[int]]], rank: int = 0, world_size: int = 1) -> None:
        super().__init__()
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"PlanBatchSampler: rank {rank} is not in [0, world_size={world_size})")
        self.plan_fn, self.rank, self.world_size = plan_fn, rank, world_size
        self.epoch = 0
        self._plan: tuple[int, list[list[int]]] | None = None
        self.sampler = _EpochHook(self)

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose plan the next ``__iter__`` serves."""
        self.epoch = epoch

    def _current(self) -> list[list[int]]:
        if self._plan is None or self._plan[0] != self.epoch:
            self._plan = (self.epoch, self.plan_fn(self.epoch))
        return self._plan[1]

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self._current():
            yield shard(batch, self.rank, self.world_size)

    def __len__(self) -> int:
        return len(self._current())


class _EpochHook:
    """Where Lightning looks for ``set_epoch`` (``batch_sampler.sampler``); forwards it to the batch sampler."""

    def __init__(self, owner: PlanBatchSampler) -> None:
        self.owner = owner

    def set_epoch(self, epoch: int) -> None:
        """Forward to the owning :class:`PlanBatchSampler`."""
        self.owner.set_epoch(epoch)


def replay_composition(plan: Sequence[Sequence[int]], pools: Sequence[np.ndarray]) -> dict:
    """Count what a plan replays, for logging: new (last pool) versus old samples, and old samples per task."""
    pools = _as_pools(pools)
    items = np.fromiter((i for batch in plan for i in batch), dtype=np.int64)
    top = max([int(items.max()) if items.size else -1] + [int(p.max()) for p in pools if p.size]) + 1
    owner = np.full(top, -1, dtype=np.int64)
    for t, p in enumerate(pools):  # later pools win, so an item shared with the current task counts as new
        owner[p] = t
    task_of = owner[items]
    if (task_of < 0).any():
        raise ValueError(f"replay_composition: plan item {int(items[task_of < 0][0])} is in none of the pools")
    counts = np.bincount(task_of, minlength=len(pools))
    return {
        "batches": len(plan),
        "samples": int(items.size),
        "new": int(counts[-1]),
        "old": int(counts[:-1].sum()),
        "old_per_task": {t: int(c) for t, c in enumerate(counts[:-1])},
    }
