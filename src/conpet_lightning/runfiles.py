"""Run-folder files that are never half-written, run ids that cannot collide, and one process per run folder.

Every file of a run folder (metrics.json, accuracy_matrix.csv, config.yaml, stage weights) is written to a temporary
file in the same folder, flushed to disk and renamed over the old one: a process killed or a disk filled during the
write leaves the previous complete file in place, so a run can always be resumed from what it had finished. A full
disk ends the run with ``DiskFullError``, one line that says which file and how to continue. Reading a file that is
nonetheless corrupt (copied half, edited by hand) raises ``RunFileError`` naming the file instead of a traceback.

``RunLock`` holds an exclusive ``flock`` on ``<run_dir>/.lock`` while a process writes the folder; the kernel releases
it when the process dies, so the lock of a killed run never needs cleaning up.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import pickle
import secrets
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import IO, Any

#: errno values that mean "no space left" (a full disk, or a full quota).
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
#: Substrings of the RuntimeError torch's C++ writer raises when the underlying stream fails (a full disk).
TORCH_WRITE_FAILURES = ("basic_ios::clear", "file write failed", "iostream error")
#: Name of the lock file inside a run folder.
LOCK_NAME = ".lock"
TMP_SUFFIX = ".tmp"

_UMASK = os.umask(0)
os.umask(_UMASK)


class RunFileError(Exception):
    """A run-folder file cannot be written or read (full disk, corrupt file, folder in use); the message is one line."""


class DiskFullError(RunFileError):
    """No space left while writing a run file; the previous complete version of the file is still in place."""

    def __init__(self, path: str | Path, run_dir: str | Path | None = None) -> None:
        self.path = Path(path)
        self.run_dir = Path(run_dir) if run_dir is not None else self.path.parent
        super().__init__(
            f"the disk is full: could not write {self.path}; free some space, then continue the run with: "
            f"conpet resume {self.run_dir}"
        )


class RunLockedError(RunFileError):
    """Another live process holds the run folder's lock."""

    def __init__(self, run_dir: str | Path, pid: int | None) -> None:
        self.run_dir = Path(run_dir)
        self.pid = pid
        holder = f"process {pid}" if pid is not None else "another process"
        super().__init__(f"run folder {self.run_dir} is in use by {holder}; wait for it to end or use another folder")


# ------------------------------------------------------------------------------------------------- atomic writes
def _is_disk_full(err: BaseException) -> bool:
    """Whether an exception from a write means the disk (or the quota) is full."""
    if isinstance(err, OSError) and err.errno in DISK_FULL_ERRNOS:
        return True
    if isinstance(err, RuntimeError):
        text = str(err)
        return any(marker in text for marker in TORCH_WRITE_FAILURES)
    return False


def _fsync_dir(folder: Path) -> None:
    """Make a rename durable (best effort: some file systems refuse fsync on a directory)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _atomic_write(path: str | Path, fill: Callable[[int], None], run_dir: str | Path | None) -> None:
    """Create a temp file next to ``path``, let ``fill(fd)`` write it, fsync, then rename it over ``path``.

    On any failure the temp file is removed and ``path`` is untouched; a full disk becomes ``DiskFullError``.
    """
    path = Path(path)
    try:
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    except OSError as err:
        if _is_disk_full(err):
            raise DiskFullError(path, run_dir) from err
        raise
    tmp = Path(tmp_name)
    try:
        try:
            fill(fd)
            os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes it private; a run file is an ordinary file
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if _is_disk_full(err):
            raise DiskFullError(path, run_dir) from err
        raise
    _fsync_dir(path.parent)


def _write_all(fd: int, data: bytes) -> None:
    """``os.write`` until every byte is out (a write may be short)."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def atomic_write_bytes(path: str | Path, data: bytes, run_dir: str | Path | None = None) -> None:
    """Replace ``path`` by ``data`` all at once (see the module docstring); raises ``DiskFullError`` on a full disk."""
    _atomic_write(path, lambda fd: _write_all(fd, data), run_dir)


def atomic_write_text(path: str | Path, text: str, run_dir: str | Path | None = None) -> None:
    """Replace ``path`` by ``text`` (UTF-8) all at once; raises ``DiskFullError`` on a full disk."""
    atomic_write_bytes(path, text.encode("utf-8"), run_dir)


def atomic_write_json(path: str | Path, obj: Any, run_dir: str | Path | None = None) -> None:
    """Replace ``path`` by ``obj`` as indented JSON all at once; raises ``DiskFullError`` on a full disk."""
    atomic_write_text(path, json.dumps(obj, indent=2), run_dir)


def atomic_torch_save(obj: Any, path: str | Path, run_dir: str | Path | None = None) -> None:
    """``torch.save(obj, path)`` all at once; a full disk (OSError, or torch's "basic_ios::clear") is DiskFullError."""
    import torch  # here, so that locking and JSON files do not pay torch's import

    def fill(fd: int) -> None:
        handle: IO[bytes] = os.fdopen(os.dup(fd), "wb")
        with handle:
            torch.save(obj, handle)
            handle.flush()

    _atomic_write(path, fill, run_dir)


