"""Passes of a module over stored records outside any Trainer: memory selection, EA-EMR alignment, CRL prototypes.

Work between stages runs after Lightning's teardown has moved the module back to the CPU; the ``FitContext`` of the
stage (``contract``) says where training ran, so these passes run there too (the GPU at ``scale=paper``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import nn

from conpet_lightning.contract import FitContext


@contextmanager
def eval_mode(module: torch.nn.Module) -> Iterator[None]:
    """Temporarily switch a module to eval mode (no dropout in frozen forwards; peft's ``adapter_names`` needs it)."""
    was = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was)


def take_rows(batch: dict[str, Any], rows: torch.Tensor) -> dict[str, Any]:
    """The sub-batch of some rows: tensors indexed, per-sample lists filtered, anything else kept."""
    idx = rows.tolist()
    return {
        n: v[rows] if torch.is_tensor(v) else [v[i] for i in idx] if isinstance(v, list) else v
        for n, v in batch.items()
    }


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
    ctx = ctx or FitContext.cpu()
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


def broadcast_from_rank0(obj: Any) -> Any:
    """Rank 0's copy of a picklable object under an initialised process group (a decision made once), else ``obj``."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        holder = [obj]
        torch.distributed.broadcast_object_list(holder, src=0)
        return holder[0]
    return obj
