"""EA-EMR and EA-EMR* (METHOD.md §3.4): EMR plus an applied embedding-alignment layer.

The alignment layer is fitted after each task and *applied* between the encoder and the head.

The head reads ``A(z)``, where ``z`` is the mask hidden state and ``A`` a ``Linear(h, h)`` (identity at the start, so
task 1 is plain EMR). ``A`` is frozen while a task trains. After task k, ``A`` is refitted by MSE so that the current
``z`` of stored samples maps onto their stored embeddings (what the head saw before), which undoes the drift of the
shared LoRA on old tasks:

- EA-EMR (with ``episodic_memory``): the stored samples are the training memory; a newly memorised sample's target
  is its embedding right after training task k; after the fit, every target is recomputed through the new ``A``.
- EA-EMR* (with ``dynamic_replay`` in cache mode): the stored samples are the task's replay stream; old samples'
  targets are embedded by the pre-task model before training (the cached sequence guarantees the same samples),
  new-task samples' targets are their embeddings right after training.

Deviation from ConPET (fidelity note §10.1): its LLaMA path trains the alignment but never applies it; here it is
applied (``apply_alignment: false`` restores the quirk). Each test records both the pre-alignment predictions
(``A_{k-1}``) and the post-alignment ones (``A_k``, which fill the accuracy matrix).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from conpet_lightning.config import RunConfig, require_choice, require_range
from conpet_lightning.contract import FitContext, MemoryView, RunContext, StageSpec
from conpet_lightning.data.records import Benchmark
from conpet_lightning.methods.static.emr import EMRConfig, EMRModule
from conpet_lightning.metrics.task_accuracy import TaskAccuracy
from conpet_lightning.models.backbone import LoadedBackbone
from conpet_lightning.passes import broadcast_from_rank0, encode_records, plan_indices
from conpet_lightning.registry import METHODS

ALIGN_INITS = ("identity", "default")


@dataclass
class EAEMRConfig(EMRConfig):
    """Options of EA-EMR / EA-EMR*."""

    name: str = "eaemr"
    apply_alignment: bool = True
    """Put the alignment layer before the head (EA-EMR); False reproduces ConPET's LLaMA path (never applied)."""
    align_init: str = "identity"
    """identity (task 1 is exactly EMR) | default (PyTorch's Linear initialisation)."""
    align_lr: float = 1e-4
    align_epochs: int = 20
    align_batch_size: int = 32

    def __post_init__(self) -> None:
        require_choice("align_init", self.align_init, ALIGN_INITS)
        require_range("align_lr", self.align_lr, low=0.0, open_low=True)
        require_range("align_epochs", self.align_epochs, low=0)
        require_range("align_batch_size", self.align_batch_size, low=1)


