"""Every failure a user can cause ends with one ``conpet: error:`` line and status 2, never a traceback; Ctrl-C 130.

The runs here stop before any training (bad input is refused at start-up), except the Ctrl-C test, which trains
one tiny task first.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from conpet_lightning import cli
from conpet_lightning.cli import main
from conpet_lightning.config import ConfigError, load_config, to_yaml
from conpet_lightning.data.benchmarks import check_num_tasks, load_benchmark
from conpet_lightning.data.records import MASK, TEMPLATE_START, DataError
from conpet_lightning.loop import TaskLoop
from conpet_lightning.resume_overrides import (
    ALLOWED_RESUME_KEYS,
    RECORD_NAME,
    check_resume_overrides,
    record_resume_overrides,
)
from conpet_lightning.runfiles import DiskFullError, RunFileError
from tests.helpers import TINY

DATA = Path(__file__).resolve().parents[1] / "data"
LOOP_SOURCE = (Path(__file__).resolve().parents[1] / "src/conpet_lightning/loop.py").read_text()


def _one_error_line(capsys: pytest.CaptureFixture[str], *needles: str) -> str:
    """The single stderr line of a failed command; it starts with ``conpet: error:`` and holds every needle."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("conpet: error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _args(experiment: str, out: Path, *overrides: str) -> list[str]:
    return ["run", experiment, *TINY, "data.num_tasks=2", f"output_dir={out}", *overrides]


def _no_run_folder(out: Path, experiment: str) -> bool:
    folder = out / experiment
    return not folder.exists() or not any(folder.iterdir())


# ------------------------------------------------------------------------------------------------- bad inputs
def test_missing_model_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nonexistent"
    assert main(_args("dynamic_conpet", tmp_path, f"model.path={missing}")) == 2
    _one_error_line(capsys, f"model.path: {missing} does not exist")
    assert _no_run_folder(tmp_path, "dynamic_conpet")  # it failed before its first task: nothing left behind


def test_model_path_without_config_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "not_a_model"
    folder.mkdir()
    (folder / "weights.bin").write_bytes(b"\0")
    assert main(_args("naive", tmp_path / "runs", f"model.path={folder}")) == 2
    _one_error_line(capsys, f"model.path: {folder} is not a Hugging Face model folder (no config.json)")
    assert _no_run_folder(tmp_path / "runs", "naive")


@pytest.mark.parametrize("value", ["-1", "0"])
def test_num_tasks_below_one(tmp_path: Path, capsys: pytest.CaptureFixture[str], value: str) -> None:
    assert main(["run", "naive", *TINY, f"output_dir={tmp_path}", f"data.num_tasks={value}"]) == 2
    _one_error_line(capsys, "data.num_tasks", value)
    assert not (tmp_path / "naive").exists()


def test_check_num_tasks_names_the_range() -> None:
    check_num_tasks(None, 10)
    check_num_tasks(1, 10)
    check_num_tasks(10, 10)
    with pytest.raises(ConfigError, match=r"^data\.num_tasks=12 but fewrel has 10 tasks; allowed 1\.\.10$"):
        check_num_tasks(12, 10, "fewrel")
    with pytest.raises(ConfigError, match=r"allowed 1\.\.10"):
        check_num_tasks(0, 10, "fewrel")


