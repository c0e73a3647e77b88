"""Every shipped experiment runs two tasks end to end on a tiny model (as lightning-hydra-template's test_sweeps)."""

from __future__ import annotations

import pytest

from conpet_lightning.config import experiment_names
from tests.helpers import tiny_loop


@pytest.mark.parametrize("experiment", experiment_names())
def test_every_experiment_runs_two_tasks(experiment, tmp_path):
    out = tiny_loop(experiment, tmp_path).run()
    assert len(out["accuracy_matrix"]) == 2 and all(v is not None for v in out["accuracy_matrix"][1])
    assert out["summary"]["budget_steps"] > 0 and out["summary"]["budget_samples_trainable"] > 0
    for record in out["per_task"]:
        assert record["stages"], record["task"]
        for stage in record["stages"].values():
            assert stage["budget"]["steps"] == stage["steps"] > 0


@pytest.mark.parametrize("experiment", experiment_names())
def test_a_one_task_run_works(experiment, tmp_path):
    out = tiny_loop(experiment, tmp_path, num_tasks=1).run()
    assert len(out["accuracy_matrix"]) == 1 and out["accuracy_matrix"][0][0] is not None


def test_a_llama_architecture_decoder_through_dynamic_conpet(tmp_path):
    loop = tiny_loop("dynamic_conpet", tmp_path, "model.backbone=tiny-llama", num_tasks=3)
    assert loop.backbone.is_decoder
    out = loop.run()
    assert len(out["accuracy_matrix"]) == 3
    assert out["per_task"][2]["selector"]["confusion"] and out["per_task"][2]["stages"]["selector"]["steps"] > 0


def test_top2_routing_sends_some_samples_to_two_experts(tmp_path):
    out = tiny_loop("dynamic_top2", tmp_path, num_tasks=3).run()
    panel = out["per_task"][2]["selector"]
    assert panel["topk"] == 2 and panel["topk_hit_rate"] > panel["acc_micro"]  # the second pick finds some


def test_equal_steps_per_task_give_every_method_the_same_steps(tmp_path):
    steps = {}
    for experiment in ("emr", "emr_star", "dynamic_conpet", "crl_star"):
        out = tiny_loop(experiment, tmp_path / experiment, "train.steps_per_task=12").run()
        steps[experiment] = [sum(s["steps"] for s in t["stages"].values()) for t in out["per_task"]]
    assert all(v == [12, 12] for v in steps.values()), steps
