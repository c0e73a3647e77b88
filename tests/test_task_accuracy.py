"""TaskAccuracy: per-task counts, accumulation over batches, reset, and sum-reduction across ranks."""

from __future__ import annotations

import math
import os
import socket

import pytest
import torch

from conpet_lightning.metrics import TaskAccuracy


def _two_batches(metric: TaskAccuracy) -> None:
    # Batch 1 (class ids): task 0 -> 2/2 correct, task 1 -> 1/2 correct.
    metric.update(torch.tensor([0, 1, 2, 3]), torch.tensor([0, 1, 0, 3]), torch.tensor([0, 0, 1, 1]))
    # Batch 2 (scores [N, C], argmax 3, 2, 0): task 1 -> 2/2 correct, task 0 -> 0/1 correct.
    scores = torch.tensor([[0.0, 0.1, 0.2, 0.9], [0.1, 0.0, 0.8, 0.3], [0.7, 0.2, 0.1, 0.0]])
    metric.update(scores, torch.tensor([3, 2, 1]), torch.tensor([1, 1, 0]))


def test_single_batch() -> None:
    m = TaskAccuracy(num_tasks=2)
    m.update(torch.tensor([0, 1, 2, 3]), torch.tensor([0, 1, 0, 3]), torch.tensor([0, 0, 1, 1]))
    out = m.compute()
    assert out["per_task"].tolist() == pytest.approx([100.0, 50.0])
    assert float(out["macro"]) == pytest.approx(75.0)
    assert float(out["micro"]) == pytest.approx(75.0)
    assert out["counts"].tolist() == [2, 2]


def test_two_batch_accumulate() -> None:
    m = TaskAccuracy(num_tasks=3)
    _two_batches(m)
    out = m.compute()
    # Task 0: 2/3, task 1: 3/4, task 2: no samples -> NaN and excluded from macro.
    per_task = out["per_task"].tolist()
    assert per_task[:2] == pytest.approx([200 / 3, 75.0])
    assert math.isnan(per_task[2])
    assert float(out["macro"]) == pytest.approx((200 / 3 + 75.0) / 2)  # 70.83
    assert float(out["micro"]) == pytest.approx(500 / 7)  # 5 of 7 correct
    assert out["counts"].tolist() == [3, 4, 0]
    assert out["correct"].tolist() == [2, 3, 0]
    assert out["counts"].dtype == torch.long


def test_reset_clears_counts() -> None:
    m = TaskAccuracy(num_tasks=2)
    _two_batches(m)
    m.reset()
    assert m.total.tolist() == [0, 0]
    assert m.correct.tolist() == [0, 0]
    m.update(torch.tensor([1]), torch.tensor([1]), torch.tensor([1]))
    out = m.compute()
    assert math.isnan(out["per_task"][0])
    assert float(out["per_task"][1]) == pytest.approx(100.0)
    assert float(out["macro"]) == pytest.approx(100.0)


def test_empty_metric_gives_nan() -> None:
    m = TaskAccuracy(num_tasks=2)
    m.update(torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long))
    out = m.compute()
    assert math.isnan(float(out["macro"])) and math.isnan(float(out["micro"]))


def test_input_errors() -> None:
    m = TaskAccuracy(num_tasks=2)
    with pytest.raises(ValueError, match=r"task_ids must lie in \[0, 2\), got values in \[0, 2\]"):
        m.update(torch.tensor([0, 1]), torch.tensor([0, 1]), torch.tensor([0, 2]))
    with pytest.raises(ValueError, match=r"target \(3,\)"):
        m.update(torch.tensor([0, 1]), torch.tensor([0, 1, 1]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="num_tasks must be a positive integer"):
        TaskAccuracy(num_tasks=0)


def test_sync_sums_counts_across_ranks() -> None:
    # Simulate two ranks holding identical states: a sum reduction doubles the counts, accuracy is unchanged.
    m = TaskAccuracy(num_tasks=3, dist_sync_fn=lambda t, group=None: [t, t], distributed_available_fn=lambda: True)
    _two_batches(m)
    out = m.compute()
    assert out["counts"].tolist() == [6, 8, 0]
    assert float(out["micro"]) == pytest.approx(500 / 7)


def _ddp_worker(rank: int, port: int, queue: object) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    m = TaskAccuracy(num_tasks=2)
    if rank == 0:  # task 0: 1/2 correct
        m.update(torch.tensor([0, 1]), torch.tensor([0, 0]), torch.tensor([0, 0]))
    else:  # task 0: 1/1, task 1: 0/3
        m.update(torch.tensor([0, 1, 1, 1]), torch.tensor([0, 2, 2, 2]), torch.tensor([0, 1, 1, 1]))
    out = m.compute()
    queue.put((rank, out["counts"].tolist(), out["correct"].tolist(), float(out["macro"])))  # type: ignore[attr-defined]
    dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_two_processes_gloo() -> None:
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.start_processes(_ddp_worker, args=(port, queue), nprocs=2, start_method="spawn")
    results = sorted(queue.get(timeout=30) for _ in range(2))
    for _, counts, correct, macro in results:
        assert counts == [3, 3]
        assert correct == [2, 0]
        assert macro == pytest.approx((200 / 3 + 0.0) / 2)
