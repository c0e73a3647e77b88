"""Routed test throughput: Dynamic ConPET with 10 experts against a single adapter, with and without the expert cache.

One ``dynamic_conpet`` model is grown to 10 tasks (10 LoRA experts, their heads, the selector; untrained: the cost of
a forward pass does not depend on the weights); its router (the default, backbone prototypes from 2/3 of the layers)
fits each task's statistics at the task's end as in a run. The test set of all 10 tasks is served by the datamodule's
test loader (length-ordered batches), and five sides are timed interleaved over the same batches:

- ``single``: one adapter and an all-class head (what a shared-LoRA method such as ``naive`` runs at test time);
- ``routed``: the real routed path with empty caches: the run's router (``contract.Router.route``, a backbone
  pass and the class statistics for the default), then ``predict_from_route`` (one grouped forward per routed expert);
- ``routed_selector``: the same with ConPET's selector as the router (a selector pass instead of the backbone pass);
- ``routed_full``: the same routed by backbone prototypes from all layers (the ``prototype_backbone`` preset, the
  default before the 2/3-depth router: one backbone pass instead of 2/3 of one);
- ``routed_cached``: the default router with the frozen experts' head outputs already in the method's expert cache
  (keyed by expert and sample key; filled by an earlier test of the same samples), so only the router runs.

The routers are computed and timed, but on untrained weights their choices mean nothing; the experts get the gold
task as their route instead, which is what a good top-1 router approximates, so the batches split across experts as in
a real test.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from bench.common import built_loop, hook_target, interleaved, median, paired_ratio, ratio_entry, size_overrides

TARGET_ROUTED = 0.5
TARGET_CACHED = 0.9
FULL_PRESET = "prototype_backbone"
EXPERTS = 10
REPEATS = {"small": 3, "tiny": 3}
CAPS: dict[str, list[str]] = {"small": [], "tiny": []}


def grow(loop: Any, tasks: int, *routers: Any) -> None:
    """Give the method every task's stages (adapters, heads, selector rows) without training, then freeze them; the
    routers fit each task at its end, as in a run."""
    method, dm = loop.method, loop.datamodule
    for task in range(tasks):
        dm.set_task(task, method.train_scope)
        method.setup_task(task)
        for stage in method.stages(task):
            method.setup_stage(task, stage)
            method.end_stage(task, stage)
        method.end_task(task)
        for router in routers:
            router.on_task_end(hook_target(loop), task)
    method.eval()


def preset_router(loop: Any, overrides: list[str], name: str) -> Any:
    """The router of ``callbacks.routing=<name>`` (the config's own preset expansion and checks), started on the
    loop's method; the run's own router is attached again, since the method predicts with it."""
    from conpet_lightning.config import load_config
    from conpet_lightning.contract import Router
    from conpet_lightning.loop import build_callbacks

    cfg = load_config("dynamic_conpet", [*overrides, f"callbacks.routing={name}"])
    router = next(cb for cb in build_callbacks(cfg) if isinstance(cb, Router))
    default = loop.method.router
    router.on_run_start(hook_target(loop))
    loop.method.attach_router(default)
    return router


def run(size: str = "small", threads: int = 1) -> list[dict[str, Any]]:
    """Time the five sides; four ratio entries over single: routed by the default router, by the selector, by the
    full-depth router, and with the cache."""
    from conpet_lightning.callbacks.routing import TopKRoutingCallback
    from conpet_lightning.contract import Router

    overrides = [*size_overrides(size, threads), f"data.num_tasks={EXPERTS}", *CAPS[size]]
    with built_loop("dynamic_conpet", overrides) as loop:
        router = next(cb for cb in loop.callbacks if isinstance(cb, Router))
        selector = TopKRoutingCallback()  # ConPET's selector: ranks by the method's frozen selector, nothing to fit
        full = preset_router(loop, overrides, FULL_PRESET)
        grow(loop, EXPERTS, router, full)
        method, dm = loop.method, loop.datamodule
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

        def routed_pass(by: Any) -> float:
            by.on_task_start(hook_target(loop), EXPERTS - 1)  # forget cached routes
            start = time.perf_counter()
            with torch.no_grad():
                for b in batches:
                    by.route(method, b, train=False)  # the router's own passes, timed
                    method.predict_from_route(b, b["task_ids"][:, None])
            return time.perf_counter() - start

        def routed() -> float:
            method.expert_cache.clear()
            return routed_pass(router)

        def routed_selector() -> float:
            method.expert_cache.clear()
            return routed_pass(selector)

        def routed_full() -> float:
            method.expert_cache.clear()
            return routed_pass(full)

        def routed_cached() -> float:
            if not method.expert_cache:
                routed_pass(router)  # fill the cache once (untimed), as an earlier test of the same samples does
            return routed_pass(router)

        routed_cached()  # warm-up (and cache fill) before timing
        single()
        sides = {
            "single": single,
            "routed": routed,
            "routed_selector": routed_selector,
            "routed_full": routed_full,
            "routed_cached": routed_cached,
        }
        times = interleaved(sides, REPEATS[size])
        experts_per_batch = [len(torch.unique(b["task_ids"])) for b in batches]
        adapters = len(method.encoder.adapters)
    rate = {k: n / median(v) for k, v in times.items()}
    conditions = {
        "size": size,
        "backbone": "minilm" if size == "small" else "tiny-bert",
        "experts": EXPERTS,
        "router": loop.cfg.callbacks["routing"]["name"],
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
            what=f"routed test samples/s with {EXPERTS} experts (the default router + routed expert, no cache) over a "
            "single adapter",
            conditions=conditions,
            details=details,
        ),
        ratio_entry(
            "routed_inference_selector",
            paired_ratio(times, "single", "routed_selector"),
            TARGET_ROUTED,
            ">=",
            what=f"routed test samples/s with {EXPERTS} experts routed by ConPET's selector "
            "(callbacks.routing=selector, no cache) over a single adapter",
            conditions=conditions,
            details=details,
        ),
        ratio_entry(
            "routed_inference_full_backbone",
            paired_ratio(times, "single", "routed_full"),
            TARGET_ROUTED,
            ">=",
            what=f"routed test samples/s with {EXPERTS} experts routed by backbone prototypes from all layers "
            f"(callbacks.routing={FULL_PRESET}, no cache) over a single adapter",
            conditions={**conditions, "router": FULL_PRESET},
            details=details,
        ),
        ratio_entry(
            "routed_inference_cached",
            paired_ratio(times, "single", "routed_cached"),
            TARGET_CACHED,
            ">=",
            what=f"routed test samples/s with {EXPERTS} experts, frozen experts' outputs cached (the router only), "
            "over a single adapter",
            conditions=conditions,
            details=details,
        ),
    ]


if __name__ == "__main__":
    import json

    print(json.dumps(run(size="tiny"), indent=2))
