"""Routers that find each test sample's task without (or beside) ConPET's learned selector, as callbacks.

Why: class-incremental accuracy = task-id accuracy x within-task accuracy (Kim et al. 2022), and Dynamic ConPET's
experts are far better than its selector routes to them. Each router here is a ``contract.Router`` that attaches
itself to a ``contract.Routable`` method at run start, fits what it needs at each task's end from that task's
training data (prototype statistics) or validation data (temperatures), and routes tests by pure row-wise scores
(``conpet_lightning.routing``), so a sample's route never depends on the test set. Swapped by one override
(``callbacks.routing=<preset>``), also on a finished run (``conpet eval``).

- ``prototype_routing``: class means and a shared shrinkage covariance of frozen features (backbone, selector, or
  each task's own expert); Mahalanobis or nearest class mean.
- ``energy_routing``: each expert's calibrated energy or max logit (T expert passes per sample).
- ``rerank_routing``: the selector's (or backbone prototypes') top-m tasks re-scored in each candidate expert's
  space by a TPL-style Mahalanobis score plus calibrated energy (m + 1 passes).

In training and validation every router sends each sample to its own task's expert (top-1 teacher forcing): the
router of the newest task is only fitted at its end, and picking an expert's best epoch by within-task accuracy is
what a router-independent expert needs. Tests route by scores only. Every router records the same routing panel
(``per_task[t]["selector"]``, the shape ``topk_routing`` writes, plus recency bias and cost).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, ClassVar

import lightning as L
import torch

from conpet_lightning.callbacks.base import TaskCallback
from conpet_lightning.config import ConfigError, require_choice, require_range
from conpet_lightning.contract import Batch, ExpertAccess, Routable, RunContext, as_capability
from conpet_lightning.passes import encode_records, take_rows
from conpet_lightning.registry import CALLBACKS
from conpet_lightning.routing import (
    ClassStatistics,
    TaskStatistics,
    class_to_task_map,
    energy_scores,
    fit_temperature,
    likelihood_ratio_score,
    mahalanobis_task_scores,
    per_expert_mahalanobis_scores,
    rerank_topm,
    routing_report,
)

FEATURES = ("backbone", "selector", "expert")
POOLING = ("mask", "mean")
METRICS = ("mahalanobis", "euclidean")
REDUCE = ("max", "logsumexp")
SHRINKAGE = ("rblw", "oas")
ENERGY_KINDS = ("energy", "max_logit")
RERANK_BASES = ("selector", "prototype")


def _json(value: Any) -> Any:
    """Rounded floats, NaN as None (metrics.json stays strict JSON)."""
    if isinstance(value, float):
        return None if math.isnan(value) else round(value, 4)
    if isinstance(value, list):
        return [_json(v) for v in value]
    if isinstance(value, dict):
        return {k: _json(v) for k, v in value.items()}
    return value


class RouterCallback(TaskCallback):
    """What every scoring router shares: teacher forcing outside tests, a per-key route cache, the test panel."""

    requires: ClassVar[tuple[type, ...]] = (Routable, ExpertAccess)
    provides: ClassVar[tuple[str, ...]] = ("router",)

    def __init__(self, options: Any) -> None:
        self.options = options
        self.cache: dict[str, torch.Tensor] = {}
        self.records: dict[int, dict[str, Any]] = {}
        self.num_tasks = 1
        self.class_to_task = torch.zeros(0, dtype=torch.long)
        self.validating = False
        self.fitted_tasks = 0
        """Tasks whose statistics or temperatures are fitted (a rebuild or a restored checkpoint does not refit)."""

    # ------------------------------------------------------------------------------------------ to implement
    def rank(self, method: Any, batch: Batch) -> torch.Tensor:
        """Expert ids ``[B, k]`` of a batch from scores alone (no gold task, no other sample)."""
        raise NotImplementedError

    def fit_task(self, ctx: RunContext, task: int) -> None:
        """Fit this task's statistics or temperature from its training or validation data."""

    def router_passes(self, seen: int) -> float:
        """Encoder passes per sample the router itself spends with ``seen`` experts."""
        raise NotImplementedError

    # -------------------------------------------------------------------------------------------- task hooks
    def on_run_start(self, ctx: RunContext) -> None:
        """Become the method's router."""
        as_capability(ctx.method, Routable, self.options.name).attach_router(self)
        as_capability(ctx.method, ExpertAccess, self.options.name)
        self.num_tasks = ctx.num_tasks
        self.class_to_task = class_to_task_map(ctx.benchmark.tasks)

    def on_task_start(self, ctx: RunContext, task: int) -> None:
        """Routes change with every task: forget cached ones."""
        self.cache.clear()

    def on_task_end(self, ctx: RunContext, task: int) -> None:
        """Fit the task's statistics once, after its expert is frozen."""
        self.cache.clear()
        if task >= self.fitted_tasks:
            self.fit_task(ctx, task)
            self.fitted_tasks = task + 1

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        """Validation routes each sample to its own task's expert (the newest task has no statistics yet)."""
        self.validating = True

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        """Back to routing by scores."""
        self.validating = False

    # ---------------------------------------------------------------------------------------------- routing
    def route(self, method: Routable, batch: Batch, *, train: bool) -> torch.Tensor:
        """``contract.Router``: the gold task in training and validation; scores otherwise, cached by sample key."""
        device = batch["input_ids"].device
        keys = batch["keys"]
        if not method.routing_active():
            return torch.zeros((len(keys), 1), dtype=torch.long, device=device)
        if train or self.validating:
            return batch["task_ids"][:, None].to(device)
        missing = [i for i, key in enumerate(keys) if key not in self.cache]
        if missing:
            top = self.rank(method, take_rows(batch, torch.tensor(missing, device=device)))
            for j, i in enumerate(missing):
                self.cache[keys[i]] = top[j].cpu()
        return torch.stack([self.cache[key] for key in keys]).to(device)

    # ------------------------------------------------------------------------------------------ test metrics
    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        """Fresh accumulators, and a clock for the routed samples/s."""
        self.cache.clear()
        self.acc: dict[str, list[torch.Tensor]] = {"route": [], "gold": [], "preds": [], "oracle": [], "labels": []}
        self.observe_seconds = 0.0
        self.started = time.perf_counter()

    def on_test_batch_end(
        self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        """The batch's routes (cached by the prediction), gold tasks, predictions and oracle predictions."""
        start = time.perf_counter()
        gold = batch["task_ids"]
        route = self.route(pl_module, batch, train=False)
        self.acc["route"].append(route.cpu())
        self.acc["gold"].append(gold.cpu())
        self.acc["preds"].append(outputs["preds"].cpu())
        self.acc["oracle"].append(pl_module.predict_from_route(batch, gold[:, None]).cpu())
        self.acc["labels"].append(batch["labels"].cpu())
        self.observe_seconds += time.perf_counter() - start

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        """The routing panel of this test for metrics.json (``per_task[t]["selector"]``)."""
        task = pl_module.task
        seconds = time.perf_counter() - self.started - self.observe_seconds
        cat = {k: torch.cat(v) if v else torch.zeros(0, dtype=torch.long) for k, v in self.acc.items()}
        n = int(cat["gold"].numel())
        rep = routing_report(cat["route"], cat["gold"], task + 1, cat["preds"], cat["oracle"], cat["labels"])
        k = int(cat["route"].shape[1]) if n else 1
        self.records[task] = {
            "selector": _json(
                {
                    "router": self.options.name,
                    "acc_macro": rep["task_id_acc_macro"],
                    "acc_micro": rep["task_id_acc_micro"],
                    "per_task": rep["task_id_acc_per_task"],
                    "topk": rep["topk"],
                    "topk_hit_rate": rep["topk_hit_rate"],
                    "confusion": rep["confusion"],
                    "recency_bias": rep["recency_bias"],
                    "oracle_acc_macro": rep.get("oracle_acc_macro", math.nan),
                    "oracle_acc_micro": rep.get("oracle_acc_micro", math.nan),
                    "oracle_gap_macro": rep.get("oracle_gap_macro", math.nan),
                    "oracle_gap_micro": rep.get("oracle_gap_micro", math.nan),
                    # an upper bound: the prediction's expert pass is a cache hit when the router ran that expert
                    "passes_per_sample": float(self.router_passes(task + 1) + k) if task > 0 else 1.0,
                    "test_samples_per_s": n / seconds if seconds > 0 else math.nan,
                }
            )
        }

    def task_record(self, task: int) -> dict[str, Any]:
        """The routing panel of a task for metrics.json."""
        return self.records.get(task, {})


# ---------------------------------------------------------------------------------------------- fitting helpers
def _features_fn(method: Any, features: str, task: int, layers: int | None = None, pooling: str = "mask") -> Any:
    """The frozen feature extractor of a prototype space for task ``task``'s statistics."""
    if features == "backbone":
        return lambda b: method.backbone_features(b, layers, pooling)
    if features == "selector":
        # the selector exists from task 2 on; task 1's statistics use expert 1, which the selector starts from
        return method.selector_features if task > 0 else lambda b: method.expert_features(b, 0)
    return lambda b: method.expert_features(b, task)


def training_features(ctx: RunContext, task: int, fn: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``fn`` over the task's training records (never test), with their global labels."""
    dm = ctx.datamodule
    idx = dm.indices("train", task)
    feats = encode_records(ctx.method, dm, "train", idx, fn, ctx.fit)
    labels = torch.tensor([int(dm.item("train", int(i))["label"]) for i in idx], dtype=torch.long)
    return feats, labels


def validation_temperature(ctx: RunContext, task: int) -> float:
    """Temperature of expert ``task`` fitted on its own task's validation data (1.0 without any)."""
    dm, method = ctx.datamodule, ctx.method
    idx = dm.indices("valid", task)
    if len(idx) == 0:
        return 1.0
    logits = encode_records(method, dm, "valid", idx, lambda b: method.expert_logits(b, task), ctx.fit)
    column = {c: j for j, c in enumerate(method.task_class_ids(task))}
    labels = torch.tensor([column[int(dm.item("valid", int(i))["label"])] for i in idx], dtype=torch.long)
    return fit_temperature(logits, labels)


class Prototypes:
    """Prototype statistics in one space (backbone, selector) or per expert, fitted from training data only."""

    def __init__(self, features: str, shrinkage: str, pooling: str = "mask") -> None:
        self.features = features
        self.layers: int | None = None
        """Backbone layers the features come from (None: all); the router sets it once it knows the backbone."""
        self.pooling = pooling
        self.shared: ClassStatistics | None = None
        self.per_task = TaskStatistics(shrinkage=shrinkage)
        self.shrinkage = shrinkage

    def fit(self, ctx: RunContext, task: int) -> None:
        """Accumulate the task's training features (statistics, not samples)."""
        fn = _features_fn(ctx.method, self.features, task, self.layers, self.pooling)
        feats, labels = training_features(ctx, task, fn)
        if self.features == "expert":
            self.per_task.add_task(feats.shape[1]).update(feats, labels)
            return
        if self.shared is None:
            self.shared = ClassStatistics(feats.shape[1], shrinkage=self.shrinkage)
        self.shared.update(feats, labels)

    def fitted(self) -> int:
        """Tasks with statistics (per-expert) or classes (shared)."""
        return len(self.per_task) if self.features == "expert" else int(self.shared is not None)

    def state_dict(self) -> dict[str, Any]:
        """Plain tensors."""
        return {
            "shared": None if self.shared is None else self.shared.state_dict(),
            "per_task": self.per_task.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict``."""
        self.shared = None
        if state.get("shared") is not None:
            self.shared = ClassStatistics(int(state["shared"]["dim"]), shrinkage=self.shrinkage)
            self.shared.load_state_dict(state["shared"])
        self.per_task.load_state_dict(state["per_task"])


# ----------------------------------------------------------------------------------------------------- prototype
@dataclass
class PrototypeRoutingOptions:
    """YAML options of ``prototype_routing``."""

    name: str = "prototype_routing"
    features: str = "expert"
    """backbone (frozen, no adapter) | selector (stale for old tasks: fitted under each task's selector) | expert
    (task t's statistics in expert t's space; T expert passes per test sample)."""
    metric: str = "mahalanobis"
    """mahalanobis (shared shrunk covariance) | euclidean (nearest class mean); shared spaces only."""
    reduce: str = "max"
    """A task's score from its classes' scores: max (nearest class) | logsumexp (shared spaces only)."""
    shrinkage: str = "rblw"
    """Covariance shrinkage toward a scaled identity: rblw | oas."""
    loglik: bool = True
    """features=expert: score by Gaussian log-likelihood (adds -1/2 log det of each expert's covariance), so spaces
    of different volume compare."""
    topk: int = 1
    layers: int | None = None
    """features=backbone: features from the backbone's first ``layers`` transformer layers only (the rest is not
    computed, so routing costs that fraction of a pass); None: all layers."""
    depth: float | None = None
    """features=backbone: ``layers`` as a share of the backbone's layers (0 < depth <= 1, rounded to the nearest
    whole layer, at least one), so one preset means the same router on every backbone; not together with layers."""
    pooling: str = "mask"
    """features=backbone: the hidden state at the mask token (mask) or the mean over the real tokens (mean)."""

    def __post_init__(self) -> None:
        require_choice("features", self.features, FEATURES)
        require_choice("pooling", self.pooling, POOLING)
        if self.layers is not None:
            require_range("layers", self.layers, low=1)
        if self.depth is not None and not 0 < self.depth <= 1:
            raise ConfigError(f"depth must be in (0, 1], got {self.depth}")
        if self.depth is not None and self.layers is not None:
            raise ConfigError("set layers or depth, not both")
        shallow = self.layers is not None or self.depth is not None
        if (shallow or self.pooling != "mask") and self.features != "backbone":
            raise ConfigError("layers, depth and pooling apply to features=backbone only")
        require_choice("metric", self.metric, METRICS)
        require_choice("reduce", self.reduce, REDUCE)
        require_choice("shrinkage", self.shrinkage, SHRINKAGE)
        require_range("topk", self.topk, low=1)


@CALLBACKS.register("prototype_routing")
class PrototypeRoutingCallback(RouterCallback):
    """Routes by class statistics of frozen features; see the module docstring."""

    options_cls = PrototypeRoutingOptions

    @classmethod
    def check_pairing(cls, slot: str, options: Any, method_options: Any) -> None:
        """Selector features need a selector."""
        if options.features == "selector" and not method_options.has_selector():
            raise ConfigError(f"callbacks.{slot}: prototype_routing features=selector needs method.selector=true")

    def __init__(self, options: PrototypeRoutingOptions | None = None) -> None:
        super().__init__(options or PrototypeRoutingOptions())
        o = self.options
        self.prototypes = Prototypes(o.features, o.shrinkage, o.pooling)
        self.pass_share = 1.0

    def on_run_start(self, ctx: RunContext) -> None:
        """Become the router; ``layers`` must fit the backbone, ``depth`` becomes a layer count."""
        super().on_run_start(ctx)
        total = ctx.method.backbone_layers()
        layers = self.layers_for(total)
        if layers is not None and layers > total:
            raise ConfigError(f"callbacks.routing.layers={layers}: the backbone has {total} layers")
        self.prototypes.layers = layers
        self.pass_share = 1.0 if layers is None else layers / total

    def layers_for(self, total: int) -> int | None:
        """Backbone layers the features come from for a backbone of ``total`` layers (None: all of them)."""
        depth = self.options.depth
        if depth is None:
            return self.options.layers
        return max(1, round(depth * total))

    def fit_task(self, ctx: RunContext, task: int) -> None:
        """Statistics of the task's training features."""
        self.prototypes.fit(ctx, task)

    def scores(self, method: Any, batch: Batch) -> torch.Tensor:
        """Task scores ``[B, fitted tasks]``."""
        p, o = self.prototypes, self.options
        if p.features == "expert":
            stats = p.per_task.finalize()
            feats = [method.expert_features(batch, t) for t in range(len(stats))]
            return per_expert_mahalanobis_scores(feats, stats, loglik=o.loglik)
        assert p.shared is not None
        if p.features == "backbone":
            f = method.backbone_features(batch, p.layers, o.pooling)
        else:
            f = method.selector_features(batch)
        return mahalanobis_task_scores(f, p.shared.finalize(), self.class_to_task, o.metric, o.reduce)

    def rank(self, method: Any, batch: Batch) -> torch.Tensor:
        """Top-k tasks by prototype scores."""
        s = self.scores(method, batch)
        return s.topk(min(self.options.topk, s.shape[1]), dim=1).indices.to(batch["input_ids"].device)

    def router_passes(self, seen: int) -> float:
        """One pass in a shared space (the share of layers computed), one per expert otherwise."""
        return float(seen if self.options.features == "expert" else self.pass_share)

    def state_dict(self) -> dict[str, Any]:
        """The statistics (not samples), for a checkpoint."""
        return {"fitted_tasks": self.fitted_tasks, "prototypes": self.prototypes.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore ``state_dict``."""
        self.fitted_tasks = int(state_dict["fitted_tasks"])
        self.prototypes.load_state_dict(state_dict["prototypes"])


# -------------------------------------------------------------------------------------------------------- energy
@dataclass
class EnergyRoutingOptions:
    """YAML options of ``energy_routing``."""

    name: str = "energy_routing"
    kind: str = "energy"
    """energy (negative free energy, logsumexp) | max_logit."""
    calibrate: bool = True
    """Divide each expert's logits by a temperature fitted on its own task's validation data."""
    energy_temperature: float = 1.0
    topk: int = 1

    def __post_init__(self) -> None:
        require_choice("kind", self.kind, ENERGY_KINDS)
        require_range("energy_temperature", self.energy_temperature, low=0, open_low=True)
        require_range("topk", self.topk, low=1)


@CALLBACKS.register("energy_routing")
class EnergyRoutingCallback(RouterCallback):
    """Routes to the most confident calibrated expert; every seen expert runs (T passes per sample)."""

    options_cls = EnergyRoutingOptions

    def __init__(self, options: EnergyRoutingOptions | None = None) -> None:
        super().__init__(options or EnergyRoutingOptions())
        self.temperatures: list[float] = []

    def fit_task(self, ctx: RunContext, task: int) -> None:
        """The task's expert temperature from its validation data."""
        self.temperatures.append(validation_temperature(ctx, task) if self.options.calibrate else 1.0)

    def temps(self, n: int) -> list[float]:
        """Temperatures of n experts (1.0 for one not fitted yet)."""
        return [self.temperatures[t] if t < len(self.temperatures) else 1.0 for t in range(n)]

    def scores(self, method: Any, batch: Batch) -> torch.Tensor:
        """Task scores ``[B, seen]``."""
        n = method.seen_task_count()
        logits = [method.expert_logits(batch, t) for t in range(n)]
        o = self.options
        return energy_scores(logits, self.temps(n), kind=o.kind, energy_temperature=o.energy_temperature)

    def rank(self, method: Any, batch: Batch) -> torch.Tensor:
        """Top-k tasks by calibrated confidence."""
        s = self.scores(method, batch)
        return s.topk(min(self.options.topk, s.shape[1]), dim=1).indices.to(batch["input_ids"].device)

    def router_passes(self, seen: int) -> float:
        """Every seen expert."""
        return float(seen)

    def state_dict(self) -> dict[str, Any]:
        """Fitted temperatures."""
        return {"fitted_tasks": self.fitted_tasks, "temperatures": list(self.temperatures)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore ``state_dict``."""
        self.fitted_tasks = int(state_dict["fitted_tasks"])
        self.temperatures = [float(t) for t in state_dict["temperatures"]]


# -------------------------------------------------------------------------------------------------------- rerank
@dataclass
class RerankRoutingOptions:
    """YAML options of ``rerank_routing``."""

    name: str = "rerank_routing"
    base: str = "selector"
    """Who proposes the candidates: selector (ConPET's, needs method.selector=true) | prototype (backbone
    prototypes, Mahalanobis)."""
    m: int = 2
    """Candidates re-scored per sample (m expert passes, each for features and logits)."""
    energy_weight: float = 1.0
    """Weight of the calibrated expert energy added to the in-expert Mahalanobis score."""
    shrinkage: str = "rblw"
    topk: int = 1

    def __post_init__(self) -> None:
        require_choice("base", self.base, RERANK_BASES)
        require_choice("shrinkage", self.shrinkage, SHRINKAGE)
        require_range("m", self.m, low=1)
        require_range("energy_weight", self.energy_weight, low=0)
        require_range("topk", self.topk, low=1)


@CALLBACKS.register("rerank_routing")
class RerankRoutingCallback(RouterCallback):
    """TPL-style re-ranking of a cheap router's top-m tasks; see the module docstring."""

    options_cls = RerankRoutingOptions

    @classmethod
    def check_pairing(cls, slot: str, options: Any, method_options: Any) -> None:
        """A selector base needs a selector."""
        if options.base == "selector" and not method_options.has_selector():
            raise ConfigError(f"callbacks.{slot}: rerank_routing base=selector needs method.selector=true")

    def __init__(self, options: RerankRoutingOptions | None = None) -> None:
        super().__init__(options or RerankRoutingOptions())
        self.experts = Prototypes("expert", self.options.shrinkage)
        self.base = Prototypes("backbone", self.options.shrinkage)
        self.temperatures: list[float] = []

    def fit_task(self, ctx: RunContext, task: int) -> None:
        """Expert-space statistics (training data), the expert's temperature (validation), base prototypes."""
        self.experts.fit(ctx, task)
        self.temperatures.append(validation_temperature(ctx, task))
        if self.options.base == "prototype":
            self.base.fit(ctx, task)

    def rank(self, method: Any, batch: Batch) -> torch.Tensor:
        """The base router's top-m, re-scored by each candidate expert."""
        if self.options.base == "selector":
            base = method.task_scores(batch)
        else:
            assert self.base.shared is not None
            feats = method.backbone_features(batch)
            base = mahalanobis_task_scores(feats, self.base.shared.finalize(), self.class_to_task)
        stats = self.experts.per_task.finalize()
        base = base[:, : len(stats)]  # only experts with statistics can be re-scored

        def rescore(task: int, rows: torch.Tensor) -> torch.Tensor:
            sub = take_rows(batch, rows.to(batch["input_ids"].device))
            energy = energy_scores([method.expert_logits(sub, task)], [self.temperatures[task]])[:, 0]
            feats = method.expert_features(sub, task)
            return likelihood_ratio_score(feats, stats[task], None, energy, self.options.energy_weight)

        route = rerank_topm(base, self.options.m, rescore, k=self.options.topk)
        return route.to(batch["input_ids"].device)

    def router_passes(self, seen: int) -> float:
        """The base's pass, and features plus logits of m candidate experts."""
        return float(1 + 2 * min(self.options.m, seen))

    def state_dict(self) -> dict[str, Any]:
        """Statistics and temperatures."""
        return {
            "fitted_tasks": self.fitted_tasks,
            "experts": self.experts.state_dict(),
            "base": self.base.state_dict(),
            "temperatures": list(self.temperatures),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore ``state_dict``."""
        self.fitted_tasks = int(state_dict["fitted_tasks"])
        self.experts.load_state_dict(state_dict["experts"])
        self.base.load_state_dict(state_dict["base"])
        self.temperatures = [float(t) for t in state_dict["temperatures"]]
