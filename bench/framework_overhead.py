"""Framework overhead: one stage through the real task loop against the same training in a bare PyTorch loop.

Framework side: ``TaskLoop.train_task`` of task 1 (its one stage), as a run calls it: a fresh Lightning Trainer with
the run's callbacks (dynamic replay plan, top-k routing, continual metrics, dashboard), the W&B logger offline, the
best-epoch and last-epoch checkpoints, restore, the stage's saved weights. Bare side: the same method object's
``training_step`` called by hand over the same plan's batches (the datamodule's ``collate``), ``loss.backward()``,
the same gradient clipping and a plain ``torch.optim.AdamW``, the run's precision (the stage Trainer's autocast,
``FitContext.forward_context``: bf16 at the CPU default), the same validation batches each epoch through
``method.predict``, and the best epoch kept in memory. Both start from the same trainable weights and seed, in one
process with one thread count, interleaved. Stage: task 1's expert stage of ``dynamic_conpet`` (FewRel). Ratio =
framework steps/s over bare steps/s.
"""

from __future__ import annotations

import time
import warnings
from typing import Any

import torch

from bench.common import (
    begin_stage,
    begin_task,
    built_loop,
    interleaved,
    median,
    paired_ratio,
    ratio_entry,
    size_overrides,
    unfreeze_first_expert,
)

TARGET = 0.95
EPOCHS = 2
REPEATS = {"small": 3, "tiny": 2}


def bare_fit(loop: Any, stage: Any) -> int:
    """The stage in plain PyTorch on the loop's own method and data; returns the number of optimizer steps."""
    import lightning as L

    from conpet_lightning.data.datamodule import collate

    method, dm, t = loop.method, loop.datamodule, loop.cfg.train
    L.seed_everything(loop.cfg.seed + len(stage.name), workers=True, verbose=False)
    params = [p for p in method.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=t.lr_for(method.task), weight_decay=t.weight_decay, eps=t.adam_eps)
    trainer, method._trainer = method._trainer, None  # a bare loop: self.log() becomes a no-op
    best, best_state, steps = -1.0, None, 0
    try:
        for epoch in range(stage.epochs):
            method.train()
            for i, indices in enumerate(dm.train_plan(epoch)):
                batch = collate([dm.item("train", j) for j in indices], dm.pad_id)
                with warnings.catch_warnings(), loop.ctx.fit.forward_context():  # the stage Trainer's autocast
                    warnings.simplefilter("ignore")  # self.log() without a Trainer warns, then does nothing
                    loss = method.training_step(batch, i)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if stage.grad_clip:
                    torch.nn.utils.clip_grad_norm_(params, stage.grad_clip)
                opt.step()
                steps += 1
            method.eval()
            correct = total = 0
            with torch.no_grad(), loop.ctx.fit.forward_context():
                for batch in dm.val_dataloader():
                    correct += int((method.predict(batch) == batch["labels"]).sum())
                    total += len(batch["keys"])
            acc = correct / max(total, 1)
            if acc > best:
                best, best_state = acc, method.trainable_state()
        if best_state is not None:
            method.load_state_dict(best_state, strict=False)
    finally:
        method._trainer = trainer
        method.train()
    return steps


def run(size: str = "small", threads: int = 1) -> list[dict[str, Any]]:
    """Measure both sides interleaved; one ratio entry."""
    overrides = [
        *size_overrides(size, threads),
        "data.num_tasks=2",
        f"train.epochs={EPOCHS}",
        "logging.wandb=true",
        "logging.wandb_mode=offline",
    ]
    with built_loop("dynamic_conpet", overrides) as loop:
        task = 0
        begin_task(loop, task)
        stage = loop.method.stages(task)[0]
        begin_stage(loop, task, stage)
        init = loop.method.trainable_state()
        assert [s.name for s in loop.method.stages(task)] == ["expert"], "task 1 is one stage"
        if loop.wandb_logger is not None:
            _ = loop.wandb_logger.experiment  # W&B starts once per run, not per stage: not part of a stage's cost
        steps: dict[str, int] = {}

        def framework() -> float:
            unfreeze_first_expert(loop.method)
            loop.method.load_state_dict(init, strict=False)
            start = time.perf_counter()
            record = loop.train_task(task)[stage.name]  # the loop's own code for task 1: its one stage
            seconds = time.perf_counter() - start
            steps["framework"] = record["steps"]
            return seconds

        def bare() -> float:
            unfreeze_first_expert(loop.method)
            loop.method.load_state_dict(init, strict=False)
            begin_task(loop, task)
            loop.method.setup_stage(task, stage)
            start = time.perf_counter()
            steps["bare"] = bare_fit(loop, stage)
            return time.perf_counter() - start

        framework()  # warm-up of both sides (first-call allocations, lazy imports), not timed
        bare()
        times = interleaved({"framework": framework, "bare": bare}, REPEATS[size])
        n_train = len(loop.datamodule.indices("train", task))
    fw, bare_s = median(times["framework"]), median(times["bare"])
    fw_rate, bare_rate = steps["framework"] / fw, steps["bare"] / bare_s
    # equal steps on both sides: the throughput ratio is bare seconds over framework seconds, per round
    ratio = paired_ratio(times, "bare", "framework") * steps["framework"] / steps["bare"]
    return [
        ratio_entry(
            "framework_throughput",
            ratio,
            TARGET,
            ">=",
            what="training steps/s of one stage through TaskLoop.train_task (Trainer, callbacks, replay plan, W&B "
            "offline, checkpoints) over the same stage in a bare PyTorch loop",
            conditions={
                "size": size,
                "backbone": "minilm" if size == "small" else "tiny-bert",
                "stage": "task 1 expert stage, dynamic_conpet, FewRel",
                "epochs": EPOCHS,
                "train_samples": n_train,
                "batch_size": loop.cfg.train.batch_size,
                "torch_threads": threads,
                "repeats": REPEATS[size],
                "statistic": "median of per-round ratios, rounds interleaved ABBA after one untimed warm-up each",
            },
            details={
                "steps": steps,
                "seconds": {k: [round(x, 3) for x in v] for k, v in times.items()},
                "median_steps_per_second": {"framework": round(fw_rate, 3), "bare": round(bare_rate, 3)},
                "ratio_of_best_times": round(min(times["bare"]) / min(times["framework"]), 4),
            },
        )
    ]


if __name__ == "__main__":
    import json

    print(json.dumps(run(size="tiny"), indent=2))
