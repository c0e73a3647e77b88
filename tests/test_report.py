"""Reports over real metrics.json files: loading, recomputation, the side-by-side table, figures."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from conpet_lightning.metrics import SUMMARY_KEYS, summarize
from conpet_lightning.reporting import (
    load_run,
    markdown_table,
    plot_forgetting_bars,
    recompute_summary,
    render_run_figures,
    report,
)

R_A = [[90.0, None, None], [70.0, 80.0, None], [60.0, 75.0, 85.0]]
R_B = [[95.0, None, None], [85.0, 88.0, None], [80.0, 82.0, 86.0]]
R_JOINT = [[95.0, None, None], [90.0, 92.0, None], [88.0, 89.0, 91.0]]
TASKS = [{"classes": [0, 1], "n_test": 100}, {"classes": [2, 3], "n_test": 200}, {"classes": [4], "n_test": 100}]


def _write_run(root: Path, name: str, run: dict[str, Any]) -> Path:
    run_dir = root / name
    run_dir.mkdir()
    (run_dir / "metrics.json").write_text(json.dumps(run), encoding="utf-8")
    return run_dir


@pytest.fixture
def two_runs(tmp_path: Path) -> tuple[Path, Path]:
    n_test = [t["n_test"] for t in TASKS]
    run_a = {
        "experiment": "emr_star",
        "run_id": "a1",
        "benchmark": "fewrel",
        "seed": 100,
        "tasks": TASKS,
        "accuracy_matrix": R_A,
        "joint_accuracy_matrix": R_JOINT,
        "summary": {**summarize(R_A, n_test, R_joint=R_JOINT), "selector_acc": 91.5},
        "per_task": [{"task": j} for j in range(3)],
    }
    stale = summarize(R_B, n_test)
    stale["acc_macro"] = 10.0  # a writer bug the report must flag
    run_b = {
        "experiment": "dynamic_conpet",
        "run_id": "b2",
        "benchmark": "fewrel",
        "seed": 200,
        "tasks": TASKS,
        "accuracy_matrix": R_B,
        "summary": stale,
        "per_task": [],
    }
    return _write_run(tmp_path, "run_a", run_a), _write_run(tmp_path, "run_b", run_b)


def test_recompute_agrees_with_summarize(two_runs: tuple[Path, Path]) -> None:
    run = load_run(two_runs[0])
    s = recompute_summary(run)
    assert s["acc_macro"] == pytest.approx(220 / 3)
    assert s["acc_micro"] == pytest.approx(73.75)
    assert s["intransigence"] == pytest.approx(23 / 3)
    # golden values worked by hand from R_A (docs/metrics.md): AIA = mean of each row's macro ACC, BWT and forgetting
    # over the old tasks 0 and 1, learning accuracy = the diagonal's mean
    assert s["aia"] == pytest.approx((90 + 75 + 220 / 3) / 3)
    assert s["bwt"] == pytest.approx(((60 - 90) + (75 - 80)) / 2)
    assert s["forgetting"] == pytest.approx(((90 - 60) + (80 - 75)) / 2)
    assert s["learning_accuracy"] == pytest.approx((90 + 80 + 85) / 3)
    assert set(s) >= set(SUMMARY_KEYS)
    # Run B has no joint matrix: intransigence is not applicable.
    assert recompute_summary(load_run(two_runs[1]))["intransigence"] is None


def test_markdown_table_has_both_runs(two_runs: tuple[Path, Path]) -> None:
    table = markdown_table([load_run(d) for d in two_runs])
    lines = table.strip().splitlines()
    assert lines[0] == "| metric | emr_star (a1) | dynamic_conpet (b2) |"
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in lines[2:]}
    assert rows["acc_macro"] == ["73.33", "82.67"]  # (80 + 82 + 86) / 3 for run B, recomputed (stored was 10)
    assert rows["bwt"] == ["-17.50", "-10.50"]  # run B: ((80 - 95) + (82 - 88)) / 2
    assert rows["fwt"] == ["n/a", "n/a"]
    assert rows["intransigence"] == ["7.67", "n/a"]
    assert rows["selector_acc"] == ["91.50", "n/a"]  # an extra stored key is carried through
    assert rows["seed"] == ["100", "200"]
    assert set(SUMMARY_KEYS) <= rows.keys()


def test_report_markdown_flags_stale_summary(two_runs: tuple[Path, Path]) -> None:
    text = report(two_runs)
    assert "emr_star (a1)" in text and "dynamic_conpet (b2)" in text
    assert "run_b/metrics.json: stored summary differs from R for acc_macro" in text
    assert "run_a/metrics.json" not in text


def test_report_json(two_runs: tuple[Path, Path]) -> None:
    rows = json.loads(report(two_runs, as_json=True))
    assert [r["experiment"] for r in rows] == ["emr_star", "dynamic_conpet"]
    assert rows[0]["mismatches"] == [] and rows[1]["mismatches"] == ["acc_macro"]
    assert rows[1]["summary"]["acc_macro"] == pytest.approx(248 / 3)
    assert set(rows[0]["summary"]) == set(SUMMARY_KEYS)


def test_load_run_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nowhere/metrics.json: no metrics.json here"):
        load_run(tmp_path / "nowhere")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "metrics.json").write_text('{"accuracy_matrix": [[90.0]],\n "tasks": [}', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad/metrics.json: malformed JSON at line 2"):
        load_run(bad)
    (bad / "metrics.json").write_text(json.dumps({"tasks": TASKS}), encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad/metrics.json: missing key 'accuracy_matrix'"):
        load_run(bad)
    (bad / "metrics.json").write_text(json.dumps({"tasks": TASKS, "accuracy_matrix": [[90.0, None]]}), "utf-8")
    with pytest.raises(ValueError, match=r"bad/metrics.json: accuracy_matrix must be square"):
        load_run(bad)
    (bad / "metrics.json").write_text(json.dumps({"tasks": [{"classes": [0]}], "accuracy_matrix": [[9.0]]}), "utf-8")
    with pytest.raises(ValueError, match=r"tasks\[0\] must be an object with 'n_test'"):
        load_run(bad)


def test_render_run_figures(two_runs: tuple[Path, Path]) -> None:
    paths = render_run_figures(two_runs[0])
    assert [p.name for p in paths] == ["accuracy_heatmap.png", "forgetting_curves.png", "forgetting_bars.png"]
    for p in paths:
        assert p.parent == two_runs[0]
        data = p.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000


def test_forgetting_bars_single_task(tmp_path: Path) -> None:
    out = plot_forgetting_bars([[80.0]], tmp_path / "sub" / "bars.png")
    assert out.is_file() and out.stat().st_size > 0


def test_summary_mismatches_handles_not_applicable() -> None:
    from conpet_lightning.reporting import summary_mismatches

    recomputed = {"bwt": None, "acc_macro": 50.0, "forgetting": 3.0}
    run = {"summary": {"bwt": 1.0, "acc_macro": 50.0, "forgetting": None}}
    assert summary_mismatches(run, recomputed) == ["bwt", "forgetting"]
    assert summary_mismatches({"summary": {"bwt": None, "acc_macro": "50"}}, recomputed) == ["acc_macro"]


def test_report_on_two_real_runs_agrees_with_their_metrics(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from conpet_lightning.cli import main
    from tests.helpers import tiny_loop

    runs = [tiny_loop(name, tmp_path / name, num_tasks=2) for name in ("naive", "joint")]
    stored = [loop.run() for loop in runs]
    dirs = [str(loop.run_dir) for loop in runs]
    capsys.readouterr()  # drop the runs' own per-task console lines
    assert main(["report", *dirs, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    for row, metrics in zip(rows, stored, strict=True):
        assert row["mismatches"] == []
        assert row["summary"] == {k: metrics["summary"][k] for k in SUMMARY_KEYS}
    assert main(["report", *dirs, "--no-figures"]) == 0
    table = capsys.readouterr().out
    assert "naive" in table and "joint" in table and table.count("|") > 10


def test_steps_per_task_row_groups_equal_budgets() -> None:
    from conpet_lightning.reporting.report import steps_per_task

    run = {"per_task": [{"train_steps": 80}] + [{"train_steps": 240}] * 9}
    assert steps_per_task(run) == "80, 240 x9"
    assert steps_per_task({"per_task": [{"train_steps": 120}] * 10}) == "120 x10"
    assert steps_per_task({"per_task": [{"train_steps": 40}, {"train_steps": 44}, {"train_steps": 48}]}) == "40, 44, 48"
