"""CRL and CRL* (METHOD.md §3.5, after Zhao et al. 2022): contrastive PET with prototype distillation.

Contrastive training with a feature bank, contrastive replay with prototype-similarity distillation, and
nearest-prototype prediction.

Per task two stages, each a fresh Trainer that keeps its last epoch (CRL selects no epoch):

1. ``contrast`` on the current task alone: supervised contrastive loss of the batch's projected features
   (``normalize(MLP(z))``, 64-d) against a bank of the stage's training features (a random ``sample_k`` subset),
   temperature 0.1; the bank is refreshed with the batch features after every step.
2. ``replay`` (task 2 on) on the stored samples: the same contrastive loss against the whole bank, plus, for samples
   of old classes, KL(softmax(t * S_prev[class]) || softmax(t * f . P_old)), where ``P_old`` are the bank's current
   old-class prototypes and ``S_prev`` the prototype-similarity matrix stored at the end of the previous task.

Prediction is the nearest class prototype (squared Euclidean distance on the unprojected hidden state), prototypes
being class means over the memory (CRL, ``prototypes: memory`` with ``episodic_memory``) or over the samples the last
stage's plan served plus ``min_sample_num`` samples of every seen class (CRL*, ``prototypes: pool`` with
``dynamic_replay`` + ``stage_data``). The memory itself is picked after stage 1 (``memory_after_stage``).

Continual evaluation skips CRL (``midtraining_eval_blocker``): prototypes are computed only in ``end_task``, so a
mid-stage prediction would use none (task 1) or the previous task's, from an encoder that has moved since.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from conpet_lightning.config import RunConfig, require_choice, require_range
from conpet_lightning.contract import FitContext, MemoryView, RunContext, StageData, StageSpec
from conpet_lightning.data.records import Benchmark
from conpet_lightning.methods.base import ContinualMethod
from conpet_lightning.models.backbone import LoadedBackbone
from conpet_lightning.passes import encode_records, plan_indices
from conpet_lightning.registry import METHODS

PROTOTYPE_SOURCES = ("memory", "pool")


@dataclass
class CRLConfig:
    """Options of CRL / CRL* (ConPET's CRL defaults)."""

    name: str = "crl"
    feat_dim: int = 64
    temperature: float = 0.1
    kl_temperature: float = 10.0
    """Scale of the similarities inside the KL softmaxes (cosine similarities lie in [-1, 1])."""
    sample_k: int = 500
    """Bank features contrasted per step in stage 1."""
    step1_epochs: int | None = None
    """Epochs of the contrastive stage (default: train.epochs)."""
    step2_epochs: int | None = None
    """Epochs of the replay stage (default: train.epochs)."""
    grad_clip: float | None = 10.0
    prototypes: str = "memory"
    """memory (CRL: means over the episodic memory) | pool (CRL*: means over the samples the replay served)."""
    min_sample_num: int = 10
    """pool: every seen class contributes at least min(this, its size) samples, so every class has a prototype."""

    def __post_init__(self) -> None:
        require_choice("prototypes", self.prototypes, PROTOTYPE_SOURCES)
        for key in ("feat_dim", "sample_k", "min_sample_num"):
            require_range(key, getattr(self, key), low=1)
        for key in ("temperature", "kl_temperature", "grad_clip"):
            require_range(key, getattr(self, key), low=0.0, open_low=True)
        require_range("step1_epochs", self.step1_epochs, low=1)
        require_range("step2_epochs", self.step2_epochs, low=1)


@METHODS.register("crl")
class CRLModule(ContinualMethod):
    """Shared LoRA + projection MLP, trained contrastively; predicts by the nearest class prototype."""

    options_cls = CRLConfig

    def __init__(self, cfg: RunConfig, benchmark: Benchmark, backbone: LoadedBackbone) -> None:
        super().__init__(cfg, benchmark, backbone, first_adapter="shared")
        self.options: CRLConfig
        h = self.hidden_size
        self.projector = nn.Sequential(nn.Linear(h, h), nn.ReLU(), nn.Linear(h, self.options.feat_dim))
        self.encoder.activate("shared")
        self.bank_index = np.empty(0, dtype=np.int64)
        self.bank_feats = torch.empty(0)
        self.bank_labels = torch.empty(0, dtype=torch.long)
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None
        self.stage_pool = np.empty(0, dtype=np.int64)
        self.memory_pool: np.ndarray | None = None
        self.prototypes = torch.empty(0)
        self.proto_classes = torch.empty(0, dtype=torch.long)
        self.prev_sim: torch.Tensor | None = None
        """Cosine similarities of the projected class prototypes at the end of the previous task."""
        self.prev_classes: list[int] = []

    # --------------------------------------------------------------------------------------------- lifecycle
    def stages(self, task: int) -> list[StageSpec]:
        """``contrast``; from task 2 on, then ``replay``. No epoch selection: the last epoch is kept."""
        o, epochs = self.options, self.cfg.train.epochs
        step1 = StageSpec("contrast", o.step1_epochs or epochs, monitor=None, grad_clip=o.grad_clip)  # type: ignore[arg-type]
        if task == 0:
            return [step1]
        return [step1, StageSpec("replay", o.step2_epochs or epochs, monitor=None, grad_clip=o.grad_clip)]  # type: ignore[arg-type]

    def memory_after_stage(self) -> str | None:
        """The ``episodic_memory`` callback picks this task's memory after ``contrast``, before ``replay``."""
        return "contrast"

    def midtraining_eval_blocker(self) -> str | None:
        """Prototypes exist only at task end (see the module docstring)."""
        return (
            "CRL predicts by class prototypes, which are computed only at the end of each task: mid-training "
            "evaluation is skipped and eval_curve holds only the end-of-task entries"
        )

    def stage_data(self, task: int, stage: StageSpec) -> StageData:
        """Stage 1 trains on the current task alone, stage 2 on the stored samples."""
        return "current" if stage.name == "contrast" else "memory"

    def setup_stage(self, task: int, stage: StageSpec) -> None:
        """Both stages train the shared LoRA and the projector."""
        super().setup_stage(task, stage)
        self.encoder.activate("shared")
        self.projector.requires_grad_(True)

    def before_fit(self, task: int, stage: StageSpec, fit: FitContext, datamodule: Any) -> None:
        """Fill the bank with the projected features of every sample the stage's plan will serve."""
        super().before_fit(task, stage, fit, datamodule)
        dm = datamodule
        self.stage_pool = plan_indices(dm, fit.epochs)
        self.bank_index = self.stage_pool
        self.bank_feats = encode_records(self, dm, "train", self.bank_index, self.project, fit).to(fit.device)
        self.bank_labels = torch.tensor([dm.item("train", int(i))["label"] for i in self.bank_index], device=fit.device)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """The bank travels with the stage's checkpoints: a stage resumed mid-way contrasts against the same bank."""
        super().on_save_checkpoint(checkpoint)
        checkpoint["crl_bank"] = {"index": torch.as_tensor(self.bank_index), "feats": self.bank_feats.detach().cpu()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Put back the bank of the epoch the stage resumes after."""
        bank = checkpoint.get("crl_bank")
        if bank is not None:
            self.bank_index = bank["index"].numpy()
            self.bank_feats = bank["feats"].to(self.bank_feats.device)

    def memory_updated(self, ctx: RunContext, task: int, memory: MemoryView) -> None:
        """The episodic memory of every seen task, the prototype pool of CRL."""
        self.memory_pool = memory.memory_indices("train", range(task + 1))

    def end_task(self, task: int) -> None:
        """Prototypes for prediction, and the prototype similarities the next task distils."""
        super().end_task(task)
        self.compute_prototypes(task)

    # ------------------------------------------------------------------------------------------------ model
    def project(self, batch: dict[str, Any]) -> torch.Tensor:
        """Unit-norm projected feature of the mask hidden state."""
        return F.normalize(self.projector(self.represent(batch)), dim=-1)

    def memory_features(self, batch: dict[str, Any], kind: str) -> torch.Tensor:
        """k-means features: the mask hidden state (CRL's choice), or the projected feature for ``logits``."""
        return self.represent(batch) if kind == "hidden" else self.project(batch)

    def predict(self, batch: dict[str, Any]) -> torch.Tensor:
        """The class of the nearest prototype (squared Euclidean distance on the hidden state)."""
        if self.prototypes.numel() == 0:
            raise RuntimeError("CRL predicts with class prototypes, which exist only after the first task ends")
        z = self.represent(batch).float()
        dist = torch.cdist(z, self.prototypes.to(z.device)).pow(2)
        return self.proto_classes.to(z.device)[dist.argmin(dim=-1)]

    # ---------------------------------------------------------------------------------------------- training
    def contrastive_loss(self, f: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Supervised contrastive loss of ``f`` against the bank (a ``sample_k`` subset in stage 1)."""
        bank_f, bank_y = self.bank_feats, self.bank_labels
        if self.stage == "contrast" and len(bank_f) > self.options.sample_k:
            pick = torch.randperm(len(bank_f), device=bank_f.device)[: self.options.sample_k]
            bank_f, bank_y = bank_f[pick], bank_y[pick]
        log_prob = F.log_softmax(f @ bank_f.to(f.dtype).T / self.options.temperature, dim=-1)
        positive = (labels[:, None] == bank_y[None, :]).to(log_prob.dtype)
        n_pos = positive.sum(dim=-1)
        keep = n_pos > 0  # a sample with no positive in the contrast set has nothing to pull towards
        if not bool(keep.any()):
            return f.sum() * 0.0
        return (-(log_prob * positive).sum(dim=-1)[keep] / n_pos[keep]).mean()

    def distill_loss(self, f: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """KL from stored to current prototype similarities, on samples of old classes only.

        Compares the stored prototype-similarity row of a sample's class with its similarity to the bank's current
        old-class prototypes.
        """
        if self.prev_sim is None or not self.prev_classes:
            return f.sum() * 0.0
        old = torch.tensor(self.prev_classes, device=f.device)
        column = torch.full((self.num_classes,), -1, dtype=torch.long, device=f.device)
        column[old] = torch.arange(len(old), device=f.device)
        rows = column[labels]
        is_old = rows >= 0
        in_bank = column[self.bank_labels] >= 0
        if not bool(is_old.any()) or not bool(in_bank.any()):
            return f.sum() * 0.0
        bank_cols = column[self.bank_labels[in_bank]]
        sums = torch.zeros(len(old), f.shape[1], device=f.device).index_add_(0, bank_cols, self.bank_feats[in_bank])
        protos = F.normalize(sums, dim=-1)  # classes missing from the bank get a zero prototype (similarity 0)
        t = self.options.kl_temperature
        current = F.log_softmax(t * f[is_old] @ protos.to(f.dtype).T, dim=-1)
        target = F.softmax(t * self.prev_sim.to(f.device)[rows[is_old]], dim=-1)
        return F.kl_div(current, target.to(current.dtype), reduction="batchmean")

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        """Contrastive loss (+ distillation in the replay stage); the bank is refreshed after the step."""
        f = self.project(batch)
        labels = batch["labels"]
        loss = self.contrastive_loss(f, labels)
        if self.stage == "replay":
            kl = self.distill_loss(f, labels)
            self.log("train/kl", kl, batch_size=len(labels))
            loss = loss + kl
        self._pending = (batch["index"], f.detach())
        self.log(f"train/{self.stage}_loss", loss, prog_bar=True, batch_size=len(labels))
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Write the batch features into the bank (after backward, so the loss's bank was the old one)."""
        super().on_train_batch_end(outputs, batch, batch_idx)
        if self._pending is None:
            return
        index, feats = self._pending
        self._pending = None
        if self.trainer.world_size > 1:  # every rank keeps the same bank: gather all shards
            index, feats = self.all_gather(index).reshape(-1), self.all_gather(feats).reshape(-1, feats.shape[-1])
        rows = torch.as_tensor(np.searchsorted(self.bank_index, index.cpu().numpy()), device=self.bank_feats.device)
        self.bank_feats[rows] = feats.to(self.bank_feats.dtype)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """CRL selects no epoch and has no prototypes mid-task: nothing to validate."""

    def on_validation_epoch_end(self) -> None:
        """Nothing was validated."""

    # -------------------------------------------------------------------------------------------- prototypes
    def prototype_pool(self, task: int) -> np.ndarray:
        """Training indices whose class means are the prototypes (see ``CRLConfig.prototypes``)."""
        if self.options.prototypes == "memory":
            if self.memory_pool is None:
                raise RuntimeError("crl with prototypes: memory needs the episodic_memory callback")
            return self.memory_pool
        dm = self.datamodule_ref
        rng = np.random.default_rng(np.random.SeedSequence([self.cfg.seed, task, 11]))
        seeds = [self.stage_pool]
        for t in range(task + 1):
            idx = dm.indices("train", t)
            labels = np.asarray([dm.item("train", int(i))["label"] for i in idx])
            for c in np.unique(labels):
                members = idx[labels == c]
                seeds.append(rng.choice(members, min(self.options.min_sample_num, len(members)), replace=False))
        return np.unique(np.concatenate(seeds))

    def compute_prototypes(self, task: int) -> None:
        """Class means of the pool: hidden-state prototypes, and projected ones for the next task's distillation."""
        dm, ctx = self.datamodule_ref, self.fit_context
        pool = self.prototype_pool(task)
        both = encode_records(self, dm, "train", pool, lambda b: self._hidden_and_projected(b), ctx)
        h, f = both[:, : self.hidden_size], both[:, self.hidden_size :]
        labels = torch.tensor([dm.item("train", int(i))["label"] for i in pool])
        classes = [c for c in self.seen_classes if bool((labels == c).any())]
        self.prototypes = torch.stack([h[labels == c].mean(0) for c in classes])
        self.proto_classes = torch.tensor(classes, dtype=torch.long)
        proj = F.normalize(torch.stack([f[labels == c].mean(0) for c in classes]), dim=-1)
        self.prev_sim = proj @ proj.T
        self.prev_classes = classes

    def _hidden_and_projected(self, batch: dict[str, Any]) -> torch.Tensor:
        z = self.represent(batch)
        return torch.cat([z, F.normalize(self.projector(z), dim=-1)], dim=-1)
