"""W&B dashboard (offline), PNG figures in the run folder, and continual evaluation every N steps, on tiny runs."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

import pytest

from conpet_lightning.config import ConfigError
from conpet_lightning.metrics import forgetting, min_acc, wc_acc
from conpet_lightning.reporting.wandb_logger import config_dict
from tests.helpers import tiny_loop

PNGS = ("accuracy_heatmap.png", "forgetting_curves.png", "forgetting_bars.png")


def read_wandb_log(run_file: Path) -> dict[str, Any]:
    """History rows, merged summary and run config of an offline ``run-*.wandb`` file (a LevelDB-format log)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = run_file.read_bytes()
    block, pos, chunks, partial = 32768, 7, [], b""  # 7 bytes of W&B file header, then 32 KiB blocks
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a record header is zero padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:
            pos += left
            continue
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 1:
            chunks.append(chunk)
        elif kind == 2:
            partial = chunk
        elif kind == 3:
            partial += chunk
        elif kind == 4:
            chunks.append(partial + chunk)
    out: dict[str, Any] = {"history": [], "summary": {}, "config": {}}

    def key(item: Any) -> str:
        return "/".join(item.nested_key) if item.nested_key else item.key

    for raw in chunks:
        record = pb.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "history":
            out["history"].append({key(i): json.loads(i.value_json) for i in record.history.item})
        elif kind == "summary":
            out["summary"].update({key(i): json.loads(i.value_json) for i in record.summary.update})
        elif kind == "run":
            out["config"].update({key(i): json.loads(i.value_json) for i in record.run.config.update})
    return out


def wandb_children() -> list[int]:
    """Pids of wandb-core processes started by this (pytest) process."""
    me, pids = os.getpid(), []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        name, rest = text[text.index("(") + 1 : text.rindex(")")], text[text.rindex(")") + 2 :].split()
        if "wandb" in name and int(rest[1]) == me:
            pids.append(int(stat.parent.name))
    return pids


