"""``conpet sweep``: the grid, fixed run folders, skip/resume/run, lanes, the index, and job-array exports."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conpet_lightning.cli import main
from conpet_lightning.config import ConfigError
from conpet_lightning.sweep import (
    GridPoint,
    emit,
    load_sweep,
    order_label,
    point_command,
    point_status,
    read_index,
    run_order,
    run_sweep,
)

ROOT = Path(__file__).resolve().parents[1]


def _sweep_file(tmp_path: Path, **changes: object) -> Path:
    """The shipped smoke sweep, writing into tmp_path, with some keys changed."""
    raw = yaml.safe_load((ROOT / "sweeps" / "smoke.yaml").read_text())
    raw.update(output_dir=str(tmp_path / "out"), **changes)
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _fake_metrics(point: GridPoint, done: int, total: int = 2) -> None:
    point.run_dir.mkdir(parents=True, exist_ok=True)
    run = {"tasks": [{"n_test": 1}] * total, "per_task": [{"task": t} for t in range(done)]}
    (point.run_dir / "metrics.json").write_text(json.dumps(run))


def test_grid_is_the_product_with_fixed_run_folders(tmp_path):
    sweep = load_sweep(_sweep_file(tmp_path))
    assert len(sweep.points) == 2 * 1 * 2 * 2  # experiments x benchmarks x task orders x seeds
    assert [p.index for p in sweep.points] == list(range(8))
    ids = {(p.experiment, p.point_id) for p in sweep.points}
    assert ("naive", "fewrel-s100") in ids and ("joint", "fewrel-perm1-s200") in ids
    p = sweep.points[3]
    assert p.run_dir == tmp_path / "out" / "smoke" / p.experiment / p.point_id
    assert load_sweep(_sweep_file(tmp_path)).points == sweep.points  # the same file gives the same grid


def test_experiment_entries_narrow_seeds_and_override_sets_narrow_experiments(tmp_path):
    path = _sweep_file(
        tmp_path,
        experiments=["naive", {"name": "joint", "seeds": [100]}],
        task_orders=["default", [1, 0]],
        overrides=[[], {"name": "lr", "args": ["train.lr=1e-3"], "experiments": ["naive"]}],
    )
    sweep = load_sweep(path)
    naive = [p for p in sweep.points if p.experiment == "naive"]
    joint = [p for p in sweep.points if p.experiment == "joint"]
    assert len(naive) == 2 * 2 * 2 and len(joint) == 1 * 2 * 1  # sets x orders x seeds
    assert {p.seed for p in joint} == {100}
    lr = [p for p in naive if p.override_set == "lr"]
    assert len(lr) == 4 and all(p.overrides[-1] == "train.lr=1e-3" for p in lr)
    assert {p.point_id for p in lr} == {
        "fewrel-lr-s100",
        "fewrel-lr-s200",
        "fewrel-lr-o1.0-s100",
        "fewrel-lr-o1.0-s200",
    }


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"seed": [1]}, "unknown sweep key"),
        ({"seeds": []}, "'seeds' is required"),
        ({"task_orders": [{"permutation": "x"}]}, "permutation"),
        ({"task_orders": ["backwards"]}, "task_orders\\[0\\]"),
        ({"args": ["train.lrr=1"]}, "lrr"),  # every point's config is composed before anything runs
        ({"experiments": ["no_such_experiment"]}, "unknown experiment"),
    ],
)
def test_bad_sweep_files_fail_before_anything_runs(tmp_path, changes, match):
    with pytest.raises(ConfigError, match=match):
        load_sweep(_sweep_file(tmp_path, **changes))


def test_finished_points_are_skipped_partial_ones_resumed_others_run(tmp_path):
    sweep = load_sweep(_sweep_file(tmp_path))
    done, partial, pending, broken = sweep.points[:4]
    _fake_metrics(done, 2)
    _fake_metrics(partial, 1)
    broken.run_dir.mkdir(parents=True)
    (broken.run_dir / "metrics.json").write_text("{not json")
    assert [point_status(p) for p in (done, partial, pending, broken)] == ["done", "partial", "pending", "broken"]
    assert point_command(sweep, done, 2) is None
    assert point_command(sweep, partial, 2)[-2:] == ["resume", str(partial.run_dir)]
    cmd = point_command(sweep, pending, 2)
    assert cmd[:3] == [sys.executable, "-m", "conpet_lightning.cli"] and cmd[3:5] == ["run", pending.experiment]
    assert f"run_id={pending.point_id}" in cmd and f"output_dir={sweep.root}" in cmd
    assert f"seed={pending.seed}" in cmd and "logging.wandb_group=smoke" in cmd
    with pytest.raises(ConfigError, match="unreadable"):
        point_command(sweep, broken, 2)


def test_lanes_split_the_cores_and_the_index_lists_every_point(tmp_path):
    sweep = load_sweep(_sweep_file(tmp_path, args=["logging.wandb=false"]))
    _fake_metrics(sweep.points[0], 2)  # finished before: skipped
    _fake_metrics(sweep.points[1], 1)  # killed before: resumed
    calls: list[tuple[list[str], Path | None]] = []

    def runner(cmd: list[str], log: Path | None) -> int:
        calls.append((cmd, log))
        by_dir = {str(p.run_dir): p for p in sweep.points}
        by_id = {(p.experiment, f"run_id={p.point_id}"): p for p in sweep.points}
        point = (
            by_dir[cmd[4]] if cmd[3] == "resume" else next(by_id[(cmd[4], a)] for a in cmd if a.startswith("run_id="))
        )
        if point.index == 5:
            return 1  # a failing run
        index = json.loads(sweep.index_path.read_text())
        assert index["points"][point.index]["status"] == "running"
        _fake_metrics(point, 2)
        return 0

    statuses = run_sweep(sweep, lanes=4, cores=8, runner=runner, echo=lambda _: None)
    assert len(calls) == 7
    runs = [cmd for cmd, _ in calls if cmd[3] == "run"]
    assert len(runs) == 6 and all("train.num_threads=2" in cmd for cmd in runs)  # 8 cores / 4 lanes
    assert all(log is not None and log.parent.parent == sweep.root / "logs" for _, log in calls)
    assert statuses == {**{i: "done" for i in range(8)}, 5: "failed"}
    index = json.loads(sweep.index_path.read_text())
    assert [p["status"] for p in index["points"]] == ["done"] * 5 + ["failed"] + ["done"] * 2
    assert index["points"][5]["returncode"] == 1
    assert index["points"][2]["run_dir"] == "naive/fewrel-perm1-s100"
    assert index["points"][2]["task_order"] == "perm:1" and index["points"][2]["seed"] == 100
    assert read_index(sweep.root) == [p.run_dir for p in sweep.points]
    assert [f.name for f in sweep.root.iterdir() if f.name.endswith(".tmp")] == []  # atomic: no temp file left

    one_lane: list[list[str]] = []
    run_sweep(sweep, lanes=1, cores=8, runner=lambda cmd, log: one_lane.append(cmd) or 1, echo=lambda _: None)
    assert len(one_lane) == 1 and "train.num_threads=8" in one_lane[0]  # only the failed point is left


def test_points_run_seed_major_so_a_stopped_sweep_holds_whole_seeds(tmp_path):
    sweep = load_sweep(_sweep_file(tmp_path))  # grid order: naive x (2 orders x 2 seeds), then joint x ...
    assert [p.experiment for p in sweep.points] == ["naive"] * 4 + ["joint"] * 4
    ran: list[tuple[str, int, str]] = []

    def runner(cmd: list[str], log: Path | None) -> int:
        point = next(p for p in sweep.points if f"run_id={p.point_id}" in cmd and p.experiment == cmd[4])
        ran.append((point.experiment, point.seed, order_label(point.task_order)))
        return 1

    run_sweep(sweep, lanes=1, cores=2, runner=runner, echo=lambda _: None)
    assert ran == [
        ("naive", 100, "default"),
        ("joint", 100, "default"),
        ("naive", 100, "perm1"),
        ("joint", 100, "perm1"),
        ("naive", 200, "default"),
        ("joint", 200, "default"),
        ("naive", 200, "perm1"),
        ("joint", 200, "perm1"),
    ]
    assert [p.index for p in run_order(sweep.points)][:2] == [0, 4]  # the grid indices themselves do not move
    # a subset (the points left after a partial sweep) still runs seed-major, even when its first point is seed 200
    subset = [p for p in sweep.points if (p.experiment, p.seed) in {("naive", 200), ("joint", 100)}]
    assert subset[0].seed == 200
    ran.clear()
    run_sweep(sweep, lanes=1, cores=2, only=[p.index for p in subset], runner=runner, echo=lambda _: None)
    assert [seed for _, seed, _ in ran] == [100, 100, 200, 200]


def test_dry_run_writes_nothing_and_cli_reports_failures(tmp_path, capsys):
    path = _sweep_file(tmp_path)
    assert main(["sweep", str(path), "--dry-run", "--lanes", "2"]) == 0
    out = capsys.readouterr().out
    assert "8 to run" in out and out.count(" run naive ") == 4 and "train.num_threads=" in out
    assert not (tmp_path / "out").exists()
    assert main(["sweep", str(path), "--point", "8"]) == 2
    assert "outside the grid 0..7" in capsys.readouterr().err


def test_slurm_array_script_runs_one_point_per_array_index(tmp_path):
    path = _sweep_file(tmp_path, slurm={"time": "01:00:00", "cpus_per_task": 4})
    sweep = load_sweep(path)
    script = emit(sweep, "slurm").read_text()
    assert "#SBATCH --array=0-7" in script and "#SBATCH --cpus-per-task=4" in script
    assert "#SBATCH --time=01:00:00" in script
    (line,) = [ln for ln in script.splitlines() if "$SLURM_ARRAY_TASK_ID" in ln]
    argv = shlex.split(line.replace("$SLURM_ARRAY_TASK_ID", "6"))
    assert argv[0] == "srun"
    out = subprocess.run([*argv[1:], "--dry-run"], capture_output=True, text=True, check=True, cwd=tmp_path).stdout
    point = sweep.points[6]
    (cmd,) = [ln for ln in out.splitlines() if ln.startswith("[6] ")]
    assert f"run {point.experiment} " in cmd and f"run_id={point.point_id}" in cmd and "data.task_order=perm:1" in cmd
    assert "1 point(s)" in out


def test_wandb_sweep_config_is_a_grid_over_points(tmp_path, capsys):
    sweep = load_sweep(_sweep_file(tmp_path))
    config = yaml.safe_load(emit(sweep, "wandb", tmp_path / "w.yaml").read_text())
    assert config["method"] == "grid" and config["parameters"]["point"]["values"] == list(range(8))
    argv = [a.replace("${args}", "--point=3") for a in config["command"]]  # what a W&B agent substitutes
    assert argv[:3] == [sys.executable, "-m", "conpet_lightning.cli"]
    assert main([*argv[3:], "--dry-run"]) == 0
    assert f"run_id={sweep.points[3].point_id}" in capsys.readouterr().out
