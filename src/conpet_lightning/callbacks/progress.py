"""A progress bar that says which task and stage is training."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar


class TaskProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar with ``task k/K · stage · epoch e`` as its description."""

    def __init__(self, task: int, num_tasks: int, stage: str, refresh_rate: int = 1) -> None:
        super().__init__(refresh_rate=refresh_rate)
        self.label = f"task {task + 1}/{num_tasks} · {stage}"

    def on_train_epoch_start(self, trainer: L.Trainer, *args: object) -> None:
        """Name the epoch with the task and stage."""
        super().on_train_epoch_start(trainer, *args)
        self.train_progress_bar.set_description(f"{self.label} · epoch {trainer.current_epoch}")
