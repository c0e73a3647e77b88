"""`ContinualDataModule`: the Lightning stage is the task; ``set_task(k)`` switches what the loaders serve.

Every record of every task is encoded once. Loaders index one flat dataset per part. Training batches always come
from a *plan* (a list of global batches of flat indices, a pure function of seed, task and epoch) that each DDP rank
shards, so the data seen does not depend on the world size. Replay callbacks swap the plan; without them the plan is
a shuffled epoch over the current task (or over all seen tasks, for methods whose ``train_scope`` is ``seen``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from conpet_lightning.data.encoding import encode, template_too_long
from conpet_lightning.data.records import PARTS, Benchmark
from conpet_lightning.data.markers import MarkerMap
from conpet_lightning.policies.sampling import PlanBatchSampler

Plan = list[list[int]]


class EncodedPart(Dataset):
    """One part (train/valid/test) of all tasks, encoded: item i is a dict of plain Python values."""

    def __init__(self, items: list[dict[str, Any]]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.items[index]


def collate(items: Sequence[dict[str, Any]], pad_id: int, multiple_of: int | None = None) -> dict[str, Any]:
    """Right-pad a list of encoded items into a batch; keys stay a list of strings.

    ``multiple_of`` rounds the width up (``data.pad_to_multiple_of``): fewer distinct tensor shapes, and CPU kernels
    keep per-shape state (oneDNN primitives) that otherwise grows with every new batch length a run meets.
    """
    width = max(len(it["input_ids"]) for it in items)
    if multiple_of:
        width = -(-width // multiple_of) * multiple_of
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(items), width), dtype=torch.long)
    for row, it in enumerate(items):
        ids[row, : len(it["input_ids"])] = torch.tensor(it["input_ids"])
        attn[row, : len(it["input_ids"])] = 1
    return {
        "input_ids": ids,
        "attention_mask": attn,
        "mask_pos": torch.tensor([it["mask_pos"] for it in items]),
        "labels": torch.tensor([it["label"] for it in items]),
        "task_ids": torch.tensor([it["task"] for it in items]),
        "index": torch.tensor([it["index"] for it in items]),
        "keys": [it["key"] for it in items],
    }


def shuffled_epoch(indices: np.ndarray, batch_size: int, seed: int, task: int, epoch: int) -> Plan:
    """A plain shuffled pass over ``indices`` in global batches, seeded by (seed, task, epoch) only."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, task, epoch, 7]))
    order = rng.permutation(indices)
    return [order[i : i + batch_size].tolist() for i in range(0, len(order), batch_size)]