@METHODS.register("eaemr")
class EAEMRModule(EMRModule):
    """EMR with an alignment layer ``A`` between the encoder and the head; see the module docstring."""

    options_cls: type = EAEMRConfig

    def __init__(self, cfg: RunConfig, benchmark: Benchmark, backbone: LoadedBackbone) -> None:
        super().__init__(cfg, benchmark, backbone)
        self.align = nn.Linear(self.hidden_size, self.hidden_size)
        if self.options.align_init == "identity":
            with torch.no_grad():
                self.align.weight.copy_(torch.eye(self.hidden_size))
                self.align.bias.zero_()
        self.align_before = nn.Linear(self.hidden_size, self.hidden_size)
        """``A`` as it was when the task started: the pre-alignment predictions use it."""
        self.align_before.load_state_dict(self.align.state_dict())
        for p in [*self.align.parameters(), *self.align_before.parameters()]:
            p.requires_grad_(False)
        self.targets: dict[int, torch.Tensor] = {}
        """EA-EMR: training-memory index -> stored embedding (CPU)."""
        self.stream_targets: dict[int, torch.Tensor] = {}
        """EA-EMR*: old replayed index -> its embedding by the pre-task model (CPU)."""
        self.uses_memory = False
        self.stream_epochs = 1
        self.pre_acc = TaskAccuracy(self.num_tasks)
        self.records: dict[int, dict[str, Any]] = {}

    # ------------------------------------------------------------------------------------------------- model
    def head_input(self, batch: dict[str, Any]) -> torch.Tensor:  # type: ignore[override]
        """``A(z)``: the aligned mask hidden state (``z`` itself with ``apply_alignment: false``)."""
        z = self.represent(batch)
        return self.align(z) if self.options.apply_alignment else z

    # --------------------------------------------------------------------------------------------- lifecycle
    def setup_task(self, task: int) -> None:
        """The task starts from the last alignment; keep a copy for the pre-alignment test."""
        super().setup_task(task)
        self.align_before.load_state_dict(self.align.state_dict())
        self.stream_targets = {}
        self.records[task] = {}

    def use_memory(self, memory: MemoryView) -> None:
        """EA-EMR: an episodic memory holds the stored samples (EA-EMR* without one aligns on the replay stream)."""
        self.uses_memory = True

    def before_fit(self, task: int, stage: StageSpec, fit: FitContext, datamodule: Any) -> None:
        """EA-EMR*, first stage of task k >= 2: embed the old samples of the replay stream with the pre-task model."""
        super().before_fit(task, stage, fit, datamodule)
        if self.uses_memory or task == 0 or self.stream_targets:
            return
        dm = datamodule
        self.stream_epochs = fit.epochs
        stream = plan_indices(dm, self.stream_epochs)
        old = stream[~np.isin(stream, dm.indices("train", self.task))]
        if len(old):
            emb = encode_records(self, dm, "train", old, self.head_input, self.fit_context)
            self.stream_targets = dict(zip(old.tolist(), emb, strict=True))

    def end_task(self, task: int) -> None:
        """EA-EMR*: fit the alignment on the replay stream (EA-EMR waits for its memory: ``memory_updated``)."""
        super().end_task(task)
        if self.uses_memory or self.datamodule_ref is None:
            return
        dm = self.datamodule_ref
        if task == 0:
            self.records[task]["fit"] = {"samples": 0, "note": "task 1 has no old samples: A unchanged"}
            return
        stream = plan_indices(dm, self.stream_epochs)
        z = self._hidden(stream)
        old = dict(self.stream_targets)
        new = self._aligned(z)  # the new task's samples keep what the head saw at the end of training
        y = torch.stack([old.get(i, new[row]) for row, i in enumerate(stream.tolist())])
        self.records[task]["fit"] = self.fit_alignment(z, y, task)

    def memory_updated(self, ctx: RunContext, task: int, memory: MemoryView) -> None:
        """EA-EMR: after the memory of task k is picked, fit ``A`` on the whole training memory, then re-store."""
        indices = memory.memory_indices("train", range(task + 1))
        if len(indices) == 0:
            return
        z = self._hidden(indices)
        current = self._aligned(z)
        y = torch.stack([self.targets.get(i, current[row]) for row, i in enumerate(indices.tolist())])
        if task > 0:
            self.records[task]["fit"] = self.fit_alignment(z, y, task)
        else:
            self.records[task]["fit"] = {"samples": int(len(indices)), "note": "task 1: targets stored, A unchanged"}
        self.targets = dict(zip(indices.tolist(), self._aligned(z), strict=True))

    # --------------------------------------------------------------------------------------------- alignment
    def _hidden(self, indices: np.ndarray) -> torch.Tensor:
        return encode_records(self, self.datamodule_ref, "train", indices, self.represent, self.fit_context)

    def _aligned(self, z: torch.Tensor) -> torch.Tensor:
        if not self.options.apply_alignment:
            return z.clone()
        with torch.no_grad():
            return self.align(z.to(self.align.weight.device)).float().cpu()

    def fit_alignment(self, z: torch.Tensor, y: torch.Tensor, task: int) -> dict[str, Any]:
        """Fit ``A`` by MSE from current embeddings ``z`` to stored targets ``y`` (Adam, mini-batches, seeded)."""
        o = self.options
        device = (self.fit_context or FitContext.cpu()).device
        z, y = z.to(device), y.to(device)
        self.align.to(device)
        params = list(self.align.parameters())
        opt = torch.optim.Adam(params, lr=o.align_lr)
        gen = torch.Generator().manual_seed(self.cfg.seed + task)
        with torch.no_grad():
            before = float(F.mse_loss(self.align(z), y))
        with torch.enable_grad():
            for p in params:
                p.requires_grad_(True)
            for _ in range(o.align_epochs):
                for rows in torch.randperm(len(z), generator=gen).split(o.align_batch_size):
                    rows = rows.to(device)
                    opt.zero_grad()
                    F.mse_loss(self.align(z[rows]), y[rows]).backward()
                    opt.step()
            for p in params:
                p.requires_grad_(False)
        state = broadcast_from_rank0({k: v.cpu() for k, v in self.align.state_dict().items()})
        self.align.load_state_dict(state)
        with torch.no_grad():
            after = float(F.mse_loss(self.align(z), y))
        return {"samples": int(len(z)), "mse_before": float(f"{before:.4g}"), "mse_after": float(f"{after:.4g}")}

    # -------------------------------------------------------------------------------------------------- test
    def on_test_epoch_start(self) -> None:
        """Fresh pre-alignment counts."""
        self.pre_acc.reset()

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, torch.Tensor]:
        """Post-alignment predictions for the accuracy matrix; pre-alignment ones counted on the side."""
        z = self.represent(batch)
        unseen = ~self.seen_class_mask(z.device)
        if self.options.apply_alignment:
            post, pre = self.head(self.align(z)), self.head(self.align_before(z))
        else:
            post = pre = self.head(z)
        self.pre_acc.update(pre.masked_fill(unseen, float("-inf")).argmax(-1), batch["labels"], batch["task_ids"])
        return {"preds": post.masked_fill(unseen, float("-inf")).argmax(-1)}

    def on_test_epoch_end(self) -> None:
        """Keep the pre-alignment result of this task's test."""
        result = self.pre_acc.compute()
        per_task = torch.atleast_1d(result["per_task"]).tolist()[: self.task + 1]  # torchmetrics squeezes one task
        self.records.setdefault(self.task, {})["pre_alignment"] = {
            "acc_macro": round(float(result["macro"]), 4),
            "acc_micro": round(float(result["micro"]), 4),
            "per_task": [round(float(v), 4) for v in per_task],
        }

    def task_record(self, task: int) -> dict[str, Any]:
        """The alignment fit and the pre-alignment test result, for metrics.json."""
        return {"alignment": self.records.get(task, {})}
