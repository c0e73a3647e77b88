"""``conpet report --group-by`` / ``--compare``: golden values computed by hand on synthetic run folders.

Hand computations used below (t quantiles: t(0.975, 2) = 4.302652729911275, t(0.975, 1) = 12.706204736174704):
- A's acc_macro over seeds 100/200/300 = 10, 20, 30: mean 20, std 10, 95 % CI 20 ± 4.302653 * 10 / sqrt(3).
- A - B with B = 8, 15, 25: differences 2, 5, 5: mean 4, std sqrt(3), standard error 1, t = 4 on 2 df; the two-sided
  p of Student's t with 2 df is 1 - t / sqrt(t^2 + 2) = 1 - 4 / sqrt(18); CI 4 ± 4.302653.
- Six pairs with differences 1..6 (all positive): the exact Wilcoxon signed-rank p is 2 / 2^6 = 0.03125.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from conpet_lightning.cli import main
from conpet_lightning.reporting.aggregate import (
    collect_runs,
    compare,
    describe,
    paired,
    report_aggregate,
    unfinished_state,
)
from conpet_lightning.reporting.results_page import main as results_main

T2 = 4.302652729911275
PARAMS = {"trainable_parameters": 40_000, "total_parameters": 22_000_000}


def make_run(
    root: Path,
    experiment: str,
    seed: int,
    acc: float,
    *,
    benchmark: str = "fewrel",
    order: object = None,
    lr: float = 2e-3,
    tasks: int = 2,
    done: int | None = None,
    steps: int = 40,
) -> Path:
    """A run folder with the files aggregation reads: metrics.json (summary, per_task budget) and config.yaml."""
    done = tasks if done is None else done
    folder = root / experiment / f"{benchmark}-{order or 'default'}-s{seed}-lr{lr}"
    folder.mkdir(parents=True)
    metrics = {
        "experiment": experiment,
        "run_id": folder.name,
        "benchmark": benchmark,
        "seed": seed,
        "tasks": [{"classes": [t], "n_test": 10} for t in range(tasks)],
        "accuracy_matrix": [[acc] * (i + 1) + [None] * (tasks - i - 1) for i in range(done)],
        "summary": {"acc_macro": acc, "bwt": -acc / 10, "fwt": None},
        "per_task": [
            {"task": t, "train_steps": steps, "train_seconds": 1.5, "stages": {"train": {"steps": steps, **PARAMS}}}
            for t in range(done)
        ],
    }
    (folder / "metrics.json").write_text(json.dumps(metrics))
    config = {"experiment": experiment, "seed": seed, "data": {"benchmark": benchmark, "task_order": order}}
    config.update(train={"lr": lr, "epochs": 2, "batch_size": 8}, model={"backbone": "minilm"}, scale="cpu")
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    return folder


@pytest.fixture
def runs_root(tmp_path: Path) -> Path:
    for seed, a, b in [(100, 10.0, 8.0), (200, 20.0, 15.0), (300, 30.0, 25.0)]:
        make_run(tmp_path, "emr_star", seed, a)
        make_run(tmp_path, "emr", seed, b)
    make_run(tmp_path, "emr", 400, 99.0)  # unpaired: emr_star has no seed 400
    make_run(tmp_path, "emr_star", 400, 99.0, done=1)  # unfinished: left out everywhere
    return tmp_path


def test_describe_golden():
    s = describe([10.0, 20.0, 30.0])
    assert s["n"] == 3 and s["mean"] == pytest.approx(20.0) and s["std"] == pytest.approx(10.0)
    half = T2 * 10 / math.sqrt(3)
    assert s["ci_low"] == pytest.approx(20 - half) and s["ci_high"] == pytest.approx(20 + half)
    one = describe([7.0])
    assert one["mean"] == 7.0 and one["std"] is None and one["ci_low"] is None
    two = describe([1.0, 3.0])  # std sqrt(2), se 1, t(0.975, 1)
    assert two["ci_high"] == pytest.approx(2 + 12.706204736174704)


def test_paired_golden():
    s = paired([10.0, 20.0, 30.0], [8.0, 15.0, 25.0])
    assert s["n"] == 3 and s["diff_mean"] == pytest.approx(4.0) and s["diff_std"] == pytest.approx(math.sqrt(3))
    assert s["diff_ci_low"] == pytest.approx(4 - T2) and s["diff_ci_high"] == pytest.approx(4 + T2)
    assert s["p_ttest"] == pytest.approx(1 - 4 / math.sqrt(18))
    assert s["p_wilcoxon"] is None  # fewer than 6 pairs
    assert s["mean_a"] == pytest.approx(20.0) and s["mean_b"] == pytest.approx(16.0)
    six = paired([float(i) for i in range(1, 7)], [0.0] * 6)
    assert six["p_wilcoxon"] == pytest.approx(2 / 2**6)
    assert paired([1.0, 2.0], [0.0, 1.0])["p_ttest"] is None  # identical differences: no spread, no test


def test_group_by_experiment_and_benchmark(runs_root):
    result = json.loads(report_aggregate([runs_root / "*" / "*"], ["experiment", "benchmark"], as_json=True))
    groups = {g["label"]: g for g in result["groups"]}
    assert set(groups) == {"emr_star/fewrel", "emr/fewrel"}
    star = groups["emr_star/fewrel"]
    assert star["n_runs"] == 3 and star["seeds"] == [100, 200, 300]  # the unfinished seed 400 is left out
    acc = star["metrics"]["acc_macro"]
    assert acc["mean"] == pytest.approx(20.0) and acc["std"] == pytest.approx(10.0)
    assert acc["ci_low"] == pytest.approx(20 - T2 * 10 / math.sqrt(3))
    assert star["metrics"]["bwt"]["mean"] == pytest.approx(-2.0)
    assert "fwt" not in star["metrics"]  # a metric no run has is not a row
    assert star["metrics"]["budget.train_steps"]["mean"] == pytest.approx(80.0)  # 2 tasks x 40 steps
    assert groups["emr/fewrel"]["metrics"]["acc_macro"]["n"] == 4
    assert any("s400" in note and "not finished (1 of 2 tasks)" in note for note in result["notes"])


def test_unfinished_folders_say_how_far_they_got(tmp_path):
    assert unfinished_state(tmp_path / "never") == "not started"
    (tmp_path / "started" / "checkpoints").mkdir(parents=True)
    assert unfinished_state(tmp_path / "started") == "started, no task finished yet"
    partial = make_run(tmp_path, "emr", 100, 10.0, tasks=3, done=2)
    assert unfinished_state(partial) == "not finished (2 of 3 tasks)"


def test_group_by_a_config_key(tmp_path):
    for seed, lr, acc in [(100, 1e-3, 10.0), (200, 1e-3, 14.0), (100, 2e-3, 30.0)]:
        make_run(tmp_path, "naive", seed, acc, lr=lr, order=f"perm:{seed}")
    runs, _ = collect_runs([tmp_path / "naive" / "*"])
    groups = json.loads(report_aggregate([tmp_path / "naive" / "*"], ["train.lr"], as_json=True))["groups"]
    by_lr = {g["group"]["train.lr"]: g["metrics"]["acc_macro"]["mean"] for g in groups}
    assert by_lr == {0.001: pytest.approx(12.0), 0.002: pytest.approx(30.0)}
    assert {r.task_order for r in runs} == {"perm:100", "perm:200"}


def test_compare_pairs_by_benchmark_seed_and_order(runs_root):
    make_run(runs_root, "emr_star", 100, 50.0, order="perm:3")  # pairs with nothing: other order
    runs, _ = collect_runs([runs_root / "*" / "*"])
    result = compare(runs, "emr_star", "emr")
    (block,) = result["benchmarks"]
    assert [p["seed"] for p in block["pairs"]] == [100, 200, 300]
    acc = block["metrics"]["acc_macro"]
    assert acc["diff_mean"] == pytest.approx(4.0) and acc["p_ttest"] == pytest.approx(1 - 4 / math.sqrt(18))
    assert acc["diff_ci_high"] == pytest.approx(4 + T2)
    assert len(result["unpaired"]) == 2  # emr seed 400, emr_star perm:3
    with pytest.raises(ValueError, match="no run matches 'crl'"):
        compare(runs, "crl", "emr")


def test_compare_by_group_label_and_two_runs_per_key_is_an_error(tmp_path):
    for seed, a, b in [(100, 10.0, 8.0), (200, 20.0, 15.0), (300, 30.0, 25.0)]:
        make_run(tmp_path / "x", "emr", seed, a, lr=1e-3)
        make_run(tmp_path / "y", "emr", seed, b, lr=2e-3)
    runs, _ = collect_runs([tmp_path / "*" / "emr" / "*"])
    with pytest.raises(ValueError, match="two runs"):
        compare(runs, "emr", "emr")
    result = compare(runs, "emr/0.001", "emr/0.002", fields=["experiment", "train.lr"])
    assert result["benchmarks"][0]["metrics"]["acc_macro"]["diff_mean"] == pytest.approx(4.0)


def test_cli_report_group_by_compare_and_sweep_index(runs_root, capsys):
    index = {
        "name": "s",
        "points": [
            {"run_dir": str(p.relative_to(runs_root)), "override_set": "default", "experiment": p.parent.name}
            for p in sorted(runs_root.glob("*/*"))
        ],
    }
    (runs_root / "index.json").write_text(json.dumps(index))
    assert main(["report", str(runs_root), "--group-by", "experiment,benchmark"]) == 0
    out = capsys.readouterr().out
    assert "| emr_star/fewrel | acc_macro | 3 | 20.00 ± 10.00 | [-4.84, 44.84] |" in out
    assert main(["report", str(runs_root / "index.json"), "--compare", "emr_star", "emr"]) == 0
    out = capsys.readouterr().out
    assert "| acc_macro | 3 | 20.00 | 16.00 | 4.00 ± 1.73 | [-0.30, 8.30] | 0.0572 | - |" in out
    assert main(["report", str(runs_root / "nothing" / "*"), "--group-by", "experiment"]) == 2


def test_results_page_from_a_sweep_folder(tmp_path):
    """Claims (b) and (c) get verdicts from the paired intervals; (a) is computed, not typed."""
    sweep = tmp_path / "sweep"
    accs = {  # experiment -> benchmark -> acc per seed 100, 200, 300
        "emr": {"fewrel": [8, 15, 25], "fewnerd": [10, 10, 10]},
        "emr_star": {"fewrel": [10, 20, 30], "fewnerd": [20, 22, 24]},  # +4 (interval spans 5), +12 (holds)
        "crl": {"fewrel": [30, 30, 30]},
        "crl_star": {"fewrel": [27, 28, 29]},  # -2 +- 1: the whole interval lies below +5
        "eaemr": {"fewrel": [10, 11]},
        "eaemr_star": {"fewrel": [20, 21]},  # 2 seeds only
        "dynamic_conpet": {"fewnerd": [30, 31, 35]},  # vs emr_star, the only Static method on fewnerd: +10, +9, +11
    }
    for exp, by_bench in accs.items():
        for bench, values in by_bench.items():
            for seed, acc in zip((100, 200, 300), values, strict=False):
                make_run(sweep, exp, seed, float(acc), benchmark=bench)
    index = {"name": "t", "points": [{"run_dir": str(p.relative_to(sweep))} for p in sorted(sweep.glob("*/*"))]}
    (sweep / "index.json").write_text(json.dumps(index))
    out = tmp_path / "docs" / "results.md"
    assert results_main([str(sweep), "--out", str(out)]) == 0
    page = out.read_text()
    assert "| 6,738,415,616 | 2,097,152 | 3,213x |" in page  # LLaMA-7B from its architecture
    assert "| 22,000,000 | 40,000 | 550x | measured" in page
    assert (
        "| (b) | `emr_star` - `emr` | fewrel | 3 | 4.00 ± 1.73 | [-0.30, 8.30] | 0.0572 | - | not established |" in page
    )
    assert "| (b) | `emr_star` - `emr` | fewnerd | 3 | 12.00 ± 2.00 |" in page and "fewnerd | 3 | 12.00" in page
    assert "`emr_star` beats `emr` by at least 5 points holds at this scale" in page
    assert "| (b) | `crl_star` - `crl` | fewrel | 3 | -2.00 ± 1.00 |" in page and "| does not hold |" in page
    assert "by at least 5 points is not established at this scale" in page
    assert "`crl` | fewnerd" not in page  # no row for a benchmark neither method ran on
    assert "Only 2 paired seed(s) of `eaemr_star` and `eaemr` on fewrel: the claim is not established." in page
    assert "best Static method on fewnerd by mean acc_macro is `emr_star`" in page
    assert "| (c) | `dynamic_conpet` - `emr_star` | fewnerd | 3 | 10.00 ± 1.00 |" in page
    assert "`dynamic_conpet` beats `emr_star` holds at this scale" in page
    assert "| `emr_star` | 3 | 100, 200, 300 | 20.00 ± 10.00 |" in page  # the fewrel table, with its seeds
    assert "| `eaemr` † | 2 | 100, 200 |" in page
    # a row with fewer seeds states its cost against the rows with enough seeds
    assert "- `eaemr` (fewrel): 2 seed(s); 40.0 steps per task on average against 40.0 for the experiments" in page
    assert "| `emr` | fewrel | 80.0 | 80-80 |" not in page and "| `emr` | fewrel | 40.0 | 40-40 | 3 |" in page
    assert "**Commit:** `" in page and "cores" in page


def test_routing_section_reads_run_panels_and_validation_evals_only(tmp_path):
    from conpet_lightning.reporting.aggregate import load_run_folder
    from conpet_lightning.reporting.routing_page import routing_section

    runs = []
    for seed, task_id in [(100, 40.0), (200, 50.0)]:
        folder = make_run(tmp_path, "dynamic_conpet", seed, 45.0)
        metrics = json.loads((folder / "metrics.json").read_text())
        panel = {"acc_macro": task_id, "oracle_acc_macro": 80.0, "oracle_gap_macro": 35.0, "recency_bias": 10.0}
        metrics["per_task"][-1]["selector"] = {**panel, "passes_per_sample": 2.0} if seed == 100 else panel
        (folder / "metrics.json").write_text(json.dumps(metrics))
        for name, split, acc in [("valid-energy", "valid", 50.0 + seed / 100), ("test-energy", "test", 99.0)]:
            ev = folder / "evals" / name
            ev.mkdir(parents=True)
            routed = {"router": {"name": "energy_routing"}, "summary": {"acc_macro": acc}}
            routed["per_task"] = [{"selector": {"acc_macro": 70.0, "passes_per_sample": 3.0}}]
            (ev / "metrics.json").write_text(json.dumps(routed))
            (ev / "config.yaml").write_text(yaml.safe_dump({"eval": {"split": split}}))
        runs.append(load_run_folder(folder))
    page = "\n".join(routing_section(runs))
    assert (
        "| `dynamic_conpet` | fewrel | test | 2 | 45.00 ± 7.07 | 80.00 ± 0.00 | 35.00 ± 0.00 | 10.00 ± 0.00 "
        "| 2.00 (1 of 2) |" in page
    )
    assert (
        "| fewrel | `dynamic_conpet` | valid-energy † | `energy_routing` | 100, 200 | 51.50 ± 0.71 | 70.00 ± 0.00 |"
        in page
    )
    assert "test-energy" not in page and "99.00" not in page  # a test-split eval is never a row to choose by
    assert routing_section([load_run_folder(make_run(tmp_path, "emr", 100, 10.0))]) == []