@pytest.mark.xfail("check_num_tasks" not in LOOP_SOURCE, reason="wired by loop", strict=True)
def test_num_tasks_above_the_benchmark(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def must_not_run(self: TaskLoop) -> dict:
        raise AssertionError("data.num_tasks=99 was not refused at start-up")

    monkeypatch.setattr(TaskLoop, "run", must_not_run)
    assert main(["run", "naive", *TINY, f"output_dir={tmp_path}", "data.num_tasks=99"]) == 2
    _one_error_line(capsys, "data.num_tasks=99", "allowed 1..")


def _ace_folder(folder: Path, empty: tuple[str, int] | None = None) -> Path:
    """ConPET key files for ACE (5 tasks), one record per task and part; ``empty`` = (part, task entry) left empty."""
    split = json.loads((DATA / "conpet_splits/ace_class_split_p5_tags.json").read_text())
    text = f"[unused0] A [unused1] met [unused2] B [unused3] .{TEMPLATE_START} B is the {MASK} of A."
    folder.mkdir(parents=True, exist_ok=True)
    for part in ("train", "valid", "test"):
        entries: list[list] = [[[f"{part}-{k}", split[f"p{k + 1}"][0], text]] for k in range(5)]
        if empty is not None and empty[0] == part:
            entries[empty[1]] = []
        (folder / f"ace_split_{part}_dataset_p5_key.json").write_text(json.dumps(entries))
    return folder


@pytest.mark.parametrize("part", ["train", "test"])
def test_conpet_json_empty_task_entry(tmp_path: Path, capsys: pytest.CaptureFixture[str], part: str) -> None:
    folder = _ace_folder(tmp_path / "ace", empty=(part, 2))
    key_file = folder / f"ace_split_{part}_dataset_p5_key.json"
    with pytest.raises(DataError, match=rf"{key_file}: task entry 2 \(task 3\) is empty"):
        load_benchmark("conpet_json", root=DATA, local_path=folder, conpet_dataset="ace")
    args = ["data.benchmark=conpet_json", f"data.local_path={folder}", "data.conpet_dataset=ace"]
    assert main(["run", "naive", *TINY, f"output_dir={tmp_path / 'runs'}", *args]) == 2
    _one_error_line(capsys, str(key_file), "task 3")
    assert _no_run_folder(tmp_path / "runs", "naive")


def test_conpet_json_full_entries_still_load(tmp_path: Path) -> None:
    bench = load_benchmark("conpet_json", root=DATA, local_path=_ace_folder(tmp_path), conpet_dataset="ace")
    assert bench.num_tasks == 5


# ---------------------------------------------------------------------------------------------------- resume
def test_resume_a_folder_that_is_not_a_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    assert main(["resume", str(tmp_path)]) == 2
    _one_error_line(capsys, str(tmp_path), "not a run folder")
    assert main(["resume", str(tmp_path / "missing")]) == 2
    _one_error_line(capsys, str(tmp_path / "missing"), "no such folder")


def _run_folder(tmp_path: Path, metrics: str) -> Path:
    run_dir = tmp_path / "naive" / "r1"
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(to_yaml(load_config("naive", [*TINY, "data.num_tasks=2"])))
    (run_dir / "metrics.json").write_text(metrics)
    return run_dir


def test_resume_with_truncated_metrics(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    full = json.dumps({"accuracy_matrix": [[50.0]], "per_task": [{"task": 0}]}, indent=2)
    run_dir = _run_folder(tmp_path, full[: len(full) // 2])
    assert main(["resume", str(run_dir)]) == 2
    _one_error_line(capsys, f"{run_dir / 'metrics.json'} is corrupt or truncated")


def test_resume_refuses_overrides_that_change_finished_tasks(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = _run_folder(tmp_path, "{}")
    assert main(["resume", str(run_dir), "train.lr=1e-4", "seed=3", "data.benchmark=fewnerd"]) == 2
    line = _one_error_line(capsys, "seed, data.benchmark", "allowed: train.lr")
    assert "train.lr," not in line.split("allowed:")[0]  # the accepted key is not listed as refused
    assert not (run_dir / RECORD_NAME).exists()


def test_check_resume_overrides() -> None:
    ok = ["train.lr=1e-4", "train.epochs=3", "logging.wandb=false", "logging.wandb_mode=disabled"]
    ok += ["eval.every_n_steps=5", "method.selector_epochs=2", "train.num_threads=1", "train.lr_by_task=[1e-3]"]
    assert check_resume_overrides(ok) == ok
    for bad in ["seed=3", "train.deterministic=true", "train.batch_size=4", "method.name=emr", "logging=x", "lr=1"]:
        with pytest.raises(ConfigError, match="resume cannot change"):
            check_resume_overrides([bad])
    with pytest.raises(ConfigError, match="not key=value"):
        check_resume_overrides(["train.lr"])
    assert "train.deterministic" not in ALLOWED_RESUME_KEYS


def test_resume_overrides_are_recorded(tmp_path: Path) -> None:
    record_resume_overrides(tmp_path, ["train.lr=1e-4"], now=0)
    record_resume_overrides(tmp_path, ["train.epochs=3", "logging.wandb=false"], now=60)
    entries = yaml.safe_load((tmp_path / RECORD_NAME).read_text())
    assert [e["overrides"] for e in entries] == [["train.lr=1e-4"], ["train.epochs=3", "logging.wandb=false"]]
    assert all(isinstance(e["time"], str) for e in entries)
    (tmp_path / RECORD_NAME).write_text("a: [1\n")
    with pytest.raises(RunFileError, match=f"{tmp_path / RECORD_NAME} is corrupt"):
        record_resume_overrides(tmp_path, ["train.lr=1"])


# ------------------------------------------------------------------------------------- failures after start-up
def _failing_init(error: BaseException):  # noqa: ANN202 - a TaskLoop.__init__ stand-in
    def init(self: TaskLoop, cfg: object, run_dir: Path) -> None:
        (Path(run_dir) / "config.yaml").write_text("started")  # what a real start-up leaves before failing
        raise error

    return init


def test_disk_full_before_the_first_task(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(TaskLoop, "__init__", _failing_init(DiskFullError(tmp_path / "x" / "config.yaml")))
    assert main(_args("naive", tmp_path)) == 2
    _one_error_line(capsys, "the disk is full", "config.yaml", "was removed")
    assert _no_run_folder(tmp_path, "naive")


def test_a_diverging_run_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    message = "loss is NaN at task 1, stage 'expert'; lower train.lr\n(or check the data)"
    monkeypatch.setattr(TaskLoop, "__init__", _failing_init(FloatingPointError(message)))
    assert main(_args("naive", tmp_path)) == 2
    _one_error_line(capsys, "loss is NaN", "lower train.lr; (or check the data)")


def test_a_bug_keeps_its_traceback_and_leaves_no_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(TaskLoop, "__init__", _failing_init(ZeroDivisionError("a bug")))
    with pytest.raises(ZeroDivisionError):
        main(_args("naive", tmp_path))
    assert _no_run_folder(tmp_path, "naive")


def test_ctrl_c_during_start_up(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(TaskLoop, "__init__", _failing_init(KeyboardInterrupt()))
    assert main(_args("naive", tmp_path)) == 130
    err = capsys.readouterr().err.strip()
    assert err == "conpet: interrupted during start-up; nothing was run"
    assert _no_run_folder(tmp_path, "naive")


def test_ctrl_c_after_one_task_says_how_to_resume(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    real_run_task = TaskLoop.run_task

    def run_task(self: TaskLoop, task: int) -> None:
        if task == 1:
            raise KeyboardInterrupt
        real_run_task(self, task)

    monkeypatch.setattr(TaskLoop, "run_task", run_task)
    assert main([*_args("naive", tmp_path), "run_id=r1"]) == 130
    run_dir = tmp_path / "naive" / "r1"
    err = capsys.readouterr().err.strip()
    assert err == (
        f"conpet: interrupted after 1 finished task(s); their results are in {run_dir}. "
        f"Continue with: conpet resume {run_dir}"
    )
    assert len(json.loads((run_dir / "metrics.json").read_text())["per_task"]) == 1


def test_ctrl_c_in_the_first_task_keeps_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupted(self: TaskLoop) -> dict:
        (self.run_dir / "checkpoints").mkdir()
        raise KeyboardInterrupt

    monkeypatch.setattr(TaskLoop, "run", interrupted)
    assert main(_args("naive", tmp_path)) == 130
    err = capsys.readouterr().err.strip()
    assert err.startswith("conpet: interrupted before the first task finished; nothing was kept")
    assert _no_run_folder(tmp_path, "naive")


def test_a_given_run_folder_is_not_removed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run_dir = tmp_path / "naive" / "mine"
    run_dir.mkdir(parents=True)
    (run_dir / "notes.txt").write_text("the user's")
    monkeypatch.setattr(TaskLoop, "__init__", _failing_init(ZeroDivisionError("a bug")))
    with pytest.raises(ZeroDivisionError):
        main([*_args("naive", tmp_path), "run_id=mine"])
    assert (run_dir / "notes.txt").read_text() == "the user's"


def test_run_folders_do_not_collide(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[Path] = []

    def init(self: TaskLoop, cfg: object, run_dir: Path) -> None:
        seen.append(Path(run_dir))
        raise KeyboardInterrupt

    monkeypatch.setattr(TaskLoop, "__init__", init)
    monkeypatch.setattr(cli.shutil, "rmtree", lambda *a, **k: None)  # keep the folders to compare them
    for _ in range(3):
        assert main(_args("naive", tmp_path)) == 130
    assert len(set(seen)) == 3 and all(p.parent == tmp_path / "naive" for p in seen)


def test_resume_of_a_folder_in_use(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tests.test_runfiles import _holder

    run_dir = _run_folder(tmp_path, "{}")
    holder = _holder(run_dir, 60)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "got"
        assert main(["resume", str(run_dir)]) == 2
        _one_error_line(capsys, f"run folder {run_dir} is in use by process {holder.pid}")
    finally:
        holder.kill()
        holder.wait()


def test_ctrl_c_inside_a_trainer_says_how_to_resume(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Lightning turns Ctrl-C during fit into ``sys.exit(1)``; the CLI still reports it as an interruption (130)."""
    import signal

    from lightning.pytorch.trainer.trainer import Trainer

    run_dir = tmp_path / "naive" / "r1"
    real_fit_impl = Trainer._fit_impl

    def fit_impl(self: Trainer, *args: object, **kwargs: object) -> None:
        if (run_dir / "metrics.json").exists():  # task 1 finished: Ctrl-C in task 2's training
            raise KeyboardInterrupt
        real_fit_impl(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "_fit_impl", fit_impl)
    handler = signal.getsignal(signal.SIGINT)
    try:
        assert main([*_args("naive", tmp_path), "run_id=r1"]) == 130
    finally:
        signal.signal(signal.SIGINT, handler)  # Lightning ignores further Ctrl-C once it saw one
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (
        f"conpet: interrupted after 1 finished task(s); their results are in {run_dir}. "
        f"Continue with: conpet resume {run_dir}"
    )
