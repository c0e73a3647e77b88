"""Routed test throughput: Dynamic ConPET with 10 experts against a single adapter, with and without the expert cache.

One ``dynamic_conpet`` model is grown to 10 tasks (10 LoRA experts, their heads, the selector; untrained: the cost of
a forward pass does not depend on the weights). The test set of all 10 tasks is served by the datamodule's test
loader (length-ordered batches), and three sides are timed interleaved over the same batches:

- ``single``: one adapter and an all-class head (what a shared-LoRA method such as ``naive`` runs at test time);
- ``routed``: the real routed path with empty caches: the frozen selector's top-1 ranking (the routing callback's
  ``ranking``), then ``predict_from_route`` (one grouped forward per routed expert);
- ``routed_cached``: the same, with the frozen experts' head outputs already in the method's expert cache (keyed by
  expert and sample key; filled by an earlier test of the same samples), so only the selector runs.

The selector is computed and timed, but its untrained ranking would send almost every sample to one expert; the
experts get the gold task as their route instead, which is what a trained top-1 selector approximates, so the
batches split across experts as in a real test.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from bench.common import built_loop, interleaved, median, paired_ratio, ratio_entry, size_overrides

TARGET_ROUTED = 0.5
TARGET_CACHED = 0.9
EXPERTS = 10
REPEATS = {"small": 3, "tiny": 3}
CAPS: dict[str, list[str]] = {"small": [], "tiny": []}


def grow(loop: Any, tasks: int) -> None:
    """Give the method every task's stages (adapters, heads, selector rows) without training, then freeze them."""
    method, dm = loop.method, loop.datamodule
    for task in range(tasks):
        dm.set_task(task, method.train_scope)
        method.setup_task(task)
        for stage in method.stages(task):
            method.setup_stage(task, stage)
            method.end_stage(task, stage)
        method.end_task(task)
    method.eval()


def run(size: str = "small", threads: int = 1) -> list[dict[str, Any]]:
    """Time the three sides; two ratio entries (routed, routed with cache) over single."""
    from conpet_lightning.callbacks.routing import TopKRoutingCallback

    overrides = [*size_overrides(size, threads), f"data.num_tasks={EXPERTS}", *CAPS[size]]
    with built_loop("dynamic_conpet", overrides) as loop:
        grow(loop, EXPERTS)
        method, dm = loop.method, loop.datamodule
        routing = next(cb for cb in loop.callbacks if isinstance(cb, TopKRoutingCallback))
        batches = list(dm.test_dataloader())
        n = sum(len(b["keys"]) for b in batches)
        torch.manual_seed(0)
        single_head = torch.nn.Linear(method.hidden_size, method.num_classes)
        method.encoder.activate("expert0", trainable=False)

        def single() -> float:
            start = time.perf_counter()
            with torch.no_grad():
                for b in batches:
                    single_head(method.represent(b)).argmax(-1)
            return time.perf_counter() - start

        def routed_pass() -> float:
            routing.cache.clear()
            start = time.perf_counter()
            with torch.no_grad():
                for b in batches:
                    routing.ranking(method, b)  # the frozen selector's forward, timed
                    method.predict_from_route(b, b["task_ids"][:, None])
            return time.perf_counter() - start

        def routed() -> float:
            method.expert_cache.clear()
            return routed_pass()

        def routed_cached() -> float:
            if not method.expert_cache:
                routed_pass()  # fill the cache once (untimed), as an earlier test of the same samples does
            return routed_pass()

        routed_cached()  # warm-up (and cache fill) before timing
        single()
        times = interleaved({"single": single, "routed": routed, "routed_cached": routed_cached}, REPEATS[size])
        experts_per_batch = [len(torch.unique(b["task_ids"])) for b in batches]
        adapters = len(method.encoder.adapters)
    rate = {k: n / median(v) for k, v in times.items()}
    conditions = {
        "size": size,
        "backbone": "minilm" if size == "small" else "tiny-bert",
        "experts": EXPERTS,
        "adapters_loaded": adapters,
        "test_samples": n,
        "eval_batch_size": loop.cfg.data.eval_batch_size,
        "batches": len(batches),
        "torch_threads": threads,
        "repeats": REPEATS[size],
        "statistic": "median over interleaved rounds (after a warm-up) of the round's samples/s ratio",
    }
    details = {
        "samples_per_second": {k: round(v, 2) for k, v in rate.items()},
        "seconds": {k: [round(x, 3) for x in v] for k, v in times.items()},
        "mean_experts_per_batch": round(sum(experts_per_batch) / len(experts_per_batch), 2),
    }
    return [
        ratio_entry(
            "routed_inference",
            paired_ratio(times, "single", "routed"),
            TARGET_ROUTED,
            ">=",
            what=f"routed test samples/s with {EXPERTS} experts (selector + routed expert, no cache) over a single "
            "adapter",
            conditions=conditions,
            details=details,
        ),
        ratio_entry(
            "routed_inference_cached",
            paired_ratio(times, "single", "routed_cached"),
            TARGET_CACHED,
            ">=",
            what=f"routed test samples/s with {EXPERTS} experts, frozen experts' outputs cached (selector only), "
            "over a single adapter",
            conditions=conditions,
            details=details,
        ),
    ]


if __name__ == "__main__":
    import json

    print(json.dumps(run(size="tiny"), indent=2))
