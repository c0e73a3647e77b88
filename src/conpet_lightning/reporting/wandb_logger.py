"""One W&B run per task-loop run, shared by the fresh Trainer of every stage (Lightning's ``WandbLogger``).

The task loop builds a new ``lightning.Trainer`` for every stage and every end-of-task test, and each of them counts
``global_step`` from 0. ``RunWandbLogger`` is one logger object passed to all of them; it adds a run-level step offset
(the optimizer steps of all earlier stages) so that ``trainer/global_step``, W&B's x axis for every metric, grows
monotonically over the whole run, and it tags every logged row with the task (0-based) and stage it came from.

The run is written into the run folder (``<run_dir>/wandb/offline-run-*`` in the default offline mode), so nothing
leaves the machine unless ``logging.wandb_mode=online``; upload later with ``wandb sync <run_dir>/wandb/offline-run-*``.
``logging.wandb_mode`` is passed to ``wandb.init(mode=...)``, which takes precedence over a ``WANDB_MODE`` environment
variable.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import OmegaConf

from conpet_lightning.config import RunConfig
from conpet_lightning.runfiles import RunFileError, atomic_write_text


class RunWandbLogger(WandbLogger):
    """A ``WandbLogger`` whose step is the run-level optimizer step, with the task and stage on every row.

    The loop's dashboard callback calls ``set_context`` when a stage (or test) starts and ``advance`` with the
    Trainer's ``global_step`` when a fit ends; see the module docstring.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        # Lightning always passes ``anonymous`` (None by default); recent wandb warns about the setting itself.
        if self._wandb_init.get("anonymous") is None:
            self._wandb_init.pop("anonymous", None)
        self.step_offset = 0
        """Optimizer steps taken by the Trainers of all finished stages of the run."""
        self.task = 0
        self.stage = ""

    def set_context(self, task: int, stage: str) -> None:
        """The task (0-based) and stage name that the next logged rows belong to."""
        self.task = int(task)
        self.stage = str(stage)

    def advance(self, steps: int) -> None:
        """A fit of ``steps`` optimizer steps finished: later Trainers' step 0 is the run's step after it."""
        self.step_offset += int(steps)

    def run_step(self, step: int | None = None) -> int:
        """The run-level step of a Trainer-local ``step`` (None = now, between fits)."""
        return self.step_offset + (0 if step is None else int(step))

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Log with ``trainer/global_step`` = the run-level step, plus ``task`` and ``stage``.

        Args:
            metrics: Values to log (scalars, or W&B media such as ``wandb.Table``).
            step: The calling Trainer's ``global_step``; None logs at the current run-level step.
        """
        row = {**metrics, "task": self.task, "stage": self.stage}
        super().log_metrics(row, step=self.run_step(step))

    def finish(self, exit_code: int = 0) -> None:
        """Finish the W&B run (idempotent) and stop wandb's service process if no other run uses it."""
        if self._experiment is None:
            return
        import wandb

        experiment, self._experiment = self._experiment, None
        finish = getattr(experiment, "finish", None)
        if finish is not None:
            finish(exit_code=exit_code)
        if wandb.run is None:
            wandb.teardown()


def config_dict(cfg: RunConfig) -> dict[str, Any]:
    """The resolved run configuration as a plain nested dict (the W&B run config)."""
    out = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
    assert isinstance(out, dict)
    return {str(k): v for k, v in out.items()}


#: File in the run folder holding the W&B run id, so that a resumed run continues the same W&B run.
RUN_ID_FILE = "wandb_run_id"


def wandb_run_id(run_dir: str | Path) -> tuple[str, bool]:
    """The W&B run id of a run folder and whether it already had one (a resume); a new id is written to the folder.

    Only rank 0 writes the file; other ranks get an id that is never used (only rank 0 starts the W&B run).

    Raises:
        RunFileError: the stored id is not a W&B id (a corrupt file), or the disk is full.
    """
    path = Path(run_dir) / RUN_ID_FILE
    if path.is_file():
        stored = path.read_text(encoding="utf-8").strip()
        if not stored or not stored.isalnum():
            raise RunFileError(f"{path} is corrupt or truncated (expected a W&B run id, got {stored[:40]!r})")
        return stored, True
    new = secrets.token_hex(4)  # W&B ids are short lowercase alphanumerics
    if rank_zero_only.rank == 0:
        atomic_write_text(path, new + "\n", run_dir=run_dir)
    return new, False


def build_wandb_logger(cfg: RunConfig, run_dir: str | Path) -> RunWandbLogger | None:
    """The run's W&B logger when ``logging.wandb`` is true (else None); the W&B run starts on first use.

    The W&B run id is kept in ``<run_dir>/wandb_run_id``: a resumed run passes it with ``resume="allow"`` and so
    continues the run it started instead of opening a second one (offline: ``wandb sync`` joins them by id).
    ``logging.wandb_mode`` was checked by ``config.validate``.
    """
    log = cfg.logging
    if not log.wandb:
        return None
    run_dir = Path(run_dir)
    run_id, _ = wandb_run_id(run_dir)
    return RunWandbLogger(
        save_dir=str(run_dir),
        project=log.wandb_project,
        name=f"{cfg.experiment}-{run_dir.name}",
        group=log.wandb_group or cfg.experiment,
        job_type="continual",
        mode=log.wandb_mode,
        config=config_dict(cfg),
        id=run_id,
        resume="allow",  # a new id starts a run, a stored one continues it
    )
