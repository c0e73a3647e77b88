"""The declared contract between the task loop, the methods and the callbacks.

A callback never imports a concrete method and never probes one with ``hasattr``: what it may ask of a method is one
of the ``typing.Protocol`` capabilities below, and a callback class names the ones it needs in ``requires``. The run
is composed (``config.check_composition``) only when the experiment's method class implements every capability its
callbacks require, before any data or model is loaded. Methods never look at ``trainer.callbacks``; whatever a
callback tells a method goes through a capability method (``attach_router``, ``memory_updated``, ``use_memory``).

Task hooks get a ``RunContext`` (what a callback may see of the run), not the loop object.

Routing state travels in a typed field: a router is attached to a ``Routable`` method once, and the method asks it for
a route whenever it predicts; nothing is written into batches or into the module's stage.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

if TYPE_CHECKING:
    import numpy as np
    import torch

    from conpet_lightning.config import RunConfig
    from conpet_lightning.data.datamodule import ContinualDataModule
    from conpet_lightning.data.records import Benchmark
    from conpet_lightning.methods.base import ContinualMethod

#: A collated batch: ``input_ids``, ``attention_mask``, ``mask_pos``, ``labels``, ``task_ids``, ``index`` (tensors)
#: and ``keys`` (sample keys, a list of strings). Nothing else travels in it.
Batch = dict[str, Any]

#: What data a stage trains on: the current task alone, current task + stored history, or stored samples only.
StageData = Literal["current", "replay", "memory"]
STAGE_DATA: tuple[StageData, ...] = ("current", "replay", "memory")


@dataclass
class StageSpec:
    """One fit of a fresh Trainer within a task."""

    name: str
    epochs: int
    monitor: str | None = "val/acc_macro"
    """Metric that picks the best epoch (maximised); None keeps the last epoch."""
    grad_clip: float | None = None
    steps: int | None = None
    """Optimizer steps of the stage under an equal budget (``train.steps_per_task``); None: ``epochs`` passes."""


def split_steps(stages: Sequence[StageSpec], total: int, shares: Sequence[float] | None = None) -> list[StageSpec]:
    """The stages with ``total`` optimizer steps split by ``shares`` (default: their epochs); they sum to ``total``.

    Largest remainders get the rounding, and every stage keeps at least one step.
    """
    weights = list(shares) if shares is not None else [float(s.epochs) for s in stages]
    if len(weights) != len(stages) or min(weights, default=1) < 0 or sum(weights) <= 0:
        raise ValueError(f"step shares {weights} do not fit the stages {[s.name for s in stages]}")
    if total < len(stages):
        raise ValueError(f"{total} steps cannot give each of {len(stages)} stages one")
    exact = [total * w / sum(weights) for w in weights]
    steps = [max(1, int(x)) for x in exact]
    order = sorted(range(len(stages)), key=lambda i: exact[i] - int(exact[i]), reverse=True)
    for i in order * 2:
        if sum(steps) == total:
            break
        if sum(steps) < total:
            steps[i] += 1
        elif steps[i] > 1:
            steps[i] -= 1
    return [replace(stage, steps=n) for stage, n in zip(stages, steps, strict=True)]


@dataclass
class FitContext:
    """Device and precision of the stage's Trainer, so passes between stages run where training runs."""

    device: torch.device
    precision: Any = None
    """The Trainer's precision plugin (its ``forward_context`` is the autocast of ``16-mixed``), or None."""
    epochs: int = 1
    """Epochs the stage's plan is iterated for (what a stream over the plan covers)."""

    def forward_context(self) -> Any:
        """The precision plugin's autocast context (a no-op in 32-bit)."""
        return self.precision.forward_context() if self.precision is not None else nullcontext()

    @classmethod
    def cpu(cls) -> FitContext:
        """The CPU in fp32 (nothing fitted yet)."""
        import torch

        return cls(torch.device("cpu"))


