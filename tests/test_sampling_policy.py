"""Dynamic replay plans: batch composition, budgets, task balance, DDP sharding and plan determinism."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from scipy.stats import chisquare
from torch.utils.data import DataLoader, TensorDataset

from conpet_lightning.policies import DynamicReplayPolicy, PlanBatchSampler, replay_composition, shard


def make_pools(sizes: list[int]) -> list[np.ndarray]:
    """Disjoint consecutive index ranges, one per task; the last one is the current task."""
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    return [np.arange(s, s + n) for s, n in zip(starts, sizes)]


def owner_of(pools: list[np.ndarray]) -> dict[int, int]:
    return {int(i): t for t, p in enumerate(pools) for i in p}


@pytest.mark.parametrize(
    ("ratio", "batch_size", "n_new", "n_old"),
    [(1, 8, 4, 4), (3, 8, 6, 2), (-3, 8, 2, 6), (1, 32, 16, 16), (3, 32, 24, 8), (-3, 32, 8, 24), (0, 8, 0, 8)],
)
def test_batch_composition_counts(ratio: float, batch_size: int, n_new: int, n_old: int) -> None:
    policy = DynamicReplayPolicy(policy=2, batch_limit=50, new_old_ratio=ratio, seed=3)
    assert policy.composition(batch_size) == (n_new, n_old)
    pools = make_pools([200, 150, 300, 120])
    owner = owner_of(pools)
    plan = policy.train_plan(3, pools, batch_size, epoch=0)
    assert len(plan) == 40
    for batch in plan:
        assert len(batch) == batch_size
        new = [i for i in batch if owner[i] == 3]
        assert len(new) == n_new
        assert len(set(new)) == n_new  # no replacement within a batch for the current task
        assert sum(owner[i] < 3 for i in batch) == n_old
    comp = replay_composition(plan, pools)
    assert comp["batches"] == 40 and comp["samples"] == 40 * batch_size
    assert comp["new"] == 40 * n_new and comp["old"] == 40 * n_old
    assert sum(comp["old_per_task"].values()) == comp["old"] and set(comp["old_per_task"]) == {0, 1, 2}


@pytest.mark.parametrize("task", [1, 2, 5, 9])
def test_budgets_per_policy(task: int) -> None:
    pools = make_pools([30] * (task + 1))
    fixed = DynamicReplayPolicy(policy=2, batch_limit=400)
    growing = DynamicReplayPolicy(policy=1, batch_limit=400)
    unlimited = DynamicReplayPolicy(policy=0, batch_limit=400)
    assert fixed.num_train_batches(task, pools) == 320
    assert len(fixed.train_plan(task, pools, 8, 0)) == 320
    assert growing.num_train_batches(task, pools) == 320 * (task + 1)
    assert len(growing.train_plan(task, pools, 8, 0)) == 320 * (task + 1)
    # 0.2 * 400 is 79.99999999999999 in floats; the budget must still be 80 validation batches
    for policy in (fixed, growing):
        assert policy.num_valid_batches() == 80
        valid = policy.valid_plan(task, pools, 32)
        assert len(valid) == 80 and all(len(b) == 32 for b in valid)
    n = 30 * (task + 1)
    assert unlimited.num_train_batches(task, pools, batch_size=8) == -(-n // 8)
    assert len(unlimited.train_plan(task, pools, 8, 0)) == -(-n // 8)
    assert len(unlimited.valid_plan(task, pools, 32)) == -(-n // 32)


def test_budget_decimal_rounding() -> None:
    policy = DynamicReplayPolicy(policy=2, batch_limit=35, train_fraction=0.8)
    assert policy.num_train_batches(1, make_pools([5, 5])) == 28  # not 29 from 0.8 * 35 = 28.000000000000004
    assert policy.num_valid_batches() == 7


@pytest.mark.parametrize("policy_id", [0, 1, 2])
def test_task0_is_a_full_shuffled_epoch(policy_id: int) -> None:
    pool = np.arange(100, 203)  # 103 samples: 12 batches of 8 and a short one of 7
    policy = DynamicReplayPolicy(policy=policy_id, batch_limit=10, seed=1)
    plan = policy.train_plan(0, [pool], 8, 0)
    assert [len(b) for b in plan] == [8] * 12 + [7]
    flat = [i for b in plan for i in b]
    assert sorted(flat) == pool.tolist()
    assert flat != pool.tolist()  # shuffled
    assert policy.num_train_batches(0, [pool], batch_size=8) == 13
    dropped = DynamicReplayPolicy(policy=policy_id, batch_limit=10, drop_last=True).train_plan(0, [pool], 8, 0)
    assert [len(b) for b in dropped] == [8] * 12


def test_policy0_covers_the_union_exactly_once() -> None:
    pools = make_pools([17, 40, 5, 61])
    plan = DynamicReplayPolicy(policy=0, batch_limit=50, seed=4).train_plan(3, pools, 16, 2)
    counts = Counter(i for b in plan for i in b)
    assert set(counts) == set(range(123)) and set(counts.values()) == {1}


def test_old_slots_are_task_uniform_not_size_proportional() -> None:
    pools = make_pools([10, 100, 1000, 64])
    policy = DynamicReplayPolicy(policy=2, batch_limit=500, seed=0)
    plan = policy.train_plan(3, pools, 32, 0)  # 400 batches x 16 old slots = 6400 old samples
    per_task = replay_composition(plan, pools)["old_per_task"]
    observed = np.array([per_task[t] for t in range(3)])
    assert observed.sum() == 6400
    assert chisquare(observed).pvalue > 0.01  # uniform over tasks: 2133 expected each
    proportional = 6400 * np.array([10, 100, 1000]) / 1110
    assert chisquare(observed, proportional).pvalue < 1e-12  # sample-proportional sampling is clearly rejected
    # within a tiny old task, every sample gets replayed
    assert {i for b in plan for i in b if i < 10} == set(range(10))


def test_task_balanced_plan_gives_every_task_the_same_share_where_the_batch_split_cannot() -> None:
    # 10 seen tasks, batches of 8: a per-batch split at ratio 1/9 rounds the new task's slots down to none
    pools = make_pools([300, 40, 60, 200, 35, 90, 50, 45, 70, 400])
    owner = owner_of(pools)
    assert DynamicReplayPolicy(policy=2, batch_limit=50, new_old_ratio=1 / 9).composition(8) == (0, 8)
    balanced = DynamicReplayPolicy(policy=2, batch_limit=50, seed=5, task_balanced=True)
    plan = balanced.train_plan(9, pools, 8, epoch=0)
    assert len(plan) == 40 and all(len(b) == 8 for b in plan)
    counts = Counter(owner[i] for b in plan for i in b)
    assert sorted(counts) == list(range(10)) and max(counts.values()) - min(counts.values()) <= 1
    new = [i for b in plan for i in b if owner[i] == 9]
    assert len(new) == len(set(new))  # a pool with enough samples gives each at most once per epoch
    assert plan == balanced.train_plan(9, pools, 8, epoch=0) and plan != balanced.train_plan(9, pools, 8, epoch=1)
    # pools smaller than their share of the 64 slots (21 or 22 each) are served in whole passes: every sample of the
    # 5-sample pool 4 or 5 times, of the 3-sample pool 7 or 8 times (draws with replacement would scatter the counts)
    small = make_pools([5, 3, 200])
    plan = DynamicReplayPolicy(policy=2, batch_limit=10, seed=1, task_balanced=True).train_plan(2, small, 8, epoch=0)
    served = Counter(i for b in plan for i in b)
    assert {served[int(i)] for i in small[0]} <= {4, 5} and {served[int(i)] for i in small[1]} <= {7, 8}
    # the default mix gives the new task half of every batch instead
    mixed = DynamicReplayPolicy(policy=2, batch_limit=50, seed=5).train_plan(9, pools, 8, epoch=0)
    assert sum(owner[i] == 9 for b in mixed for i in b) == 160


def test_small_current_pool_and_empty_old_pools() -> None:
    policy = DynamicReplayPolicy(policy=2, batch_limit=20, seed=2)
    pools = [np.arange(0, 50), np.array([], dtype=np.int64), np.arange(50, 53)]  # current task has 3 < 16 new slots
    plan = policy.train_plan(2, pools, 32, 0)
    for batch in plan:
        assert sum(i >= 50 for i in batch) == 16  # drawn with replacement
        assert sum(i < 50 for i in batch) == 16  # the empty old pool is skipped, the other fills every old slot
    only_new = policy.train_plan(2, [np.array([], dtype=np.int64), np.array([], dtype=np.int64), np.arange(9)], 8, 0)
    assert all(len(b) == 8 and len(set(b)) == 8 for b in only_new)  # all old pools empty -> all-new batches


def test_plans_do_not_depend_on_world_size_or_global_rng() -> None:
    pools = make_pools([40, 70, 33])
    policy = DynamicReplayPolicy(policy=2, batch_limit=25, seed=7)
    np.random.seed(1)
    torch.manual_seed(1)
    plan = policy.train_plan(2, pools, 8, 1)
    np.random.seed(999)
    torch.manual_seed(999)
    assert DynamicReplayPolicy(policy=2, batch_limit=25, seed=7).train_plan(2, pools, 8, 1) == plan
    for batch in plan:
        assert shard(batch, 0, 2) + shard(batch, 1, 2) == batch
        assert shard(batch, 0, 1) == batch
        assert [i for r in range(4) for i in shard(batch, r, 4)] == batch
    with pytest.raises(ValueError, match="does not split evenly over 3 ranks"):
        shard(plan[0], 0, 3)


def test_plan_batch_sampler_two_ranks_cover_the_same_data_as_one() -> None:
    pools = make_pools([40, 70, 33])
    policy = DynamicReplayPolicy(policy=2, batch_limit=25, seed=7)
    dataset = TensorDataset(torch.arange(143))

    def plan_fn(epoch: int) -> list[list[int]]:
        return policy.train_plan(2, pools, 8, epoch)

    samplers = [PlanBatchSampler(plan_fn), PlanBatchSampler(plan_fn, 0, 2), PlanBatchSampler(plan_fn, 1, 2)]
    for epoch in (0, 1):
        loaders = []
        for sampler in samplers:
            sampler.set_epoch(epoch)
            loaders.append(DataLoader(dataset, batch_sampler=sampler))
        assert [len(loader) for loader in loaders] == [20, 20, 20]
        for (single,), (half0,), (half1,) in zip(*loaders):
            assert len(half0) == len(half1) == 4
            assert torch.equal(torch.cat([half0, half1]), single)
        assert [b for b in samplers[0]] == plan_fn(epoch)
    with pytest.raises(ValueError, match="rank 2"):
        PlanBatchSampler(plan_fn, rank=2, world_size=2)


def test_cache_mode_replays_and_fresh_mode_resamples() -> None:
    pools = make_pools([40, 70, 33])
    cached = DynamicReplayPolicy(policy=2, batch_limit=25, resample_every_epoch=False, seed=5)
    first = [cached.train_plan(2, pools, 8, e) for e in range(3)]
    assert first[0] != first[1] != first[2]  # epochs of one task still differ
    assert [cached.train_plan(2, pools, 8, e) for e in range(3)] == first  # re-iterating replays the sequence
    other = DynamicReplayPolicy(policy=2, batch_limit=25, resample_every_epoch=False, seed=5)
    assert other.train_plan(2, pools, 8, 2) == first[2]  # (seed, task) + epoch index, not call history
    fresh = DynamicReplayPolicy(policy=2, batch_limit=25, seed=5)
    assert fresh.train_plan(2, pools, 8, 0) != fresh.train_plan(2, pools, 8, 1)
    assert fresh.train_plan(2, pools, 8, 1) == fresh.train_plan(2, pools, 8, 1)
    assert DynamicReplayPolicy(policy=2, batch_limit=25, seed=6).train_plan(2, pools, 8, 0) != fresh.train_plan(
        2, pools, 8, 0
    )


def test_validation_plan_is_fixed_within_a_task() -> None:
    pools = make_pools([40, 70, 33])
    policy = DynamicReplayPolicy(policy=2, batch_limit=25, seed=5)
    valid = policy.valid_plan(2, pools, 8)
    assert len(valid) == 5
    for epoch in range(3):
        policy.train_plan(2, pools, 8, epoch)
        assert policy.valid_plan(2, pools, 8) == valid
    assert policy.valid_plan(3, pools + [np.arange(143, 180)], 8) != valid


def test_bad_inputs_raise_clear_errors() -> None:
    with pytest.raises(ValueError, match="policy 3"):
        DynamicReplayPolicy(policy=3, batch_limit=50)
    with pytest.raises(ValueError, match="no training batch"):
        DynamicReplayPolicy(policy=2, batch_limit=1)
    with pytest.raises(ValueError, match="exactly one pool"):
        DynamicReplayPolicy(policy=2, batch_limit=50).train_plan(0, make_pools([3, 3]), 2, 0)
    with pytest.raises(ValueError, match=r"pools\[1\]"):
        DynamicReplayPolicy(policy=2, batch_limit=50).train_plan(1, [np.arange(3), np.zeros((2, 2), dtype=int)], 2, 0)
    with pytest.raises(ValueError, match="needs batch_size"):
        DynamicReplayPolicy(policy=0, batch_limit=50).num_train_batches(2, make_pools([3, 3, 3]))
    with pytest.raises(ValueError, match="none of the pools"):
        replay_composition([[0, 99]], make_pools([3, 3]))


def test_lightning_trainer_serves_each_epochs_plan() -> None:
    import lightning as L  # noqa: N812

    pools = make_pools([40, 30])
    policy = DynamicReplayPolicy(policy=2, batch_limit=5, seed=1)

    def plan_fn(epoch: int) -> list[list[int]]:
        return policy.train_plan(1, pools, 4, epoch)

    seen: list[tuple[int, list[int]]] = []

    class Recorder(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(1, 1)

        def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
            seen.append((self.current_epoch, batch[0].tolist()))
            return self.layer(batch[0].float()[:, None]).sum()

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    loader = DataLoader(TensorDataset(torch.arange(70)), batch_sampler=PlanBatchSampler(plan_fn))
    trainer = L.Trainer(
        max_epochs=3,
        accelerator="cpu",
        use_distributed_sampler=False,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(Recorder(), loader)
    for epoch in range(3):  # Lightning's set_epoch reaches the batch sampler through its `sampler` hook
        assert [b for e, b in seen if e == epoch] == plan_fn(epoch)
