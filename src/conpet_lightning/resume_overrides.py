"""Which ``key=value`` overrides ``conpet resume`` accepts, and their record in the run folder.

A resumed run rebuilds its finished tasks from their saved weights and must end with the results of an uninterrupted
run, so only settings that cannot change a finished task may differ on resume: the optimisation of the tasks still to
train (learning rate, epochs), where and how it computes, and logging. Everything else (seed, data, model, method
structure, callbacks) is refused with the keys listed. Accepted overrides are appended to
``<run_dir>/resume_overrides.yaml``, so the folder says which settings its later tasks were trained with.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from conpet_lightning.config import ConfigError
from conpet_lightning.runfiles import RunFileError, atomic_write_text

#: Keys a resume may change (exact keys, or a section ending in ``.*``).
ALLOWED_RESUME_KEYS: tuple[str, ...] = (
    "train.lr",
    "train.lr_by_task",
    "train.epochs",
    "train.num_threads",
    "train.accelerator",
    "train.devices",
    "train.strategy",
    "train.precision",
    "logging.*",
    "eval.every_n_steps",
    "method.selector_epochs",
)
#: The file in the run folder that records every resume's overrides.
RECORD_NAME = "resume_overrides.yaml"


def is_allowed_resume_key(key: str) -> bool:
    """Whether ``key`` (a dotted config key) may be overridden on resume."""
    for allowed in ALLOWED_RESUME_KEYS:
        if allowed.endswith(".*"):
            if key.startswith(allowed[:-1]) and len(key) > len(allowed) - 1:
                return True
        elif key == allowed:
            return True
    return False


def check_resume_overrides(overrides: list[str]) -> list[str]:
    """The overrides unchanged if every key may change on resume.

    Raises:
        ConfigError: an entry that is not ``key=value``, or keys that could change finished tasks (all listed,
            with the allowed ones).
    """
    refused: list[str] = []
    for entry in overrides:
        key, sep, _ = entry.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"resume override {entry!r} is not key=value")
        if not is_allowed_resume_key(key):
            refused.append(key)
    if refused:
        raise ConfigError(
            f"resume cannot change {', '.join(refused)} (it would change the finished tasks); "
            f"allowed: {', '.join(ALLOWED_RESUME_KEYS)}"
        )
    return list(overrides)


def record_resume_overrides(run_dir: str | Path, overrides: list[str], now: float | None = None) -> Path:
    """Append ``{time, overrides}`` to ``<run_dir>/resume_overrides.yaml`` (an atomic rewrite); returns the file.

    Raises:
        RunFileError: the existing record is not a YAML list (corrupt), or the disk is full (``DiskFullError``).
    """
    path = Path(run_dir) / RECORD_NAME
    entries: list[Any] = []
    if path.is_file():
        try:
            loaded = OmegaConf.to_container(OmegaConf.load(path))
        except Exception as err:  # yaml's parser errors have no common base worth naming
            raise RunFileError(f"{path} is corrupt or truncated ({' '.join(str(err).split())})") from err
        if not isinstance(loaded, list):
            raise RunFileError(f"{path} is corrupt or truncated (expected a list of resumes)")
        entries = loaded
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(now))
    entries.append({"time": stamp, "overrides": list(overrides)})
    atomic_write_text(path, OmegaConf.to_yaml(OmegaConf.create(entries)), run_dir=run_dir)
    return path
