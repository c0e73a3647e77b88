"""StageDataCallback: the replay stage of a two-stage method gets fresh epochs from the task's plan, however many."""

from __future__ import annotations

from types import SimpleNamespace

from conpet_lightning.callbacks.stage_data import StageDataCallback
from conpet_lightning.contract import StageSpec


class FakeDataModule:
    """Just the plan-installing surface of ContinualDataModule."""

    def __init__(self) -> None:
        self.plan_fn = lambda epoch: [[100 + epoch]]
        self.info = "replay plan"
        self.valid: list[list[int]] | None = [[7]]

    def installed_train_plan(self):  # noqa: ANN201
        return self.plan_fn, self.info

    def set_train_plan(self, plan_fn, info: str) -> None:  # noqa: ANN001
        self.plan_fn, self.info = plan_fn, info

    def valid_plan(self) -> list[list[int]]:
        return self.valid or []

    def set_valid_plan(self, plan: list[list[int]] | None) -> None:
        self.valid = plan

    @property
    def train_plan_info(self) -> str:
        return self.info

    def train_plan(self, epoch: int) -> list[list[int]]:
        return self.plan_fn(epoch)

    def indices(self, part: str, task: int) -> list[int]:
        return [1, 2, 3]

    batch_size = 2


class TwoStages:
    """A CRL-like method: a contrastive stage on the current task, then a replay stage."""

    stages_ = [StageSpec("contrast", 1), StageSpec("replay", 1)]

    def stages(self, task: int) -> list[StageSpec]:
        return self.stages_

    def stage_data(self, task: int, stage: StageSpec) -> str:
        return "current" if stage.name == "contrast" else "replay"


def test_replay_stage_draws_every_epoch_its_step_budget_needs() -> None:
    dm = FakeDataModule()
    ctx = SimpleNamespace(datamodule=dm, method=TwoStages(), seed=1)
    cb = StageDataCallback()
    cb.on_task_start(ctx, 0)
    cb.on_stage_start(ctx, 0, StageSpec("contrast", 1, steps=3))
    assert dm.info == "current task"
    # an equal step budget can make the one-epoch replay stage iterate 4 epochs: each must be its own draw
    cb.on_stage_start(ctx, 0, StageSpec("replay", 1, steps=40))
    assert [dm.train_plan(e) for e in range(4)] == [[[100]], [[101]], [[102]], [[103]]]
    assert dm.info == "replay plan" and dm.valid == [[7]]