def assert_pngs(run_dir: Path) -> None:
    for name in PNGS:
        data = (run_dir / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000, name


@pytest.fixture(scope="module")
def dynamic_run(tmp_path_factory):
    """Dynamic ConPET, 2 tasks, W&B on (config offline mode beats conftest WANDB_MODE=disabled), eval every 2."""
    loop = tiny_loop("dynamic_conpet", tmp_path_factory.mktemp("dash"), "logging.wandb=true", "eval.every_n_steps=2")
    metrics = loop.run()
    runs = sorted((loop.run_dir / "wandb").glob("offline-run-*"))
    return loop, metrics, runs


@pytest.fixture(scope="module")
def naive_run(tmp_path_factory):
    """Naive, 2 tasks, W&B off, continual evaluation every 2 steps."""
    loop = tiny_loop("naive", tmp_path_factory.mktemp("curve"), "eval.every_n_steps=2")
    metrics = loop.run()
    return loop, metrics


def last_media(wb: dict[str, Any], run: Path, name: str) -> Any:
    """The table file of the last history row that logged ``name``."""
    rows = [r for r in wb["history"] if f"{name}/path" in r]
    assert rows, f"{name} was never logged"
    return json.loads((run / "files" / rows[-1][f"{name}/path"]).read_text())


def test_offline_wandb_run_holds_the_accuracy_matrix_and_charts(dynamic_run):
    loop, metrics, runs = dynamic_run
    assert len(runs) == 1, runs
    run = runs[0]
    wb = read_wandb_log(next(run.glob("run-*.wandb")))
    R = metrics["accuracy_matrix"]
    assert json.loads((loop.run_dir / "metrics.json").read_text())["accuracy_matrix"] == R

    table = last_media(wb, run, "dashboard/accuracy_matrix")
    assert table["columns"] == ["after_task", "task0", "task1"]
    assert table["data"] == [[i, *R[i]] for i in range(2)]
    assert len(list((run / "files/media/table/dashboard").glob("accuracy_matrix_*.table.json"))) == 2  # one per task

    curves = last_media(wb, run, "dashboard/forgetting_curves_table")  # wandb.plot.line_series' data
    expected = [[i, f"task {j}", R[i][j]] for j in range(2) for i in range(j, 2)]
    assert sorted(map(tuple, curves["data"])) == sorted(map(tuple, expected))

    bars = last_media(wb, run, "dashboard/forgetting_bars_table")
    assert bars["data"] == [["task 0", pytest.approx(forgetting(R)[1][0])]]
    assert any(r.get("dashboard/accuracy_heatmap/_type") == "image-file" for r in wb["history"])

    selector = metrics["per_task"][1]["selector"]
    confusion = last_media(wb, run, "selector/confusion")
    assert confusion["data"] == [[g, *selector["confusion"][g]] for g in range(2)]
    panel = [r for r in wb["history"] if "selector/topk_hit_rate" in r][-1]
    assert panel["selector/topk_hit_rate"] == pytest.approx(selector["topk_hit_rate"])
    assert panel["selector/oracle_gap_macro"] == pytest.approx(selector["oracle_gap_macro"])

    for name in ("acc_macro", "bwt", "forgetting", "min_acc", "wc_acc"):
        assert wb["summary"][name] == pytest.approx(metrics["summary"][name]), name
    config = {k: v for k, v in wb["config"].items() if not k.startswith("_")}
    assert config == json.loads(json.dumps(config_dict(loop.cfg)))  # the resolved config is the W&B run config
    assert config["method"]["name"] == "dynamic_conpet" and config["logging"]["wandb_mode"] == "offline"
    assert_pngs(loop.run_dir)


def test_wandb_steps_are_monotonic_over_the_run_and_tagged(dynamic_run):
    loop, metrics, runs = dynamic_run
    wb = read_wandb_log(next(runs[0].glob("run-*.wandb")))
    steps = [r["trainer/global_step"] for r in wb["history"] if "trainer/global_step" in r]
    assert len(steps) > 8 and steps == sorted(steps)
    # every stage's Trainer restarts at 0: the test rows sit at the run's cumulative optimizer steps
    cumulative, total = [], 0
    for rec in metrics["per_task"]:
        total += rec["train_steps"]
        cumulative.append(total)
    tests = [r for r in wb["history"] if "test/acc_macro" in r]
    assert [r["trainer/global_step"] for r in tests] == cumulative
    assert [(r["task"], r["stage"]) for r in tests] == [(0, "test"), (1, "test")]
    sel = [r for r in wb["history"] if "val/selector_acc" in r]
    assert sel and all((r["task"], r["stage"]) == (1, "selector") for r in sel)
    assert cumulative[0] <= sel[0]["trainer/global_step"] < cumulative[1]
    # the continual-evaluation curve is on W&B too, in the order of eval_curve
    logged = [r["continual/acc_task0"] for r in wb["history"] if "continual/acc_task0" in r]
    assert logged == pytest.approx([e["acc"][0] for e in metrics["eval_curve"]])
    assert wandb_children() == []  # the run is finished and wandb's service process is gone


def test_dynamic_eval_curve_routes_every_seen_task(dynamic_run):
    loop, metrics, _ = dynamic_run
    curve = metrics["eval_curve"]
    assert {e["task"] for e in curve} == {0, 1}
    assert all(len(e["acc"]) == e["task"] + 1 for e in curve)
    expert_steps = metrics["per_task"][1]["stages"]["expert"]["steps"]
    assert [e["step"] for e in curve if e["task"] == 1] == [*range(2, expert_steps + 1, 2), expert_steps]
    assert [e for e in curve if e["task"] == 1][-1]["acc"] == metrics["accuracy_matrix"][1]


def test_eval_curve_every_n_steps_and_min_acc(naive_run):
    loop, metrics = naive_run
    saved = json.loads((loop.run_dir / "metrics.json").read_text())
    curve, R = saved["eval_curve"], saved["accuracy_matrix"]
    for task in range(2):
        entries = [e for e in curve if e["task"] == task]
        n_steps = saved["per_task"][task]["stages"]["train"]["steps"]
        assert [e["step"] for e in entries] == [*range(2, n_steps + 1, 2), n_steps]
        assert all(len(e["acc"]) == task + 1 and all(0 <= a <= 100 for a in e["acc"]) for e in entries)
        assert entries[-1]["acc"] == R[task][: task + 1]  # the end-of-task entry is the test's row of R
    summary = saved["summary"]
    assert isinstance(summary["min_acc"], float) and isinstance(summary["wc_acc"], float)
    assert summary["min_acc"] == pytest.approx(min_acc(curve, 1))
    assert summary["wc_acc"] == pytest.approx(wc_acc(curve, 1))
    # by hand: task 0's worst accuracy while task 1 trained, and task 1's accuracy at its last evaluation
    worst = min(e["acc"][0] for e in curve if e["task"] == 1)
    assert summary["min_acc"] == pytest.approx(worst)
    assert summary["wc_acc"] == pytest.approx(R[1][1] / 2 + worst / 2)


def test_figures_without_wandb(naive_run):
    loop, _ = naive_run
    assert_pngs(loop.run_dir)
    assert not (loop.run_dir / "wandb").exists()
    assert loop.wandb_logger is None


@pytest.mark.parametrize(
    ("override", "match"),
    [("logging.wandb_mode=offlne", "logging.wandb_mode must be one of"), ("eval.every_n_steps=0", "every_n_steps")],
)
def test_bad_dashboard_options_fail_before_loading(tmp_path, override, match):
    with pytest.raises(ConfigError, match=match):
        tiny_loop("naive", tmp_path, "logging.wandb=true", override)
    assert not (tmp_path / "naive" / "run" / "wandb").exists()
