"""Distillation towards a frozen copy of a previous model (LwF, Li & Hoiem 2017): its loss and its output cache.

Used by ``lwf`` (the shared adapter and head) and by Dynamic ConPET's ``selector_distill`` (the selector).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from conpet_lightning.passes import take_rows


def soft_target_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Cross-entropy of the student's tempered softmax against the teacher's, averaged over the batch."""
    target = F.softmax(teacher.float() / temperature, dim=-1)
    return -(target * F.log_softmax(student.float() / temperature, dim=-1)).sum(-1).mean()


class TeacherCache:
    """A frozen teacher's outputs by sample key: computed once per sample while the teacher stays the same.

    ``compute`` maps a sub-batch to the teacher's outputs; ``clear`` when the teacher changes (a new task).
    """

    def __init__(self, compute: Callable[[dict[str, Any]], torch.Tensor]) -> None:
        self.compute = compute
        self.outputs: dict[str, torch.Tensor] = {}
        self.last_hits = 0
        self.last_misses = 0
        """Rows of the last call served from the cache and computed (a training budget counts them)."""

    def clear(self) -> None:
        """Forget every output (the teacher changed)."""
        self.outputs.clear()

    def __call__(self, batch: dict[str, Any], device: torch.device) -> torch.Tensor:
        """The teacher's outputs for the batch's samples ``[B, ...]`` on ``device``; only unseen keys are computed."""
        keys = batch["keys"]
        missing = [i for i, k in enumerate(keys) if k not in self.outputs]
        self.last_hits, self.last_misses = len(keys) - len(missing), len(missing)
        if missing:
            rows = torch.tensor(missing, device=batch["input_ids"].device)
            with torch.no_grad():
                out = self.compute(take_rows(batch, rows)).float().cpu()
            for j, i in enumerate(missing):
                self.outputs[keys[i]] = out[j]
        return torch.stack([self.outputs[k] for k in keys]).to(device)
