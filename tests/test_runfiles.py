"""Run files: atomic writes that survive a full disk, corrupt files named, unique run ids, one process per folder."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conpet_lightning import runfiles
from conpet_lightning.runfiles import (
    DiskFullError,
    RunFileError,
    RunLock,
    RunLockedError,
    atomic_torch_save,
    atomic_write_json,
    atomic_write_text,
    clean_temp_files,
    create_run_dir,
    load_torch,
    new_run_id,
    read_json,
)

SRC = str(Path(__file__).resolve().parents[1] / "src")


def _no_temp_files(folder: Path) -> bool:
    return not [p for p in folder.iterdir() if p.name.endswith(runfiles.TMP_SUFFIX)]


def _one_line(err: BaseException) -> str:
    text = str(err)
    assert "\n" not in text
    return text


def test_atomic_writes_replace_the_file(tmp_path: Path) -> None:
    atomic_write_text(tmp_path / "a.txt", "one")
    atomic_write_text(tmp_path / "a.txt", "two")
    atomic_write_json(tmp_path / "m.json", {"R": [[1.0]]})
    atomic_torch_save({"w": torch.arange(3)}, tmp_path / "final.pt")
    assert (tmp_path / "a.txt").read_text() == "two"
    assert read_json(tmp_path / "m.json") == {"R": [[1.0]]}
    assert torch.equal(load_torch(tmp_path / "final.pt")["w"], torch.arange(3))
    assert oct((tmp_path / "a.txt").stat().st_mode & 0o777) == oct(0o666 & ~runfiles._UMASK)
    assert _no_temp_files(tmp_path)


def _full_disk_after(limit: int) -> object:
    """An ``os.write`` that writes up to ``limit`` bytes in all, then fails like a full disk."""
    real = os.write
    left = [limit]

    def write(fd: int, data: bytes | memoryview) -> int:
        if left[0] <= 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        n = real(fd, bytes(data)[: left[0]])
        left[0] -= n
        return n

    return write


def test_disk_full_keeps_the_previous_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "metrics.json"
    atomic_write_json(path, {"per_task": [1]})
    before = path.read_bytes()
    monkeypatch.setattr(os, "write", _full_disk_after(10))
    with pytest.raises(DiskFullError) as info:
        atomic_write_json(path, {"per_task": [1, 2], "pad": "x" * 10000}, run_dir=tmp_path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert _no_temp_files(tmp_path)
    line = _one_line(info.value)
    assert "disk is full" in line and str(path) in line and f"conpet resume {tmp_path}" in line
    assert isinstance(info.value, RunFileError)


def test_quota_exceeded_is_disk_full_and_run_dir_defaults_to_parent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "accuracy_matrix.csv"
    atomic_write_text(path, "task1\n10.00\n")

    def no_quota(fd: int, data: bytes) -> int:
        raise OSError(errno.EDQUOT, "Disk quota exceeded")

    monkeypatch.setattr(os, "write", no_quota)
    with pytest.raises(DiskFullError, match=f"conpet resume {tmp_path}$"):
        atomic_write_text(path, "task1,task2\n")
    monkeypatch.undo()
    assert path.read_text() == "task1\n10.00\n"


def test_other_write_errors_are_not_disk_full(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "x.txt"
    atomic_write_text(path, "old")

    def broken(fd: int, data: bytes) -> int:
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(os, "write", broken)
    with pytest.raises(OSError) as info:
        atomic_write_text(path, "new")
    monkeypatch.undo()
    assert not isinstance(info.value, DiskFullError)
    assert path.read_text() == "old" and _no_temp_files(tmp_path)


@pytest.mark.parametrize(
    "error",
    [
        RuntimeError(
            "[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed writing file "
            "data/0: file write failed"
        ),
        RuntimeError("basic_ios::clear: iostream error"),
        OSError(errno.ENOSPC, "No space left on device"),
    ],
)
def test_disk_full_in_torch_save_keeps_previous_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: Exception
) -> None:
    path = tmp_path / "checkpoints" / "final.pt"
    path.parent.mkdir()
    atomic_torch_save({"w": torch.ones(2)}, path, run_dir=tmp_path)
    real_save = torch.save

    def failing_save(obj: object, f: object, *args: object, **kwargs: object) -> None:
        real_save({"w": torch.zeros(1000)}, f)  # a partial file is on disk when the error comes
        raise error

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(DiskFullError) as info:
        atomic_torch_save({"w": torch.zeros(2)}, path, run_dir=tmp_path)
    monkeypatch.undo()
    assert torch.equal(load_torch(path)["w"], torch.ones(2))
    assert _no_temp_files(path.parent)
    line = _one_line(info.value)
    assert str(path) in line and f"conpet resume {tmp_path}" in line


def test_unrelated_torch_error_is_not_disk_full(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing_save(obj: object, f: object) -> None:
        raise RuntimeError("cannot pickle this")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(RuntimeError, match="cannot pickle") as info:
        atomic_torch_save({}, tmp_path / "w.pt")
    assert not isinstance(info.value, DiskFullError)
    assert not (tmp_path / "w.pt").exists() and _no_temp_files(tmp_path)


def test_corrupt_json_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "metrics.json"
    path.write_text(json.dumps({"per_task": [1, 2, 3]}, indent=2)[:17])
    with pytest.raises(RunFileError) as info:
        read_json(path, "the run's metrics")
    line = _one_line(info.value)
    assert line.startswith("cannot read the run's metrics: ") and f"{path} is corrupt or truncated (" in line
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(RunFileError, match="is corrupt or truncated"):
        read_json(path)
    with pytest.raises(RunFileError, match=f"{tmp_path / 'nope.json'} does not exist"):
        read_json(tmp_path / "nope.json")


def test_truncated_weights_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "final.pt"
    torch.save({"state_dict": {"w": torch.ones(100)}}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(RunFileError) as info:
        load_torch(path, "task 1's weights")
    assert f"{path} is corrupt or truncated (" in _one_line(info.value)
    path.write_bytes(b"")
    with pytest.raises(RunFileError, match="corrupt or truncated"):
        load_torch(path)
    with pytest.raises(RunFileError, match="does not exist"):
        load_torch(tmp_path / "missing.pt")


def test_clean_temp_files(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    stale = tmp_path / "sub" / ".final.pt.abc123.tmp"
    stale.write_bytes(b"half")
    keep = tmp_path / "metrics.json"
    keep.write_text("{}")
    assert clean_temp_files(tmp_path) == [stale]
    assert not stale.exists() and keep.exists()


def test_run_ids_are_unique_in_one_second() -> None:
    ids = [new_run_id(7) for _ in range(200)]
    assert len(set(ids)) == 200
    stamp, seed, rand = ids[0].rsplit("-", 2)
    assert time.strptime(stamp, "%Y%m%d-%H%M%S") and seed == "s7"
    assert len(rand) == 6 and int(rand, 16) >= 0


def test_create_run_dir_retries_a_collision(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ids = iter(["20250101-000000-s1-aaaaaa", "20250101-000000-s1-aaaaaa", "20250101-000000-s1-bbbbbb"])
    monkeypatch.setattr(runfiles, "new_run_id", lambda seed: next(ids))
    first = create_run_dir(tmp_path / "exp", None, seed=1)
    second = create_run_dir(tmp_path / "exp", None, seed=1)
    assert first.name.endswith("aaaaaa") and second.name.endswith("bbbbbb")


def test_create_run_dir_with_a_given_id(tmp_path: Path) -> None:
    run_dir = create_run_dir(tmp_path, "mine")
    assert run_dir == tmp_path / "mine" and run_dir.is_dir()
    assert create_run_dir(tmp_path, "mine") == run_dir  # no results yet: reusable
    (run_dir / "metrics.json").write_text("{}")
    with pytest.raises(RunFileError, match=f"run folder {run_dir} already holds results"):
        create_run_dir(tmp_path, "mine")


# --------------------------------------------------------------------------------------------------- locking
_HOLDER = """
import sys, time
sys.path.insert(0, {src!r})
from conpet_lightning.runfiles import RunLock, RunLockedError
try:
    lock = RunLock({run_dir!r}).acquire()
