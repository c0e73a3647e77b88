"""Aggregate run folders over seeds and task orders: mean ± std and 95 % t-intervals, and paired comparisons.

One run is one number per metric; a claim needs many. ``conpet report --group-by experiment,benchmark`` groups runs
(folders, globs or a sweep's ``index.json``) by the named fields and gives, per summary metric and budget column,
mean ± sample std, n and the 95 % t-interval of the mean. ``conpet report --compare A B`` pairs A's and B's runs by
(benchmark, seed, task order), so seed-to-seed variation that both share cancels, and gives the paired difference's
mean, its 95 % t-interval, the paired t-test p-value and, from 6 pairs on, the Wilcoxon signed-rank p-value.
"""

from __future__ import annotations

import glob
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from scipy import stats

#: Fields every run has; any other group-by field is a dotted config key (``train.lr``) or a metrics.json key.
BUILTIN_FIELDS = ("experiment", "base_experiment", "benchmark", "seed", "task_order", "override_set")
#: Budget columns derived from ``per_task`` (summed over tasks) when the run has them.
BUDGET_COLUMNS = {"budget.train_steps": "train_steps", "budget.train_seconds": "train_seconds"}
#: Fewest pairs for which the Wilcoxon signed-rank test is reported (below, its smallest p exceeds 0.05).
WILCOXON_MIN_N = 6
CONFIDENCE = 0.95


@dataclass
class Run:
    """One finished run folder, reduced to what aggregation needs."""

    path: Path
    experiment: str
    """The experiment, with ``+<override set>`` for a sweep's non-default override set (a row of its own)."""
    base_experiment: str
    benchmark: str
    seed: int | None
    task_order: str
    """``default``, ``perm:<seed>`` or the comma-joined order: runs with equal labels saw the same sequence."""
    override_set: str | None
    metrics: dict[str, float | None]
    config: dict[str, Any] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict)

    def get(self, name: str) -> Any:
        """A group-by field: a builtin, a dotted key of the run's config.yaml, or a top-level metrics.json key."""
        if name in BUILTIN_FIELDS:
            return getattr(self, name)
        node: Any = self.config
        for part in name.split("."):
            if not isinstance(node, Mapping) or part not in node:
                node = self.raw.get(name)
                break
            node = node[part]
        return node


def _order_label(spec: Any) -> str:
    if spec is None or spec == "default":
        return "default"
    if isinstance(spec, list | tuple):
        return ",".join(str(int(t)) for t in spec)
    return str(spec)