class ContinualDataModule(L.LightningDataModule):
    """Serves the current task's data; test and validation batches carry task ids and stable sample keys."""

    def __init__(
        self,
        benchmark: Benchmark,
        tokenizer: Any,
        markers: MarkerMap,
        *,
        max_seq_len: int,
        batch_size: int,
        eval_batch_size: int = 32,
        seed: int = 0,
        template_filter: int | None = 50,
        num_workers: int = 0,
        eval_split: str = "test",
        pad_to_multiple_of: int | None = None,
    ) -> None:
        super().__init__()
        self.pad_to_multiple_of = pad_to_multiple_of
        self.benchmark = benchmark
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.seed = seed
        self.num_workers = num_workers
        self.eval_split = eval_split
        """The part the end-of-task evaluation reads (``eval.split``): test, or valid when choosing defaults."""
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.task = 0
        self.train_scope = "current"
        self.filtered: dict[int, int] = {}
        """Training records dropped by the template-length filter, per task."""
        self.parts: dict[str, EncodedPart] = {}
        self._lengths: dict[str, np.ndarray] = {}
        self.task_index: dict[str, list[np.ndarray]] = {}
        for part in PARTS:
            self._encode_part(part, tokenizer, markers, max_seq_len, template_filter)
        self._train_plan_fn: Callable[[int], Plan] | None = None
        self._valid_plan: Plan | None = None
        self.train_plan_info: str = "current task"

    def _encode_part(self, part: str, tok: Any, markers: MarkerMap, max_len: int, limit: int | None) -> None:
        items: list[dict[str, Any]] = []
        per_task: list[np.ndarray] = []
        for task in range(self.benchmark.num_tasks):
            start = len(items)
            for rec in self.benchmark.records(part, task):
                if part == "train" and limit is not None and template_too_long(rec.text, limit):
                    self.filtered[task] = self.filtered.get(task, 0) + 1
                    continue
                enc = encode(rec.text, tok, markers, max_len)
                items.append(
                    {
                        "input_ids": enc.input_ids,
                        "mask_pos": enc.mask_pos,
                        "label": rec.label,
                        "task": task,
                        "key": rec.key,
                        "index": len(items),
                    }
                )
            per_task.append(np.arange(start, len(items), dtype=np.int64))
        self.parts[part] = EncodedPart(items)
        self.task_index[part] = per_task

    # ----------------------------------------------------------------------------------------------- task switching
    def set_task(self, task: int, train_scope: str = "current") -> None:
        """Make ``task`` (0-based) current; replay plans installed for the previous task are dropped."""
        if not 0 <= task < self.benchmark.num_tasks:
            raise IndexError(f"task {task} is outside 0..{self.benchmark.num_tasks - 1}")
        if train_scope not in ("current", "seen"):
            raise ValueError(f"train_scope must be 'current' or 'seen', not {train_scope!r}")
        self.task = task
        self.train_scope = train_scope
        self._train_plan_fn = None
        self._valid_plan = None
        self.train_plan_info = "current task" if train_scope == "current" else "all seen tasks"

    def indices(self, part: str, task: int) -> np.ndarray:
        """Flat indices of one task's records in one part."""
        return self.task_index[part][task]

    def seen_indices(self, part: str, upto: int | None = None) -> np.ndarray:
        """Flat indices of tasks 0..upto (default: the current task) in one part."""
        upto = self.task if upto is None else upto
        return np.concatenate([self.task_index[part][t] for t in range(upto + 1)])

    def item(self, part: str, index: int) -> dict[str, Any]:
        """One encoded item by flat index."""
        return self.parts[part][index]

    def set_train_plan(self, plan_fn: Callable[[int], Plan], info: str) -> None:
        """Install a training plan: ``plan_fn(epoch)`` returns the global batches of that epoch."""
        self._train_plan_fn = plan_fn
        self.train_plan_info = info

    def installed_train_plan(self) -> tuple[Callable[[int], Plan], str]:
        """The installed plan function and its description, to reinstall after a stage that trains on other data.

        Any epoch can be drawn from it, however many a step budget needs.
        """
        fn = self._train_plan_fn
        if fn is None:
            task, pool = self.task, self.indices("train", self.task) if self.train_scope == "current" else None
            pool = pool if pool is not None else self.seen_indices("train")
            size, seed = self.batch_size, self.seed
            fn = lambda epoch: shuffled_epoch(pool, size, seed, task, epoch)  # noqa: E731
        return fn, self.train_plan_info

    def set_valid_plan(self, plan: Plan | None) -> None:
        """Install a fixed validation plan (global batches) for the current task; None = all seen valid data."""
        self._valid_plan = plan

    def train_plan(self, epoch: int) -> Plan:
        """The global training batches of an epoch of the current task."""
        if self._train_plan_fn is not None:
            return self._train_plan_fn(epoch)
        pool = self.indices("train", self.task) if self.train_scope == "current" else self.seen_indices("train")
        return shuffled_epoch(pool, self.batch_size, self.seed, self.task, epoch)

    def valid_plan(self) -> Plan:
        """Validation batches: an installed plan, or every valid record of the seen tasks."""
        if self._valid_plan is not None:
            return self._valid_plan
        return self._sequential(self.seen_indices("valid"))

    def plan_of(self, indices: np.ndarray) -> Plan:
        """Evaluation batches over the given flat indices, in order (``eval_batch_size`` each)."""
        return self._sequential(indices)

    def _sequential(self, indices: np.ndarray) -> Plan:
        size = self.eval_batch_size
        return [indices[i : i + size].tolist() for i in range(0, len(indices), size)]

    # ------------------------------------------------------------------------------------------------- loaders
    def _rank_world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def _epoch(self) -> int:
        trainer = getattr(self, "trainer", None)
        return trainer.current_epoch if trainer is not None else 0

    def _loader(self, part: str, plan_fn: Callable[[int], Plan], rank: int = 0, world: int = 1) -> DataLoader:
        return DataLoader(
            self.parts[part],
            batch_sampler=PlanBatchSampler(plan_fn, rank=rank, world_size=world),
            collate_fn=lambda items: collate(items, self.pad_id, self.pad_to_multiple_of),
            num_workers=self.num_workers,
        )

    def _eval_loader(self, part: str, plan: Plan) -> DataLoader:
        """Evaluation batches are sharded round-robin without padding, so no sample is counted twice.

        Each rank's shard is ordered by length (stable), so a batch holds samples of similar length: about a fifth
        fewer padded tokens on FewRel. Evaluation metrics are order-free (they are keyed by task id and sample key).
        """
        rank, world = self._rank_world()
        flat = np.asarray([i for batch in plan for i in batch][rank::world], dtype=np.int64)
        flat = flat[np.argsort(self.lengths(part)[flat], kind="stable")]
        return self._loader(part, lambda _epoch: self._sequential(flat))

    def lengths(self, part: str) -> np.ndarray:
        """Token length of every encoded item of a part, by flat index."""
        if part not in self._lengths:
            self._lengths[part] = np.asarray([len(it["input_ids"]) for it in self.parts[part].items], dtype=np.int64)
        return self._lengths[part]

    def train_dataloader(self) -> DataLoader:
        """Training loader over the current plan (one global plan, this rank's shard).

        Under DDP a short last batch is trimmed to a multiple of the world size so every rank gets an equal shard.
        """
        rank, world = self._rank_world()

        def plan_fn(_epoch: int) -> Plan:
            plan = self.train_plan(self._epoch())
            if world > 1:
                plan = [b[: len(b) - len(b) % world] for b in plan if len(b) >= world]
            return plan

        return self._loader("train", plan_fn, rank, world)

    def val_dataloader(self) -> DataLoader:
        """Validation loader over the seen tasks (or the replay callback's fixed plan)."""
        return self._eval_loader("valid", self.valid_plan())

    def test_dataloader(self) -> DataLoader:
        """Test loader over all seen tasks' evaluation split (the test sets, or validation under ``eval.split``)."""
        return self._eval_loader(self.eval_split, self._sequential(self.seen_indices(self.eval_split)))

    def loader_for(self, part: str, indices: Sequence[int]) -> DataLoader:
        """A plain sequential loader over given flat indices (feature extraction for memory selection)."""
        arr = np.asarray(indices, dtype=np.int64)
        return self._loader(part, lambda _epoch: self._sequential(arr))