@dataclass
class StageBudget:
    """What a stage's training cost, counted by the method as it trains (``metrics.json`` ``stages.<name>.budget``).

    ``samples_trainable`` went through trainable parameters (forward and backward); ``samples_frozen_only`` were in a
    batch but passed frozen modules only (Dynamic ConPET's replayed samples routed to frozen experts, skipped from the
    trainable pass). Frozen forwards (frozen experts' outputs, a distillation teacher's outputs, a head-only stage's
    features) are served from a cache (hits) or computed (misses).
    """

    steps: int = 0
    samples_trainable: int = 0
    samples_frozen_only: int = 0
    frozen_cache_hits: int = 0
    frozen_cache_misses: int = 0
    tokens: int = 0
    """Non-padding tokens of the stage's training batches."""

    def as_list(self) -> list[int]:
        """The counts in field order (to sum them across DDP ranks)."""
        return [int(getattr(self, f)) for f in self.__dataclass_fields__]


@dataclass
class RunContext:
    """What a task hook sees of the run: its config, data, method, folder and results so far."""

    cfg: RunConfig
    benchmark: Benchmark
    datamodule: ContinualDataModule
    method: ContinualMethod
    """The run's method; what only some methods can do is asked through the Protocols of this module."""
    run_dir: Path
    loggers: list[Any] = field(default_factory=list)
    R: list[list[float | None]] = field(default_factory=list)
    """Accuracy matrix rows of the tasks tested so far (percent, None above the diagonal)."""
    per_task: list[dict[str, Any]] = field(default_factory=list)
    """``metrics.json`` ``per_task`` entries of the tasks tested so far."""
    eval_curve: list[dict[str, Any]] = field(default_factory=list)
    """Continual-evaluation entries (``eval.every_n_steps``), appended by that callback."""
    fit: FitContext | None = None
    """Device and precision of the current stage's Trainer (set before each stage)."""

    @property
    def seed(self) -> int:
        """The run's seed."""
        return int(self.cfg.seed)

    @property
    def num_tasks(self) -> int:
        """Tasks in the run's sequence."""
        return int(self.benchmark.num_tasks)


def stream_seed(seed: int, task: int, stage: str, epoch: int | None = None) -> int:
    """A seed of its own for every (task, stage[, epoch]): a resumed run reaches each with the same random state."""
    import numpy as np

    words = [seed % 2**32, task, zlib.crc32(stage.encode())] + ([] if epoch is None else [epoch])
    return int(np.random.SeedSequence(words).generate_state(1)[0])


# ---------------------------------------------------------------------------------------------- capabilities
@runtime_checkable
class Router(Protocol):
    """Decides which experts a batch goes to."""

    def route(self, method: Routable, batch: Batch, *, train: bool) -> torch.Tensor:
        """Expert ids ``[B, k]``, best first (teacher forcing may apply when ``train``)."""


@runtime_checkable
class Routable(Protocol):
    """A method with per-task experts that predicts through a route (Dynamic ConPET)."""

    def task_scores(self, batch: Batch) -> torch.Tensor:
        """Frozen selector scores ``[B, seen tasks]`` (no gradient)."""

    def predict_from_route(self, batch: Batch, route: torch.Tensor) -> torch.Tensor:
        """Global class predictions when each sample goes to the experts of ``route`` ``[B, k]``."""

    def attach_router(self, router: Router | None) -> None:
        """Use ``router`` whenever a route is needed (None: every sample to every expert)."""

    def routing_active(self) -> bool:
        """True when batches must be routed now (the expert stage, tests from task 2 on), False otherwise."""


