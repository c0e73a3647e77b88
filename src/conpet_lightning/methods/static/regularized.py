"""Replay-free baselines on the shared LoRA (METHOD.md §5): EWC and LwF.

Both train the shared-PET model (one LoRA + all-class head) on the current task only and regularise the trainable
parameters (the LoRA tensors and the head, which ConPET names ``lora_*`` so that its "LoRA parameters" include it).

- EWC: penalty ``lambda/2 * sum_i F_i (theta_i - theta*_i)^2``. After each task the Fisher is estimated on the task's
  training data from per-class gradients weighted by the predicted class probability,
  ``F = E_batch sum_c p(c) (d log p(c) / d theta)^2`` over the seen classes, and added to the running Fisher;
  ``theta*`` becomes the parameters after the task.
- LwF: soft-target cross-entropy at temperature T between the previous model's old-class logits (a frozen copy of
  the adapter, ``teacher``, and of the head, cached per sample) and the current model's, weight ``lambda``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from conpet_lightning.config import RunConfig, require_range
from conpet_lightning.contract import FitContext
from conpet_lightning.data.records import Benchmark
from conpet_lightning.methods.distill import TeacherCache, soft_target_loss
from conpet_lightning.methods.shared import SharedPETConfig
from conpet_lightning.methods.static.emr import EMRModule
from conpet_lightning.models.backbone import LoadedBackbone
from conpet_lightning.passes import batch_to, eval_mode
from conpet_lightning.registry import METHODS


@dataclass
class EWCConfig(SharedPETConfig):
    """Options of EWC on the LoRA parameters."""

    name: str = "ewc"
    ewc_lambda: float = 100.0
    """Penalty weight (ConPET's ``ewc_lambda``, swept in its logs)."""
    fisher_batches: int | None = None
    """Training batches of the task used for the Fisher (None = all)."""
    fisher_topk: int | None = None
    """Per batch, only the k classes of highest mean probability contribute (None = every seen class, exact)."""

    def __post_init__(self) -> None:
        require_range("ewc_lambda", self.ewc_lambda, low=0.0)
        require_range("fisher_batches", self.fisher_batches, low=1)
        require_range("fisher_topk", self.fisher_topk, low=1)


@METHODS.register("ewc")
class EWCModule(EMRModule):
    """Shared LoRA + all-class head with an EWC penalty towards the parameters of earlier tasks."""

    options_cls: type = EWCConfig

    def __init__(self, cfg: RunConfig, benchmark: Benchmark, backbone: LoadedBackbone) -> None:
        super().__init__(cfg, benchmark, backbone)
        self.fisher: dict[str, torch.Tensor] = {}
        self.anchor: dict[str, torch.Tensor] = {}

    def penalty(self) -> torch.Tensor:
        """``lambda/2 * sum F (theta - theta*)^2`` over the regularised parameters (0 before task 2)."""
        total = torch.zeros((), device=self.device)
        if not self.fisher:
            return total
        for name, param in self.named_parameters():
            if name in self.fisher:
                fisher, anchor = self.fisher[name].to(param.device), self.anchor[name].to(param.device)
                total = total + (fisher * (param - anchor).pow(2)).sum()
        return 0.5 * self.options.ewc_lambda * total

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        """Cross-entropy + the EWC penalty."""
        ce = self.classification_loss(self.logits(batch), batch["labels"])
        reg = self.penalty()
        self.log("train/ewc", reg, batch_size=len(batch["labels"]))
        self.log("train/loss", ce + reg, prog_bar=True, batch_size=len(batch["labels"]))
        return ce + reg

    def end_task(self, task: int) -> None:
        """Add this task's Fisher to the running one and anchor at the current parameters."""
        super().end_task(task)
        fisher = self.estimate_fisher(task)
        for name, value in fisher.items():
            self.fisher[name] = self.fisher.get(name, torch.zeros_like(value)) + value
        self.anchor = {n: p.detach().cpu().clone() for n, p in self.named_parameters() if n in fisher}

    def estimate_fisher(self, task: int) -> dict[str, torch.Tensor]:
        """Per-class gradients of the mean log-probability, squared and weighted by the mean probability."""
        o, dm = self.options, self.datamodule_ref
        ctx = self.fit_context or FitContext.cpu()
        named = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        fisher = {n: torch.zeros_like(p, device="cpu") for n, p in named}
        self.to(ctx.device)
        idx = dm.indices("train", task)
        seen = torch.tensor(self.seen_classes, device=ctx.device)
        n_batches = 0
        with eval_mode(self), torch.enable_grad(), ctx.forward_context():
            for batch in dm.loader_for("train", idx):
                if o.fisher_batches is not None and n_batches >= o.fisher_batches:
                    break
                logp = F.log_softmax(self.logits(batch_to(batch, ctx.device))[:, seen].float(), dim=-1)
                weight = logp.exp().mean(0).detach()
                cols = range(len(seen)) if o.fisher_topk is None else weight.topk(min(o.fisher_topk, len(seen)))[1]
                for c in [int(c) for c in cols]:
                    grads = torch.autograd.grad(logp[:, c].mean(), [p for _, p in named], retain_graph=True)
                    for (name, _), g in zip(named, grads, strict=True):
                        fisher[name] += float(weight[c]) * g.detach().pow(2).cpu()
                n_batches += 1
        return {n: f / max(n_batches, 1) for n, f in fisher.items()}


@dataclass
class LwFConfig(SharedPETConfig):
    """Options of LwF on the LoRA parameters."""

    name: str = "lwf"
    lwf_lambda: float = 1.0
    """Weight of the distillation term (ConPET reuses ``ewc_lambda``)."""
    temperature: float = 2.0

    def __post_init__(self) -> None:
        require_range("lwf_lambda", self.lwf_lambda, low=0.0)
        require_range("temperature", self.temperature, low=0.0, open_low=True)


@METHODS.register("lwf")
class LwFModule(EMRModule):
    """Shared LoRA + all-class head distilled towards the previous model's old-class outputs."""

    options_cls: type = LwFConfig

    def __init__(self, cfg: RunConfig, benchmark: Benchmark, backbone: LoadedBackbone) -> None:
        super().__init__(cfg, benchmark, backbone)
        self.teacher_head: torch.nn.Linear | None = None
        self.teacher = TeacherCache(self._teacher_outputs)
        """The previous model's old-class logits, cached by sample key within the task."""

    def setup_task(self, task: int) -> None:
        """From task 2 on, freeze a copy of the adapter and head as they ended the previous task."""
        super().setup_task(task)
        self.teacher.clear()
        if task == 0:
            return
        if "teacher" not in self.encoder.adapters:
            self.encoder.add_adapter("teacher", init_from="shared")
        else:
            self.encoder.load_adapter_state("teacher", self.encoder.adapter_state("shared"))
        self.encoder.freeze_adapter("teacher")
        self.teacher_head = copy.deepcopy(self.head).requires_grad_(False)

    def old_classes(self) -> list[int]:
        """Classes of the tasks before the current one."""
        return [c for t in range(self.task) for c in self.task_classes[t]]

    def _teacher_outputs(self, batch: dict[str, Any]) -> torch.Tensor:
        assert self.teacher_head is not None
        with eval_mode(self.encoder):
            hidden = self.represent(batch, adapter_names=["teacher"] * len(batch["keys"]))
            return self.teacher_head.to(hidden.device)(hidden)[:, self.old_classes()]

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        """Cross-entropy + lambda * soft-target cross-entropy on the old classes."""
        logits = self.logits(batch)
        loss = self.classification_loss(logits, batch["labels"])
        if self.task > 0:
            teacher = self.teacher(batch, self.device)
            self.count_frozen(self.teacher)
            distill = soft_target_loss(logits[:, self.old_classes()], teacher, self.options.temperature)
            self.log("train/distill", distill, batch_size=len(batch["labels"]))
            loss = loss + self.options.lwf_lambda * distill
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["labels"]))
        return loss
