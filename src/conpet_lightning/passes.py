"""Helpers shared by the static methods and the memory callbacks: where to run feature passes, and how.

Work between stages (memory selection, EA-EMR alignment, CRL prototypes, the EWC Fisher) runs outside any Trainer,
after Lightning's teardown has moved the module back to the CPU. ``FitContext`` remembers the device and precision
plugin of the last fit so that those passes run where training ran (the GPU at ``scale=paper``), not on the CPU.
This module imports nothing from ``callbacks`` so both sides can use it without an import cycle.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import nn

from conpet_lightning.methods.base import eval_mode

#: What data a stage trains on (a method's ``stage_data(task, stage)``; default ``replay``):
#: ``current`` = the current task alone, ``replay`` = current task + stored history, ``memory`` = stored samples only.
STAGE_DATA = ("current", "replay", "memory")


@dataclass
class FitContext:
    """Device and precision plugin of the last fit, so between-stage passes run where training ran."""

    device: torch.device
    precision: Any = None
    """The Trainer's precision plugin (its ``forward_context`` is the autocast of ``16-mixed``), or None."""

    @classmethod
    def from_trainer(cls, trainer: L.Trainer, module: nn.Module) -> FitContext:
        """Record the module's device and the Trainer's precision plugin (call from ``on_fit_start``)."""
        device = next(module.parameters()).device
        return cls(device=device, precision=getattr(trainer, "precision_plugin", None))

    def forward_context(self) -> Any:
        """The precision plugin's autocast context (a no-op in 32-bit)."""
        return self.precision.forward_context() if self.precision is not None else nullcontext()


def fit_context_of(*candidates: Any) -> FitContext:
    """The first recorded ``FitContext`` among the candidates, else the CPU in fp32 (nothing was fitted yet)."""
    for ctx in candidates:
        if isinstance(ctx, FitContext):
            return ctx
    return FitContext(torch.device("cpu"))


def batch_to(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Move the tensors of a collated batch to ``device`` (the string keys stay)."""
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def encode_records(
    module: nn.Module,
    datamodule: Any,
    part: str,
    indices: Sequence[int] | np.ndarray,
    fn: Callable[[dict[str, Any]], torch.Tensor],
    ctx: FitContext | None = None,
) -> torch.Tensor:
    """``fn(batch)`` over the given records of ``part``, in order: a float32 CPU tensor ``[len(indices), d]``.

    The module runs in eval mode without gradient on ``ctx.device`` (moved there if needed) and stays there
    afterwards, since the next Trainer puts it on that device anyway.
    """
    ctx = ctx or FitContext(torch.device("cpu"))
    indices = np.asarray(indices, dtype=np.int64)
    if indices.size == 0:
        raise ValueError(f"encode_records: no {part} records to encode")
    module.to(ctx.device)
    out = []
    with torch.no_grad(), eval_mode(module), ctx.forward_context():
        for batch in datamodule.loader_for(part, indices):
            out.append(fn(batch_to(batch, ctx.device)).float().cpu())
    return torch.cat(out)


def plan_indices(datamodule: Any, epochs: int) -> np.ndarray:
    """Sorted unique training indices that the installed plan serves over ``epochs`` epochs (the replay stream)."""
    items = [i for e in range(max(epochs, 1)) for batch in datamodule.train_plan(e) for i in batch]
    return np.unique(np.asarray(items, dtype=np.int64))


def stage_data_kind(method: Any, task: int, stage: Any) -> str:
    """What a stage trains on, from the method's ``stage_data`` (``replay`` when it does not say)."""
    fn = getattr(method, "stage_data", None)
    kind = fn(task, stage) if fn is not None else "replay"
    if kind not in STAGE_DATA:
        raise ValueError(f"{type(method).__name__}.stage_data returned {kind!r}; expected one of {STAGE_DATA}")
    return kind


def broadcast_from_rank0(obj: Any) -> Any:
    """Rank 0's copy of a picklable object under an initialised process group (a decision made once), else ``obj``."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        holder = [obj]
        torch.distributed.broadcast_object_list(holder, src=0)
        return holder[0]
    return obj
