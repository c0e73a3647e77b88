"""Episodic memory (METHOD.md §3.2) as a callback: per-class exemplars picked at task end, replayed by EMR's rule.

At the end of task k (or after the stage the method names in ``memory_after_stage()``, e.g. CRL's contrastive stage),
``ceil(train_fraction x M)`` exemplars per class are picked from the task's training records and
``M - ceil(train_fraction x M)`` from its validation records, by k-means on features (the classifier outputs or the
mask hidden state; the sample nearest each centroid), herding, random choice or a reservoir over the stream.
Before each stage it installs the stage's data (the policy-0 plan): the current task plus the old tasks' training
memory concatenated r times (r from the EMR frequency rule), or the memory alone for a method's ``memory`` stages;
validation is the current task's valid set plus the old tasks' valid memory.

Deviation from ConPET: its validation memory is the 20 % of the k-means picks held out of the *training* memory; here
the datamodule serves validation from the valid part, so the validation share is picked from the task's valid records
instead (the same M per class in total, never a trained-on sample).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from conpet_lightning.callbacks.base import TaskCallback
from conpet_lightning.config import require_choice, require_range
from conpet_lightning.contract import (
    FitContext,
    MemoryFeatureSource,
    MemoryUser,
    RunContext,
    StageDataSource,
    StageSpec,
    stage_data_of,
)
from conpet_lightning.data.datamodule import shuffled_epoch
from conpet_lightning.passes import broadcast_from_rank0, encode_records
from conpet_lightning.policies.memory import ReservoirBuffer, emr_replay_frequency, select_exemplars
from conpet_lightning.policies.sampling import decimal_ceil, replay_composition
from conpet_lightning.registry import CALLBACKS

SELECTIONS = ("kmeans", "herding", "random", "reservoir")
FEATURES = ("logits", "hidden")
FREQUENCY_RULES = ("emr", "memory", "fixed")
_EMPTY = np.empty(0, dtype=np.int64)


@dataclass
class EpisodicMemoryOptions:
    """YAML options of ``episodic_memory``."""

    name: str = "episodic_memory"
    selection: str = "kmeans"
    """kmeans (ConPET) | herding | random | reservoir (a uniform sample of the whole stream, not per class)."""
    per_class: int = 5
    """Memory size M per class (ConPET: FewNERD/OntoNotes 100, BBN/FewRel 50, TACRED/ACE 20)."""
    feature: str = "logits"
    """Selection features: the classifier output vector (EMR, EA-EMR) or the mask hidden state (CRL)."""
    train_fraction: float = 0.8
    """Share of M (rounded up) that is training memory; the rest validates. CRL keeps all of it: 1.0."""
    frequency: str = "emr"
    """Replay repetition r: emr (per-class rule), memory (EA-EMR: room / memory size) or fixed (``replay_times``)."""
    base_frequency: int = 1
    """r when the new data alone fills the budget (CPU default 1; ConPET: FewNERD/OntoNotes 10, the others 5)."""
    replay_times: int = 1
    """r of the fixed rule (CRL: 1)."""
    batch_limit: int = 50
    """The budget in batches that the frequency rule fills (ConPET's batch_limit)."""
    budget_fraction: float = 0.8
    """Training share of ``batch_limit`` in the frequency rule (ConPET's 80/20)."""

    def __post_init__(self) -> None:
        require_choice("selection", self.selection, SELECTIONS)
        require_choice("feature", self.feature, FEATURES)
        require_choice("frequency", self.frequency, FREQUENCY_RULES)
        for key in ("per_class", "base_frequency", "replay_times", "batch_limit"):
            require_range(key, getattr(self, key), low=1)
        require_range("train_fraction", self.train_fraction, low=0.0, high=1.0, open_low=True)
        require_range("budget_fraction", self.budget_fraction, low=0.0, high=1.0, open_low=True)


def _chunks(indices: np.ndarray, size: int) -> list[list[int]]:
    return [indices[i : i + size].tolist() for i in range(0, len(indices), size)]


@CALLBACKS.register("episodic_memory")
class EpisodicMemoryCallback(TaskCallback):
    """Per-class exemplar memory of every finished task, and the policy-0 plan that replays it."""

    options_cls = EpisodicMemoryOptions
    provides: ClassVar[tuple[str, ...]] = ("replay",)
    requires: ClassVar[tuple[type, ...]] = (MemoryFeatureSource, MemoryUser, StageDataSource)

    def __init__(self, options: EpisodicMemoryOptions | None = None) -> None:
        self.options = options or EpisodicMemoryOptions()
        self.memory: dict[str, dict[int, np.ndarray]] = {"train": {}, "valid": {}}
        """part -> task -> flat indices of that task's exemplars in the part."""
        self.reservoirs: dict[str, ReservoirBuffer] = {}
        self.records: dict[int, dict[str, Any]] = {}
        self.fit_context: FitContext | None = None
        """Where the last stage trained: feature passes at task end run there too."""

    # ------------------------------------------------------------------------------------------------- queries
    @property
    def sizes(self) -> tuple[int, int]:
        """Exemplars per class in the (training, validation) memory."""
        n_train = decimal_ceil(self.options.train_fraction, self.options.per_class)
        return n_train, self.options.per_class - n_train

    def memory_indices(self, part: str, tasks: range | list[int]) -> np.ndarray:
        """The exemplars of ``part`` stored for the given tasks (flat indices, concatenated in task order)."""
        arrays = [self.memory[part].get(t, _EMPTY) for t in tasks]
        return np.concatenate(arrays) if arrays else _EMPTY

    # ------------------------------------------------------------------------------------------------- hooks
    def on_run_start(self, ctx: RunContext) -> None:
        """Tell the method an episodic memory serves it."""
        ctx.method.use_memory(self)

    def on_stage_start(self, ctx: RunContext, task: int, stage: StageSpec) -> None:
        """Install the stage's training plan and validation plan."""
        self.fit_context = ctx.fit
        self.install(ctx, task, stage)

    def on_stage_end(self, ctx: RunContext, task: int, stage: StageSpec) -> None:
        """Pick the task's memory here if the method wants it before its next stage (CRL)."""
        if stage.name == ctx.method.memory_after_stage():
            self.select(ctx, task)

    def on_task_end(self, ctx: RunContext, task: int) -> None:
        """Pick the task's memory (unless a stage already did)."""
        if task not in self.memory["train"]:
            self.select(ctx, task)

    def task_record(self, task: int) -> dict[str, Any]:
        """Memory sizes and the replay composition of each stage, for metrics.json."""
        return self.records.get(task, {})

    # --------------------------------------------------------------------------------------------- selection
    def select(self, run: RunContext, task: int) -> None:
        """Pick task ``task``'s exemplars (decided once, on rank 0's features, under DDP) and tell the method."""
        n_train, n_valid = self.sizes
        chosen = {part: self._choose(run, part, task, n) for part, n in (("train", n_train), ("valid", n_valid))}
        chosen = broadcast_from_rank0(chosen)
        for part, picked in chosen.items():
            if self.options.selection == "reservoir":  # the reservoir may evict earlier tasks' items
                for t in range(task + 1):
                    self.memory[part][t] = np.intersect1d(picked, run.datamodule.indices(part, t))
            else:
                self.memory[part][task] = np.asarray(picked, dtype=np.int64)
        o = self.options
        record = self.records.setdefault(task, {})
        record["memory"] = {
            "selection": o.selection,
            "feature": o.feature,
            "per_class": o.per_class,
            "train": int(len(self.memory_indices("train", range(task + 1)))),
            "valid": int(len(self.memory_indices("valid", range(task + 1)))),
        }
        run.method.memory_updated(run, task, self)

    def _choose(self, run: RunContext, part: str, task: int, n: int) -> np.ndarray:
        dm, o = run.datamodule, self.options
        idx = dm.indices(part, task)
        if n == 0 or len(idx) == 0:
            return _EMPTY
        if o.selection == "reservoir":
            capacity = n * run.benchmark.num_classes  # the memory's final size: n per class of the whole sequence
            buffer = self.reservoirs.setdefault(part, ReservoirBuffer(capacity, seed=run.cfg.seed))
            buffer.add(idx.tolist())
            return np.sort(buffer.items)
        labels = np.asarray([dm.item(part, int(i))["label"] for i in idx])
        if o.selection == "random":
            feats = np.zeros((len(idx), 1))
        else:
            method: MemoryFeatureSource = run.method
            ctx = self.fit_context or FitContext.cpu()
            kind = o.feature
            feats = encode_records(run.method, dm, part, idx, lambda b: method.memory_features(b, kind), ctx).numpy()
        rows = select_exemplars(feats, labels, n, method=o.selection, seed=run.cfg.seed)
        return idx[rows]

    # --------------------------------------------------------------------------------------------------- plans
    def replay_frequency(self, n_new: int, memory_size: int, n_old_classes: int, batch_size: int) -> int:
        """How many times the stored samples are concatenated into the stage's training set (METHOD.md §3.2)."""
        o = self.options
        if o.frequency == "fixed":
            return o.replay_times
        if memory_size == 0 or n_old_classes == 0:
            return 1
        per_class, classes = (self.sizes[0], n_old_classes) if o.frequency == "emr" else (memory_size, 1)
        return emr_replay_frequency(
            o.batch_limit, batch_size, n_new, per_class, classes, o.base_frequency, o.budget_fraction
        )

    def install(self, run: RunContext, task: int, stage: StageSpec) -> None:
        """Install the training and validation plans of a stage (see the module docstring)."""
        dm = run.datamodule
        kind = stage_data_of(run.method, task, stage)
        current = dm.indices("train", task)
        if kind == "memory":
            pools = [self.memory["train"].get(t, _EMPTY) for t in range(task + 1)]
            n_new, classes = 0, task + 1
        elif kind == "replay" and task > 0:
            pools = [self.memory["train"].get(t, _EMPTY) for t in range(task)] + [current]
            n_new, classes = len(current), task
        else:
            pools, n_new, classes = [current], len(current), 0
        n_old_classes = sum(len(run.benchmark.tasks[t]) for t in range(classes))
        stored = pools if kind == "memory" else pools[:-1]
        r = self.replay_frequency(n_new, int(sum(len(p) for p in stored)), n_old_classes, dm.batch_size)
        items = np.concatenate([np.tile(p, r) for p in stored] + ([] if kind == "memory" else [pools[-1]]))
        if len(items) == 0:
            raise ValueError(f"episodic_memory: stage '{stage.name}' of task {task + 1} has no training samples")
        seed, batch_size = run.cfg.seed, dm.batch_size
        dm.set_train_plan(
            lambda epoch: shuffled_epoch(items, batch_size, seed, task, epoch),
            f"episodic memory ({kind}: {self.options.selection}, M={self.options.per_class}, r={r})",
        )
        valid = np.concatenate([self.memory_indices("valid", range(task)), dm.indices("valid", task)])
        dm.set_valid_plan(_chunks(valid, dm.eval_batch_size))
        comp = replay_composition(dm.train_plan(0), pools)
        self.records.setdefault(task, {}).setdefault("replay", {})[stage.name] = {
            "data": kind,
            "replay_frequency": r,
            "train_batches_per_epoch": comp["batches"],
            "samples_per_epoch": comp["samples"],
            "new_per_epoch": comp["new"],
            "old_per_epoch": comp["old"],
            "old_per_task": {str(k): v for k, v in comp["old_per_task"].items()},
            "valid_samples": int(len(valid)),
        }

    # ------------------------------------------------------------------------------------------------- resume
    def state_dict(self) -> dict[str, Any]:
        """The stored exemplars and reservoir states."""
        return {
            "memory": {p: {t: v.tolist() for t, v in m.items()} for p, m in self.memory.items()},
            "reservoirs": {p: b.state_dict() for p, b in self.reservoirs.items()},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore ``state_dict`` output."""
        self.memory = {
            p: {int(t): np.asarray(v, dtype=np.int64) for t, v in m.items()} for p, m in state_dict["memory"].items()
        }
        for part, state in state_dict.get("reservoirs", {}).items():
            buffer = ReservoirBuffer(state["capacity"])
            buffer.load_state_dict(state)
            self.reservoirs[part] = buffer
