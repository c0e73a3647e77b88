"""`ContinualMethod`: the LightningModule contract the task loop drives.

A method declares its stages per task (``stages``), what it trains in each (``setup_stage``), and how it predicts
over all seen classes (``predict``). Validation and test share one per-task accuracy metric (synced under DDP), so
best-epoch selection and the accuracy matrix use the same definition (macro = mean over seen tasks).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import lightning as L
import torch

from conpet_lightning.config import RunConfig, check_options
from conpet_lightning.contract import (
    FitContext,
    MemoryView,
    RunContext,
    StageBudget,
    StageData,
    StageSpec,
    stream_seed,
)
from conpet_lightning.data.records import Benchmark
from conpet_lightning.methods.distill import TeacherCache
from conpet_lightning.metrics.task_accuracy import TaskAccuracy
from conpet_lightning.models.backbone import LoadedBackbone
from conpet_lightning.models.encoder import MaskEncoder
from conpet_lightning.models.pet import count_parameters, make_lora_config
from conpet_lightning.passes import eval_mode
from conpet_lightning.runfiles import load_torch

__all__ = ["ContinualMethod", "StageSpec", "eval_mode"]


class ContinualMethod(L.LightningModule, ABC):
    """Base of every continual method: one encoder with named LoRA adapters, heads, and the seen-class bookkeeping.

    It implements the capabilities every method has (``contract``: stage data, per-task records, mid-training
    evaluation, reacting to a memory) with neutral defaults; a subclass overrides what it does differently.
    """

    options_cls: ClassVar[type]
    """The method's options dataclass (defaults and checks); the registry validates ``method`` with it."""
    #: Which training data the default plan serves: the current task only, or every seen task (joint).
    train_scope: str = "current"
    #: Partial stage checkpoints (trainable tensors only) load into the full module.
    strict_loading = False

    @classmethod
    def check_pairing(cls, options: Any, provided: set[str]) -> None:
        """Cross-field rules against what the run's callbacks provide (e.g. ``router``); raise ConfigError."""

    def __init__(self, cfg: RunConfig, benchmark: Benchmark, backbone: LoadedBackbone, first_adapter: str = "shared"):
        super().__init__()
        self.cfg = cfg
        self.task_classes: list[list[int]] = [list(c) for c in benchmark.tasks]
        self.num_classes = benchmark.num_classes
        self.num_tasks = benchmark.num_tasks
        lora = cfg.model.lora
        self.encoder = MaskEncoder(
            backbone,
            make_lora_config(lora.r, lora.alpha, lora.dropout, lora.target_modules, model=backbone.model),
            first_adapter=first_adapter,
        )
        self.hidden_size = int(backbone.model.config.hidden_size)
        self.options: Any = check_options(self.options_cls, cfg.method, "method")
        self.task = 0
        self.stage = ""
        self.val_acc = TaskAccuracy(self.num_tasks)
        self.fit_context: FitContext | None = None
        """Device and precision of the last stage's Trainer (``before_fit``): passes between stages run there."""
        self.datamodule_ref: Any = None
        """The run's datamodule, for passes between stages (set by ``before_fit``)."""
        self.budget = StageBudget()
        """The current stage's training cost so far (reset by ``before_fit``)."""
        self.batch_frozen_only = 0
        """Samples of the current training batch that passed frozen modules only (set by ``training_step``)."""

    # ------------------------------------------------------------------------------------------- task bookkeeping
    @property
    def seen_classes(self) -> list[int]:
        """All class ids of tasks 0..current."""
        return [c for t in range(self.task + 1) for c in self.task_classes[t]]

    def seen_class_mask(self, device: torch.device | None = None) -> torch.Tensor:
        """Boolean [num_classes] mask of the seen classes."""
        mask = torch.zeros(self.num_classes, dtype=torch.bool, device=device)
        mask[self.seen_classes] = True
        return mask

    def setup_task(self, task: int) -> None:
        """Called by the loop when task ``task`` (0-based) starts."""
        self.task = task

    def stages(self, task: int) -> list[StageSpec]:
        """The stages of a task, in order; each is fitted by a fresh Trainer."""
        return [StageSpec("train", self.cfg.train.epochs, grad_clip=self.cfg.train.grad_clip)]

    def step_shares(self, task: int, stages: list[StageSpec]) -> list[float] | None:
        """How an equal budget (``train.steps_per_task``) splits over the stages; None: in proportion to epochs."""
        return None

    def setup_stage(self, task: int, stage: StageSpec) -> None:
        """Prepare trainable parameters for a stage (HF models load in eval mode; training wants train mode)."""
        self.stage = stage.name
        self.train()

    def before_fit(self, task: int, stage: StageSpec, fit: FitContext, datamodule: Any) -> None:
        """Called by the loop right before a stage's fit, and when a resumed run rebuilds a finished stage.

        Work that depends on the stage's data plan (banks, streams, priors) belongs here, not in Lightning's
        ``on_fit_start``, so that a resumed run redoes it exactly.
        """
        self.fit_context = fit
        self.datamodule_ref = datamodule
        self.budget = StageBudget()

    def end_stage(self, task: int, stage: StageSpec) -> None:
        """Called after the best checkpoint of a stage is restored."""

    def end_task(self, task: int) -> None:
        """Called after the last stage of a task (before its test)."""

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Count the batch into the stage's budget (samples through trainable parameters, tokens)."""
        frozen, self.batch_frozen_only = self.batch_frozen_only, 0
        self.budget.samples_trainable += len(batch["keys"]) - frozen
        self.budget.samples_frozen_only += frozen
        self.budget.tokens += int(batch["attention_mask"].sum())

    def count_frozen(self, cache: TeacherCache) -> None:
        """Count a training batch's frozen forwards through ``cache`` into the stage's budget.

        A teacher's outputs or a frozen module's features: served rows are hits, computed rows are misses.
        """
        self.budget.frozen_cache_hits += cache.last_hits
        self.budget.frozen_cache_misses += cache.last_misses

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """Every optimizer step draws from its own random stream (dropout, sampled contrast sets).

        The stream depends on (seed, task, stage, step) only, not on what Lightning or a data loader drew before, so
        a stage resumed from its checkpoint continues exactly as the uninterrupted run did.
        """
        torch.manual_seed(stream_seed(self.cfg.seed, self.task, self.stage, self.global_step))

    # ------------------------------------------------------------------------------ capabilities (``contract``)
    def stage_data(self, task: int, stage: StageSpec) -> StageData:
        """What a stage trains on: by default the current task plus whatever the replay callbacks store."""
        return "replay"

    def task_record(self, task: int) -> dict[str, Any]:
        """Extra entries for ``metrics.json`` ``per_task[task]``."""
        return {}

    def midtraining_eval_blocker(self) -> str | None:
        """Why continual evaluation would measure nothing meaningful mid-stage (None: it can run)."""
        return None

    def memory_after_stage(self) -> str | None:
        """The stage after which an episodic memory picks this task's exemplars (None: at task end)."""
        return None

    def use_memory(self, memory: MemoryView) -> None:
        """An episodic memory serves this method (called once at run start)."""

    def memory_updated(self, ctx: RunContext, task: int, memory: MemoryView) -> None:
        """Task ``task``'s exemplars were picked."""

    # --------------------------------------------------------------------------------------------- model pieces
    def represent(self, batch: dict[str, Any], adapter_names: list[str] | None = None) -> torch.Tensor:
        """Hidden state at the mask position, with the active adapter (or per-sample adapters)."""
        return self.encoder(batch["input_ids"], batch["attention_mask"], batch["mask_pos"], adapter_names=adapter_names)

    @abstractmethod
    def predict(self, batch: dict[str, Any]) -> torch.Tensor:
        """Predicted global class id per sample, over the seen classes only."""

    @abstractmethod
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        """One optimisation step's loss."""

    def parameter_report(self) -> dict[str, int]:
        """Trainable vs total parameters of the whole module right now."""
        trainable, total = count_parameters(self)
        return {"trainable": trainable, "total": total}

    # ------------------------------------------------------------------------------------------- eval and optim
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Accumulate per-task accuracy of the validation batch."""
        self.val_acc.update(self.predict(batch), batch["labels"], batch["task_ids"])

    def on_validation_epoch_end(self) -> None:
        """Log macro/micro validation accuracy over the seen tasks (synced by torchmetrics)."""
        result = self.val_acc.compute()
        self.log("val/acc_macro", float(result["macro"]), prog_bar=True, sync_dist=False)
        self.log("val/acc_micro", float(result["micro"]), sync_dist=False)
        self.val_acc.reset()

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, torch.Tensor]:
        """Predictions for the continual-metrics callback (which fills the accuracy matrix)."""
        return {"preds": self.predict(batch)}

    def on_before_backward(self, loss: torch.Tensor) -> None:
        """Stop at once on a non-finite loss, naming where; finished tasks are already on disk."""
        if not torch.isfinite(loss).all():
            raise FloatingPointError(
                f"non-finite loss ({float(loss.detach())}) at task {self.task + 1}, stage '{self.stage}', "
                f"step {self.global_step}: lower train.lr, or check the data of this task"
            )

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """AdamW over the parameters this stage trains (ConPET: wd 0.01, no scheduler)."""
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            raise RuntimeError(f"stage '{self.stage}' of task {self.task} has no trainable parameters")
        t = self.cfg.train
        return torch.optim.AdamW(params, lr=t.lr_for(self.task), weight_decay=t.weight_decay, eps=t.adam_eps)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The tensors this stage trains (the frozen backbone and frozen experts never change)."""
        trainable = {n for n, p in self.named_parameters() if p.requires_grad}
        return {k: v.detach().cpu().clone() for k, v in self.state_dict().items() if k in trainable}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep only what this stage trains: the frozen backbone and frozen experts never change."""
        trainable = {n for n, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}

    def stage_extra_state(self) -> dict[str, Any]:
        """What the current stage leaves besides its trained tensors that a later stage uses (saved with them)."""
        return {}

    def load_stage_extra_state(self, state: dict[str, Any]) -> None:
        """Put back ``stage_extra_state`` of the current stage (a resumed run rebuilding it)."""

    def restore_trainable(self, path: str) -> None:
        """Load a stage checkpoint (a partial state dict, and the stage's extra state when it has one)."""
        saved = load_torch(path, "stage weights")
        if "extra" in saved:
            self.load_stage_extra_state(saved["extra"])
        state = saved["state_dict"]
        missing = set(state) - set(self.state_dict())
        if missing:
            raise KeyError(f"checkpoint {path} has keys this module lacks: {sorted(missing)[:5]}")
        self.load_state_dict(state, strict=False)
