"""Smoke tests of the bench harness (``make bench``, ``make bench-gpu``) at tiny sizes; the figures mean nothing."""

from __future__ import annotations

import inspect
import json
import sys
import time
import types
from pathlib import Path

import pytest
import torch

from bench import framework_overhead as bench_framework
from bench import gpu, profile_run, run_all
from bench.common import heap_in_use_mb, ratio_entry

ALL_RATIOS = {
    "framework_throughput",
    "task_time_last_over_task2",
    "peak_memory_last_over_task1",
    "routed_inference",
    "routed_inference_selector",
    "routed_inference_full_backbone",
    "routed_inference_cached",
    "skip_frozen_expert_stage",
    "eval_padding",
} | ({"heap_in_use_last_over_task1"} if heap_in_use_mb() is not None else set())


def _check_entry(entry: dict) -> None:
    """An entry holds its ratio, target and a verdict consistent with them."""
    op, target = entry["target"].split()
    holds = entry["ratio"] >= float(target) if op == ">=" else entry["ratio"] <= float(target)
    assert entry["holds"] is holds
    assert entry["verdict"] == ("holds" if holds else "MISSED")
    assert entry["ratio"] > 0 and entry["conditions"] and entry["what"]


def _only_result(folder: Path) -> dict:
    files = list(folder.glob("*.json"))
    assert len(files) == 1, files
    return json.loads(files[0].read_text())


def test_ratio_entry_verdict() -> None:
    assert ratio_entry("a", 0.96, 0.95, ">=", what="x", conditions={"c": 1})["holds"] is True
    missed = ratio_entry("b", 1.2, 1.05, "<=", what="x", conditions={"c": 1})
    assert missed["holds"] is False and missed["verdict"] == "MISSED" and missed["target"] == "<= 1.05"
    with pytest.raises(ValueError):
        ratio_entry("c", 1.0, 1.0, "<", what="x", conditions={})


@pytest.mark.skipif(heap_in_use_mb() is None, reason="needs glibc's mallinfo2")
def test_heap_in_use_counts_live_memory_and_not_what_was_freed() -> None:
    before = heap_in_use_mb()
    block = torch.ones(16 * 2**20)  # 64 MiB
    held = heap_in_use_mb()
    del block
    after = heap_in_use_mb()
    assert before is not None and held is not None and after is not None
    assert held - before >= 63 and held - after >= 63


def test_bare_loop_of_the_framework_bench_runs_at_the_run_precision() -> None:
    import lightning as L

    from conpet_lightning.contract import FitContext

    def fit_context(precision: str) -> FitContext:  # what bench.common.begin_stage gives the bare loop
        trainer = L.Trainer(accelerator="cpu", precision=precision, logger=False, enable_progress_bar=False)
        return FitContext(trainer.strategy.root_device, trainer.precision_plugin)

    a = torch.ones(4, 4)
    with fit_context("bf16-mixed").forward_context():
        assert torch.mm(a, a).dtype == torch.bfloat16  # as Lightning's bf16-mixed plugin does on CPU
    with fit_context("32-true").forward_context():
        assert torch.mm(a, a).dtype == torch.float32
    source = inspect.getsource(bench_framework.bare_fit)
    assert source.count("loop.ctx.fit.forward_context()") == 2  # training steps and validation


def test_phases_are_exclusive() -> None:
    phases = profile_run.Phases()

    def inner() -> None:
        time.sleep(0.05)

    def outer() -> None:
        time.sleep(0.05)
        phases.wrap(inner, lambda ph, args: f"{ph.context()} · inner")()

    phases.wrap(outer, "train step (x)")()
    assert set(phases.totals) == {"train step (x)", "train · inner"}
    assert 0.04 < phases.totals["train step (x)"] < 0.09  # the nested 50 ms are not counted twice
    assert 0.04 < phases.totals["train · inner"] < 0.09
    groups = profile_run.group(phases.totals, wall=0.2)
    assert groups["forward_backward"] == pytest.approx(sum(phases.totals.values()), abs=0.01)
    assert sum(groups.values()) == pytest.approx(0.2, abs=0.02)