def _budget(per_task: Sequence[Mapping[str, Any]]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for column, key in BUDGET_COLUMNS.items():
        values = [t.get(key) for t in per_task]
        out[column] = float(sum(values)) if values and all(isinstance(v, int | float) for v in values) else None
    return out


def load_run_folder(path: str | Path, index_entry: Mapping[str, Any] | None = None) -> Run | None:
    """Read a run folder (None when it has not finished every task: a partial run would bias its group)."""
    path = Path(path)
    metrics_path = path / "metrics.json"
    if not metrics_path.is_file():
        return None
    raw = json.loads(metrics_path.read_text(encoding="utf-8"))
    R, tasks = raw.get("accuracy_matrix") or [], raw.get("tasks") or []
    if not R or len(R) < len(tasks):
        return None
    config_path = path / "config.yaml"
    config = (yaml.safe_load(config_path.read_text(encoding="utf-8")) or {}) if config_path.is_file() else {}
    entry = index_entry or {}
    base = str(raw.get("experiment") or config.get("experiment") or entry.get("experiment") or path.parent.name)
    override_set = entry.get("override_set")
    order_spec = (config.get("data") or {}).get("task_order", raw.get("task_order"))
    metrics = {k: (float(v) if isinstance(v, int | float) else None) for k, v in (raw.get("summary") or {}).items()}
    metrics.update(_budget(raw.get("per_task") or []))
    seed = raw.get("seed", config.get("seed"))
    return Run(
        path=path,
        experiment=base if override_set in (None, "default") else f"{base}+{override_set}",
        base_experiment=base,
        benchmark=str(raw.get("benchmark") or (config.get("data") or {}).get("benchmark")),
        seed=None if seed is None else int(seed),
        task_order=_order_label(order_spec),
        override_set=override_set,
        metrics=metrics,
        config=config,
        raw=raw,
    )


def unfinished_state(path: Path) -> str:
    """Why a run folder is not a finished run, in words: not started, or how many tasks it finished."""
    metrics_path = path / "metrics.json"
    if not metrics_path.is_file():
        return "not started" if not path.is_dir() or not any(path.iterdir()) else "started, no task finished yet"
    try:
        raw = json.loads(metrics_path.read_text(encoding="utf-8"))
    except ValueError:
        return "metrics.json does not parse"
    return f"not finished ({len(raw.get('accuracy_matrix') or [])} of {len(raw.get('tasks') or [])} tasks)"


def _index_entries(index_path: Path) -> Iterable[tuple[Path, Mapping[str, Any]]]:
    index = json.loads(index_path.read_text(encoding="utf-8"))
    for entry in index["points"]:
        yield index_path.parent / entry["run_dir"], entry


def collect_runs(paths: Sequence[str | Path]) -> tuple[list[Run], list[str]]:
    """Finished runs from run folders, glob patterns and sweep indexes (``index.json`` or a folder holding one).

    Returns:
        The runs (each folder once) and notes on what was left out (unfinished or missing runs).
    """
    runs: list[Run] = []
    notes: list[str] = []
    seen: set[Path] = set()

    def add(folder: Path, entry: Mapping[str, Any] | None = None) -> None:
        key = folder.resolve()
        if key in seen:
            return
        seen.add(key)
        run = load_run_folder(folder, entry)
        if run is None:
            notes.append(f"{folder}: {unfinished_state(folder)}; left out")
        else:
            runs.append(run)

    for raw in paths:
        matches = sorted(glob.glob(str(raw))) if glob.has_magic(str(raw)) else [str(raw)]
        if not matches:
            notes.append(f"{raw}: matches nothing")
        for match in matches:
            path = Path(match)
            index = path if path.name == "index.json" else path / "index.json"
            if index.is_file() and not (path / "metrics.json").is_file():
                for folder, entry in _index_entries(index):
                    add(folder, entry)
            elif path.is_dir() or path.name == "metrics.json":
                add(path.parent if path.name == "metrics.json" else path)
            else:
                raise FileNotFoundError(f"{path}: not a run folder, a metrics.json or a sweep index")
    return runs, notes


# --------------------------------------------------------------------------------------------- statistics
def describe(values: Sequence[float]) -> dict[str, float | int | None]:
    """n, mean, sample std (ddof=1) and the 95 % t-interval of the mean; spread and interval need n >= 2."""
    x = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=float)
    n = int(x.size)
    if n == 0:
        return {"n": 0, "mean": None, "std": None, "ci_low": None, "ci_high": None}
    mean = float(x.mean())
    if n < 2:
        return {"n": 1, "mean": mean, "std": None, "ci_low": None, "ci_high": None}
    std = float(x.std(ddof=1))
    half = float(stats.t.ppf(0.5 + CONFIDENCE / 2, n - 1)) * std / math.sqrt(n)
    return {"n": n, "mean": mean, "std": std, "ci_low": mean - half, "ci_high": mean + half}


def paired(a: Sequence[float], b: Sequence[float]) -> dict[str, float | int | None]:
    """The paired difference a - b: mean, std, 95 % t-interval, paired t-test p and (n >= 6) Wilcoxon p."""
    d = [x - y for x, y in zip(a, b, strict=True)]
    out: dict[str, float | int | None] = {f"diff_{k}" if k != "n" else k: v for k, v in describe(d).items()}
    out["mean_a"] = describe(a)["mean"]
    out["mean_b"] = describe(b)["mean"]
    out["p_ttest"] = None
    out["p_wilcoxon"] = None
    if len(d) >= 2 and np.std(d) > 0:
        out["p_ttest"] = float(stats.ttest_rel(a, b).pvalue)
    if len(d) >= WILCOXON_MIN_N and any(v != 0 for v in d):
        out["p_wilcoxon"] = float(stats.wilcoxon(d).pvalue)
    return out


