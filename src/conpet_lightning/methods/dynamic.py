"""Dynamic ConPET: one LoRA expert per task plus a LoRA selector that routes each sample to its top-k experts.

Per task k >= 2 (0-based k >= 1) there are two stages, each a fresh Trainer: ``selector`` (task-id cross-entropy on
the dynamic-replay batches) then ``expert`` (routing by the frozen best selector, teacher forcing in training, the
logits of unselected experts filled with ``null_expert_logit``, log-softmax over all seen classes). Task 1 trains
expert 1 alone. Routing itself comes from a router callback (``topk_routing``), which attaches itself to the method
(``contract.Routable.attach_router``); without a selector every sample goes through every expert.

Frozen things are computed once: old experts' head outputs are cached by (expert, sample key). Samples routed only
to frozen experts add a constant to the loss and no gradient, so with ``skip_frozen`` they never enter the trainable
forward pass: the same loss and gradients as a function of the parameters. Two runs with and without it still drift
apart when the backbone has dropout, because the skipped rows no longer draw dropout masks (the random stream shifts).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from conpet_lightning.config import ConfigError, OptionError, RunConfig, require_choice, require_range
from conpet_lightning.contract import Batch, FitContext, Router, StageSpec
from conpet_lightning.data.records import Benchmark
from conpet_lightning.methods.base import ContinualMethod
from conpet_lightning.methods.distill import TeacherCache, soft_target_loss
from conpet_lightning.metrics.task_accuracy import TaskAccuracy
from conpet_lightning.models.backbone import LoadedBackbone
from conpet_lightning.passes import eval_mode, take_rows
from conpet_lightning.registry import METHODS
from conpet_lightning.routing.scores import class_level_task_scores


@dataclass
class DynamicConPETConfig:
    """Options of Dynamic ConPET (METHOD.md §4)."""

    name: str = "dynamic_conpet"
    selector: bool = True
    """False = no selector: every sample goes through every expert (the 'w/o selector' ablation)."""
    selector_init: str = "from_prev_expert"
    """from_prev_expert (from expert k-1 at every task, the selector of task 2 included) | conpet_llama (ConPET's
    LLaMA path: fresh at task 2, from expert k-1 afterwards) | from_prev_selector (BERT-faithful) | fresh."""
    expert_init: str = "from_selector"
    """from_selector (LLaMA-faithful: expert k starts from the best selector-k LoRA) | fresh."""
    selector_epochs: int | None = None
    """Epochs of the selector stage (default: train.epochs)."""
    selector_step_share: float | None = None
    """Under an equal budget (``train.steps_per_task``), the selector stage's share of a task's steps (the expert
    gets the rest); None: in proportion to the two stages' epochs."""
    selector_grad_clip: float = 1.0
    selector_target: str = "task"
    """task: ConPET's selector head, one logit per seen task | class: the head predicts over all seen classes and a
    task's score is the log-sum-exp over its classes (a class-level selector)."""
    selector_logit_adjustment: float = 0.0
    """tau of logit-adjusted training (Menon et al. 2021): the selector trains on ``logits + tau * log(prior)``,
    prior = each task's share of the selector's training plan, and predicts from the raw logits. Dynamic replay
    gives the new task half of every batch, so an unadjusted selector over-routes to the newest task; 0 = ConPET."""
    selector_distill: float = 0.0
    """Weight of distilling the selector towards its frozen copy as the previous task ended, on the old outputs (LwF's
    soft targets, ``selector_distill_temperature``), from the 3rd task on. With ``selector_init=from_prev_selector``
    the selector keeps its own LoRA across tasks and its old-task outputs; 0 = ConPET (no distillation)."""
    selector_distill_temperature: float = 2.0
    selector_head_epochs: int = 0
    """Epochs of a head-only stage after the selector stage (``selector_head``): the selector's LoRA frozen, its
    features computed once per sample, the head retrained on the stage's plan. With ``callbacks.replay.balanced_stages=
    [selector_head]`` that is balanced fine-tuning of the selector head (as in EEIL, Castro et al. 2018); its best
    epoch is kept by validation task-id accuracy. 0 = ConPET (no such stage)."""
    shared_optimizer: bool = False
    """ConPET's LLaMA path: the selector and the expert stage share one AdamW (one LoRA slot), so the expert's LoRA
    starts with the selector's Adam moments; False: a fresh AdamW per stage. Needs ``expert_init=from_selector``."""
    null_expert_logit: float = -100.0
    skip_frozen: bool = True
    """Serve samples routed only to frozen experts from the cache instead of the trainable forward (same loss and
    gradients; with backbone dropout, different random masks)."""

    def __post_init__(self) -> None:
        require_choice("selector_init", self.selector_init, INIT_SELECTOR)
        require_choice("expert_init", self.expert_init, INIT_EXPERT)
        require_choice("selector_target", self.selector_target, ("task", "class"))
        if self.shared_optimizer and self.expert_init != "from_selector":
            raise OptionError("shared_optimizer", True, "only with expert_init=from_selector (one LoRA slot)")
        require_range("selector_epochs", self.selector_epochs, low=0)
        require_range("selector_step_share", self.selector_step_share, low=0.0, high=1.0, open_low=True)
        require_range("selector_grad_clip", self.selector_grad_clip, low=0, open_low=True)
        require_range("selector_logit_adjustment", self.selector_logit_adjustment, low=0)
        require_range("selector_distill", self.selector_distill, low=0)
        require_range("selector_distill_temperature", self.selector_distill_temperature, low=0, open_low=True)
        require_range("selector_head_epochs", self.selector_head_epochs, low=0)

    def has_selector(self) -> bool:
        """True when a learned selector routes samples (a router callback must then be present)."""
        return self.selector


