"""Read finished runs (``metrics.json``), recompute their summaries from R, and compare runs side by side.

The summary is recomputed from the stored accuracy matrix rather than trusted, so runs written by older code
are compared under today's metric definitions, and a disagreement with the stored summary is flagged.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from conpet_lightning.metrics.matrix import SUMMARY_KEYS, summarize, validate_matrix

METRICS_FILE = "metrics.json"
#: Stored and recomputed summary values further apart than this (percentage points) are reported as mismatches.
MISMATCH_TOL = 1e-6


def _metrics_path(run_dir: str | Path) -> Path:
    p = Path(run_dir)
    return p if p.name == METRICS_FILE or p.is_file() else p / METRICS_FILE


def load_run(run_dir: str | Path) -> dict[str, Any]:
    """Read and check ``run_dir/metrics.json`` (``run_dir`` may also be the file itself).

    Returns:
        The parsed run, plus ``_path`` (the file read) for error messages and labels.

    Raises:
        FileNotFoundError: the file does not exist (the message names it).
        ValueError: malformed JSON (with line and column), or a missing/ill-formed ``accuracy_matrix`` or ``tasks``.
    """
    path = _metrics_path(run_dir)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no {METRICS_FILE} here; is this a finished run directory?")
    try:
        run = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}") from e
    if not isinstance(run, dict):
        raise ValueError(f"{path}: expected a JSON object at the top level, got {type(run).__name__}")
    for key in ("accuracy_matrix", "tasks"):
        if key not in run:
            raise ValueError(f"{path}: missing key '{key}'")
    n = validate_matrix(run["accuracy_matrix"], f"{path}: accuracy_matrix").shape[0]
    tasks = run["tasks"]
    if not isinstance(tasks, list) or len(tasks) < n:
        raise ValueError(f"{path}: 'tasks' must list at least the {n} trained tasks, got {tasks!r:.200}")
    for j, t in enumerate(tasks[:n]):
        if not isinstance(t, dict) or "n_test" not in t:
            raise ValueError(f"{path}: tasks[{j}] must be an object with 'n_test', got {t!r:.200}")
    if "joint_accuracy_matrix" in run:
        validate_matrix(run["joint_accuracy_matrix"], f"{path}: joint_accuracy_matrix")
    run["_path"] = str(path)
    return run


def recompute_summary(run: Mapping[str, Any]) -> dict[str, float | None]:
    """Summary metrics of a loaded run, recomputed from its ``accuracy_matrix`` and ``tasks[*].n_test``.

    Optional inputs are used when the run has them: ``joint_accuracy_matrix`` (intransigence), ``fwt_baseline``
    (FWT) and ``eval_curve`` (min-ACC, WC-ACC).
    """
    R = run["accuracy_matrix"]
    n_test = [t["n_test"] for t in run["tasks"][: len(R)]]
    return summarize(
        R,
        n_test,
        R_joint=run.get("joint_accuracy_matrix"),
        fwt_baseline=run.get("fwt_baseline"),
        eval_curve=run.get("eval_curve"),
    )


def summary_mismatches(run: Mapping[str, Any], recomputed: Mapping[str, float | None]) -> list[str]:
    """Names of metrics whose stored ``summary`` value disagrees with the recomputed one (stale or buggy writer)."""
    stored = run.get("summary") or {}
    bad = []
    for key, new in recomputed.items():
        if key not in stored:
            continue
        old = stored[key]
        if old is None or new is None:
            if old is not new:
                bad.append(key)
        elif not isinstance(old, int | float) or not math.isclose(old, new, rel_tol=0, abs_tol=MISMATCH_TOL):
            bad.append(key)
    return bad


def run_label(run: Mapping[str, Any]) -> str:
    """Column label of a run: ``experiment (run_id)``, falling back to the file path for what is missing."""
    exp = run.get("experiment") or Path(str(run.get("_path", "?"))).parent.name
    rid = run.get("run_id")
    return f"{exp} ({rid})" if rid is not None else str(exp)


def _cell(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.2f}"
    return str(v).replace("|", "\\|")


def steps_per_task(run: Mapping[str, Any]) -> str:
    """Optimizer steps of each task, run-length compressed (``80, 240 x9``): equal budgets show as one group."""
    steps = [int(t.get("train_steps", 0)) for t in run.get("per_task") or []]
    groups: list[list[int]] = []
    for n in steps:
        if groups and groups[-1][0] == n:
            groups[-1][1] += 1
        else:
            groups.append([n, 1])
    return ", ".join(f"{n} x{k}" if k > 1 else str(n) for n, k in groups) or "n/a"


def markdown_table(runs: Sequence[Mapping[str, Any]]) -> str:
    """Side-by-side markdown table: one column per run, one row per summary metric (recomputed).

    Rows follow ``SUMMARY_KEYS``; any extra keys in a run's stored summary (e.g. selector accuracy) follow,
    sorted. Context rows (benchmark, seed, tasks, optimizer steps of each task) come first. ``n/a`` marks a metric
    that does not apply.
    """
    if not runs:
        raise ValueError("markdown_table needs at least one run")
    summaries = []
    for run in runs:
        s: dict[str, Any] = {k: v for k, v in (run.get("summary") or {}).items() if k not in SUMMARY_KEYS}
        s.update(recompute_summary(run))
        summaries.append(s)
    extra = sorted({k for s in summaries for k in s if k not in SUMMARY_KEYS})
    lines = [
        "| metric | " + " | ".join(_cell(run_label(r)) for r in runs) + " |",
        "|---|" + "---:|" * len(runs),
    ]
    context = {
        "benchmark": [r.get("benchmark") for r in runs],
        "seed": [r.get("seed") for r in runs],
        "tasks": [len(r["accuracy_matrix"]) for r in runs],
        "steps per task": [steps_per_task(r) for r in runs],
    }
    for name, values in context.items():
        lines.append(f"| {name} | " + " | ".join(_cell(v) for v in values) + " |")
    for key in (*SUMMARY_KEYS, *extra):
        lines.append(f"| {key} | " + " | ".join(_cell(s.get(key)) for s in summaries) + " |")
    return "\n".join(lines) + "\n"


def with_evals(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each run followed by its ``conpet eval`` results (``<run>/evals/<name>/metrics.json``), labelled as evals."""
    out: list[dict[str, Any]] = []
    for run in runs:
        out.append(run)
        for path in sorted(Path(run["_path"]).parent.glob("evals/*/metrics.json")):
            ev = load_run(path)
            ev["experiment"] = f"{ev.get('experiment') or run.get('experiment')} eval:{path.parent.name}"
            out.append(ev)
    return out


def report(run_dirs: Sequence[str | Path], as_json: bool = False) -> str:
    """Compare runs: a markdown table (plus notes on stale stored summaries), or JSON with the same numbers.

    Args:
        run_dirs: Run directories (or their ``metrics.json`` files).
        as_json: Return a JSON list of ``{experiment, run_id, benchmark, seed, path, summary, mismatches}``.
    """
    runs = with_evals([load_run(d) for d in run_dirs])
    if not runs:
        raise ValueError("report needs at least one run directory")
    rows = []
    for run in runs:
        summary = recompute_summary(run)
        rows.append(
            {
                "experiment": run.get("experiment"),
                "run_id": run.get("run_id"),
                "benchmark": run.get("benchmark"),
                "seed": run.get("seed"),
                "path": run["_path"],
                "summary": summary,
                "mismatches": summary_mismatches(run, summary),
            }
        )
    if as_json:
        return json.dumps(rows, indent=2) + "\n"
    text = markdown_table(runs)
    notes = [
        f"- {r['path']}: stored summary differs from R for {', '.join(r['mismatches'])}"
        for r in rows
        if r["mismatches"]
    ]
    if notes:
        text += "\nValues above are recomputed from the accuracy matrix.\n" + "\n".join(notes) + "\n"
    return text
