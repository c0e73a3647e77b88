"""``data.task_order``: the benchmark's order, an explicit permutation, or a seeded one, applied before capping."""

from __future__ import annotations

import pytest

from conpet_lightning.config import ConfigError, load_config
from conpet_lightning.data.benchmarks import resolve_task_order
from conpet_lightning.data.records import Benchmark, Record
from conpet_lightning.loop import build_benchmark


def _bench() -> Benchmark:
    """Three tasks with non-contiguous class ids, two records per task and part."""
    tasks = [[4, 0], [1, 3], [2, 5]]
    parts = {
        part: [[Record(f"{part}-{k}-{i}", tasks[k][i], k, f"text {part} {k} {i}") for i in range(2)] for k in range(3)]
        for part in ("train", "valid", "test")
    }
    return Benchmark("toy", "text_classification", [f"c{i}" for i in range(6)], tasks, parts)


def test_reordered_moves_records_with_their_task_and_renumbers_them():
    bench = _bench()
    out = bench.reordered([2, 0, 1])
    assert out.tasks == [[2, 5], [4, 0], [1, 3]]
    out.validate()  # every record's task index agrees with its new position and its label with the task's classes
    for part in ("train", "valid", "test"):
        for new, old in enumerate([2, 0, 1]):
            got = out.records(part, new)
            assert [r.key for r in got] == [r.key for r in bench.records(part, old)]
            assert [r.label for r in got] == [r.label for r in bench.records(part, old)]
            assert {r.task for r in got} == {new}
    assert bench.tasks == [[4, 0], [1, 3], [2, 5]]  # the original is untouched
    assert bench.records("train", 0)[0].task == 0
    with pytest.raises(ValueError, match="not a permutation"):
        bench.reordered([0, 0, 1])


def test_resolve_task_order_specs():
    assert resolve_task_order(None, 4) == [0, 1, 2, 3]
    assert resolve_task_order([3, 1, 0, 2], 4) == [3, 1, 0, 2]
    perm = resolve_task_order("perm:7", 10)
    assert sorted(perm) == list(range(10)) and perm != list(range(10))
    assert resolve_task_order("perm:7", 10) == perm  # seeded: the same every time
    assert resolve_task_order("perm:8", 10) != perm


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ([0, 1], "exactly once"),
        ([0, 1, 1], "exactly once"),
        ([0, 1, 3], "exactly once"),
        ("perm", "perm:<seed>"),
        ("shuffle:3", "perm:<seed>"),
        ("perm:x", "perm:<seed>"),
        ("perm:-1", ">= 0"),
        (3, "perm:<seed>"),
        ([0.5, 1, 2], "perm:<seed>"),
    ],
)
def test_bad_task_order_is_a_config_error(spec, match):
    with pytest.raises(ConfigError, match=match):
        resolve_task_order(spec, 3)


def test_task_order_in_the_config_is_checked_before_any_data_loads():
    assert load_config("naive", ["data.task_order=[1,0]"]).data.task_order == [1, 0]
    assert load_config("naive", ["data.task_order=perm:3"]).data.task_order == "perm:3"
    with pytest.raises(ConfigError, match="data.task_order"):
        load_config("naive", ["data.task_order=backwards"])


def test_build_benchmark_applies_the_order_before_num_tasks():
    caps = ["data.max_train_per_class=2", "data.max_valid_per_class=1", "data.max_test_per_class=1"]
    base, base_order = build_benchmark(load_config("naive", caps))
    order = resolve_task_order("perm:5", base.num_tasks)
    cfg = load_config("naive", [*caps, "data.task_order=perm:5", "data.num_tasks=2"])
    bench, used = build_benchmark(cfg)
    assert base_order == list(range(base.num_tasks)) and used == order[:2]  # the order metrics.json records
    assert bench.tasks == [base.tasks[order[0]], base.tasks[order[1]]]
    assert [r.key for r in bench.records("test", 1)] == [r.key for r in base.records("test", order[1])]
    assert all(r.task == 1 for r in bench.records("train", 1))
