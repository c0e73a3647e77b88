"""Each deviation from ConPET is an option with ConPET's behaviour one override away (docs/deviations.md)."""

from __future__ import annotations

from typing import Any

import torch

from conpet_lightning.callbacks.base import TaskCallback
from conpet_lightning.methods.dynamic import expert_name
from tests.helpers import tiny_loop


class Served(TaskCallback):
    """The training batches of each (task, stage), and the selector's LoRA when task 2's selector stage starts."""

    def __init__(self) -> None:
        self.batches: dict[tuple[int, str], list[list[int]]] = {}
        self.selector_at_task2: dict[str, torch.Tensor] | None = None
        self.expert1: dict[str, torch.Tensor] | None = None

    def on_stage_start(self, ctx: Any, task: int, stage: Any) -> None:
        if (task, stage.name) == (1, "selector"):
            self.selector_at_task2 = ctx.method.encoder.adapter_state("selector")
            self.expert1 = ctx.method.encoder.adapter_state(expert_name(0))

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self.batches.setdefault((pl_module.task, pl_module.stage), []).append(batch["index"].tolist())


def _run(tmp_path, *overrides: str) -> tuple[dict[str, Any], Served]:
    loop = tiny_loop("dynamic_conpet", tmp_path, *overrides)
    served = Served()
    loop.callbacks.append(served)
    return loop.run(), served


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(a[k], b[k.replace("selector", expert_name(0))]) for k in a)


def test_conpet_behaviours_are_one_override_away(tmp_path):
    ours, served_ours = _run(tmp_path / "ours")
    conpet, served_conpet = _run(
        tmp_path / "conpet",
        "method.selector_init=conpet_llama",
        "callbacks.replay.redraw_per_stage=true",
        "train.zero_shot_validation=true",
    )
    # batches: one plan for both stages of a task here; ConPET draws each stage's own
    assert (
        served_ours.batches[(1, "selector")][: len(served_ours.batches[(1, "expert")])]
        == served_ours.batches[(1, "expert")][: len(served_ours.batches[(1, "selector")])]
    )
    assert served_conpet.batches[(1, "selector")] != served_conpet.batches[(1, "expert")]
    # the selector of task 2 starts from expert 1 here, from a fresh LoRA in ConPET's LLaMA path
    assert served_ours.selector_at_task2 is not None and served_conpet.selector_at_task2 is not None
    assert _same(served_ours.selector_at_task2, served_ours.expert1)
    assert not _same(served_conpet.selector_at_task2, served_conpet.expert1)
    # the step-0 candidate is validated and recorded only when asked for
    assert all("zero_shot_score" not in s for t in ours["per_task"] for s in t["stages"].values())
    assert all("zero_shot_score" in s for t in conpet["per_task"] for s in t["stages"].values())


def test_the_untrained_stage_is_kept_when_it_scores_at_least_as_well(tmp_path):
    out, _ = _run(tmp_path, "train.zero_shot_validation=true", "train.lr=1e-30")  # training changes nothing
    stage = out["per_task"][1]["stages"]["expert"]
    assert stage["kept_step0"] is True and stage["zero_shot_score"] == stage["best_score"]


class ValidTasks(TaskCallback):
    """The task ids of the validation batches of each task's training."""

    def __init__(self) -> None:
        self.tasks: dict[int, set[int]] = {}

    def on_validation_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int, *args: Any) -> None:
        self.tasks.setdefault(pl_module.task, set()).update(batch["task_ids"].tolist())


def _valid_tasks(tmp_path, experiment: str, *overrides: str) -> tuple[str, dict[int, set[int]]]:
    loop = tiny_loop(experiment, tmp_path, *overrides)
    seen = ValidTasks()
    loop.callbacks.append(seen)
    return loop.run()["valid_scope"], seen.tasks


def test_replay_free_methods_select_epochs_on_the_current_task_only(tmp_path):
    assert _valid_tasks(tmp_path / "naive", "naive") == ("current", {0: {0}, 1: {1}})
    assert _valid_tasks(tmp_path / "seen", "naive", "data.valid_scope=seen") == ("seen", {0: {0}, 1: {0, 1}})
    assert _valid_tasks(tmp_path / "star", "emr_star")[1][1] == {0, 1}  # replay keeps the old tasks' data


class OptimizerAtStart(TaskCallback):
    """How many of the expert stage's parameters start with Adam moments, per task."""

    def __init__(self) -> None:
        self.with_state: dict[int, int] = {}

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if pl_module.stage == "expert":
            self.with_state[pl_module.task] = len(trainer.optimizers[0].state)


def test_shared_optimizer_carries_the_selector_moments_into_the_expert_stage(tmp_path):
    counts = {}
    for name, extra in (("fresh", []), ("shared", ["method.shared_optimizer=true"])):
        loop = tiny_loop("dynamic_conpet", tmp_path / name, *extra, num_tasks=3)
        probe = OptimizerAtStart()
        loop.callbacks.append(probe)
        loop.run()
        counts[name] = probe.with_state
    lora = len([n for n, _ in loop.method.named_parameters() if ".selector." in n])
    assert counts["fresh"] == {0: 0, 1: 0, 2: 0}
    assert counts["shared"][0] == 0 and counts["shared"][1] == counts["shared"][2] == lora > 0


def test_shared_optimizer_needs_one_lora_slot():
    import pytest

    from conpet_lightning.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="method.shared_optimizer=True is not allowed"):
        load_config("dynamic_conpet", ["method.shared_optimizer=true", "method.expert_init=fresh"])
