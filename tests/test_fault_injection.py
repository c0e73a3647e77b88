"""Fault injection: a run killed at any point and resumed ends with the uninterrupted run's R and weights, bit for bit.

Kills are raised from inside the run (a callback or a file write raising ``Killed``), which leaves the run folder as
a real kill would at that point: the finished tasks' files, and inside a stage Lightning's checkpoint of the last
completed epoch. ``TaskLoop.resume`` then rebuilds everything from the folder in fresh objects. The fast cases run in
``make test``; every experiment x kill point runs in ``make test-slow``.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from conpet_lightning import runfiles
from conpet_lightning.callbacks.base import TaskCallback
from conpet_lightning.loop import TaskLoop
from conpet_lightning.runfiles import DiskFullError
from tests.helpers import TINY, tiny_loop

NUM_TASKS = 3
EPOCHS = "train.epochs=2"


class Killed(Exception):
    """Stands for the process dying at this point."""


class KillAt(TaskCallback):
    """Raises ``Killed`` at a chosen point: after task ``task``'s test, or at the start of ``epoch`` of a stage."""

    def __init__(self, task: int, stage: str | None = None, epoch: int = 1) -> None:
        self.task, self.stage, self.epoch = task, stage, epoch

    def on_task_evaluated(self, ctx: Any, task: int) -> None:
        if self.stage is None and task == self.task:
            raise Killed(f"after task {task}")

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        if (pl_module.task, pl_module.stage, trainer.current_epoch) == (self.task, self.stage, self.epoch):
            raise Killed(f"task {self.task} stage {self.stage} epoch {self.epoch}")


def _run(experiment: str, folder: Path, kill: TaskCallback | None = None) -> TaskLoop:
    loop = tiny_loop(experiment, folder, EPOCHS, num_tasks=NUM_TASKS)
    if kill is not None:
        loop.callbacks.append(kill)
    loop.run()
    return loop


def _state(loop: TaskLoop) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in loop.method.state_dict().items()}


def _assert_same(resumed: TaskLoop, reference: TaskLoop, out: dict[str, Any]) -> None:
    ref = reference.write_metrics()
    assert out["accuracy_matrix"] == ref["accuracy_matrix"]
    a, b = _state(resumed), _state(reference)
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert different == []


@pytest.fixture(scope="module")
def references(tmp_path_factory: pytest.TempPathFactory) -> dict[str, TaskLoop]:
    """Uninterrupted runs, one per experiment, built on first use."""
    cache: dict[str, TaskLoop] = {}

    class Lazy(dict):
        def __missing__(self, experiment: str) -> TaskLoop:
            cache[experiment] = _run(experiment, tmp_path_factory.mktemp(f"ref-{experiment}"))
            return cache[experiment]

    return Lazy()


def _kill_and_resume(experiment: str, tmp_path: Path, kill: TaskCallback) -> tuple[TaskLoop, dict[str, Any]]:
    with pytest.raises(Killed):
        _run(experiment, tmp_path, kill)
    run_dir = tmp_path / experiment / "run"
    resumed = TaskLoop.resume(run_dir)
    return resumed, resumed.run()


def _case_id(value: object) -> str:
    return f"{value.task}-{value.stage}" if isinstance(value, KillAt) else str(value)


FAST = [
    ("naive", KillAt(task=1)),
    ("dynamic_conpet", KillAt(task=1, stage="selector")),
    ("dynamic_conpet", KillAt(task=2, stage="expert")),
]
SLOW = [
    (exp, kill)
    for exp, stages in (
        ("naive", ("train",)),
        ("emr", ("train",)),
        ("eaemr_star", ("train",)),
        ("crl_star", ("contrast", "replay")),
        ("dynamic_conpet", ("selector", "expert")),
        ("limitless", ("selector", "expert")),
    )
    for kill in [KillAt(task=0), KillAt(task=1), *(KillAt(task=1, stage=s) for s in stages)]
]


@pytest.mark.parametrize(("experiment", "kill"), FAST, ids=_case_id)
def test_resume_after_a_kill_is_exact(experiment, kill, references, tmp_path):
    resumed, out = _kill_and_resume(experiment, tmp_path, kill)
    _assert_same(resumed, references[experiment], out)


@pytest.mark.slow
@pytest.mark.parametrize(("experiment", "kill"), SLOW, ids=_case_id)
def test_resume_after_a_kill_is_exact_for_every_experiment(experiment, kill, references, tmp_path):
    resumed, out = _kill_and_resume(experiment, tmp_path, kill)
    _assert_same(resumed, references[experiment], out)


def test_a_kill_inside_a_stage_continues_from_its_last_epoch(tmp_path):
    """The killed stage is not redone: its checkpoint of epoch 1 exists and the resumed fit starts after it."""
    with pytest.raises(Killed):
        _run("naive", tmp_path, KillAt(task=1, stage="train"))
    run_dir = tmp_path / "naive" / "run"
    assert (run_dir / "checkpoints" / "task2" / "train" / "last.ckpt").is_file()
    epochs_run: list[int] = []

    class Count(TaskCallback):
        def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
            if pl_module.task == 1:
                epochs_run.append(trainer.current_epoch)

    resumed = TaskLoop.resume(run_dir)
    resumed.callbacks.append(Count())
    resumed.run()
    assert epochs_run == [1]
    assert not (run_dir / "checkpoints" / "task2" / "train" / "last.ckpt").exists()  # final.pt marks it done


