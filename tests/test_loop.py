"""The task loop end to end on a tiny model: run folder, accuracy matrix, naive vs joint data, errors."""

import json

import pytest
import torch

from conpet_lightning.cli import main
from tests.helpers import TINY, tiny_loop


def _reject_non_json(name: str) -> None:
    raise AssertionError(f"metrics.json holds {name}, which strict JSON readers (jq, JavaScript) reject")


def test_naive_run_writes_the_run_folder(tmp_path):
    loop = tiny_loop("naive", tmp_path, num_tasks=3)
    out = loop.run()
    run = loop.run_dir
    assert (run / "config.yaml").read_text().count("naive") >= 1
    saved = json.loads((run / "metrics.json").read_text(), parse_constant=_reject_non_json)
    assert saved == json.loads(json.dumps(out))
    assert saved["per_task"][0]["test"]["per_task"][1:] == [None, None]  # tasks not seen yet: null, not NaN
    R = saved["accuracy_matrix"]
    assert len(R) == 3 and all(len(row) == 3 for row in R)
    assert all(R[i][j] is None for i in range(3) for j in range(3) if j > i)
    assert all(0.0 <= R[i][j] <= 100.0 for i in range(3) for j in range(i + 1))
    assert saved["summary"]["acc_macro"] == pytest.approx(sum(R[2]) / 3)
    n = [t["n_test"] for t in saved["tasks"]]
    assert saved["summary"]["acc_micro"] == pytest.approx(sum(a * b for a, b in zip(R[2], n)) / sum(n))
    assert [t["task"] for t in saved["per_task"]] == [0, 1, 2]
    for rec in saved["per_task"]:
        assert rec["train_steps"] > 0 and rec["train_seconds"] > 0
        stage = rec["stages"]["train"]
        assert 0 < stage["trainable_parameters"] < stage["total_parameters"]
    csv = (run / "accuracy_matrix.csv").read_text().splitlines()
    assert csv[0] == "task1,task2,task3" and len(csv) == 4


def test_cpu_default_runs_the_encoder_in_bf16_autocast_in_training_and_evaluation(tmp_path):
    from conpet_lightning.config import load_config

    default = load_config("dynamic_conpet", [])
    assert (default.train.precision, default.data.max_seq_len) == ("bf16-mixed", 48)  # chosen by sweeps/cpu_speed
    loop = tiny_loop("naive", tmp_path, "train.precision=bf16-mixed", num_tasks=1)
    seen: dict[bool, set[torch.dtype]] = {True: set(), False: set()}
    first_linear = next(m for m in loop.method.modules() if isinstance(m, torch.nn.Linear))
    first_linear.register_forward_hook(lambda mod, args, out: seen[mod.training].add(out.dtype))
    out = loop.run()
    assert seen[True] == {torch.bfloat16} and seen[False] == {torch.bfloat16}  # training and evaluation
    assert 0.0 <= out["summary"]["acc_macro"] <= 100.0


def test_joint_trains_on_all_seen_tasks_and_naive_on_the_current_one(tmp_path):
    naive = tiny_loop("naive", tmp_path / "n", num_tasks=3).run()
    joint = tiny_loop("joint", tmp_path / "j", num_tasks=3).run()
    naive_steps = [t["train_steps"] for t in naive["per_task"]]
    joint_steps = [t["train_steps"] for t in joint["per_task"]]
    assert naive_steps[0] == joint_steps[0]
    assert joint_steps[2] > joint_steps[1] > joint_steps[0]  # the pool grows with every task
    assert naive_steps[2] == naive_steps[0]  # 4 per class x 8 classes each task


def test_best_epoch_is_restored(tmp_path):
    loop = tiny_loop("naive", tmp_path, "train.epochs=2", num_tasks=1)
    loop.run()
    stage = loop.per_task[0]["stages"]["train"]
    best = torch.load(loop.run_dir / stage["best_checkpoint"], weights_only=True)["state_dict"]
    live = loop.method.state_dict()
    assert set(best) == {n for n, _ in loop.method.named_parameters() if "lora_" in n or n.startswith("head.")}
    assert all(torch.equal(best[k], live[k]) for k in best)


def test_nan_loss_stops_with_a_clear_error_and_keeps_finished_tasks(tmp_path, monkeypatch):
    loop = tiny_loop("naive", tmp_path, num_tasks=2)
    original = loop.method.training_step

    def poisoned(batch, batch_idx):
        loss = original(batch, batch_idx)
        return loss * float("nan") if loop.method.task == 1 else loss

    monkeypatch.setattr(loop.method, "training_step", poisoned)
    with pytest.raises(FloatingPointError, match="task 2"):
        loop.run()
    saved = json.loads((loop.run_dir / "metrics.json").read_text())
    assert len(saved["accuracy_matrix"]) == 1  # task 1's result survived


def test_cli_unknown_key_is_a_clean_error(capsys):
    assert main(["run", "naive", "train.epochz=1"]) == 2
    assert "epochz" in capsys.readouterr().err


def test_cli_run_and_stats(tmp_path, capsys):
    args = ["run", "naive", *TINY, "data.num_tasks=1", f"output_dir={tmp_path}", "run_id=r1"]
    assert main(args) == 0
    saved = json.loads((tmp_path / "naive" / "r1" / "metrics.json").read_text())
    out = capsys.readouterr().out
    assert f"[conpet] task 1/1: acc_macro={saved['summary']['acc_macro']:.2f}" in out
    assert f"[conpet] done: acc_macro={saved['summary']['acc_macro']:.2f}" in out
    assert main(args) == 2  # the same run folder is never overwritten
    assert "already holds results" in capsys.readouterr().err
    assert main(["data", "stats", "banking77", "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["benchmark"] == "banking77" and stats["num_classes"] == 77 and len(stats["tasks"]) == 7
