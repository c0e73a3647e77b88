"""Per-task cost of ``dynamic_conpet`` over 10 tasks: training time (last task over task 2), peak memory (after the
last task over after task 1), and the heap the process holds (the same ratio, freed memory left out).

One real run through the task loop in a fresh subprocess, so the peak resident memory (VmHWM) is the run's own. A
callback reads the peak after every task and times every training step. Task 2 is the first task with both stages
(selector and expert) on the fixed dynamic-replay budget, so tasks 2..10 run the same number of steps; a growing
ratio is cost that grows with the number of experts. Both ratios come from one run; the time ratio cannot be
interleaved (task 10 comes after task 2), so the median per-step ratio is reported beside it as a check.

Why two memory ratios: the peak (VmHWM) also counts memory the allocators keep after it is freed (glibc's heap);
the heap in use (``mallinfo2``) leaves that out, and the live tensors count what the run holds in tensors. The CPU
kernels keep state per input shape (about 1.8 MiB of heap per new (rows, tokens) shape of a bf16 MiniLM forward), and
routed passes meet new row counts task after task; ``conpet_lightning.native_memory`` caps those caches and hands free
heap pages back after every stage and test, so the heap in use stays flat from task 2. Task 1 is smaller by
construction (no selector yet: its LoRA, its stage and the routed test start at task 2), so each memory entry also
reports its ratio over task 2 in its details.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

from bench.common import heap_in_use_mb, peak_rss_mb, ratio_entry, run_child, size_overrides
from conpet_lightning.native_memory import KERNEL_CACHE_ENV

TIME_TARGET = 1.05
MEMORY_TARGET = 1.05
#: Small caps: per task (k >= 2) 16 selector and 16 expert steps of batch 8, one epoch each.
CAPS = {
    "small": ["data.max_train_per_class=8", "callbacks.replay.batch_limit=20", "method.selector_epochs=1"],
    "tiny": ["callbacks.replay.batch_limit=5", "method.selector_epochs=1"],
}
TASKS = {"small": 10, "tiny": 3}


def live_tensor_mb() -> float:
    """MiB of the distinct tensor storages the garbage collector can reach (parameters, caches, optimizer state)."""
    import torch

    seen: dict[int, int] = {}
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and obj.device.type == "cpu":
            storage = obj.untyped_storage()
            seen.setdefault(storage.data_ptr(), storage.nbytes())
    seen.pop(0, None)
    return sum(seen.values()) / 2**20


def child(out: Path, overrides: list[str]) -> None:
    """Run the experiment here, recording the peak RSS after each task and each training step's duration."""
    import lightning as L

    from conpet_lightning.callbacks.base import TaskCallback
    from conpet_lightning.config import load_config
    from conpet_lightning.loop import TaskLoop

    class Probe(TaskCallback):
        def __init__(self) -> None:
            self.peak_mb: list[float] = []
            self.heap_mb: list[float | None] = []
            self.tensor_mb: list[float] = []
            self.step_seconds: dict[int, list[float]] = {}
            self._start = 0.0

        def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
            self._start = time.perf_counter()

        def on_train_batch_end(
            self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
        ) -> None:
            self.step_seconds.setdefault(pl_module.task, []).append(time.perf_counter() - self._start)

        def on_task_evaluated(self, loop: TaskLoop, task: int) -> None:
            self.peak_mb.append(round(peak_rss_mb(), 1))
            gc.collect()
            heap = heap_in_use_mb()
            self.heap_mb.append(None if heap is None else round(heap, 1))
            self.tensor_mb.append(round(live_tensor_mb(), 1))

    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config("dynamic_conpet", [f"output_dir={tmp}", *overrides])
        loop = TaskLoop(cfg, Path(tmp) / "run")
        probe = Probe()
        loop.callbacks.append(probe)
        metrics = loop.run()
    out.write_text(
        json.dumps(
            {
                "train_seconds": [t["train_seconds"] for t in metrics["per_task"]],
                "train_steps": [t["train_steps"] for t in metrics["per_task"]],
                "expert_cache_entries": [t.get("expert_cache_entries") for t in metrics["per_task"]],
                "peak_rss_mb": probe.peak_mb,
                "heap_in_use_mb": probe.heap_mb,
                "live_tensor_mb": probe.tensor_mb,
                "median_step_seconds": [
                    round(statistics.median(probe.step_seconds.get(t, [0.0])), 4) for t in range(len(probe.peak_mb))
                ],
                "acc_macro": metrics["summary"].get("acc_macro"),
                "kernel_cache_capacity": {name: os.environ.get(name) for name in KERNEL_CACHE_ENV},
            }
        )
    )


def run(size: str = "small", threads: int = 1) -> list[dict[str, Any]]:
    """One subprocess run; its ratio entries (training time, peak memory, heap in use where glibc tells it)."""
    tasks = TASKS[size]
    overrides = [*size_overrides(size, threads), f"data.num_tasks={tasks}", *CAPS[size]]
    r = run_child("bench.task_cost", overrides, threads)
    secs, steps, peak, heap = r["train_seconds"], r["train_steps"], r["peak_rss_mb"], r["heap_in_use_mb"]
    conditions = {
        "size": size,
        "experiment": "dynamic_conpet, FewRel",
        "tasks": tasks,
        "overrides": overrides,
        "torch_threads": threads,
        "process": "one fresh subprocess for the run",
    }
    memory = {
        "heap_in_use_mb_after_each_task": heap,
        "live_tensor_mb_after_each_task": r["live_tensor_mb"],
        "kernel_cache_capacity": r["kernel_cache_capacity"],
    }
    step_ratio = r["median_step_seconds"][-1] / max(r["median_step_seconds"][1], 1e-9)
    return [
        ratio_entry(
            "task_time_last_over_task2",
            secs[-1] / secs[1],
            TIME_TARGET,
            "<=",
            what=f"dynamic_conpet training seconds of task {tasks} over task 2 (selector + expert stages, equal steps)",
            conditions=conditions,
            details={
                "train_seconds": secs,
                "train_steps": steps,
                "equal_steps": steps[-1] == steps[1],
                "median_step_seconds": r["median_step_seconds"],
                "median_step_ratio_last_over_task2": round(step_ratio, 4),
                "expert_cache_entries": r["expert_cache_entries"],
                "acc_macro": r["acc_macro"],
                "process_wall_seconds": r["process_wall_seconds"],
            },
        ),
        ratio_entry(
            "peak_memory_last_over_task1",
            peak[-1] / peak[0],
            MEMORY_TARGET,
            "<=",
            what=f"peak resident memory (VmHWM) after task {tasks} over after task 1, dynamic_conpet",
            conditions=conditions,
            details={
                "peak_rss_mb_after_each_task": peak,
                "ratio_last_over_task2": round(peak[-1] / peak[1], 4),
                **memory,
            },
        ),
        *(
            []
            if None in heap
            else [
                ratio_entry(
                    "heap_in_use_last_over_task1",
                    heap[-1] / heap[0],
                    MEMORY_TARGET,
                    "<=",
                    what=f"heap in use (glibc mallinfo2, freed memory left out) after task {tasks} over after task 1",
                    conditions=conditions,
                    details={"ratio_last_over_task2": round(heap[-1] / heap[1], 4), **memory},
                )
            ]
        ),
    ]


def main() -> None:
    """``--child OUT overrides...``: the subprocess side; otherwise print the tiny run's entries."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", type=Path)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    if args.child is not None:
        child(args.child, args.overrides)
    else:
        print(json.dumps(run(size="tiny"), indent=2))


if __name__ == "__main__":
    main()