@runtime_checkable
class ExpertAccess(Protocol):
    """What a router that scores tasks itself may ask of a method with per-task experts (all frozen, no gradient).

    Routers other than the learned selector (prototypes, expert confidence, re-ranking) fit statistics on these
    features and logits at each task's end and score test samples with them.
    """

    def seen_task_count(self) -> int:
        """Tasks whose experts exist."""

    def task_class_ids(self, task: int) -> list[int]:
        """Global class ids of a task, in the column order of its expert's logits."""

    def backbone_features(self, batch: Batch, layers: int | None = None, pooling: str = "mask") -> torch.Tensor:
        """Features ``[B, d]`` of the frozen backbone without adapters (its first ``layers`` layers; mask or mean)."""

    def backbone_layers(self) -> int:
        """Transformer layers of the backbone (``backbone_features`` may use fewer)."""

    def selector_features(self, batch: Batch) -> torch.Tensor:
        """Features ``[B, d]`` under the frozen selector."""

    def expert_features(self, batch: Batch, task: int) -> torch.Tensor:
        """Features ``[B, d]`` under task ``task``'s frozen expert."""

    def expert_logits(self, batch: Batch, task: int) -> torch.Tensor:
        """Task ``task``'s frozen expert's logits ``[B, classes of task]``."""


@runtime_checkable
class MemoryView(Protocol):
    """What a method may read of an episodic memory."""

    def memory_indices(self, part: str, tasks: range | Sequence[int]) -> np.ndarray:
        """Flat indices of the stored samples of ``part`` for the given tasks."""


@runtime_checkable
class MemoryFeatureSource(Protocol):
    """A method that gives features for exemplar selection."""

    def memory_features(self, batch: Batch, kind: str) -> torch.Tensor:
        """``kind`` = ``logits`` (classifier outputs) or ``hidden`` (the mask hidden state): ``[B, d]``."""


@runtime_checkable
class MemoryUser(Protocol):
    """A method that reacts to an episodic memory: where it is picked, and what was picked."""

    def memory_after_stage(self) -> str | None:
        """Name of the stage after which the task's memory is picked (None: at task end)."""

    def use_memory(self, memory: MemoryView) -> None:
        """Called once at run start when an episodic memory serves the method."""

    def memory_updated(self, ctx: RunContext, task: int, memory: MemoryView) -> None:
        """Called after task ``task``'s exemplars were picked."""


@runtime_checkable
class StageDataSource(Protocol):
    """A method that says which data each of its stages trains on."""

    def stage_data(self, task: int, stage: StageSpec) -> StageData:
        """``current``, ``replay`` or ``memory``."""


def stage_data_of(method: StageDataSource, task: int, stage: StageSpec) -> StageData:
    """The method's answer for a stage, checked (a wrong answer is a bug in the method)."""
    kind = method.stage_data(task, stage)
    if kind not in STAGE_DATA:
        raise RuntimeError(f"{type(method).__name__}.stage_data returned {kind!r}; expected one of {STAGE_DATA}")
    return kind


@runtime_checkable
class MidTrainingEvaluable(Protocol):
    """A method that can be tested in the middle of a stage (continual evaluation)."""

    def midtraining_eval_blocker(self) -> str | None:
        """Why a mid-training prediction would measure nothing meaningful, or None when it can be evaluated."""

    def predict(self, batch: Batch) -> torch.Tensor:
        """Global class predictions over the seen classes."""


@runtime_checkable
class TaskRecorder(Protocol):
    """Anything that adds entries to ``metrics.json`` ``per_task[task]``."""

    def task_record(self, task: int) -> dict[str, Any]:
        """Entries for ``per_task[task]``."""


#: Capability names an options dataclass may declare, and the Protocol each stands for.
CAPABILITIES: Mapping[str, type] = {
    "routing": Routable,
    "expert_access": ExpertAccess,
    "memory_features": MemoryFeatureSource,
    "memory_user": MemoryUser,
    "stage_data": StageDataSource,
    "midtraining_eval": MidTrainingEvaluable,
    "task_record": TaskRecorder,
}


def missing_capabilities(method_cls: type, required: Sequence[type]) -> list[str]:
    """Names of the Protocols in ``required`` that ``method_cls`` does not implement (checked on the class)."""
    return [proto.__name__ for proto in required if not issubclass(method_cls, proto)]


def as_capability(method: Any, proto: type, who: str) -> Any:
    """``method`` typed as ``proto``, or a RuntimeError naming who needed it (a composition bug, not a user error)."""
    if not isinstance(method, proto):
        raise RuntimeError(f"{who} needs a method implementing {proto.__name__}; {type(method).__name__} does not")
    return method