def clean_temp_files(folder: str | Path) -> list[Path]:
    """Remove the temp files a killed writer left in ``folder`` and its subfolders (call it holding the lock)."""
    removed = []
    for tmp in Path(folder).rglob(f".*{TMP_SUFFIX}"):
        if tmp.is_file():
            with contextlib.suppress(OSError):
                tmp.unlink()
                removed.append(tmp)
    return removed


# ---------------------------------------------------------------------------------------------------- reading
def _corrupt(path: Path, what: str, reason: BaseException | str) -> RunFileError:
    text = " ".join(str(reason).split()) or type(reason).__name__
    return RunFileError(f"cannot read {what}: {path} is corrupt or truncated ({text})")


def read_json(path: str | Path, what: str = "a run file") -> Any:
    """The JSON content of ``path``; a missing, truncated or corrupt file is a ``RunFileError`` naming it.

    Args:
        path: the file.
        what: what it holds, for the message ("the run's metrics").
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as err:
        raise RunFileError(f"cannot read {what}: {path} does not exist") from err
    except UnicodeDecodeError as err:
        raise _corrupt(path, what, err) from err
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise _corrupt(path, what, err) from err


def load_torch(path: str | Path, what: str = "saved weights", map_location: Any = "cpu") -> Any:
    """``torch.load(path, weights_only=True)``; a missing, truncated or corrupt file is a ``RunFileError`` naming it."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise RunFileError(f"cannot read {what}: {path} does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError, KeyError) as err:
        raise _corrupt(path, what, err) from err


# ------------------------------------------------------------------------------------------------ run folders
def new_run_id(seed: int) -> str:
    """A run id that sorts by time and cannot collide: ``%Y%m%d-%H%M%S-s<seed>-<6 random hex digits>``."""
    return f"{time.strftime('%Y%m%d-%H%M%S')}-s{seed}-{secrets.token_hex(3)}"


def create_run_dir(base: str | Path, run_id: str | None, seed: int = 0, attempts: int = 20) -> Path:
    """Create ``base/run_id`` as a new folder that no other run uses.

    Args:
        base: the experiment's output folder (created if missing).
        run_id: a user-given id, or None to generate one with ``new_run_id(seed)``.
        seed: the run's seed, part of a generated id.
        attempts: how many generated ids to try (each collision is astronomically unlikely).

    Raises:
        RunFileError: a user-given id whose folder already holds results (metrics.json), or no free id found.
    """
    base = Path(base)
    base.mkdir(parents=True, exist_ok=True)
    if run_id is not None:
        run_dir = base / run_id
        if (run_dir / "metrics.json").exists():
            raise RunFileError(f"run folder {run_dir} already holds results; pick another run_id")
        run_dir.mkdir(exist_ok=True)  # a user-given folder without results may be reused; RunLock guards it
        return run_dir
    for _ in range(attempts):
        run_dir = base / new_run_id(seed)
        try:
            run_dir.mkdir(exist_ok=False)
        except FileExistsError:
            continue
        return run_dir
    raise RunFileError(f"could not create a new run folder under {base} after {attempts} attempts")


class RunLock:
    """Exclusive, non-blocking ``flock`` on ``<run_dir>/.lock`` while one process writes the run folder.

    A second process on the same folder gets ``RunLockedError`` with the holder's pid. The kernel drops the lock
    when its process dies (even by SIGKILL), so a stale lock file is simply taken over. Within one process the lock
    is shared: the CLI and the task loop may both take it for the same folder, and it is held until both release.
    """

    _held: dict[str, list[int]] = {}
    """Lock file (real path) -> [fd, holders] of the locks this process holds."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self._key: str | None = None

    def acquire(self) -> RunLock:
        """Take the lock (raises ``RunLockedError`` if another live process holds it)."""
        if self._key is not None:
            return self
        key = os.path.realpath(self.path)
        if key in RunLock._held:
            RunLock._held[key][1] += 1
            self._key = key
            return self
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666 & ~_UMASK)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as err:
            pid = _read_pid(fd)
            os.close(fd)
            raise RunLockedError(self.run_dir, pid) from err
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        RunLock._held[key] = [fd, 1]
        self._key = key
        return self

    def release(self) -> None:
        """Drop this hold; the last one unlocks (the file stays: removing it would race with a process opening it)."""
        if self._key is None:
            return
        key, self._key = self._key, None
        entry = RunLock._held[key]
        entry[1] -= 1
        if entry[1] > 0:
            return
        del RunLock._held[key]
        fd = entry[0]
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

    @property
    def held(self) -> bool:
        """Whether this object holds the lock now."""
        return self._key is not None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


def _read_pid(fd: int) -> int | None:
    """The pid written in a lock file, if readable."""
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None
