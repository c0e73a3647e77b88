"""Evaluation padding: tokens the model processes (batch x longest row) over tokens it needs (the rows' lengths).

Counted on the datamodule's real loaders at the default ``dynamic_conpet`` configuration (FewRel, all caps as in
``make run``): every end-of-task test (task k tests tasks 1..k) and every validation plan that dynamic replay
installs. Pure data, no model: the ratio is exact and does not depend on the machine. Training batches (random
replay mixes, which cannot be reordered without changing the training) are reported beside it for information.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np

from bench.common import ratio_entry

TARGET = 1.10


def count(loader: Any) -> tuple[int, int]:
    """(processed, needed) tokens over a loader's batches."""
    processed = needed = 0
    for batch in loader:
        mask = batch["attention_mask"]
        processed += int(mask.numel())
        needed += int(mask.sum())
    return processed, needed


def run(size: str = "small", threads: int = 1) -> list[dict[str, Any]]:
    """Count the default run's evaluation batches; one ratio entry (``size=tiny`` uses the tiny caps)."""
    from conpet_lightning.callbacks.replay import DynamicReplayCallback, DynamicReplayOptions
    from conpet_lightning.config import load_config
    from conpet_lightning.data.datamodule import ContinualDataModule
    from conpet_lightning.loop import build_benchmark
    from conpet_lightning.models.backbone import load_backbone

    extra = ["model.backbone=tiny-bert", "data.max_train_per_class=4", "data.max_test_per_class=2"]
    cfg = load_config("dynamic_conpet", extra if size == "tiny" else [])
    built = build_benchmark(cfg)
    bench = built[0] if isinstance(built, tuple) else built  # (benchmark, task order) since the task_order option
    backbone = load_backbone(cfg.model.backbone)
    dm = ContinualDataModule(
        bench,
        backbone.tokenizer,
        backbone.markers,
        max_seq_len=cfg.data.max_seq_len,
        batch_size=cfg.train.batch_size,
        eval_batch_size=cfg.data.eval_batch_size,
        seed=cfg.seed,
        template_filter=cfg.data.template_filter,
    )
    replay_opts = dict(cfg.callbacks["replay"])
    replay = DynamicReplayCallback(
        DynamicReplayOptions(**{k: v for k, v in replay_opts.items() if k in DynamicReplayOptions.__dataclass_fields__})
    )
    shim = SimpleNamespace(datamodule=dm, cfg=cfg, seed=cfg.seed, benchmark=bench, num_tasks=bench.num_tasks)
    test = [0, 0]
    valid = [0, 0]
    train = [0, 0]
    for task in range(bench.num_tasks):
        dm.set_task(task, "current")
        replay.on_task_start(shim, task)  # type: ignore[arg-type]
        for acc, loader in ((test, dm.test_dataloader()), (valid, dm.val_dataloader()), (train, dm.train_dataloader())):
            p, n = count(loader)
            acc[0] += p
            acc[1] += n
    processed, needed = test[0] + valid[0], test[1] + valid[1]
    lengths = dm.lengths("test")
    return [
        ratio_entry(
            "eval_padding",
            processed / needed,
            TARGET,
            "<=",
            what="evaluation tokens processed (batch x longest row) over tokens needed, all end-of-task tests and "
            "validation plans of a default run",
            conditions={
                "config": "dynamic_conpet defaults (make run)" if size == "small" else "tiny caps",
                "tasks": bench.num_tasks,
                "eval_batch_size": cfg.data.eval_batch_size,
                "max_seq_len": cfg.data.max_seq_len,
                "machine_independent": True,
            },
            details={
                "test_ratio": round(test[0] / test[1], 4),
                "valid_ratio": round(valid[0] / valid[1], 4),
                "train_ratio_info": round(train[0] / max(train[1], 1), 4),
                "tokens": {"test": test, "valid": valid, "train_epoch0": train},
                "test_length_p50_p90_max": [
                    int(np.percentile(lengths, 50)),
                    int(np.percentile(lengths, 90)),
                    int(lengths.max()),
                ],
            },
        )
    ]


if __name__ == "__main__":
    import json

    print(json.dumps(run(size="tiny"), indent=2))