@pytest.mark.parametrize("target", ["metrics.json", "final.pt"])
def test_a_full_disk_at_a_run_file_write_leaves_a_resumable_run(target, references, tmp_path, monkeypatch):
    """The second write of ``target`` hits a full disk: the previous file stays whole and the run resumes exactly."""
    real_replace = runfiles.os.replace
    seen = {"n": 0}

    def replace(src: str, dst: str) -> None:
        if Path(dst).name == target:
            seen["n"] += 1
            if seen["n"] == 2:
                raise OSError(errno.ENOSPC, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(runfiles.os, "replace", replace)
    with pytest.raises(DiskFullError, match="disk is full"):
        _run("naive", tmp_path)
    monkeypatch.setattr(runfiles.os, "replace", real_replace)
    run_dir = tmp_path / "naive" / "run"
    resumed = TaskLoop.resume(run_dir)
    _assert_same(resumed, references["naive"], resumed.run())


@pytest.mark.slow
def test_kill_9_during_a_real_run_then_resume_gives_the_uninterrupted_r(tmp_path):
    """``conpet run`` killed by SIGKILL soon after its first task, then ``conpet resume``: the same R, bit for bit."""
    args = [*TINY, "data.num_tasks=3", EPOCHS, "logging.wandb=false"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def conpet(*argv: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "conpet_lightning.cli", *argv], env=env)

    assert conpet("run", "dynamic_conpet", *args, f"output_dir={tmp_path / 'a'}", "run_id=ref").wait(900) == 0
    victim = conpet("run", "dynamic_conpet", *args, f"output_dir={tmp_path / 'b'}", "run_id=killed")
    metrics = tmp_path / "b" / "dynamic_conpet" / "killed" / "metrics.json"
    deadline = time.time() + 900
    while not metrics.is_file() and victim.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    victim.send_signal(signal.SIGKILL)
    victim.wait(60)
    assert conpet("resume", str(metrics.parent)).wait(900) == 0
    ref = json.loads((tmp_path / "a" / "dynamic_conpet" / "ref" / "metrics.json").read_text())
    assert json.loads(metrics.read_text())["accuracy_matrix"] == ref["accuracy_matrix"]


def test_a_kill_in_a_later_stage_does_not_redo_the_finished_stages_of_its_task(references, tmp_path):
    """Killed inside task 2's expert stage: the resume loads task 2's selector stage and trains no selector epoch."""
    with pytest.raises(Killed):
        _run("dynamic_conpet", tmp_path, KillAt(task=1, stage="expert"))
    trained: list[tuple[int, str, int]] = []

    class Count(TaskCallback):
        def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
            trained.append((pl_module.task, pl_module.stage, trainer.current_epoch))

    resumed = TaskLoop.resume(tmp_path / "dynamic_conpet" / "run")
    resumed.callbacks.append(Count())
    out = resumed.run()
    assert [t for t in trained if t[0] == 1] == [(1, "expert", 1)]  # only the expert's second epoch is left
    ref = references["dynamic_conpet"].write_metrics()
    assert out["per_task"][1]["stages"]["selector"]["steps"] == ref["per_task"][1]["stages"]["selector"]["steps"]
    _assert_same(resumed, references["dynamic_conpet"], out)


@pytest.mark.parametrize("head_epochs", [0, 1], ids=["selector", "selector+head"])
def test_resume_with_a_shared_optimizer_is_exact(tmp_path, head_epochs):
    """The selector's Adam moments travel with its stage weights: a kill inside the expert stage resumes exactly,
    also when a selector_head stage (which carries no moments) lies between the selector and the expert."""
    shared = ("method.shared_optimizer=true", f"method.selector_head_epochs={head_epochs}")
    reference = tiny_loop("dynamic_conpet", tmp_path / "ref", EPOCHS, *shared, num_tasks=NUM_TASKS)
    reference.run()
    killed = tiny_loop("dynamic_conpet", tmp_path / "k", EPOCHS, *shared, num_tasks=NUM_TASKS)
    killed.callbacks.append(KillAt(task=1, stage="expert", epoch=0))
    with pytest.raises(Killed):
        killed.run()
    resumed = TaskLoop.resume(killed.run_dir)
    _assert_same(resumed, reference, resumed.run())


def test_a_run_in_a_relative_output_dir_finishes(tmp_path, monkeypatch):
    """The default ``output_dir=runs`` is relative: stage records must not assume an absolute run folder."""
    from conpet_lightning.cli import main

    monkeypatch.chdir(tmp_path)
    args = [*TINY, "data.num_tasks=2", "output_dir=runs", "run_id=rel"]
    assert main(["run", "naive", *args]) == 0
    saved = json.loads((tmp_path / "runs" / "naive" / "rel" / "metrics.json").read_text())
    assert saved["per_task"][0]["stages"]["train"]["best_checkpoint"] == "checkpoints/task1/train/best.ckpt"
