"""The task-loop orchestrator: a fresh Trainer per stage of each task, then a test on all seen tasks.

For each task, for each stage the method declares, a fresh Trainer fits and the best epoch (by the stage's
validation metric) is restored; then all seen tasks are tested.

Run state (config, metrics, the accuracy matrix, each stage's trained weights) is written after every task, so
nothing finished is lost, and ``TaskLoop.resume`` continues a killed run at the first unfinished task: finished tasks
are replayed without training (each stage's saved weights are loaded where its fit would have ended, and every
task-end step such as memory selection or the EA-EMR alignment runs again on them), then training goes on.
"""

from __future__ import annotations

import json
import logging
import os
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import OmegaConf

from conpet_lightning.callbacks.base import TaskCallback
from conpet_lightning.callbacks.continual_eval import ContinualEvalCallback
from conpet_lightning.callbacks.continual_metrics import ContinualMetricsCallback
from conpet_lightning.callbacks.dashboard import DashboardCallback
from conpet_lightning.callbacks.progress import TaskProgressBar
from conpet_lightning.config import ConfigError, RunConfig, to_yaml, validate
from conpet_lightning.data.benchmarks import load_benchmark, resolve_task_order
from conpet_lightning.data.datamodule import ContinualDataModule
from conpet_lightning.data.records import Benchmark
from conpet_lightning.methods.base import ContinualMethod, StageSpec
from conpet_lightning.metrics import summarize
from conpet_lightning.models.backbone import load_backbone
from conpet_lightning.registry import CALLBACKS, METHODS
from conpet_lightning.reporting.wandb_logger import RunWandbLogger, build_wandb_logger


def build_benchmark(cfg: RunConfig) -> Benchmark:
    """Load, cap and (optionally) shorten the benchmark named in the config."""
    d = cfg.data
    root = Path(d.root)
    if not root.is_absolute() and not root.exists():
        root = Path(__file__).resolve().parents[2] / root
    bench = load_benchmark(
        d.benchmark, root=root, seed=d.split_seed, local_path=d.local_path, conpet_dataset=d.conpet_dataset
    )
    bench = bench.reordered(resolve_task_order(d.task_order, bench.num_tasks))
    bench = bench.capped(train=d.max_train_per_class, valid=d.max_valid_per_class, test=d.max_test_per_class, seed=0)
    if d.num_tasks is not None:
        keep = d.num_tasks
        bench = Benchmark(
            name=bench.name,
            task_type=bench.task_type,
            label_names=bench.label_names,
            tasks=bench.tasks[:keep],
            parts={part: tasks[:keep] for part, tasks in bench.parts.items()},
        )
    return bench


def build_callbacks(cfg: RunConfig) -> list[TaskCallback]:
    """Instantiate the callback entries of the config, in the order written."""
    out = []
    for slot, entry in cfg.callbacks.items():
        if entry is None:
            continue
        cls = CALLBACKS.get(entry["name"])
        out.append(cls.from_options(dict(entry), slot))
    return out


