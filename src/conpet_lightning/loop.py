"""The task-loop orchestrator: a fresh Trainer per stage of each task, then a test on all seen tasks.

For each task, for each stage the method declares, a fresh Trainer fits and the best epoch (by the stage's validation
metric) is restored; then all seen tasks are tested. The run's callbacks (the accuracy matrix, the configured ones,
continual evaluation, the dashboard) are ordinary ``TaskCallback`` objects in one list, called at task and stage
boundaries with the run's ``RunContext``; the run folder is written by ``RunFolder`` alone, atomically.

Randomness is explicit: every (task, stage) and every optimizer step has a seed of its own (``contract.stream_seed``),
the former set before any parameter of that task or stage is created. So a resumed run rebuilds finished stages
exactly: each is set up as it was, its saved weights (and extra state) are loaded where its fit ended
(``before_fit`` and every hook after the fit run again on them, with no Trainer fit), and a stage that was killed
midway continues from Lightning's checkpoint of its last completed epoch (weights, optimizer, loop state). The
resumed run ends with the uninterrupted run's results.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from dataclasses import fields
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import OmegaConf

from conpet_lightning.callbacks.base import TaskCallback
from conpet_lightning.callbacks.continual_eval import ContinualEvalCallback
from conpet_lightning.callbacks.continual_metrics import ContinualMetricsCallback
from conpet_lightning.callbacks.dashboard import DashboardCallback
from conpet_lightning.callbacks.progress import TaskProgressBar
from conpet_lightning.config import ConfigError, RunConfig, to_yaml, validate
from conpet_lightning.contract import FitContext, RunContext, StageBudget, StageSpec, split_steps, stream_seed
from conpet_lightning.data.benchmarks import check_num_tasks, load_benchmark, resolve_task_order
from conpet_lightning.data.datamodule import ContinualDataModule
from conpet_lightning.data.records import Benchmark
from conpet_lightning.methods.base import ContinualMethod
from conpet_lightning.metrics import summarize
from conpet_lightning.models.backbone import load_backbone
from conpet_lightning.native_memory import release_free_heap
from conpet_lightning.paths import in_project
from conpet_lightning.registry import CALLBACKS, METHODS
from conpet_lightning.reporting.wandb_logger import RunWandbLogger, build_wandb_logger
from conpet_lightning.run_folder import CONFIG, RunFolder, is_rank_zero
from conpet_lightning.runfiles import read_json


def build_benchmark(cfg: RunConfig) -> tuple[Benchmark, list[int]]:
    """The benchmark named in the config, reordered, capped and shortened, and its task order.

    The order lists indices into the benchmark's own sequence (``data.task_order``), for metrics.json.
    """
    d = cfg.data
    root = in_project(d.root)
    bench = load_benchmark(
        d.benchmark, root=root, seed=d.split_seed, local_path=d.local_path, conpet_dataset=d.conpet_dataset
    )
    order = resolve_task_order(d.task_order, bench.num_tasks)
    bench = bench.reordered(order)
    bench = bench.capped(train=d.max_train_per_class, valid=d.max_valid_per_class, test=d.max_test_per_class, seed=0)
    if d.num_tasks is not None:
        check_num_tasks(d.num_tasks, bench.num_tasks, bench.name)
        keep = d.num_tasks
        order = order[:keep]
        bench = Benchmark(
            name=bench.name,
            task_type=bench.task_type,
            label_names=bench.label_names,
            tasks=bench.tasks[:keep],
            parts={part: tasks[:keep] for part, tasks in bench.parts.items()},
        )
    return bench, order


def build_callbacks(cfg: RunConfig) -> list[TaskCallback]:
    """The callback entries of the config, in the order written (options were checked by ``config.validate``)."""
    return [CALLBACKS.get(entry["name"]).from_options(dict(entry), slot) for slot, entry in cfg.callbacks.items()]


#: Budget fields totalled over all tasks and stages into the summary (``budget_<field>``).
BUDGET_TOTALS = (*(f.name for f in fields(StageBudget)), "fit_seconds")


def budget_totals(per_task: list[dict[str, Any]]) -> dict[str, float]:
    """The run's budget so far: each stage budget field summed over tasks and stages, plus the tests' seconds."""
    stages = [s.get("budget", {}) for t in per_task for s in t.get("stages", {}).values()]
    out: dict[str, float] = {f"budget_{k}": round(sum(float(b.get(k, 0)) for b in stages), 3) for k in BUDGET_TOTALS}
    out["budget_test_seconds"] = round(sum(float(t.get("test", {}).get("seconds", 0)) for t in per_task), 3)
    return out


def cpu_has_native_bf16() -> bool:
    """Whether oneDNN runs bf16 matmuls natively on this CPU (the CPU default's bf16 autocast is fast only then)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def quiet_lightning() -> None:
    """A run builds dozens of Trainers: keep their repeated banners and known-harmless warnings off the console."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*`Trainer.fit` stopped.*")
    warnings.filterwarnings("ignore", message=".*Checkpoint directory .* exists and is not empty.*")  # resume


def load_reference(path: str | None) -> list[list[float | None]] | None:
    """The accuracy matrix of a reference (joint) run, for intransigence."""
    if path is None:
        return None
    file = Path(path)
    file = file / "metrics.json" if file.is_dir() else file
    if not file.is_file():
        raise ConfigError(f"eval.reference_run: no metrics.json at {file}")
    return read_json(file, "the reference run's metrics")["accuracy_matrix"]


class TaskLoop:
    """Drives one run: data, method, callbacks, a fresh Trainer per stage, and the run folder."""

    def __init__(
        self, cfg: RunConfig, run_dir: Path, finished: dict[str, Any] | None = None, resumed: bool = False
    ) -> None:
        quiet_lightning()
        self.cfg = cfg
        self.folder = RunFolder(run_dir)
        self.run_dir = self.folder.path
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.finished = finished
        """The metrics.json of the tasks a resumed run already finished (``TaskLoop.resume``), else None."""
        self.resumed = resumed or finished is not None
        """A resumed run: stages whose weights the folder already holds are loaded, not fitted again."""
        self.folder.write_config(to_yaml(cfg))
        if cfg.train.num_threads and cfg.train.accelerator == "cpu":
            torch.set_num_threads(cfg.train.num_threads)
        if cfg.train.accelerator == "cpu" and cfg.train.precision.startswith("bf16") and not cpu_has_native_bf16():
            print(
                f"[conpet] warning: train.precision={cfg.train.precision} on a CPU without native bf16 (AVX512-BF16 or "
                "AMX) runs slower than fp32; set train.precision=32-true (results then differ from the bf16 default)",
                flush=True,
            )
        L.seed_everything(cfg.seed, workers=True, verbose=False)
        self.reference = load_reference(cfg.eval.reference_run)
        self.benchmark, self.task_order = build_benchmark(cfg)
        self.backbone = load_backbone(
            cfg.model.backbone, path=cfg.model.path, dtype=cfg.model.dtype, dropout=cfg.model.dropout
        )
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
            eval_split=cfg.eval.split,
            pad_to_multiple_of=cfg.data.pad_to_multiple_of,
        )
        L.seed_everything(stream_seed(cfg.seed, 0, "method"), workers=True, verbose=False)
        method_cls = METHODS.get(cfg.method["name"])
        self.method: ContinualMethod = method_cls(cfg, self.benchmark, self.backbone)
        self.wandb_logger: RunWandbLogger | None = build_wandb_logger(cfg, self.run_dir)
        """One W&B logger for the run (``logging.wandb``), passed to every Trainer (``reporting.wandb_logger``)."""
        self.metrics = ContinualMetricsCallback(self.benchmark.num_tasks)
        every = cfg.eval.every_n_steps
        self.callbacks: list[TaskCallback] = [
            self.metrics,
            *build_callbacks(cfg),
            *([ContinualEvalCallback(every)] if every is not None else []),
            DashboardCallback(self.wandb_logger),
        ]
        for cb in self.callbacks:  # the composition checked the class; this checks the instance
            for proto in cb.requires:
                if not isinstance(self.method, proto):
                    raise RuntimeError(f"{type(cb).__name__} needs {proto.__name__}; {method_cls.__name__} lacks it")
        replay = any("replay" in cb.provides for cb in self.callbacks)
        self.valid_scope = cfg.data.valid_scope
        if self.valid_scope == "auto":  # a replay-free learner selects epochs on the data it holds
            self.valid_scope = "seen" if replay or self.method.train_scope == "seen" else "current"
        self.ctx = RunContext(
            cfg=cfg,
            benchmark=self.benchmark,
            datamodule=self.datamodule,
            method=self.method,
            run_dir=self.run_dir,
            loggers=[self.wandb_logger] if self.wandb_logger is not None else [],
        )

    @property
    def per_task(self) -> list[dict[str, Any]]:
        """``metrics.json`` ``per_task`` of the tasks finished so far."""
        return self.ctx.per_task

    @classmethod
    def resume(cls, run_dir: str | Path, overrides: list[str] | None = None) -> TaskLoop:
        """The loop of a killed run, from its folder: its ``config.yaml`` plus ``overrides``.

        It continues after the finished tasks, and inside the stage the run was killed in.

        Raises:
            ConfigError: the folder is not a run folder, or every task is already finished.
            RunFileError: a run file is corrupt or truncated.
        """
        folder = RunFolder(run_dir)
        if not (folder.path / CONFIG).is_file():
            raise ConfigError(f"cannot resume {folder.path}: it is not a run folder (no {CONFIG})")
        try:
            raw = OmegaConf.load(folder.path / CONFIG)
        except Exception as err:
            raise ConfigError(f"cannot resume: {folder.path / CONFIG} does not parse ({err})") from err
        if overrides:
            raw = OmegaConf.merge(raw, OmegaConf.from_dotlist(list(overrides)))
        cfg = validate(raw)
        finished = folder.read_metrics()
        done = len(finished["per_task"]) if finished else 0
        if finished is not None and done >= len(finished.get("tasks", [])) > 0:
            raise ConfigError(f"{folder.path} already finished all {done} tasks; nothing to resume")
        return cls(cfg, folder.path, finished=finished, resumed=True)

    # ----------------------------------------------------------------------------------------------- trainers
    def make_trainer(self, task: int, stage: StageSpec | None, extra: list[L.Callback] | None = None) -> L.Trainer:
        """A fresh Trainer; the persistent callbacks are the same objects every time."""
        t = self.cfg.train
        name = stage.name if stage else "test"
        bar: list[L.Callback] = (
            [TaskProgressBar(task, self.benchmark.num_tasks, name)] if self.cfg.logging.progress_bar else []
        )
        budgeted = stage is not None and stage.steps is not None
        return L.Trainer(
            max_epochs=-1 if budgeted else stage.epochs if stage else 1,
            max_steps=stage.steps if stage is not None and stage.steps is not None else -1,
            # an equal budget validates as often as the stage has epochs, every steps / epochs steps
            val_check_interval=max(1, stage.steps // max(stage.epochs, 1)) if budgeted else None,  # type: ignore[union-attr, operator]
            check_val_every_n_epoch=None if budgeted else 1,
            accelerator=t.accelerator,
            devices=t.devices,
            strategy=t.strategy,
            precision=t.precision,  # type: ignore[arg-type]
            gradient_clip_val=stage.grad_clip if stage else None,
            callbacks=[*self.callbacks, *bar, *(extra or [])],
            logger=self.ctx.loggers or False,
            enable_progress_bar=self.cfg.logging.progress_bar,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            use_distributed_sampler=False,  # the datamodule shards one global plan itself
            deterministic=t.deterministic,
            inference_mode=False,  # caches filled in evaluation are reused in training: no inference tensors
            default_root_dir=str(self.run_dir),
            log_every_n_steps=10,
        )

    def stages_of(self, task: int) -> list[StageSpec]:
        """The stages the loop fits for a task: the method's, with an equal budget split over them when one is set."""
        stages = [s for s in self.method.stages(task) if s.epochs > 0]
        total = self.cfg.train.steps_per_task
        if total is None or not stages:
            return stages
        return split_steps(stages, total, self.method.step_shares(task, stages))

    def plan_epochs(self, stage: StageSpec) -> int:
        """Epochs of the installed plan the stage iterates: its epochs, or as many as its step budget reaches."""
        if stage.steps is None:
            return max(stage.epochs, 1)
        epochs, served = 0, 0
        while served < stage.steps:
            served += max(len(self.datamodule.train_plan(epochs)), 1)
            epochs += 1
        return epochs

    def fit_stage(self, task: int, stage: StageSpec, trainer: L.Trainer, checkpoints: list[ModelCheckpoint]) -> Any:
        """Fit one stage (from its last completed epoch if a killed run left one) and restore its best epoch."""
        best, _ = checkpoints
        params = self.method.parameter_report()
        last = self.folder.stage_last(task, stage.name)
        start = time.perf_counter()
        zero_shot = self.zero_shot_score(trainer, stage)
        before = self.method.trainable_state() if zero_shot is not None else None
        trainer.fit(self.method, datamodule=self.datamodule, ckpt_path=str(last) if last.is_file() else None)
        seconds = time.perf_counter() - start
        budget = self.method.budget
        budget.steps = int(trainer.global_step)
        counts = torch.tensor(budget.as_list(), dtype=torch.long)
        if trainer.world_size > 1:  # each rank counted its shard; steps are the same on every rank
            counts = trainer.strategy.reduce(counts.to(trainer.strategy.root_device), reduce_op="sum").cpu()
            counts[0] = budget.steps
        spent = dict(zip((f.name for f in fields(budget)), (int(c) for c in counts), strict=True))
        if best.best_model_path:
            self.method.restore_trainable(best.best_model_path)
        score = best.best_model_score
        kept_step0 = zero_shot is not None and (score is None or zero_shot >= float(score))  # ConPET: ties too
        if kept_step0 and before is not None:  # ConPET's step-0 candidate won: the stage keeps its start
            self.method.load_state_dict(before, strict=False)
        record = {
            "seconds": round(seconds, 3),
            "steps": int(trainer.global_step),
            "epochs": int(trainer.current_epoch),
            "best_score": None if score is None else round(float(score), 4),
            # relpath, not Path.relative_to: Lightning gives an absolute path, the run folder may be relative
            "best_checkpoint": os.path.relpath(best.best_model_path, self.run_dir) if best.best_model_path else None,
            "trainable_parameters": params["trainable"],
            "total_parameters": params["total"],
            "budget": {**spent, "fit_seconds": round(seconds, 3)},
            **({"zero_shot_score": round(zero_shot, 4), "kept_step0": kept_step0} if zero_shot is not None else {}),
        }
        state, extra = self.method.trainable_state(), self.method.stage_extra_state()
        self.folder.save_stage_weights(task, stage.name, state, record, extra)
        if is_rank_zero():
            last.unlink(missing_ok=True)  # final.pt marks the stage done
        return record

    def zero_shot_score(self, trainer: L.Trainer, stage: StageSpec) -> float | None:
        """The stage's validation score before it trains (``train.zero_shot_validation``), else None."""
        if not self.cfg.train.zero_shot_validation or stage.monitor is None:
            return None
        results = trainer.validate(self.method, datamodule=self.datamodule, verbose=False)
        value = results[0].get(stage.monitor) if results else None
        return None if value is None else float(value)

    def stage_checkpoints(self, task: int, stage: StageSpec) -> list[ModelCheckpoint]:
        """The best epoch (by ``stage.monitor``; the last one without) and the last completed epoch (to resume)."""
        folder = self.folder.stage_dir(task, stage.name)
        best = ModelCheckpoint(
            dirpath=folder,
            filename="best",
            monitor=stage.monitor,
            mode="max",
            save_top_k=1,
            save_weights_only=True,
            enable_version_counter=False,
        )
        # the latest epoch, overwritten each time (no monitor: the newest is the top one); mode="min" tells its state
        # apart from ``best`` for CRL, whose stages monitor nothing either
        last = ModelCheckpoint(dirpath=folder, filename="last", save_top_k=1, mode="min", enable_version_counter=False)
        return [best, last]

    def evaluate(self, task: int) -> dict[str, Any]:
        """Test on all seen tasks; fills row ``task`` of R and returns the per-task result."""
        trainer = self.make_trainer(task, None)
        start = time.perf_counter()
        trainer.test(self.method, datamodule=self.datamodule, verbose=False)
        seconds = round(time.perf_counter() - start, 3)
        release_free_heap()  # after the timing: the test's seconds are a budget column
        return {**self.metrics.last, "seconds": seconds}

    # -------------------------------------------------------------------------------------------------- the run
    def run(self) -> dict[str, Any]:
        """Train and test task by task; returns the final metrics dictionary (also written as metrics.json).

        The W&B run (if any) is finished at the end, also when the run fails (with exit code 1).
        """
        finished = False
        try:
            done = 0
            if self.finished:
                done = len(self.finished["per_task"])
                self.ctx.R.extend(self.finished["accuracy_matrix"][:done])
                self.ctx.per_task.extend(self.finished["per_task"][:done])
                self.ctx.eval_curve.extend(e for e in self.finished.get("eval_curve", []) if e["task"] < done)
                self.ctx.R[:] = [[*row, *[None] * (self.benchmark.num_tasks - len(row))] for row in self.ctx.R]
            for cb in self.callbacks:
                cb.on_run_start(self.ctx)
            for task in range(self.benchmark.num_tasks):
                if task < done:
                    self.train_task(task, rebuild=True)
                else:
                    self.run_task(task)
            metrics = self.write_metrics()
            for cb in self.callbacks:
                cb.on_run_end(self.ctx, metrics)
            finished = True
            return metrics
        finally:
            if self.wandb_logger is not None:
                self.wandb_logger.finish(exit_code=0 if finished else 1)

    def train_task(self, task: int, rebuild: bool = False) -> dict[str, Any]:
        """The lifecycle of one task up to its test; returns the per-stage records.

        Every stage is set up, fitted (or, with ``rebuild``, loaded from its saved weights) and closed, with the
        callbacks' hooks around each.
        """
        L.seed_everything(stream_seed(self.cfg.seed, task, "task"), workers=True, verbose=False)
        self.datamodule.set_task(task, self.method.train_scope)
        if self.valid_scope == "current":  # replay callbacks, where present, install their own validation plans
            self.datamodule.set_valid_plan(self.datamodule.plan_of(self.datamodule.indices("valid", task)))
        self.method.setup_task(task)
        for cb in self.callbacks:
            cb.on_task_start(self.ctx, task)
        stages: dict[str, Any] = {}
        for stage in self.stages_of(task):
            L.seed_everything(stream_seed(self.cfg.seed, task, stage.name), workers=True, verbose=False)
            self.method.setup_stage(task, stage)
            checkpoints = self.stage_checkpoints(task, stage)
            trainer = self.make_trainer(task, stage, checkpoints)
            self.ctx.fit = FitContext(trainer.strategy.root_device, trainer.precision_plugin)
            for cb in self.callbacks:
                cb.on_stage_start(self.ctx, task, stage)
            self.ctx.fit.epochs = self.plan_epochs(stage)  # the callbacks installed the stage's plan
            self.method.before_fit(task, stage, self.ctx.fit, self.datamodule)
            done = self.folder.stage_weights(task, stage.name)
            if rebuild or (self.resumed and done.is_file()):  # a finished stage (of the task a kill interrupted)
                self.method.restore_trainable(str(done))
                stages[stage.name] = self.folder.stage_record(task, stage.name)
            else:
                stages[stage.name] = self.fit_stage(task, stage, trainer, checkpoints)
            self.method.end_stage(task, stage)
            for cb in self.callbacks:
                cb.on_stage_end(self.ctx, task, stage)
            release_free_heap()
        self.method.end_task(task)
        for cb in self.callbacks:
            cb.on_task_end(self.ctx, task)
        return stages

    def run_task(self, task: int) -> None:
        """All stages of one task, then its test."""
        record: dict[str, Any] = {"task": task}
        record["stages"] = self.train_task(task)
        record["train_seconds"] = round(sum(s["seconds"] for s in record["stages"].values()), 3)
        record["train_steps"] = sum(s["steps"] for s in record["stages"].values())
        record["train_data"] = self.datamodule.train_plan_info
        record["filtered_long_templates"] = self.datamodule.filtered.get(task, 0)
        record["test"] = self.evaluate(task)
        for cb in self.callbacks:
            cb.on_task_tested(self.ctx, task)
        for recorder in [*self.callbacks, self.method]:
            record.update(recorder.task_record(task))
        self.ctx.per_task.append(record)
        self.write_metrics()
        if is_rank_zero():  # one line per task, so a run without a progress bar (a log file, CI) shows where it is
            test = record["test"]
            print(
                f"[conpet] task {task + 1}/{self.benchmark.num_tasks}: acc_macro={test['macro']:.2f} "
                f"acc_micro={test['micro']:.2f} train {record['train_seconds']:.0f} s, {record['train_steps']} steps",
                flush=True,
            )
        for cb in self.callbacks:
            cb.on_task_evaluated(self.ctx, task)

    def write_metrics(self) -> dict[str, Any]:
        """Write metrics.json and accuracy_matrix.csv for the tasks finished so far."""
        R = self.ctx.R
        n_test = [int(len(self.datamodule.indices(self.cfg.eval.split, t))) for t in range(self.benchmark.num_tasks)]
        done = len(R)
        square = [row[:done] for row in R]
        joint = None
        if self.reference is not None and len(self.reference) >= done:
            joint = [row[:done] for row in self.reference[:done]]
        curve = self.ctx.eval_curve or None
        summary = summarize(square, n_test[:done], R_joint=joint, eval_curve=curve) if done else {}
        summary.update(budget_totals(self.ctx.per_task))
        out = {
            "experiment": self.cfg.experiment,
            "run_id": self.run_dir.name,
            "benchmark": self.benchmark.name,
            "seed": self.cfg.seed,
            "task_order": self.task_order,
            "valid_scope": self.valid_scope,
            "eval_split": self.cfg.eval.split,
            "tasks": [{"classes": c, "n_test": n} for c, n in zip(self.benchmark.tasks, n_test, strict=True)],
            "accuracy_matrix": square,
            "summary": summary,
            "per_task": self.ctx.per_task,
        }
        if self.ctx.eval_curve:
            out["eval_curve"] = self.ctx.eval_curve
        if joint is not None:
            out["joint_accuracy_matrix"] = joint
        self.folder.write_metrics(out)
        return out
