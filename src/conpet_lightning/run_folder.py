"""The one writer of a run folder: config.yaml, metrics.json, accuracy_matrix.csv and each stage's weights.

Every file is written atomically (a temporary file in the same folder, then a rename: ``runfiles``), so a kill or a
full disk during a write leaves the previous complete file in place and the run resumable. Only global rank 0
writes; other ranks read.

Layout of a stage: ``checkpoints/task<k>/<stage>/final.pt`` (the stage's trained tensors, written once the stage
ends: it marks the stage done), ``best.ckpt`` (its best epoch so far) and ``last.ckpt`` (its last completed epoch
with the optimizer and loop state, so a run killed inside the stage continues from there).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lightning.pytorch.utilities import rank_zero_only

from conpet_lightning.runfiles import (
    RunFileError,
    atomic_torch_save,
    atomic_write_json,
    atomic_write_text,
    load_torch,
    read_json,
)

METRICS = "metrics.json"
CONFIG = "config.yaml"
MATRIX_CSV = "accuracy_matrix.csv"


def is_rank_zero() -> bool:
    """True in the process that writes the run folder: global rank 0 (Lightning's launcher sets the others' rank)."""
    return rank_zero_only.rank == 0


class RunFolder:
    """Paths and atomic writes of one run folder."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    # ------------------------------------------------------------------------------------------------ paths
    def stage_dir(self, task: int, stage: str) -> Path:
        """``checkpoints/task<k>/<stage>`` (1-based task in the name), created on first use."""
        folder = self.path / "checkpoints" / f"task{task + 1}" / stage
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def stage_weights(self, task: int, stage: str) -> Path:
        """The trained tensors a finished stage left (``final.pt``)."""
        return self.stage_dir(task, stage) / "final.pt"

    def stage_last(self, task: int, stage: str) -> Path:
        """Lightning's checkpoint of the stage's last completed epoch (``last.ckpt``)."""
        return self.stage_dir(task, stage) / "last.ckpt"

    # ----------------------------------------------------------------------------------------------- writes
    def write_config(self, text: str) -> None:
        """The resolved configuration."""
        if is_rank_zero():
            atomic_write_text(self.path / CONFIG, text, run_dir=self.path)

    def save_stage_weights(
        self, task: int, stage: str, state: dict[str, Any], record: dict[str, Any], extra: dict[str, Any]
    ) -> None:
        """A finished stage's trained tensors, extra state and ``metrics.json`` record; the stage now counts as done."""
        if is_rank_zero():
            payload = {"state_dict": state, "extra": extra, "record": json.dumps(record)}
            atomic_torch_save(payload, self.stage_weights(task, stage), run_dir=self.path)

    def stage_record(self, task: int, stage: str) -> dict[str, Any]:
        """The record a finished stage saved with its weights (how it trained: steps, budget, best epoch)."""
        saved = load_torch(self.stage_weights(task, stage), "stage weights")
        return json.loads(saved.get("record", "{}"))

    def write_metrics(self, metrics: dict[str, Any]) -> None:
        """metrics.json and accuracy_matrix.csv for the tasks finished so far."""
        if not is_rank_zero():
            return
        atomic_write_json(self.path / METRICS, metrics, run_dir=self.path)
        square = metrics["accuracy_matrix"]
        lines = [",".join(f"task{j + 1}" for j in range(len(square)))]
        lines += [",".join("" if v is None else f"{v:.2f}" for v in row) for row in square]
        atomic_write_text(self.path / MATRIX_CSV, "\n".join(lines) + "\n", run_dir=self.path)

    # ------------------------------------------------------------------------------------------------ reads
    def read_metrics(self) -> dict[str, Any] | None:
        """The metrics.json of the finished tasks, or None when no task finished yet."""
        path = self.path / METRICS
        if not path.is_file():
            return None
        metrics = read_json(path, "the run's metrics")
        if not isinstance(metrics, dict) or not isinstance(metrics.get("per_task"), list):
            raise RunFileError(f"{path} is corrupt or truncated (no per_task list)")
        return metrics