except RunLockedError:
    print("locked", flush=True)
    sys.exit(3)
print("got", flush=True)
time.sleep({hold})
"""


def _holder(run_dir: Path, hold: float) -> subprocess.Popen[str]:
    code = _HOLDER.format(src=SRC, run_dir=str(run_dir), hold=hold)
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)


def test_second_process_is_refused_with_holder_pid(tmp_path: Path) -> None:
    holder = _holder(tmp_path, 60)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "got"
        with pytest.raises(RunLockedError) as info:
            RunLock(tmp_path).acquire()
        line = _one_line(info.value)
        assert str(tmp_path) in line and f"process {holder.pid}" in line and info.value.pid == holder.pid
    finally:
        holder.kill()
        holder.wait()


def test_stale_lock_of_a_killed_process_is_taken_over(tmp_path: Path) -> None:
    holder = _holder(tmp_path, 60)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "got"
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    assert (tmp_path / runfiles.LOCK_NAME).read_text().strip() == str(holder.pid)  # the stale file is still there
    with RunLock(tmp_path) as lock:
        assert lock.held
        assert (tmp_path / runfiles.LOCK_NAME).read_text().strip() == str(os.getpid())
    assert not lock.held
    with RunLock(tmp_path):  # released: taken again
        pass


def test_racing_processes_only_one_gets_the_lock(tmp_path: Path) -> None:
    racers = [_holder(tmp_path, 8) for _ in range(4)]
    outcomes = []
    for proc in racers:
        out, _ = proc.communicate(timeout=120)
        outcomes.append((out.strip(), proc.returncode))
    assert sorted(outcomes) == [("got", 0)] + [("locked", 3)] * 3


def test_lock_is_shared_within_one_process(tmp_path: Path) -> None:
    """The CLI and the loop may both take it: one process never locks itself out, and the last release unlocks."""
    outer = RunLock(tmp_path).acquire()
    with RunLock(tmp_path) as inner:
        assert inner.held
    probe = _holder(tmp_path, 0)
    assert probe.communicate(timeout=120)[0].strip() == "locked"  # still held by outer
    outer.release()
    probe = _holder(tmp_path, 0)
    assert probe.communicate(timeout=120)[0].strip() == "got"


def test_a_resumed_run_continues_the_same_wandb_run(tmp_path: Path) -> None:
    from conpet_lightning.config import load_config
    from conpet_lightning.reporting.wandb_logger import RUN_ID_FILE, build_wandb_logger

    cfg = load_config("naive", ["logging.wandb=true", "logging.wandb_mode=disabled"])
    first = build_wandb_logger(cfg, tmp_path)
    assert first is not None
    run_id = (tmp_path / RUN_ID_FILE).read_text().strip()
    assert first._wandb_init["id"] == run_id and first._wandb_init["resume"] == "allow"
    again = build_wandb_logger(cfg, tmp_path)  # the resume of the same folder
    assert again is not None
    assert again._wandb_init["id"] == run_id and again._wandb_init["resume"] == "allow"
    (tmp_path / "other").mkdir()
    other = build_wandb_logger(cfg, tmp_path / "other")  # another run gets another id
    assert other is not None and other._wandb_init["id"] != run_id
    (tmp_path / RUN_ID_FILE).write_text("\n")
    with pytest.raises(RunFileError, match=f"{tmp_path / RUN_ID_FILE} is corrupt"):
        build_wandb_logger(cfg, tmp_path)
