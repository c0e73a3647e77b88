"""The routing section of the results page: how well the routed runs find each sample's expert.

Two tables, both read from run folders: the test routing panel each routed run wrote (``per_task[-1]["selector"]``:
task-id accuracy, what oracle routing would reach with the same experts, recency bias, cost), and the routers compared
on the *validation* split by ``conpet eval RUN_DIR callbacks.routing=<preset> eval.split=valid`` (``evals/*/``), which
is where a default router may be chosen: never on test data.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from conpet_lightning.reporting.aggregate import Run, describe, fmt

#: Columns of the test routing panel: metrics.json key -> header.
PANEL = {
    "acc_macro": "task-id acc (macro)",
    "oracle_acc_macro": "oracle acc_macro",
    "oracle_gap_macro": "oracle gap",
    "recency_bias": "recency bias",
    "passes_per_sample": "passes / sample",
}


def _cell(values: Sequence[float | None]) -> str:
    """Mean ± std of the values present; ``(k of n)`` when some runs lack the metric (written by older versions)."""
    present = [v for v in values if v is not None]
    s = describe(present)
    if s["mean"] is None:
        return "-"
    text = f"{fmt(s['mean'])} ± {fmt(s['std'])}" if s["std"] is not None else fmt(s["mean"])
    return text if len(present) == len(values) else f"{text} ({len(present)} of {len(values)})"


def _panel(raw: Mapping[str, Any]) -> Mapping[str, Any] | None:
    per_task = raw.get("per_task") or []
    return per_task[-1].get("selector") if per_task else None


def run_panel_table(runs: Sequence[Run]) -> list[str]:
    """Mean ± std over seeds of the final routing panel, per routed experiment, benchmark and evaluated split."""
    groups: dict[tuple[str, str, str], list[Mapping[str, Any]]] = {}
    for run in runs:
        panel = _panel(run.raw)
        if panel:
            groups.setdefault((run.experiment, run.benchmark, str(run.raw.get("eval_split", "test"))), []).append(panel)
    if not groups:
        return []
    lines = [
        "### Routing of the routed runs (their own router, after the last task)",
        "",
        "Task-id accuracy is the share of test samples sent to their own task's expert; oracle acc_macro is what the "
        "same experts reach when every sample goes to its own task's expert; recency bias is the share of old-task "
        "samples sent to the newest expert.",
        "",
        "| experiment | benchmark | split | runs | " + " | ".join(PANEL.values()) + " |",
        "|---|---|---|---:|" + "---:|" * len(PANEL),
    ]
    for (experiment, bench, split), panels in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        cells = [_cell([p.get(key) for p in panels]) for key in PANEL]
        lines.append(f"| `{experiment}` | {bench} | {split} | {len(panels)} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def validation_evals(runs: Sequence[Run]) -> list[tuple[Run, str, dict[str, Any]]]:
    """(run, eval name, eval metrics) of every eval on the validation split under the runs' folders."""
    found = []
    for run in runs:
        for metrics_path in sorted(Path(run.path).glob("evals/*/metrics.json")):
            config_path = metrics_path.with_name("config.yaml")
            config = yaml.safe_load(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
            if ((config or {}).get("eval") or {}).get("split") != "valid":
                continue
            found.append((run, metrics_path.parent.name, json.loads(metrics_path.read_text(encoding="utf-8"))))
    return found


def validation_router_table(runs: Sequence[Run]) -> list[str]:
    """Routers compared on validation data: per benchmark and eval, final acc_macro and task-id accuracy."""
    evals = validation_evals(runs)
    if not evals:
        return []
    groups: dict[tuple[str, str, str], list[tuple[Run, dict[str, Any]]]] = {}
    for run, name, metrics in evals:
        groups.setdefault((run.benchmark, run.experiment, name), []).append((run, metrics))
    lines = [
        "### Routers on the validation split (`conpet eval`, same trained experts)",
        "",
        "Each finished routed run re-tested with another router on the validation split "
        "(`conpet eval RUN_DIR callbacks.routing=<preset> eval.split=valid`): the data a default router is chosen on. "
        "The routers' options are in each eval's config.yaml.",
        "",
        "| benchmark | experiment | eval | router | seeds | acc_macro | task-id acc (macro) | passes / sample |",
        "|---|---|---|---|---|---:|---:|---:|",
    ]
    few = False
    for (bench, experiment, name), members in sorted(groups.items()):
        seeds = sorted({r.seed for r, _ in members if r.seed is not None})
        router = (members[0][1].get("router") or {}).get("name", "-")
        acc = _cell([(m.get("summary") or {}).get("acc_macro") for _, m in members])
        panels = [_panel(m) or {} for _, m in members]
        task_id = _cell([p.get("acc_macro") for p in panels])
        passes = _cell([p.get("passes_per_sample") for p in panels])
        mark = " †" if len(seeds) < 3 else ""
        few = few or bool(mark)
        lines.append(
            f"| {bench} | `{experiment}` | {name}{mark} | `{router}` | {', '.join(map(str, seeds))} | {acc} | "
            f"{task_id} | {passes} |"
        )
    if few:
        lines += ["", "† fewer than 3 seeds: its spread is not an estimate (one seed: a one-seed figure)."]
    return [*lines, ""]


def routing_section(runs: Sequence[Run]) -> list[str]:
    """The page's routing section, empty when no run is routed."""
    body = [*run_panel_table(runs), *validation_router_table(runs)]
    return ["## Routing", "", *body] if body else []
