"""Shared helpers of the benchmarks: a cut-down real run, and the results file."""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

RESULTS = Path(__file__).resolve().parent / "results"


def run_experiment(experiment: str, *overrides: str) -> dict[str, Any]:
    """Run an experiment through the real task loop in a temporary folder; returns its metrics.json content."""
    from conpet_lightning.config import load_config
    from conpet_lightning.loop import TaskLoop

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(experiment, [f"output_dir={tmp}", "logging.progress_bar=false", *overrides])
        return TaskLoop(cfg, Path(tmp) / experiment / "bench").run()


def write_result(name: str, result: dict[str, Any]) -> Path:
    """Write ``bench/results/<name>.json`` with the machine it ran on and when."""
    import torch

    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{name}.json"
    meta = {
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
    }
    out.write_text(json.dumps({"benchmark": name, **meta, **result}, indent=2))
    return out
