"""Shared test helpers: tiny, fast configurations of real experiments."""

from __future__ import annotations

import os
import subprocess
import sys
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
    "train.steps_per_task=null",  # one epoch per stage; the equal-budget tests set their own steps
    "logging.progress_bar=false",
    "logging.wandb=false",  # the dashboard tests switch it on
    "train.num_threads=1",  # tiny models gain nothing from a second thread, and lose much when the CPU is busy
    "train.precision=32-true",  # exact checks recompute in fp32; the CPU default's bf16 has its own test
]


def tiny_config(experiment: str, tmp_path: Path, *overrides: str, num_tasks: int = 2) -> RunConfig:
    """A real experiment file, cut down to a tiny model and a few tasks."""
    extra = ["callbacks.replay.batch_limit=5"] if "replay" in load_config(experiment).callbacks else []
    return load_config(experiment, [*TINY, f"data.num_tasks={num_tasks}", f"output_dir={tmp_path}", *extra, *overrides])


def tiny_loop(experiment: str, tmp_path: Path, *overrides: str, num_tasks: int = 2) -> TaskLoop:
    """A TaskLoop over a tiny config, writing into tmp_path."""
    cfg = tiny_config(experiment, tmp_path, *overrides, num_tasks=num_tasks)
    return TaskLoop(cfg, tmp_path / cfg.experiment / "run")


def run_world(driver_text: str, folder: Path, world: int, timeout: int = 900) -> None:
    """Run a DDP driver script (``driver.py REPO OUT WORLD``) as its own process tree: ``world`` gloo ranks on CPU."""
    driver = folder.parent / "driver.py"
    driver.write_text(driver_text)
    folder.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("LOCAL_RANK", None)
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, str(driver), str(repo), str(folder), str(world)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
