"""Skipping replayed samples in Dynamic ConPET's expert stage: the same loss, a shorter step.

With top-1 routing and teacher forcing, replayed old samples go to frozen experts and give the current expert no
gradient; ``method.skip_frozen`` keeps them out of the trainable forward pass and serves their logits from the
expert cache. Measured side by side in one process on one model: the expert stage of the last task (FewRel, the
packaged MiniLM), its dynamic-replay batches (half new, half replayed), the route that top-1 teacher forcing gives
(the gold task), a plain AdamW with the stage's clipping. Each side starts from the same weights and seed and runs
the same batches; the sides alternate. The frozen experts' outputs are cached by an untimed pass first, as they are
after the first epoch of a real stage, so both sides serve frozen rows from the cache and differ only in the
trainable forward and backward. Validation (identical in both) is not part of the ratio; its share of a real stage
is in the details.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from bench.common import (
    begin_task,
    built_loop,
    interleaved,
    median,
    paired_ratio,
    ratio_entry,
    route_by_gold,
    size_overrides,
)

TARGET = 0.6
TASKS = 4
REPEATS = {"small": 5, "tiny": 3}
CAPS = {"small": ["callbacks.replay.batch_limit=25"], "tiny": ["callbacks.replay.batch_limit=5"]}


def run(size: str = "small", threads: int = 1) -> list[dict[str, Any]]:
    """Time the expert stage's training steps with and without skipping; one ratio entry."""
    import lightning as L

    from conpet_lightning.data.datamodule import collate
    from conpet_lightning.methods.base import eval_mode

    overrides = [*size_overrides(size, threads), f"data.num_tasks={TASKS}", *CAPS[size]]
    with built_loop("dynamic_conpet", overrides) as loop:
        method, dm = loop.method, loop.datamodule
        last = TASKS - 1
        for task in range(TASKS):
            begin_task(loop, task)
            stages = method.stages(task)
            for stage in stages:
                method.setup_stage(task, stage)
            if task < last:
                method.end_task(task)
        stage = stages[-1]
        assert stage.name == "expert"
        batches = []
        for indices in dm.train_plan(0):
            batch = collate([dm.item("train", i) for i in indices], dm.pad_id)
            route_by_gold(method, batch)  # top-1 with teacher forcing: the gold expert
            batches.append(batch)
        replayed = sum(int((b["task_ids"] != last).sum()) for b in batches)
        total = sum(len(b["keys"]) for b in batches)
        init = method.trainable_state()
        params = [p for p in method.parameters() if p.requires_grad]
        t = loop.cfg.train

        def steps(skip: bool) -> float:
            method.options.skip_frozen = skip
            method.load_state_dict(init, strict=False)
            method.train()
            L.seed_everything(0, verbose=False)
            opt = torch.optim.AdamW(params, lr=t.lr_for(last), weight_decay=t.weight_decay, eps=t.adam_eps)
            start = time.perf_counter()
            for batch in batches:
                loss = method.expert_loss(batch)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if stage.grad_clip:
                    torch.nn.utils.clip_grad_norm_(params, stage.grad_clip)
                opt.step()
            return time.perf_counter() - start

        steps(True)  # fills the expert cache with the frozen experts' outputs; warm-up
        steps(False)
        times = interleaved({"skip": lambda: steps(True), "full": lambda: steps(False)}, REPEATS[size])
        start = time.perf_counter()
        with torch.no_grad(), eval_mode(method):
            for batch in dm.val_dataloader():
                route_by_gold(method, batch)
                method.predict(batch)
        valid_seconds = time.perf_counter() - start
        method.options.skip_frozen = True
    skip, full = median(times["skip"]), median(times["full"])
    return [
        ratio_entry(
            "skip_frozen_expert_stage",
            paired_ratio(times, "skip", "full"),
            TARGET,
            "<=",
            what="expert-stage training seconds with replayed samples skipped (skip_frozen=true) over computed "
            "(skip_frozen=false), same batches and weights",
            conditions={
                "size": size,
                "backbone": "minilm" if size == "small" else "tiny-bert",
                "stage": f"expert stage of task {TASKS}, dynamic_conpet, FewRel, dynamic replay",
                "steps": len(batches),
                "batch_size": t.batch_size,
                "replayed_share": round(replayed / total, 3),
                "torch_threads": threads,
                "repeats": REPEATS[size],
                "statistic": "median of per-round ratios, rounds interleaved ABBA after one untimed warm-up each",
            },
            details={
                "seconds": {k: [round(x, 3) for x in v] for k, v in times.items()},
                "ratio_of_best_times": round(min(times["skip"]) / min(times["full"]), 4),
                "validation_seconds_once": round(valid_seconds, 3),
                "stage_ratio_with_one_validation": round((skip + valid_seconds) / (full + valid_seconds), 4),
            },
        )
    ]


if __name__ == "__main__":
    import json

    print(json.dumps(run(size="tiny"), indent=2))
