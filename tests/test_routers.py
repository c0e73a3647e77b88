"""Router callbacks on a tiny Dynamic ConPET run: valid routes and panels, no test information, training statistics."""

from __future__ import annotations

import random

import pytest
import torch

from conpet_lightning.callbacks.base import TaskCallback
from conpet_lightning.callbacks.routers import EnergyRoutingCallback, PrototypeRoutingCallback, RerankRoutingCallback
from conpet_lightning.callbacks.routing import TopKRoutingCallback
from conpet_lightning.config import ConfigError, load_config
from conpet_lightning.evaluate import eval_config
from conpet_lightning.loop import TaskLoop
from conpet_lightning.routing.scores import mahalanobis_task_scores
from conpet_lightning.run_folder import RunFolder
from tests.helpers import tiny_config, tiny_loop

NUM_TASKS = 3
ROUTERS = {
    "selector": ["callbacks.routing.preset=selector"],
    "prototype_expert": ["callbacks.routing=prototype"],
    "prototype_backbone": ["callbacks.routing=prototype", "callbacks.routing.features=backbone"],
    "prototype_selector_euclid": [
        "callbacks.routing=prototype",
        "callbacks.routing.features=selector",
        "callbacks.routing.metric=euclidean",
    ],
    "prototype_backbone_first_layer_mean": [
        "callbacks.routing=prototype_backbone",
        "callbacks.routing.layers=1",
        "callbacks.routing.pooling=mean",
    ],
    "prototype_backbone_shallow": ["callbacks.routing=prototype_backbone_shallow"],
    "energy": ["callbacks.routing=energy"],
    "max_logit": ["callbacks.routing=energy", "callbacks.routing.kind=max_logit"],
    "rerank": ["callbacks.routing=rerank"],
    "rerank_prototype": ["callbacks.routing=rerank", "callbacks.routing.base=prototype"],
}