INIT_SELECTOR = ("from_prev_expert", "conpet_llama", "from_prev_selector", "fresh")
INIT_EXPERT = ("from_selector", "fresh")
SELECTOR_STAGES = ("selector", "selector_head")
"""Stages that train the selector (task-id targets, validated by task-id accuracy); the expert stage comes after."""


def expert_name(task: int) -> str:
    """Adapter name of the expert of a 0-based task."""
    return f"expert{task}"


@METHODS.register("dynamic_conpet")
class DynamicConPET(ContinualMethod):
    """Per-task LoRA experts with per-task heads, and a LoRA task selector whose head grows by one row per task."""

    options_cls = DynamicConPETConfig

    @classmethod
    def check_pairing(cls, options: Any, provided: set[str]) -> None:
        """A selector is only used through a router callback."""
        if options.selector and "router" not in provided:
            raise ConfigError(
                "method.selector=true needs a router callback (callbacks.routing: {preset: topk_routing}); "
                "set method.selector=false to send every sample to every expert"
            )

    def __init__(self, cfg: RunConfig, benchmark: Benchmark, backbone: LoadedBackbone) -> None:
        super().__init__(cfg, benchmark, backbone, first_adapter=expert_name(0))
        self.options: DynamicConPETConfig
        self.carried_moments: dict[str, dict[str, Any]] = {}
        """Selector LoRA name -> its Adam state at the end of the selector stage (``shared_optimizer``)."""
        self.router: Router | None = None
        """Decides the experts of each batch (attached by the routing callback); None: every expert."""
        self.expert_heads = nn.ModuleList([nn.Linear(self.hidden_size, len(self.task_classes[0]))])
        self.selector_head: nn.Linear | None = None
        self.selector_val = TaskAccuracy(self.num_tasks)
        self.expert_cache: dict[tuple[int, str], torch.Tensor] = {}
        """(expert, sample key) -> that frozen expert's head output for the sample."""
        self.frozen_experts: set[int] = set()
        self.selector_log_prior: torch.Tensor | None = None
        """log share of each task in the selector stage's training plan (for logit adjustment)."""
        self.selector_priors: dict[int, list[float]] = {}
        self.selector_teacher_head: nn.Linear | None = None
        """The selector head as the previous task ended (``selector_distill``); its LoRA is ``selector_teacher``."""
        self.selector_teacher = TeacherCache(self._selector_teacher_outputs)
        self.selector_feature_cache = TeacherCache(self.selector_features)
        """Features under the frozen selector LoRA in the ``selector_head`` stage, by sample key."""
        self.class_index = torch.tensor([0])  # replaced in setup_task

    # --------------------------------------------------------------------------------------------- task lifecycle
    def stages(self, task: int) -> list[StageSpec]:
        """Task 1: the expert alone; later tasks: selector (if enabled) then expert."""
        t = self.cfg.train
        expert = StageSpec("expert", t.epochs, grad_clip=t.grad_clip)
        if task == 0 or not self.options.selector:
            return [expert]
        sel_epochs = self.options.selector_epochs if self.options.selector_epochs is not None else t.epochs
        clip = self.options.selector_grad_clip
        selector = StageSpec("selector", sel_epochs, monitor="val/selector_acc", grad_clip=clip)
        head = StageSpec("selector_head", self.options.selector_head_epochs, monitor="val/selector_acc", grad_clip=clip)
        return [selector, head, expert] if head.epochs > 0 else [selector, expert]

    def step_shares(self, task: int, stages: list[StageSpec]) -> list[float] | None:
        """``selector_step_share`` of the task's steps to the selector stages, the rest to the expert (when both train).

        Two selector stages (``selector_head_epochs``) split their share by their epochs.
        """
        share = self.options.selector_step_share
        names = [s.name for s in stages]
        if share is None or names[-1:] != ["expert"] or not names[:-1] or set(names[:-1]) - set(SELECTOR_STAGES):
            return None
        epochs = sum(s.epochs for s in stages[:-1])
        return [share * s.epochs / epochs for s in stages[:-1]] + [1.0 - share]

    def setup_task(self, task: int) -> None:
        """Grow the selector (task >= 1) and add this task's expert adapter and head."""
        super().setup_task(task)
        if task > 0 and self.options.selector:
            self._grow_selector(task)
        if task > 0:
            self.expert_heads.append(nn.Linear(self.hidden_size, len(self.task_classes[task])))
        # global class id -> column of the seen-class logit matrix
        seen = self.seen_classes
        index = torch.full((self.num_classes,), -1, dtype=torch.long)
        index[seen] = torch.arange(len(seen))
        self.class_index = index

    def _grow_selector(self, task: int) -> None:
        init = self.options.selector_init
        if self.options.selector_distill > 0 and self.selector_head is not None:
            self._freeze_selector_teacher()
        if "selector" not in self.encoder.adapters:  # task 2: ConPET's LLaMA path starts the selector fresh
            source = expert_name(task - 1) if init == "from_prev_expert" else None
            self.encoder.add_adapter("selector", init_from=source)
        elif init in ("from_prev_expert", "conpet_llama"):
            self.encoder.load_adapter_state("selector", self.encoder.adapter_state(expert_name(task - 1)))
        elif init == "fresh":  # a newly initialised LoRA (peft's init) in place of last task's selector
            fresh = f"selector_init{task}"
            self.encoder.add_adapter(fresh)
            self.encoder.load_adapter_state("selector", self.encoder.adapter_state(fresh))
            self.encoder.model.delete_adapter(fresh)
        old = self.selector_head
        outputs = task + 1 if self.options.selector_target == "task" else len(self.seen_classes)
        head = nn.Linear(self.hidden_size, outputs)  # seen classes are ordered task by task: old rows come first
        if old is not None:
            with torch.no_grad():  # old rows are copied; the new row keeps its fresh initialisation
                head.weight[: old.out_features].copy_(old.weight)
                head.bias[: old.out_features].copy_(old.bias)
        self.selector_head = head.to(self.device)

    def _freeze_selector_teacher(self) -> None:
        """Keep the selector (LoRA and head) as it ended the previous task, frozen, as the distillation teacher."""
        if "selector_teacher" not in self.encoder.adapters:  # peft's init draws random numbers: keep the stream
            with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                self.encoder.add_adapter("selector_teacher", init_from="selector")
        else:
            self.encoder.load_adapter_state("selector_teacher", self.encoder.adapter_state("selector"))
        self.encoder.freeze_adapter("selector_teacher")
        assert self.selector_head is not None
        self.selector_teacher_head = copy.deepcopy(self.selector_head).requires_grad_(False)
        self.selector_teacher.clear()

    def _selector_teacher_outputs(self, batch: dict[str, Any]) -> torch.Tensor:
        assert self.selector_teacher_head is not None
        with eval_mode(self.encoder):
            hidden = self.represent(batch, adapter_names=["selector_teacher"] * len(batch["keys"]))
            return self.selector_teacher_head.to(hidden.device)(hidden)

    def setup_stage(self, task: int, stage: StageSpec) -> None:
        """Make exactly this stage's adapter and head trainable."""
        super().setup_stage(task, stage)
        for p in self.expert_heads.parameters():
            p.requires_grad_(False)
        if self.selector_head is not None:
            self.selector_head.requires_grad_(False)
        if stage.name in SELECTOR_STAGES:
            self.encoder.activate("selector", trainable=stage.name == "selector")
            assert self.selector_head is not None
            self.selector_head.requires_grad_(True)
            self.selector_feature_cache.clear()  # the head stage's features: the selector's LoRA as it is now
            return
        name = expert_name(task)
        if name not in self.encoder.adapters:
            from_selector = self.options.expert_init == "from_selector" and "selector" in self.encoder.adapters
            self.encoder.add_adapter(name, init_from="selector" if from_selector else None)
        self.encoder.activate(name)
        self.expert_heads[task].requires_grad_(True)

    def end_task(self, task: int) -> None:
        """Freeze this task's expert forever (the selector only trains in its own stage of the next task)."""
        self.encoder.freeze_adapter(expert_name(task))
        self.expert_heads[task].requires_grad_(False)
        self.frozen_experts.add(task)

    # ------------------------------------------------------------------------------------- shared optimizer
    def on_train_end(self) -> None:
        """Selector stage with ``shared_optimizer``: keep its LoRA's Adam moments for the expert stage."""
        if self.stage != "selector" or not self.options.shared_optimizer:
            return
        names = {id(p): n for n, p in self.named_parameters()}
        optimizer = self.trainer.optimizers[0]
        self.carried_moments = {
            names[id(p)]: {k: v.detach().clone() if torch.is_tensor(v) else v for k, v in state.items()}
            for p, state in optimizer.state.items()
            if ".selector." in names.get(id(p), "")
        }

    def stage_extra_state(self) -> dict[str, Any]:
        """The selector stage's carried Adam moments (``shared_optimizer``), saved with its weights for resume."""
        return {"carried_moments": self.carried_moments} if self.stage == "selector" and self.carried_moments else {}

    def load_stage_extra_state(self, state: dict[str, Any]) -> None:
        """Put back the carried moments of a rebuilt selector stage (other stages saved none and change nothing)."""
        if "carried_moments" in state:
            self.carried_moments = dict(state["carried_moments"])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """AdamW; with ``shared_optimizer`` the expert's LoRA starts from the selector's moments (one LoRA slot)."""
        optimizer = super().configure_optimizers()
        if self.stage == "expert" and self.options.shared_optimizer and self.carried_moments:
            mine = f".{expert_name(self.task)}."
            for name, p in self.named_parameters():
                source = self.carried_moments.get(name.replace(mine, ".selector.")) if p.requires_grad else None
                if source is not None and mine in name:
                    optimizer.state[p] = {
                        k: v.clone().to(p.device) if torch.is_tensor(v) else v for k, v in source.items()
                    }
        return optimizer

    # ------------------------------------------------------------------------------------------------ selector
    def before_fit(self, task: int, stage: StageSpec, fit: FitContext, datamodule: Any) -> None:
        """Selector stage: measure each task's share of the training plan (the prior of logit adjustment)."""
        super().before_fit(task, stage, fit, datamodule)
        if stage.name not in SELECTOR_STAGES or self.options.selector_logit_adjustment == 0:
            self.selector_log_prior = None
            return
        dm = datamodule
        key = "task" if self.options.selector_target == "task" else "label"
        targets = torch.tensor([dm.item("train", i)[key] for batch in dm.train_plan(0) for i in batch])
        if key == "label":
            targets = self.class_index[targets]
        counts = torch.bincount(
            targets, minlength=self.selector_head.out_features if self.selector_head else 1
        ).double()
        prior = (counts + 1) / (counts.sum() + len(counts))  # add-one smoothing: no task has a zero prior
        if stage.name == "selector":  # the record is the selector stage's (a head stage may be balanced)
            self.selector_priors[self.task] = [round(float(v), 4) for v in prior]
        self.selector_log_prior = prior.log().float()

    def task_scores(self, batch: Batch) -> torch.Tensor:
        """The frozen selector's task scores ``[B, seen tasks]`` (``contract.Routable``)."""
        return self.selector_task_scores(self.selector_logits(batch))

    def selector_task_scores(self, logits: torch.Tensor) -> torch.Tensor:
        """Task scores from the selector head's outputs: themselves, or the log-sum-exp over each task's classes."""
        if self.options.selector_target == "task":
            return logits
        seen_tasks = torch.tensor([t for t in range(self.task + 1) for _ in self.task_classes[t]])
        return class_level_task_scores(logits, seen_tasks, self.task + 1)

    def selector_targets(self, batch: Batch) -> torch.Tensor:
        """What the selector head is trained to predict: the task id, or the class's column among the seen ones."""
        if self.options.selector_target == "task":
            return batch["task_ids"]
        return self.class_index.to(batch["labels"].device)[batch["labels"]]

    def attach_router(self, router: Router | None) -> None:
        """Route through ``router`` from now on (``contract.Routable``)."""
        self.router = router

    def routing_active(self) -> bool:
        """Batches are routed from task 2 on, outside the selector stage (``contract.Routable``)."""
        return self.task > 0 and self.stage not in SELECTOR_STAGES

    def selector_logits(self, batch: dict[str, Any], trainable: bool = False) -> torch.Tensor:
        """Task scores [B, k+1]; frozen (no grad, eval mode) unless training the selector."""
        assert self.selector_head is not None, "the selector exists from task 2 on"
        if trainable:
            return self.selector_head(self.represent(batch))
        with torch.no_grad(), eval_mode(self.encoder):
            hidden = self.represent(batch, adapter_names=["selector"] * len(batch["keys"]))
            return self.selector_head(hidden)

    # ------------------------------------------------------------------------------------------------- experts
    def frozen_expert_logits(self, batch: dict[str, Any], rows: torch.Tensor, expert: int) -> torch.Tensor:
        """Head outputs of an expert under no grad for some rows of the batch; frozen experts' come from the cache."""
        return self.frozen_outputs(batch, {expert: rows})[expert]

    def frozen_outputs(self, batch: dict[str, Any], wanted: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """Head outputs of several experts under no grad, each for its rows of the batch.

        Cached outputs of frozen experts are reused; every other (row, expert) pair goes through *one* mixed-adapter
        forward (peft's per-row ``adapter_names``), so a routed batch costs one encoder pass however many experts it
        reaches, instead of one small pass per expert.
        """
        pending: list[tuple[int, int]] = []  # (expert, row) pairs to compute
        hits = 0
        for expert, rows in wanted.items():
            cacheable = expert in self.frozen_experts
            for i in rows.tolist():
                if cacheable and (expert, batch["keys"][i]) in self.expert_cache:
                    hits += 1
                else:
                    pending.append((expert, i))
        if self.training:  # the training budget counts frozen forwards (validation and tests are not training)
            self.budget.frozen_cache_hits += hits
            self.budget.frozen_cache_misses += len(pending)
        fresh: dict[tuple[int, str], torch.Tensor] = {}
        if pending:
            sub = take_rows(batch, torch.tensor([i for _, i in pending], device=self.device))
            with torch.no_grad(), eval_mode(self.encoder):
                hidden = self.represent(sub, adapter_names=[expert_name(e) for e, _ in pending])
                for expert in sorted({e for e, _ in pending}):
                    at = [j for j, (e, _) in enumerate(pending) if e == expert]
                    out = self.expert_heads[expert](hidden[at]).float().detach()
                    for j, row in zip(at, out, strict=True):
                        key = batch["keys"][pending[j][1]]
                        fresh[(expert, key)] = row
                        if expert in self.frozen_experts:
                            self.expert_cache[(expert, key)] = row.cpu()
        result: dict[int, torch.Tensor] = {}
        for expert, rows in wanted.items():
            keys = [batch["keys"][i] for i in rows.tolist()]
            result[expert] = torch.stack([fresh.get((expert, k), self.expert_cache.get((expert, k))) for k in keys]).to(
                self.device
            )
        return result

    def assemble_logits(self, batch: dict[str, Any], route: torch.Tensor, trainable: int | None) -> torch.Tensor:
        """[B, seen classes] logits: each routed expert fills its own columns, the rest is ``null_expert_logit``.

        ``trainable`` is the expert that carries gradient (the current one in training), or None.
        """
        n_seen = len(self.seen_classes)
        logits = torch.full((len(route), n_seen), self.options.null_expert_logit, device=self.device)
        rows_of = {e: (route == e).any(dim=1).nonzero(as_tuple=True)[0] for e in torch.unique(route).tolist()}
        frozen = self.frozen_outputs(batch, {e: r for e, r in rows_of.items() if e != trainable})
        for expert, rows in rows_of.items():
            cols = self.class_index[self.task_classes[expert]].to(self.device)
            if expert == trainable:
                if self.options.skip_frozen:
                    values = self.expert_heads[expert](self.represent(take_rows(batch, rows)))
                else:  # reference path: the whole batch through the trainable expert, unrouted rows discarded
                    values = self.expert_heads[expert](self.represent(batch))[rows]
            else:
                values = frozen[expert]
            logits = logits.index_put((rows[:, None], cols[None, :]), values.to(logits.dtype))
        return logits

    def all_experts_route(self, batch_size: int) -> torch.Tensor:
        """Every sample to every seen expert (no selector)."""
        return torch.arange(self.task + 1, device=self.device).expand(batch_size, -1)

    def route_of(self, batch: dict[str, Any], train: bool = False) -> torch.Tensor:
        """The batch's routing [B, topk]: from the attached router (with or without a selector), else all experts."""
        if self.task == 0:
            return torch.zeros((len(batch["keys"]), 1), dtype=torch.long, device=self.device)
        if self.router is not None:
            return self.router.route(self, batch, train=train)
        if self.options.selector:
            raise RuntimeError("method.selector is on but no router is attached (see check_pairing)")
        return self.all_experts_route(len(batch["keys"]))

    # ----------------------------------------------------------------------------- expert access (routers)
    def seen_task_count(self) -> int:
        """Tasks whose experts exist (``contract.ExpertAccess``)."""
        return self.task + 1

    def task_class_ids(self, task: int) -> list[int]:
        """Global class ids of a task, in the column order of its expert head (``contract.ExpertAccess``)."""
        return list(self.task_classes[task])

    def backbone_features(self, batch: Batch, layers: int | None = None, pooling: str = "mask") -> torch.Tensor:
        """Frozen backbone features without any adapter ``[B, H]`` (``contract.ExpertAccess``).

        The mask hidden state of the last layer, or of the first ``layers`` layers, or their mean over real tokens.
        """
        with torch.no_grad(), eval_mode(self.encoder):
            return self.encoder.backbone_states(
                batch["input_ids"], batch["attention_mask"], batch["mask_pos"], layers=layers, pooling=pooling
            ).float()

    def backbone_layers(self) -> int:
        """Transformer layers of the backbone (``contract.ExpertAccess``)."""
        return self.encoder.num_layers()

    def selector_features(self, batch: Batch) -> torch.Tensor:
        """Mask hidden state under the selector's LoRA ``[B, H]``, frozen (``contract.ExpertAccess``)."""
        with torch.no_grad(), eval_mode(self.encoder):
            return self.represent(batch, adapter_names=["selector"] * len(batch["keys"])).float()

    def expert_features(self, batch: Batch, task: int) -> torch.Tensor:
        """Mask hidden state under expert ``task``'s LoRA ``[B, H]``, frozen (``contract.ExpertAccess``)."""
        with torch.no_grad(), eval_mode(self.encoder):
            return self.represent(batch, adapter_names=[expert_name(task)] * len(batch["keys"])).float()

    def expert_logits(self, batch: Batch, task: int) -> torch.Tensor:
        """Expert ``task``'s head outputs ``[B, classes of task]``, frozen and cached (``contract.ExpertAccess``)."""
        rows = torch.arange(len(batch["keys"]), device=self.device)
        return self.frozen_expert_logits(batch, rows, task)

    # ---------------------------------------------------------------------------------------------- Lightning
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        """Selector: task-id CE. Expert: NLL over all seen classes of the routed, assembled logits."""
        n = len(batch["keys"])
        if self.stage in SELECTOR_STAGES:
            if self.stage == "selector":
                logits = self.selector_logits(batch, trainable=True)
            else:  # head only: the frozen LoRA's features are computed once per sample
                assert self.selector_head is not None
                features = self.selector_feature_cache(batch, self.device)
                self.count_frozen(self.selector_feature_cache)
                logits = self.selector_head(features.to(self.selector_head.weight.dtype))
            adjusted = logits
            if self.selector_log_prior is not None:
                prior = self.selector_log_prior.to(logits.device)
                adjusted = logits + self.options.selector_logit_adjustment * prior
            loss = F.cross_entropy(adjusted, self.selector_targets(batch))
            if self.selector_teacher_head is not None:  # the old outputs come first in the grown head
                teacher = self.selector_teacher(batch, self.device)
                self.count_frozen(self.selector_teacher)
                t = self.options.selector_distill_temperature
                distill = soft_target_loss(logits[:, : teacher.shape[1]], teacher, t)
                self.log("train/selector_distill", distill, batch_size=n)
                loss = loss + self.options.selector_distill * distill
        else:
            loss = self.expert_loss(batch)
        self.log(f"train/{self.stage}_loss", loss, prog_bar=True, batch_size=n)
        return loss

    def expert_loss(self, batch: dict[str, Any]) -> torch.Tensor:
        """NLL over all seen classes of the routed logits; only the current expert carries gradient."""
        route = self.route_of(batch, train=True)
        if self.options.skip_frozen:  # rows that never reach the trainable expert skip its forward pass
            self.batch_frozen_only = int((~(route == self.task).any(dim=1)).sum())
        logits = self.assemble_logits(batch, route, trainable=self.task)
        target = self.class_index.to(self.device)[batch["labels"]]
        loss = F.nll_loss(F.log_softmax(logits, dim=-1), target)
        if not loss.requires_grad:
            # No sample reached the trainable expert (a batch of replayed samples only): the loss is a constant and
            # every gradient is zero. Tie it to the trainable parameters so the optimiser still takes its step, as
            # it would have with the full forward pass.
            loss = loss + sum(p.sum() * 0.0 for p in self.parameters() if p.requires_grad)
        return loss

    def predict_from_route(self, batch: dict[str, Any], route: torch.Tensor) -> torch.Tensor:
        """Global class predictions from a given routing (no gradient)."""
        with torch.no_grad():
            logits = self.assemble_logits(batch, route, trainable=None)
        seen = torch.tensor(self.seen_classes, device=self.device)
        return seen[logits.argmax(dim=-1)]

    def predict(self, batch: dict[str, Any]) -> torch.Tensor:
        """Route (callback or all experts), then argmax over the seen classes."""
        return self.predict_from_route(batch, self.route_of(batch))

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Selector stage: task-id accuracy; expert stage: the full pipeline's class accuracy."""
        if self.stage in SELECTOR_STAGES:
            pred_task = self.task_scores(batch).argmax(-1)
            self.selector_val.update(pred_task, batch["task_ids"], batch["task_ids"])
        else:
            super().validation_step(batch, batch_idx)

    def on_validation_epoch_end(self) -> None:
        """Log the stage's selection metric."""
        if self.stage in SELECTOR_STAGES:
            result = self.selector_val.compute()
            self.log("val/selector_acc", float(result["macro"]), prog_bar=True)
            self.selector_val.reset()
        else:
            super().on_validation_epoch_end()

    def task_record(self, task: int) -> dict[str, Any]:
        """Expert-cache size, for the cost report."""
        record: dict[str, Any] = {"expert_cache_entries": len(self.expert_cache)}
        if task in self.selector_priors:
            record["selector_train_prior"] = self.selector_priors[task]
        return record
