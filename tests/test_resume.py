"""A killed run resumes after its last finished task and ends exactly where an uninterrupted run ends."""

from __future__ import annotations

import json
import os
import signal

import pytest

from conpet_lightning.callbacks.base import TaskCallback
from conpet_lightning.cli import main
from conpet_lightning.config import ConfigError
from conpet_lightning.loop import TaskLoop
from conpet_lightning.methods.shared import NaiveModule
from tests.helpers import TINY, tiny_loop


class Kill(TaskCallback):
    """Stops the run when task ``at`` (0-based) starts, as a killed process would."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_task_start(self, loop, task):
        if task == self.at:
            raise KeyboardInterrupt(f"killed at task {task + 1}")


# The selector-training options keep state across tasks (a frozen teacher copy, a feature cache, a stage of its own).
SELECTOR_OPTIONS = (
    "method.selector_init=from_prev_selector",
    "method.selector_distill=1.0",
    "method.selector_head_epochs=1",
    "callbacks.replay.balanced_stages=[selector,selector_head]",
)


@pytest.mark.parametrize(
    ("experiment", "overrides"),
    [
        ("dynamic_conpet", ()),
        ("dynamic_conpet", ("callbacks.routing=selector",)),
        ("emr", ()),
        ("eaemr_star", ()),
        ("crl", ()),
        ("dynamic_conpet", SELECTOR_OPTIONS),
    ],
    ids=["dynamic_conpet", "dynamic_conpet-selector", "emr", "eaemr_star", "crl", "dynamic_conpet-selector_options"],
)
def test_resumed_run_matches_an_uninterrupted_one(tmp_path, experiment, overrides):
    whole = tiny_loop(experiment, tmp_path / "whole", *overrides, num_tasks=3).run()

    killed = tiny_loop(experiment, tmp_path / "killed", *overrides, num_tasks=3)
    killed.callbacks.insert(0, Kill(at=2))
    with pytest.raises(KeyboardInterrupt):
        killed.run()
    saved = json.loads((killed.run_dir / "metrics.json").read_text())
    assert len(saved["per_task"]) == 2  # tasks 1-2 were on disk when the run died

    out = TaskLoop.resume(killed.run_dir).run()
    assert out["accuracy_matrix"] == whole["accuracy_matrix"]
    assert [t["train_steps"] for t in out["per_task"]] == [t["train_steps"] for t in whole["per_task"]]
    assert out["per_task"][:2] == saved["per_task"]  # finished tasks keep their records
    assert json.loads((killed.run_dir / "metrics.json").read_text())["accuracy_matrix"] == out["accuracy_matrix"]


def test_resume_refuses_a_finished_run_and_a_folder_without_results(tmp_path, capsys):
    loop = tiny_loop("naive", tmp_path, num_tasks=1)
    loop.run()
    with pytest.raises(ConfigError, match="nothing to resume"):
        TaskLoop.resume(loop.run_dir)
    assert main(["resume", str(tmp_path / "nowhere")]) == 2
    assert "no such folder" in capsys.readouterr().err


def test_sigterm_exits_nonzero_and_the_run_resumes(tmp_path, monkeypatch, capsys):
    """Lightning turns SIGTERM into a SystemExit with no code (status 0); conpet must not report it as success."""
    original = NaiveModule.training_step

    def terminated(self, batch, batch_idx):
        if self.task == 1 and batch_idx == 0:
            os.kill(os.getpid(), signal.SIGTERM)  # as `kill <pid>` or a scheduler's preemption would
        return original(self, batch, batch_idx)

    monkeypatch.setattr(NaiveModule, "training_step", terminated)
    args = ["run", "naive", *TINY, "data.num_tasks=2", f"output_dir={tmp_path}", "run_id=r"]
    assert main(args) == 128 + signal.SIGTERM
    run_dir = tmp_path / "naive" / "r"
    assert f"conpet resume {run_dir}" in capsys.readouterr().err
    assert len(json.loads((run_dir / "metrics.json").read_text())["per_task"]) == 1  # task 1 is kept

    monkeypatch.setattr(NaiveModule, "training_step", original)
    assert main(["resume", str(run_dir)]) == 0
    assert len(json.loads((run_dir / "metrics.json").read_text())["accuracy_matrix"]) == 2