class Predictions(TaskCallback):
    """Each test sample's prediction and route, by sample key."""

    def __init__(self) -> None:
        self.preds: dict[str, int] = {}
        self.tasks: dict[str, int] = {}

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        for key, pred, task in zip(batch["keys"], outputs["preds"].tolist(), batch["task_ids"].tolist(), strict=True):
            self.preds[key] = pred
            self.tasks[key] = task


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished tiny 3-task dynamic_conpet run (selector on), whose experts every router re-tests."""
    loop = tiny_loop("dynamic_conpet", tmp_path_factory.mktemp("routers"), num_tasks=NUM_TASKS)
    loop.run()
    return loop.run_dir


def rebuilt(run_dir, overrides, tmp_path):
    """The run rebuilt from its saved weights with a router swapped in (what ``conpet eval`` does), all tasks done."""
    loop = TaskLoop(eval_config(run_dir, overrides), tmp_path / "eval")
    loop.folder = RunFolder(run_dir)
    for cb in loop.callbacks:
        cb.on_run_start(loop.ctx)
    for task in range(NUM_TASKS):
        loop.train_task(task, rebuild=True)
    return loop


def router_of(loop):
    return next(cb for cb in loop.callbacks if "router" in cb.provides)


@pytest.mark.parametrize("name", list(ROUTERS))
def test_router_gives_valid_routes_and_a_panel_and_uses_no_test_task_ids(trained, tmp_path, name):
    loop = rebuilt(trained, ROUTERS[name], tmp_path)
    router, last = router_of(loop), NUM_TASKS - 1
    record = Predictions()
    loop.callbacks.append(record)
    loop.evaluate(last)
    panel = router.task_record(last)["selector"]
    n_test = sum(len(loop.datamodule.indices("test", t)) for t in range(NUM_TASKS))
    assert sum(map(sum, panel["confusion"])) == n_test and len(panel["confusion"]) == NUM_TASKS
    assert 0 <= panel["acc_macro"] <= 100 and 0 <= panel["oracle_acc_macro"] <= 100
    if name != "selector":
        assert panel["passes_per_sample"] > 1 and panel["test_samples_per_s"] > 0
        assert panel["recency_bias"] is None or 0 <= panel["recency_bias"] <= 100
    seen = set(loop.method.seen_classes)
    assert set(record.preds.values()) <= seen and len(record.preds) == n_test
    first, first_tasks = dict(record.preds), dict(record.tasks)

    # permute the test samples' task ids: no prediction may change (routes come from the inputs alone)
    items = loop.datamodule.parts["test"].items
    tasks = [it["task"] for it in items]
    shuffled = tasks[:]
    random.Random(0).shuffle(shuffled)
    assert shuffled != tasks
    for it, t in zip(items, shuffled, strict=True):
        it["task"] = t
    if isinstance(router, TopKRoutingCallback):
        router.cache.clear()  # its per-key cache would otherwise answer the second test on its own
    record.preds.clear()
    loop.evaluate(last)
    assert record.preds == first
    assert record.tasks != first_tasks  # the test batches did carry the permuted task ids


def test_prototype_statistics_come_from_training_data_only(trained, tmp_path):
    loop = rebuilt(trained, ["callbacks.routing=prototype"], tmp_path)
    router = router_of(loop)
    assert isinstance(router, PrototypeRoutingCallback)
    dm = loop.datamodule
    per_task = router.prototypes.per_task
    assert len(per_task) == NUM_TASKS
    for t in range(NUM_TASKS):
        stats = per_task[t]
        assert stats.num_samples == len(dm.indices("train", t)) != len(dm.indices("valid", t))
        assert sorted(stats.class_ids) == sorted(loop.benchmark.tasks[t])
    # statistics, not samples: the state is means and one scatter per task, and it round-trips
    fresh = PrototypeRoutingCallback(router.options)
    fresh.load_state_dict(router.state_dict())
    batch = next(iter(dm.loader_for("test", dm.indices("test", 1))))
    assert torch.equal(fresh.scores(loop.method, batch), router.scores(loop.method, batch))


def test_backbone_features_of_the_first_layers_are_those_layers_hidden_states(trained, tmp_path):
    loop = rebuilt(trained, ["callbacks.routing=prototype_backbone"], tmp_path)
    method, dm = loop.method, loop.datamodule
    batch = next(iter(dm.loader_for("test", dm.indices("test", 0))))
    total = method.backbone_layers()
    with torch.no_grad(), method.encoder.model.disable_adapter():
        method.encoder.eval()
        full = method.encoder.model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True
        ).hidden_states
    rows = torch.arange(len(batch["keys"]))
    weights = batch["attention_mask"].float().unsqueeze(-1)
    for layers in range(1, total + 1):
        mask = method.backbone_features(batch, layers, "mask")
        assert torch.allclose(mask, full[layers][rows, batch["mask_pos"]].float(), atol=1e-5), layers
        mean = method.backbone_features(batch, layers, "mean")
        assert torch.allclose(mean, (full[layers].float() * weights).sum(1) / weights.sum(1), atol=1e-5), layers
    assert method.backbone_layers() == total  # the layer stack is whole again
    assert torch.equal(method.backbone_features(batch), method.backbone_features(batch, total, "mask"))
    # the router counts the share of a pass it computes
    router = PrototypeRoutingCallback(PrototypeRoutingCallback.options_cls(features="backbone", layers=1))
    router.on_run_start(loop.ctx)
    assert router.router_passes(NUM_TASKS) == pytest.approx(1 / total)


def test_depth_is_a_share_of_the_backbone_layers(trained, tmp_path):
    loop = rebuilt(trained, ["callbacks.routing=prototype_backbone_shallow"], tmp_path)
    router, method = router_of(loop), loop.method
    total = method.backbone_layers()
    layers = max(1, round(router.options.depth * total))
    assert router.prototypes.layers == layers
    assert router.router_passes(NUM_TASKS) == pytest.approx(layers / total)
    assert [router.layers_for(n) for n in (6, 30, 1)] == [4, 20, 1]  # MiniLM, SmolLM2, a one-layer backbone
    batch = next(iter(loop.datamodule.test_dataloader()))
    stats = router.prototypes.shared.finalize()
    expected = mahalanobis_task_scores(
        method.backbone_features(batch, layers, "mean"), stats, router.class_to_task, "mahalanobis", "max"
    )
    assert torch.equal(router.scores(method, batch), expected)


def test_backbone_layer_options_are_checked(trained, tmp_path):
    with pytest.raises(ConfigError, match="features=backbone only"):
        load_config("dynamic_conpet", ["callbacks.routing=prototype", "callbacks.routing.layers=2"])
    with pytest.raises(ConfigError, match="not both"):
        load_config("dynamic_conpet", ["callbacks.routing=prototype_backbone_shallow", "callbacks.routing.layers=2"])
    with pytest.raises(ConfigError, match="depth must be in"):
        load_config("dynamic_conpet", ["callbacks.routing=prototype_backbone", "callbacks.routing.depth=1.5"])
    loop = rebuilt(trained, ["callbacks.routing=prototype_backbone"], tmp_path)
    router = PrototypeRoutingCallback(PrototypeRoutingCallback.options_cls(features="backbone", layers=99))
    with pytest.raises(ConfigError, match="callbacks.routing.layers=99"):
        router.on_run_start(loop.ctx)


def test_shared_space_statistics_count_every_training_sample_once(trained, tmp_path):
    loop = rebuilt(trained, ["callbacks.routing=prototype", "callbacks.routing.features=backbone"], tmp_path)
    stats = router_of(loop).prototypes.shared
    dm = loop.datamodule
    assert stats.num_samples == sum(len(dm.indices("train", t)) for t in range(NUM_TASKS))
    assert stats.num_classes == sum(len(c) for c in loop.benchmark.tasks)


def test_energy_and_rerank_fit_one_temperature_per_expert(trained, tmp_path):
    energy = router_of(rebuilt(trained, ["callbacks.routing=energy"], tmp_path / "e"))
    rerank = router_of(rebuilt(trained, ["callbacks.routing=rerank"], tmp_path / "r"))
    assert isinstance(energy, EnergyRoutingCallback) and isinstance(rerank, RerankRoutingCallback)
    assert len(energy.temperatures) == len(rerank.temperatures) == NUM_TASKS
    assert energy.temperatures == pytest.approx(rerank.temperatures)
    assert all(t > 0 for t in energy.temperatures) and any(t != 1.0 for t in energy.temperatures)


def test_selector_free_router_trains_without_the_selector_stage(tmp_path):
    loop = tiny_loop(
        "dynamic_conpet", tmp_path, "method.selector=false", "callbacks.routing.preset=energy", num_tasks=NUM_TASKS
    )
    out = loop.run()
    assert all(list(t["stages"]) == ["expert"] for t in out["per_task"])
    assert loop.method.selector_head is None
    panel = out["per_task"][-1]["selector"]
    assert panel["router"] == "energy_routing" and sum(map(sum, panel["confusion"])) > 0


def test_routers_that_need_a_selector_refuse_a_run_without_one(tmp_path):
    for extra in (
        ["callbacks.routing.preset=selector"],
        ["callbacks.routing.preset=rerank"],
        ["callbacks.routing.preset=prototype", "callbacks.routing.features=selector"],
    ):
        with pytest.raises(ConfigError, match="selector=true"):
            tiny_config("dynamic_conpet", tmp_path, "method.selector=false", *extra)
    with pytest.raises(ConfigError, match="needs a router"):
        tiny_config("dynamic_conpet", tmp_path, "callbacks.routing=null")
    with pytest.raises(ConfigError, match="features"):
        tiny_config("dynamic_conpet", tmp_path, "callbacks.routing.preset=prototype", "callbacks.routing.features=cls")