def quiet_lightning() -> None:
    """A run builds dozens of Trainers: keep their repeated banners and known-harmless warnings off the console."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*`Trainer.fit` stopped.*")
    warnings.filterwarnings("ignore", message=".*Checkpoint directory .* exists and is not empty.*")  # resume


def is_rank_zero() -> bool:
    """True in the process that writes the run folder: global rank 0 (Lightning's launcher sets the others' rank)."""
    return rank_zero_only.rank == 0


def load_reference(path: str | None) -> list[list[float | None]] | None:
    """The accuracy matrix of a reference (joint) run, for intransigence."""
    if path is None:
        return None
    file = Path(path)
    file = file / "metrics.json" if file.is_dir() else file
    if not file.is_file():
        raise ConfigError(f"eval.reference_run: no metrics.json at {file}")
    return json.loads(file.read_text())["accuracy_matrix"]


class TaskLoop:
    """Drives one run: data, method, callbacks, a fresh Trainer per stage, and the run folder."""

    def __init__(self, cfg: RunConfig, run_dir: Path) -> None:
        quiet_lightning()
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.finished: dict[str, Any] | None = None
        """The metrics.json of the tasks a resumed run already finished (``TaskLoop.resume``), else None."""
        if is_rank_zero():
            (self.run_dir / "config.yaml").write_text(to_yaml(cfg))
        self.wandb_logger: RunWandbLogger | None = build_wandb_logger(cfg, self.run_dir)
        """One W&B logger for the run (``logging.wandb``), passed to every Trainer (``reporting.wandb_logger``)."""
        every = cfg.eval.every_n_steps
        self.continual_eval = ContinualEvalCallback(every) if every is not None else None
        """Fills ``eval_curve`` when ``eval.every_n_steps`` is set (see ``callbacks.continual_eval``)."""
        if cfg.train.num_threads and cfg.train.accelerator == "cpu":
            torch.set_num_threads(cfg.train.num_threads)
        L.seed_everything(cfg.seed, workers=True, verbose=False)
        self.benchmark = build_benchmark(cfg)
        self.backbone = load_backbone(cfg.model.backbone, path=cfg.model.path, dtype=cfg.model.dtype)
        self.datamodule = ContinualDataModule(
            self.benchmark,
            self.backbone.tokenizer,
            self.backbone.markers,
            max_seq_len=cfg.data.max_seq_len,
            batch_size=cfg.train.batch_size,
            eval_batch_size=cfg.data.eval_batch_size,
            seed=cfg.seed,
            template_filter=cfg.data.template_filter,
            num_workers=cfg.data.num_workers,
        )
        method_cls = METHODS.get(cfg.method["name"])
        self.method: ContinualMethod = method_cls(cfg, self.benchmark, self.backbone)
        self.callbacks = build_callbacks(cfg)
        self.metrics = ContinualMetricsCallback(self.benchmark.num_tasks)
        self.per_task: list[dict[str, Any]] = []
        self.extra_loggers: list[Any] = []
        if self.wandb_logger is not None:
            self.extra_loggers.append(self.wandb_logger)
        self.eval_curve: list[dict[str, Any]] = []
        """Evaluations during training ({"task", "step", "acc": [per seen task]}), if a callback records them."""
        self.dashboard = DashboardCallback(self.wandb_logger)
        """PNG figures after every task, and the W&B panels when W&B is on (see ``callbacks.dashboard``)."""
        self.callbacks += [cb for cb in (self.continual_eval, self.dashboard) if cb is not None]
        self.reference = load_reference(cfg.eval.reference_run)

    @classmethod
    def resume(cls, run_dir: str | Path) -> TaskLoop:
        """The loop of a killed run, from its folder: its own ``config.yaml``, continuing after its finished tasks.

        Raises:
            ConfigError: the folder has no config.yaml or metrics.json, or every task is already finished.
        """
        run_dir = Path(run_dir)
        for name in ("config.yaml", "metrics.json"):
            if not (run_dir / name).is_file():
                raise ConfigError(f"cannot resume {run_dir}: it has no {name} (nothing finished to resume from)")
        cfg = validate(OmegaConf.load(run_dir / "config.yaml"))
        finished = json.loads((run_dir / "metrics.json").read_text())
        done = len(finished.get("per_task", []))
        loop = cls(cfg, run_dir)
        if done >= loop.benchmark.num_tasks:
            raise ConfigError(f"{run_dir} already finished all {done} tasks; nothing to resume")
        loop.finished = finished
        return loop

    # ----------------------------------------------------------------------------------------------- trainers
    def make_trainer(
        self, task: int, stage: StageSpec | None, extra: list[L.Callback] | None = None, max_epochs: int | None = None
    ) -> L.Trainer:
        """A fresh Trainer; the persistent callbacks are the same objects every time."""
        t = self.cfg.train
        name = stage.name if stage else "test"
        bar: list[L.Callback] = (
            [TaskProgressBar(task, self.benchmark.num_tasks, name)] if self.cfg.logging.progress_bar else []
        )
        return L.Trainer(
            max_epochs=max_epochs if max_epochs is not None else stage.epochs if stage else 1,
            accelerator=t.accelerator,
            devices=t.devices,
            strategy=t.strategy,
            precision=t.precision,  # type: ignore[arg-type]
            gradient_clip_val=stage.grad_clip if stage else None,
            callbacks=[*self.callbacks, self.metrics, *bar, *(extra or [])],
            logger=self.extra_loggers or False,
            enable_progress_bar=self.cfg.logging.progress_bar,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            use_distributed_sampler=False,  # the datamodule shards one global plan itself
            deterministic=t.deterministic,
            default_root_dir=str(self.run_dir),
            log_every_n_steps=10,
        )

    def stage_state_path(self, task: int, stage: StageSpec) -> Path:
        """Where the trained weights of a stage are kept (``checkpoints/task<k>/<stage>/final.pt``)."""
        folder = self.run_dir / "checkpoints" / f"task{task + 1}" / stage.name
        folder.mkdir(parents=True, exist_ok=True)
        return folder / "final.pt"

    def fit_stage(self, task: int, stage: StageSpec) -> dict[str, Any]:
        """Fit one stage and restore its best epoch (by ``stage.monitor``)."""
        L.seed_everything(self.cfg.seed + 1000 * task + len(stage.name), workers=True, verbose=False)
        ckpt = ModelCheckpoint(
            dirpath=self.run_dir / "checkpoints" / f"task{task + 1}" / stage.name,
            filename="best",
            monitor=stage.monitor,
            mode="max",
            save_top_k=1,
            save_weights_only=True,
            enable_version_counter=False,
        )
        trainer = self.make_trainer(task, stage, [ckpt])
        params = self.method.parameter_report()
        start = time.perf_counter()
        trainer.fit(self.method, datamodule=self.datamodule)
        seconds = time.perf_counter() - start
        best = ckpt.best_model_path
        if best:
            self.method.restore_trainable(best)
        if is_rank_zero():  # what the stage leaves behind (best or last epoch): what a resumed run reloads
            torch.save({"state_dict": self.method.trainable_state()}, self.stage_state_path(task, stage))
        score = ckpt.best_model_score
        return {
            "seconds": round(seconds, 3),
            "steps": int(trainer.global_step),
            "epochs": int(trainer.current_epoch),
            "best_score": None if score is None else round(float(score), 4),
            "best_checkpoint": os.path.relpath(best, self.run_dir) if best else None,
            "trainable_parameters": params["trainable"],
            "total_parameters": params["total"],
        }

    def evaluate(self, task: int) -> dict[str, Any]:
        """Test on all seen tasks; fills row ``task`` of R and returns the per-task result."""
        self.metrics.task = task
        trainer = self.make_trainer(task, None)
        start = time.perf_counter()
        trainer.test(self.method, datamodule=self.datamodule, verbose=False)
        return {**self.metrics.last, "seconds": round(time.perf_counter() - start, 3)}

    # -------------------------------------------------------------------------------------------------- the run
    def run(self) -> dict[str, Any]:
        """Train and test task by task; returns the final metrics dictionary (also written as metrics.json).

        The W&B run (if any) is finished at the end, also when the run fails (with exit code 1).
        """
        finished = False
        try:
            for cb in self.callbacks:
                cb.on_run_start(self)
            done = len(self.finished["per_task"]) if self.finished else 0
            for task in range(self.benchmark.num_tasks):
                if task < done:
                    self.replay_task(task)
                else:
                    self.run_task(task)
            metrics = self.write_metrics()
            for cb in self.callbacks:
                cb.on_run_end(self, metrics)
            finished = True
            return metrics
        finally:
            if self.wandb_logger is not None:
                self.wandb_logger.finish(exit_code=0 if finished else 1)

    def train_task(self, task: int, fit: Callable[[StageSpec], dict[str, Any]]) -> dict[str, Any]:
        """The lifecycle of one task up to its test: hooks around ``fit(stage)`` for every stage; per-stage records."""
        self.datamodule.set_task(task, self.method.train_scope)
        self.method.setup_task(task)
        for cb in self.callbacks:
            cb.on_task_start(self, task)
        stages: dict[str, Any] = {}
        for stage in self.method.stages(task):
            if stage.epochs <= 0:
                continue
            self.method.setup_stage(task, stage)
            for cb in self.callbacks:
                cb.on_stage_start(self, task, stage)
            stages[stage.name] = fit(stage)
            self.method.end_stage(task, stage)
            for cb in self.callbacks:
                cb.on_stage_end(self, task, stage)
        self.method.end_task(task)
        for cb in self.callbacks:
            cb.on_task_end(self, task)
        return stages

    def replay_task(self, task: int) -> None:
        """Rebuild the state a finished task left (resume): its stages load their saved weights instead of training.

        Each stage still gets a Trainer (with no epoch to run), so the hooks that record where training runs fire as
        in a real fit; everything after it (memory selection, alignment, prototypes, freezing) runs again as it did.
        """

        def load(stage: StageSpec) -> dict[str, Any]:
            path = self.stage_state_path(task, stage)
            if not path.is_file():
                raise ConfigError(f"cannot resume: {path} is missing (task {task + 1}, stage '{stage.name}')")
            self.make_trainer(task, stage, max_epochs=0).fit(self.method, datamodule=self.datamodule)
            self.method.restore_trainable(str(path))
            return {}

        self.train_task(task, load)
        assert self.finished is not None
        self.per_task.append(self.finished["per_task"][task])
        self.metrics.restore_row(task, self.finished["accuracy_matrix"][task])
        self.eval_curve.extend(e for e in self.finished.get("eval_curve", []) if e["task"] == task)

    def run_task(self, task: int) -> None:
        """All stages of one task, then its test."""
        record: dict[str, Any] = {"task": task}
        record["stages"] = self.train_task(task, lambda stage: self.fit_stage(task, stage))
        record["train_seconds"] = round(sum(s["seconds"] for s in record["stages"].values()), 3)
        record["train_steps"] = sum(s["steps"] for s in record["stages"].values())
        record["train_data"] = self.datamodule.train_plan_info
        record["filtered_long_templates"] = self.datamodule.filtered.get(task, 0)
        record["test"] = self.evaluate(task)
        if self.continual_eval is not None:
            self.continual_eval.record_task_end(self, task)  # R's new row closes the task's eval curve
        for cb in self.callbacks:
            record.update(cb.task_record(task))
        if hasattr(self.method, "task_record"):
            record.update(self.method.task_record(task))
        self.per_task.append(record)
        self.write_metrics()
        if is_rank_zero():  # one line per task, so a run without a progress bar (a log file, CI) shows where it is
            test = record["test"]
            print(
                f"[conpet] task {task + 1}/{self.benchmark.num_tasks}: acc_macro={test['macro']:.2f} "
                f"acc_micro={test['micro']:.2f} train {record['train_seconds']:.0f} s, {record['train_steps']} steps",
                flush=True,
            )
        for cb in self.callbacks:
            cb.on_task_evaluated(self, task)

    def write_metrics(self) -> dict[str, Any]:
        """Write metrics.json and accuracy_matrix.csv for the tasks finished so far."""
        R = self.metrics.R
        n_test = [int(len(self.datamodule.indices("test", t))) for t in range(self.benchmark.num_tasks)]
        done = len(R)
        square = [row[:done] for row in R]
        joint = None
        if self.reference is not None and len(self.reference) >= done:
            joint = [row[:done] for row in self.reference[:done]]
        curve = self.eval_curve or None
        summary = summarize(square, n_test[:done], R_joint=joint, eval_curve=curve) if done else {}
        out = {
            "experiment": self.cfg.experiment,
            "run_id": self.run_dir.name,
            "benchmark": self.benchmark.name,
            "seed": self.cfg.seed,
            "tasks": [{"classes": c, "n_test": n} for c, n in zip(self.benchmark.tasks, n_test, strict=True)],
            "accuracy_matrix": square,
            "summary": summary,
            "per_task": self.per_task,
        }
        if self.eval_curve:
            out["eval_curve"] = self.eval_curve
        if joint is not None:
            out["joint_accuracy_matrix"] = joint
        if is_rank_zero():
            (self.run_dir / "metrics.json").write_text(json.dumps(out, indent=2))
            lines = [",".join(f"task{j + 1}" for j in range(done))]
            lines += [",".join("" if v is None else f"{v:.2f}" for v in row) for row in square]
            (self.run_dir / "accuracy_matrix.csv").write_text("\n".join(lines) + "\n")
        return out
