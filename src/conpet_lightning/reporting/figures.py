"""PNG figures of a run's accuracy matrix: heatmap, per-task accuracy curves, final forgetting bars.

Figures are drawn with matplotlib's object-oriented API on an Agg canvas created inside each function, so no
pyplot global state or backend switch leaks into the caller (safe in headless runs, notebooks and threads).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from conpet_lightning.metrics.matrix import Matrix, acc_macro, forgetting, validate_matrix
from conpet_lightning.reporting.report import load_run, run_label

if TYPE_CHECKING:
    from matplotlib.figure import Figure

#: Above this many tasks, cell values and legends would be unreadable and are left out.
MAX_ANNOTATED_TASKS = 12


def _figure(width: float, height: float) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str | Path) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out


def plot_accuracy_heatmap(R: Matrix, path: str | Path, title: str | None = None) -> Path:
    """Heatmap of R: row = after training task i, column = evaluated on task j; empty above the diagonal."""
    a = validate_matrix(R)
    n = a.shape[0]
    size = max(3.5, 0.55 * n + 2.0)
    fig = _figure(size + 1.0, size)
    ax = fig.add_subplot()
    im = ax.imshow(np.ma.masked_invalid(a), vmin=0, vmax=100, cmap="viridis")
    fig.colorbar(im, ax=ax, label="accuracy (%)")
    if n <= MAX_ANNOTATED_TASKS:
        for i, j in zip(*np.nonzero(~np.isnan(a))):
            ax.text(j, i, f"{a[i, j]:.0f}", ha="center", va="center", fontsize=8, color="w" if a[i, j] < 60 else "k")
    ax.set_xticks(range(n))
    ax.set_yticks(range(n))
    ax.set_xlabel("evaluated on task j")
    ax.set_ylabel("after training task i")
    ax.set_title(title or "Accuracy matrix R")
    return _save(fig, path)


def plot_forgetting_curves(R: Matrix, path: str | Path, title: str | None = None) -> Path:
    """One line per task j: its accuracy after each training step i >= j, plus the macro ACC after each step."""
    a = validate_matrix(R)
    n = a.shape[0]
    fig = _figure(7.0, 4.5)
    ax = fig.add_subplot()
    steps = np.arange(n)
    for j in range(n):
        ax.plot(steps[j:], a[j:, j], marker="o", markersize=3, linewidth=1.2, label=f"task {j}")
    ax.plot(steps, [acc_macro(R, i) for i in range(n)], "k--", linewidth=2, label="ACC (macro)")
    ax.set_xticks(steps)
    ax.set_ylim(0, 100)
    ax.set_xlabel("after training task i")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title or "Per-task accuracy over the task sequence")
    if n <= MAX_ANNOTATED_TASKS:
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_forgetting_bars(R: Matrix, path: str | Path, title: str | None = None) -> Path:
    """Bars of each old task's forgetting after the last task, ``f[T-1][j]`` (RWalk), for ``j < T-1``."""
    f = forgetting(R)
    n = len(f)
    fig = _figure(max(4.0, 0.5 * n + 2.0), 4.0)
    ax = fig.add_subplot()
    if n < 2:
        ax.text(0.5, 0.5, "forgetting needs at least 2 tasks", ha="center", va="center", transform=ax.transAxes)
    else:
        values = [f[n - 1][j] for j in range(n - 1)]
        ax.bar(range(n - 1), values, color=["tab:red" if v > 0 else "tab:green" for v in values])
        ax.set_xticks(range(n - 1))
        ax.axhline(0, color="k", linewidth=0.8)
    ax.set_xlabel("task j")
    ax.set_ylabel("forgetting after the last task (pp)")
    ax.set_title(title or "Final forgetting per task")
    return _save(fig, path)


def render_run_figures(run_dir: str | Path) -> list[Path]:
    """Write ``accuracy_heatmap.png``, ``forgetting_curves.png`` and ``forgetting_bars.png`` into the run dir.

    Reads ``run_dir/metrics.json`` (see ``load_run``) and returns the written paths.
    """
    run = load_run(run_dir)
    out_dir = Path(run["_path"]).parent
    R = run["accuracy_matrix"]
    label = run_label(run)
    return [
        plot_accuracy_heatmap(R, out_dir / "accuracy_heatmap.png", title=f"Accuracy matrix: {label}"),
        plot_forgetting_curves(R, out_dir / "forgetting_curves.png", title=f"Per-task accuracy: {label}"),
        plot_forgetting_bars(R, out_dir / "forgetting_bars.png", title=f"Final forgetting: {label}"),
    ]
