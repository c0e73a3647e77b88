"""The run dashboard: PNG figures in the run folder after every task, and the W&B panels when W&B is on.

Always among the run's callbacks (last in the list the task loop composes). After each task's test
(``on_task_evaluated``, when ``metrics.json`` holds the new row of R) it renders ``accuracy_heatmap.png``,
``forgetting_curves.png`` and ``forgetting_bars.png`` into the run folder with
``reporting.figures.render_run_figures``, with or without W&B.

With a ``RunWandbLogger`` (``logging.wandb: true``) it also keeps the logger's task/stage context and run-level step
offset up to date across the loop's fresh Trainers, and logs after each task:

- ``dashboard/accuracy_matrix``: R so far as a ``wandb.Table`` (one row per trained task ``after_task``, one column
  ``task{j}`` per task, null above the diagonal), and ``dashboard/accuracy_heatmap``: the heatmap PNG as an image;
- ``dashboard/forgetting_curves``: each task's accuracy against the task index (``wandb.plot.line_series``);
- ``dashboard/forgetting_bars``: each old task's forgetting after this task (``wandb.plot.bar``), from task 2 on;
- ``dashboard/acc_macro``, ``dashboard/forgetting``: the macro ACC and average forgetting after this task;
- for routed runs (``per_task[t]["selector"]``, written by ``topk_routing``): ``selector/acc_macro``,
  ``selector/acc_micro``, ``selector/topk_hit_rate``, ``selector/oracle_acc_macro``, ``selector/oracle_gap_macro``,
  ``selector/oracle_gap_micro`` and the routing confusion matrix ``selector/confusion`` (a table: gold task per row,
  routed-to task per column).

At run end the ``metrics.json`` summary goes into the W&B run summary, the continual-evaluation curve (if any) is
logged as the table ``dashboard/eval_curve``, and the W&B run is finished.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_only

from conpet_lightning.callbacks.base import TaskCallback
from conpet_lightning.contract import RunContext, StageSpec
from conpet_lightning.metrics.matrix import acc_macro, average_forgetting, forgetting

if TYPE_CHECKING:
    from conpet_lightning.reporting.wandb_logger import RunWandbLogger

#: Scalar entries of a task's selector panel that are logged to W&B as ``selector/<name>``.
SELECTOR_SCALARS = (
    "acc_macro",
    "acc_micro",
    "topk_hit_rate",
    "oracle_acc_macro",
    "oracle_gap_macro",
    "oracle_gap_micro",
)


def _is_rank_zero() -> bool:
    return rank_zero_only.rank == 0


def accuracy_table_rows(R: list[list[float | None]]) -> tuple[list[str], list[list[Any]]]:
    """Columns and rows of the W&B accuracy-matrix table: ``after_task`` then ``task{j}`` (None above the diagonal)."""
    n = len(R)
    return ["after_task", *(f"task{j}" for j in range(n))], [[i, *R[i][:n]] for i in range(n)]


class DashboardCallback(TaskCallback):
    """PNG figures after every task; W&B tables, charts and the selector panel when a W&B logger is given."""

    def __init__(self, wandb_logger: RunWandbLogger | None = None, figures: bool = True) -> None:
        self.wandb_logger = wandb_logger
        self.figures = figures

    # ---------------------------------------------------------------------------------- step bookkeeping
    def on_stage_start(self, ctx: RunContext, task: int, stage: StageSpec) -> None:
        """Rows logged by the stage's Trainer carry its task and stage."""
        if self.wandb_logger is not None:
            self.wandb_logger.set_context(task, stage.name)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """The next Trainer's step 0 is the run step after this fit."""
        if self.wandb_logger is not None:
            self.wandb_logger.advance(trainer.global_step)

    def on_task_end(self, ctx: RunContext, task: int) -> None:
        """The end-of-task test (and the panels after it) log as stage ``test``."""
        if self.wandb_logger is not None:
            self.wandb_logger.set_context(task, "test")

    # ------------------------------------------------------------------------------------------- panels
    def on_task_evaluated(self, ctx: RunContext, task: int) -> None:
        """Render the PNG figures, then log the task's W&B panels.

        A failure here is a warning, not the end of the run: ``metrics.json`` (from which ``conpet report`` and
        ``render_run_figures`` redraw everything) is already on disk.
        """
        if not _is_rank_zero():
            return
        if self.figures:
            from conpet_lightning.reporting.figures import render_run_figures

            try:
                render_run_figures(ctx.run_dir)
            except Exception as err:  # figures are a convenience: the run goes on
                warnings.warn(f"dashboard: could not render the figures after task {task}: {err!r}", stacklevel=2)
        if self.wandb_logger is not None:
            try:
                panels = self.task_panels(ctx, task)
            except Exception as err:
                warnings.warn(f"dashboard: could not build the W&B panels after task {task}: {err!r}", stacklevel=2)
            else:
                self.wandb_logger.log_metrics(panels)

    def task_panels(self, ctx: RunContext, task: int) -> dict[str, Any]:
        """The W&B values logged after ``task``: R, its heatmap, forgetting curves and bars, the selector panel."""
        import wandb

        n = task + 1
        R = [row[:n] for row in ctx.R[:n]]
        columns, rows = accuracy_table_rows(R)
        out: dict[str, Any] = {
            "dashboard/accuracy_matrix": wandb.Table(columns=columns, data=rows),
            "dashboard/acc_macro": acc_macro(R),
            "dashboard/forgetting_curves": wandb.plot.line_series(
                xs=[list(range(j, n)) for j in range(n)],
                ys=[[R[i][j] for i in range(j, n)] for j in range(n)],
                keys=[f"task {j}" for j in range(n)],
                title="Per-task accuracy over the task sequence",
                xname="after training task",
            ),
        }
        heatmap = ctx.run_dir / "accuracy_heatmap.png"
        if heatmap.is_file():
            out["dashboard/accuracy_heatmap"] = wandb.Image(str(heatmap), caption=f"R after task {task}")
        if task > 0:
            f = forgetting(R)
            bars = wandb.Table(columns=["task", "forgetting"], data=[[f"task {j}", f[task][j]] for j in range(task)])
            out["dashboard/forgetting_bars"] = wandb.plot.bar(
                bars, "task", "forgetting", title=f"Forgetting after task {task} (pp)"
            )
            out["dashboard/forgetting"] = average_forgetting(R)
        selector = ctx.per_task[task].get("selector") if task < len(ctx.per_task) else None
        if selector:
            out.update({f"selector/{k}": selector[k] for k in SELECTOR_SCALARS if selector.get(k) is not None})
            confusion = selector.get("confusion")
            if confusion:
                k = len(confusion)
                out["selector/confusion"] = wandb.Table(
                    columns=["gold_task", *(f"routed_to_{r}" for r in range(k))],
                    data=[[g, *confusion[g]] for g in range(k)],
                )
        return out

    # ------------------------------------------------------------------------------------------- run end
    def on_run_end(self, ctx: RunContext, metrics: dict[str, Any]) -> None:
        """The summary into the W&B run summary, the eval curve as a table, then finish the W&B run."""
        if self.wandb_logger is None:
            return
        if _is_rank_zero():
            import wandb

            if ctx.eval_curve:
                n = ctx.num_tasks
                rows = [
                    [e["task"], e["step"], *(e["acc"][j] if j < len(e["acc"]) else None for j in range(n))]
                    for e in ctx.eval_curve
                ]
                table = wandb.Table(columns=["task", "step", *(f"task{j}" for j in range(n))], data=rows)
                self.wandb_logger.log_metrics({"dashboard/eval_curve": table})
            summary = {k: v for k, v in metrics.get("summary", {}).items()}
            summary["num_tasks_trained"] = len(metrics.get("accuracy_matrix", []))
            self.wandb_logger.experiment.summary.update(summary)
        self.wandb_logger.finish(exit_code=0)