def test_missed_target_exits_zero_error_exits_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    missed = types.ModuleType("bench.fake_missed")
    missed.run = lambda size, threads: [ratio_entry("fake", 2.0, 1.0, "<=", what="x", conditions={"size": size})]
    broken = types.ModuleType("bench.fake_broken")

    def boom(size: str, threads: int) -> list:
        raise RuntimeError("boom")

    broken.run = boom
    monkeypatch.setitem(sys.modules, "bench.fake_missed", missed)
    monkeypatch.setitem(sys.modules, "bench.fake_broken", broken)
    monkeypatch.setattr(run_all, "BENCHMARKS", ("fake_missed", "fake_broken"))
    args = ["--size", "tiny", "--threads", "1", "--no-profile"]
    assert run_all.main([*args, "--only", "fake_missed", "--out", str(tmp_path / "a")]) == 0
    assert _only_result(tmp_path / "a")["ratios"][0]["verdict"] == "MISSED"
    assert run_all.main([*args, "--out", str(tmp_path / "b")]) == 1
    result = _only_result(tmp_path / "b")
    assert [e["benchmark"] for e in result["errors"]] == ["fake_broken"]
    assert [e["name"] for e in result["ratios"]] == ["fake"]


def test_some_benchmarks_tiny(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Three real benchmarks at the tiny size: their ratios reach the JSON and the printed table."""
    code = run_all.main(
        [
            *("--size", "tiny", "--threads", "1", "--no-profile", "--out", str(tmp_path)),
            *("--only", "eval_padding,routed_inference,skip_frozen", "--note", "test"),
        ]
    )
    assert code == 0
    result = _only_result(tmp_path)
    names = {e["name"] for e in result["ratios"]}
    routed = {
        "routed_inference",
        "routed_inference_selector",
        "routed_inference_full_backbone",
        "routed_inference_cached",
    }
    assert names == {"eval_padding", *routed, "skip_frozen_expert_stage"}
    for entry in result["ratios"]:
        _check_entry(entry)
    assert result["conditions"]["note"] == "test" and result["conditions"]["torch_threads"] == 1
    assert result["errors"] == [] and result["profile"] is None
    printed = capsys.readouterr().out
    assert all(name in printed for name in names)


@pytest.mark.slow
def test_whole_bench_tiny(tmp_path: Path) -> None:
    """Every ratio with target and verdict, and the profile's groups, from one tiny ``make bench``."""
    assert run_all.main(["--size", "tiny", "--threads", "1", "--out", str(tmp_path)]) == 0
    result = _only_result(tmp_path)
    assert {e["name"] for e in result["ratios"]} == ALL_RATIOS
    for entry in result["ratios"]:
        _check_entry(entry)
    profile = result["profile"]
    assert set(profile["groups"]) == {
        "trainer_construction",
        "wandb",
        "data_loading_and_encoding",
        "forward_backward",
        "evaluation",
        "figures",
        "other",
    }
    assert profile["groups"]["forward_backward"] > 0 and profile["groups"]["trainer_construction"] > 0
    assert sum(profile["groups"].values()) == pytest.approx(profile["wall_seconds_in_process"], abs=0.1)
    assert profile["not_patched"] == []
    assert len(profile["per_task_phase_seconds"]) == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the skip without CUDA")
def test_bench_gpu_skips_without_cuda(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert gpu.main(["--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "skipped" in out[0]
    assert not list(tmp_path.iterdir())


def test_bench_gpu_dry_run_on_cpu(tmp_path: Path) -> None:
    """The GPU benchmark's code path on a tiny random LLaMA on the CPU."""
    args = "--device cpu --backbone tiny-llama --steps 1 --warmup 1 --experts 3 --batch-size 2 --seq-len 16"
    assert (
        gpu.main([*args.split(), "--infer-batch", "4", "--infer-repeats", "1", "--rounds", "1", "--out", str(tmp_path)])
        == 0
    )
    result = json.loads(next(tmp_path.glob("gpu-*.json")).read_text())
    r = result["models"]["tiny-llama"]
    assert r["train_tokens_per_s"] > 0 and r["routed_samples_per_s"] > 0 and r["lora_expert_parameter_mib"] > 0
    assert r["memory_per_expert_mib"] is None  # GPU memory is only measured on CUDA
