"""Shared test helpers: tiny, fast configurations of real experiments."""

from __future__ import annotations

from pathlib import Path

from conpet_lightning.config import RunConfig, load_config
from conpet_lightning.loop import TaskLoop

TINY = [
    "model.backbone=tiny-bert",
    "data.max_train_per_class=4",
    "data.max_valid_per_class=2",
    "data.max_test_per_class=2",
    "data.max_seq_len=48",
    "train.epochs=1",
    "logging.progress_bar=false",
    "logging.wandb=false",  # the dashboard tests switch it on
    "train.num_threads=1",  # tiny models gain nothing from a second thread, and lose much when the CPU is busy
]


def tiny_config(experiment: str, tmp_path: Path, *overrides: str, num_tasks: int = 2) -> RunConfig:
    """A real experiment file, cut down to a tiny model and a few tasks."""
    extra = ["callbacks.replay.batch_limit=5"] if "replay" in load_config(experiment).callbacks else []
    return load_config(experiment, [*TINY, f"data.num_tasks={num_tasks}", f"output_dir={tmp_path}", *extra, *overrides])


def tiny_loop(experiment: str, tmp_path: Path, *overrides: str, num_tasks: int = 2) -> TaskLoop:
    """A TaskLoop over a tiny config, writing into tmp_path."""
    cfg = tiny_config(experiment, tmp_path, *overrides, num_tasks=num_tasks)
    return TaskLoop(cfg, tmp_path / cfg.experiment / "run")