# ----------------------------------------------------------------------------------------------- grouping
def group_runs(runs: Sequence[Run], fields: Sequence[str]) -> dict[tuple[Any, ...], list[Run]]:
    """Runs keyed by their values of ``fields``, in order of first appearance."""
    groups: dict[tuple[Any, ...], list[Run]] = {}
    for run in runs:
        groups.setdefault(tuple(_hashable(run.get(f)) for f in fields), []).append(run)
    return groups


def _hashable(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def metric_names(runs: Sequence[Run]) -> list[str]:
    """Every metric some run has, in first-seen order (summary keys, then the budget columns)."""
    names: dict[str, None] = {}
    for run in runs:
        names.update(dict.fromkeys(run.metrics))
    return list(names)


def aggregate(runs: Sequence[Run], fields: Sequence[str]) -> list[dict[str, Any]]:
    """Per group: its field values, label, runs, and ``describe`` of every metric over the group's runs."""
    out = []
    names = metric_names(runs)
    for key, members in group_runs(runs, fields).items():
        metrics = {m: describe([r.metrics.get(m) for r in members if r.metrics.get(m) is not None]) for m in names}
        out.append(
            {
                "group": dict(zip(fields, key, strict=True)),
                "label": "/".join(str(v) for v in key),
                "n_runs": len(members),
                "seeds": sorted({r.seed for r in members if r.seed is not None}),
                "task_orders": sorted({r.task_order for r in members}),
                "runs": [str(r.path) for r in members],
                "metrics": {m: v for m, v in metrics.items() if v["n"]},
            }
        )
    return out


def _side(runs: Sequence[Run], name: str, fields: Sequence[str]) -> list[Run]:
    """Runs of one compared side: an experiment name, or a group label of ``fields`` (``emr/fewrel``)."""
    return [r for r in runs if r.experiment == name or "/".join(str(r.get(f)) for f in fields) == name]


def pair_key(run: Run) -> tuple[str, int | None, str]:
    """What two runs must share to be paired: benchmark, seed and task order."""
    return (run.benchmark, run.seed, run.task_order)


def compare(runs: Sequence[Run], a: str, b: str, fields: Sequence[str] = ("experiment",)) -> dict[str, Any]:
    """Paired comparison of side ``a`` against ``b``, per benchmark, for every metric both sides have.

    Raises:
        ValueError: a side matches no run, or one side has two runs for the same (benchmark, seed, order).
    """
    sides = {}
    for name in (a, b):
        members = _side(runs, name, fields)
        if not members:
            known = sorted({r.experiment for r in runs})
            raise ValueError(f"--compare: no run matches {name!r}; experiments here: {', '.join(known)}")
        keyed: dict[tuple[str, int | None, str], Run] = {}
        for run in members:
            if pair_key(run) in keyed:
                raise ValueError(
                    f"--compare: {name!r} has two runs for benchmark/seed/order {pair_key(run)}: "
                    f"{keyed[pair_key(run)].path} and {run.path}; name a narrower group"
                )
            keyed[pair_key(run)] = run
        sides[name] = keyed
    common = [k for k in sides[a] if k in sides[b]]
    unpaired = sorted(str(k) for k in set(sides[a]) ^ set(sides[b]))
    out: dict[str, Any] = {"a": a, "b": b, "benchmarks": [], "unpaired": unpaired}
    for bench in dict.fromkeys(k[0] for k in common):
        keys = [k for k in common if k[0] == bench]
        ra, rb = [sides[a][k] for k in keys], [sides[b][k] for k in keys]
        metrics = {}
        for m in metric_names([*ra, *rb]):
            pairs = [(x.metrics.get(m), y.metrics.get(m)) for x, y in zip(ra, rb, strict=True)]
            pairs = [(x, y) for x, y in pairs if x is not None and y is not None]
            if pairs:
                metrics[m] = paired([x for x, _ in pairs], [y for _, y in pairs])
        out["benchmarks"].append(
            {"benchmark": bench, "pairs": [{"seed": k[1], "task_order": k[2]} for k in keys], "metrics": metrics}
        )
    return out


# ------------------------------------------------------------------------------------------------- output
def fmt(v: float | None, digits: int = 2) -> str:
    """A number for a table cell; ``-`` when it does not apply."""
    return "-" if v is None else f"{v:.{digits}f}"


def fmt_p(p: float | None) -> str:
    """A p-value: 3 significant digits, ``-`` when the test does not apply."""
    return "-" if p is None else f"{p:.3g}"


def groups_markdown(groups: Sequence[Mapping[str, Any]]) -> str:
    """Long-format table: one row per (group, metric) with n, mean ± std and the 95 % interval."""
    lines = ["| group | metric | n | mean ± std | 95 % CI |", "|---|---|---:|---:|---:|"]
    for g in groups:
        for m, s in g["metrics"].items():
            ci = f"[{fmt(s['ci_low'])}, {fmt(s['ci_high'])}]" if s["ci_low"] is not None else "-"
            lines.append(f"| {g['label']} | {m} | {s['n']} | {fmt(s['mean'])} ± {fmt(s['std'])} | {ci} |")
    return "\n".join(lines) + "\n"


def compare_markdown(result: Mapping[str, Any]) -> str:
    """One table per benchmark: A, B, the paired difference A - B with its interval, and the p-values."""
    a, b = result["a"], result["b"]
    text = []
    for block in result["benchmarks"]:
        n = len(block["pairs"])
        text.append(f"{a} - {b} on {block['benchmark']} ({n} pair(s) by seed and task order)\n")
        text.append(f"| metric | n | {a} | {b} | diff (mean ± std) | 95 % CI | p (paired t) | p (Wilcoxon) |")
        text.append("|---|---:|---:|---:|---:|---:|---:|---:|")
        for m, s in block["metrics"].items():
            ci = f"[{fmt(s['diff_ci_low'])}, {fmt(s['diff_ci_high'])}]" if s["diff_ci_low"] is not None else "-"
            text.append(
                f"| {m} | {s['n']} | {fmt(s['mean_a'])} | {fmt(s['mean_b'])} | {fmt(s['diff_mean'])} ± "
                f"{fmt(s['diff_std'])} | {ci} | {fmt_p(s['p_ttest'])} | {fmt_p(s['p_wilcoxon'])} |"
            )
        text.append("")
    if not result["benchmarks"]:
        text.append(f"{a} and {b} share no (benchmark, seed, task order): nothing to pair.\n")
    if result["unpaired"]:
        text.append("Unpaired (left out): " + "; ".join(result["unpaired"]) + "\n")
    return "\n".join(text)


def report_aggregate(
    paths: Sequence[str | Path],
    group_by: Sequence[str] = ("experiment", "benchmark"),
    compare_pair: tuple[str, str] | None = None,
    as_json: bool = False,
) -> str:
    """What ``conpet report --group-by ... [--compare A B] [--json]`` prints."""
    runs, notes = collect_runs(paths)
    if not runs:
        raise FileNotFoundError(f"no finished run among {list(map(str, paths))}")
    group_by = list(group_by) or ["experiment", "benchmark"]
    result: dict[str, Any] = {"group_by": group_by, "notes": notes}
    if compare_pair is not None:
        result["compare"] = compare(runs, *compare_pair, fields=group_by)
    else:
        result["groups"] = aggregate(runs, group_by)
    if as_json:
        return json.dumps(result, indent=2) + "\n"
    text = compare_markdown(result["compare"]) if compare_pair else groups_markdown(result["groups"])
    return text + "".join(f"\n- {note}" for note in notes) + ("\n" if notes else "")
