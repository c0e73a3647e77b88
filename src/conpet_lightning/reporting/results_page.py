"""Generate docs/results.md from a sweep's run folders: no number on the page is typed by hand.

``make results SWEEP=sweeps/cpu_equal_budget.yaml`` (or ``python -m conpet_lightning.reporting.results_page SWEEP``)
reads every finished run the sweep's index lists and writes the conditions (commit, budgets, model, machine), mean ±
std per experiment and benchmark with the number of seeds, and one row per claim of the ConPET paper with the measured
difference, its 95 % interval, p-values and a generated sentence saying whether the claim holds at this scale.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from conpet_lightning.paths import PROJECT_ROOT
from conpet_lightning.reporting.aggregate import (
    Run,
    aggregate,
    collect_runs,
    compare,
    fmt,
    fmt_p,
)
from conpet_lightning.reporting.routing_page import routing_section

#: Summary columns of the main tables (metrics.json ``summary`` keys) and their headers.
TABLE_METRICS = {"acc_macro": "acc_macro", "acc_micro": "acc_micro", "aia": "AIA", "forgetting": "F", "bwt": "BWT"}
#: The metric the claims are judged on.
CLAIM_METRIC = "acc_macro"
#: Fewest paired seeds for a claim to be judged at all.
MIN_PAIRS = 3
#: Claim (b): the Static ConPET (*) version of each PET-only baseline, and the gain the paper reports.
STAR_PAIRS = (("emr_star", "emr"), ("eaemr_star", "eaemr"), ("crl_star", "crl"))
STAR_GAIN = 5.0
STATIC_METHODS = tuple(star for star, _ in STAR_PAIRS)
#: Claim (c) is tested on the largest shipped benchmark.
LARGEST_BENCHMARK = "fewnerd"
#: Claim (a): the paper's parameter cut, and the LLaMA-7B architecture it is computed for.
PARAM_CUT = 3000.0


@dataclass(frozen=True)
class LlamaArch:
    """A LLaMA-architecture decoder, enough to count its parameters and a LoRA's (untied embeddings, no biases)."""

    vocab: int = 32000
    hidden: int = 4096
    layers: int = 32
    intermediate: int = 11008

    def total_parameters(self) -> int:
        """Embeddings + LM head + per layer (q, k, v, o; gate, up, down; two RMSNorms) + the final norm."""
        per_layer = 4 * self.hidden * self.hidden + 3 * self.hidden * self.intermediate + 2 * self.hidden
        return 2 * self.vocab * self.hidden + self.layers * per_layer + self.hidden

    def lora_parameters(self, r: int = 4, modules: int = 2) -> int:
        """LoRA of rank r on ``modules`` square projections per layer (ConPET: q and k): A (r x d) + B (d x r)."""
        return self.layers * modules * r * (self.hidden + self.hidden)


# ------------------------------------------------------------------------------------------------ sources
def sweep_runs(source: str | Path) -> tuple[list[Run], list[str], str]:
    """Finished runs of a sweep (its YAML, folder or index.json), the notes on left-out runs, and a display name."""
    path = Path(source)
    if path.suffix in (".yaml", ".yml"):
        from conpet_lightning.sweep import load_sweep

        sweep = load_sweep(path, validate_configs=False)
        runs, notes = collect_runs([sweep.index_path])
        return runs, notes, f"{path} ({sweep.root})"
    runs, notes = collect_runs([path])
    return runs, notes, str(path)


def git_commit(repo: Path) -> str:
    """The commit the page was generated at (with a note when the working tree differs from it)."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo, capture_output=True, text=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return f"`{head}`" + (" (with uncommitted changes)" if dirty else "")


def machine() -> str:
    """Where the page was generated: OS, architecture, Python and core count."""
    return f"{platform.system()} {platform.machine()}, Python {platform.python_version()}, {os.cpu_count()} cores"


def _cfg(run: Run, dotted: str) -> Any:
    node: Any = run.config
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, Mapping) else None
    return node


def _distinct(values: Sequence[Any]) -> str:
    seen = list(dict.fromkeys("-" if v is None else str(v) for v in values))
    return ", ".join(seen) if seen else "-"


def _stage_values(run: Run, key: str) -> list[list[float]]:
    """Per task, the ``key`` of every stage in metrics.json ``per_task[t].stages``."""
    out = []
    for task in run.raw.get("per_task") or []:
        stages = (task.get("stages") or {}).values()
        out.append([float(s[key]) for s in stages if isinstance(s, Mapping) and isinstance(s.get(key), int | float)])
    return out


# ------------------------------------------------------------------------------------------------ sections
def conditions(runs: Sequence[Run], source: str, repo: Path) -> list[str]:
    """The conditions block: what produced the numbers, all read from the runs, git and this machine."""

    def of(key: str) -> str:
        return _distinct([_cfg(r, key) for r in runs])

    return [
        "## Conditions",
        "",
        f"- **Runs:** {len(runs)} finished run folders of {source}.",
        f"- **Commit:** {git_commit(repo)}, when this page was generated.",
        f"- **Model:** {of('model.backbone')} (path {of('model.path')}); scale {of('scale')}; "
        f"LoRA r = {of('model.lora.r')}.",
        f"- **Training:** epochs {of('train.epochs')}, batch size {of('train.batch_size')}, lr {of('train.lr')}, "
        f"precision {of('train.precision')}, at most {of('data.max_seq_len')} tokens, "
        f"{of('train.num_threads')} torch thread(s) per run.",
        f"- **Task orders:** {_distinct([r.task_order for r in runs])}.",
        f"- **Machine:** {machine()} (where the page was generated).",
        "",
    ]


def _steps_per_task(runs: Sequence[Run]) -> list[float]:
    """Optimizer steps of every task of the runs (all stages summed)."""
    return [sum(stages) for r in runs for stages in _stage_values(r, "steps") if stages]


def _few_seed_costs(runs: Sequence[Run], few: Sequence[tuple[str, str, int]]) -> list[str]:
    """For each row with fewer seeds: its steps per task against those of the rows with enough seeds (its cost)."""
    lines = []
    for bench, experiment, n in few:
        on_bench = [r for r in runs if r.benchmark == bench]
        fewer = {e for b, e, _ in few if b == bench}
        own = _steps_per_task([r for r in on_bench if r.experiment == experiment])
        full = _steps_per_task([r for r in on_bench if r.experiment not in fewer])
        if not own or not full:
            continue
        mine, theirs = sum(own) / len(own), sum(full) / len(full)
        lines.append(
            f"- `{experiment}` ({bench}): {n} seed(s); {fmt(mine, 1)} steps per task on average against "
            f"{fmt(theirs, 1)} for the experiments with {MIN_PAIRS} or more seeds ({fmt(mine / theirs, 1)}x)."
        )
    return lines


def budget_table(runs: Sequence[Run]) -> list[str]:
    """Optimizer steps per task (summed over stages, mean over tasks and runs) and training seconds per method."""
    lines = [
        "### Budget",
        "",
        "Optimizer steps of all stages of a task (metrics.json `per_task[t].stages[*].steps`), per experiment. The "
        "seconds are the stages' fit time as the runs measured it, in the sweep's lanes on a machine that may have "
        "run other work too: a cost indication, not a benchmark (`make bench` measures costs side by side).",
        "",
        "| experiment | benchmark | steps per task (mean) | steps per task (min-max) | train s per run (mean) |",
        "|---|---|---:|---:|---:|",
    ]
    for group in aggregate(runs, ["experiment", "benchmark"]):
        members = [
            r
            for r in runs
            if r.experiment == group["group"]["experiment"] and r.benchmark == group["group"]["benchmark"]
        ]
        per_task = _steps_per_task(members)
        if not per_task:
            continue
        seconds = group["metrics"].get("budget.train_seconds", {}).get("mean")
        mean = fmt(sum(per_task) / len(per_task), 1)
        lines.append(
            f"| `{group['group']['experiment']}` | {group['group']['benchmark']} | {mean} "
            f"| {fmt(min(per_task), 0)}-{fmt(max(per_task), 0)} | {fmt(seconds, 0)} |"
        )
    return [*lines, ""]


def results_tables(runs: Sequence[Run]) -> list[str]:
    """Mean ± std of the summary metrics per experiment, one table per benchmark, with the seeds behind each row."""
    groups = aggregate(runs, ["experiment", "benchmark"])
    lines = ["## Results (mean ± std over seeds and task orders)", ""]
    few: list[tuple[str, str, int]] = []
    for bench in dict.fromkeys(g["group"]["benchmark"] for g in groups):
        lines += [f"### {bench}", "", "| experiment | runs | seeds | " + " | ".join(TABLE_METRICS.values()) + " |"]
        lines.append("|---|---:|---|" + "---:|" * len(TABLE_METRICS))
        for g in (g for g in groups if g["group"]["benchmark"] == bench):
            cells = []
            for key in TABLE_METRICS:
                s = g["metrics"].get(key)
                cells.append("-" if s is None else f"{fmt(s['mean'])} ± {fmt(s['std'])}")
            mark = ""
            if len(g["seeds"]) < MIN_PAIRS:
                few.append((bench, g["group"]["experiment"], len(g["seeds"])))
                mark = " †"
            seeds = ", ".join(map(str, g["seeds"]))
            lines.append(
                f"| `{g['group']['experiment']}`{mark} | {g['n_runs']} | {seeds} | " + " | ".join(cells) + " |"
            )
        lines.append("")
    if few:
        lines += [f"† fewer than {MIN_PAIRS} seeds: its spread is not an estimate; it takes part in no claim.", ""]
        lines += [*_few_seed_costs(runs, few), ""]
    return lines


def _verdict(s: Mapping[str, Any] | None, threshold: float) -> str:
    """``holds``, ``does not hold`` or ``not established``, from the paired difference's 95 % interval.

    Holds: the mean difference reaches ``threshold`` and the interval excludes 0. Does not hold: the whole interval
    lies below ``threshold``. Otherwise, or with fewer than ``MIN_PAIRS`` pairs: not established.
    """
    if s is None or s["n"] < MIN_PAIRS or s["diff_ci_low"] is None:
        return "not established"
    if s["diff_mean"] >= threshold and s["diff_ci_low"] > 0:
        return "holds"
    if s["diff_ci_high"] < threshold:
        return "does not hold"
    return "not established"


def _sentence(a: str, b: str, bench: str, s: Mapping[str, Any] | None, threshold: float, verdict: str) -> str:
    if s is None:
        return f"`{a}` and `{b}` share no seed on {bench}: the claim is not established."
    if s["n"] < MIN_PAIRS:
        return f"Only {s['n']} paired seed(s) of `{a}` and `{b}` on {bench}: the claim is not established."
    gap = f" by at least {threshold:g} points" if threshold else ""
    verb = "is not established" if verdict == "not established" else verdict
    ci = f"[{fmt(s['diff_ci_low'])}, {fmt(s['diff_ci_high'])}]"
    return (
        f"On {bench}, `{a}` - `{b}` = {fmt(s['diff_mean'])} points ({CLAIM_METRIC}, 95 % CI {ci}, paired t p = "
        f"{fmt_p(s['p_ttest'])}, n = {s['n']}): the claim that `{a}` beats `{b}`{gap} {verb} at this scale."
    )


def _claim_rows(
    runs: Sequence[Run], a: str, b: str, benches: Sequence[str], threshold: float, label: str
) -> tuple[list[str], list[str]]:
    rows, sentences = [], []
    for bench in benches:
        sub = [r for r in runs if r.benchmark == bench and r.experiment in (a, b)]
        if not sub:
            continue  # neither method ran on this benchmark
        s = None
        if {r.experiment for r in sub} == {a, b}:
            blocks = compare(sub, a, b)["benchmarks"]
            s = blocks[0]["metrics"].get(CLAIM_METRIC) if blocks else None
        verdict = _verdict(s, threshold)
        if s is None:
            rows.append(f"| {label} | `{a}` - `{b}` | {bench} | 0 | - | - | - | - | {verdict} |")
        else:
            ci = f"[{fmt(s['diff_ci_low'])}, {fmt(s['diff_ci_high'])}]" if s["diff_ci_low"] is not None else "-"
            rows.append(
                f"| {label} | `{a}` - `{b}` | {bench} | {s['n']} | {fmt(s['diff_mean'])} ± {fmt(s['diff_std'])} | "
                f"{ci} | {fmt_p(s['p_ttest'])} | {fmt_p(s['p_wilcoxon'])} | {verdict} |"
            )
        sentences.append(f"- {_sentence(a, b, bench, s, threshold, verdict)}")
    return rows, sentences


def claims(runs: Sequence[Run]) -> list[str]:
    """The three claims of the paper, each with its rows and a generated sentence."""
    arch = LlamaArch()
    total, lora = arch.total_parameters(), arch.lora_parameters(r=4, modules=2)
    ratio = total / lora
    lines = [
        "## The paper's claims at this scale",
        "",
        f"Paired differences of {CLAIM_METRIC} over runs with the same benchmark, seed and task order. A claim holds "
        f"when the mean difference reaches the claimed gap and its 95 % interval excludes 0, does not hold when the "
        f"whole interval lies below the gap, and is not established otherwise or with fewer than {MIN_PAIRS} pairs.",
        "",
        "### (a) Tunable parameters cut by more than 3,000x",
        "",
        "| model | total parameters | trainable parameters | total / trainable | source |",
        "|---|---:|---:|---:|---|",
        f"| LLaMA-7B, LoRA r=4 on q, k of {arch.layers} layers (hidden {arch.hidden}) | {total:,} | {lora:,} | "
        f"{ratio:,.0f}x | computed from the architecture |",
    ]
    measured: dict[str, list[tuple[float, float]]] = {}
    for run in runs:
        backbone = str(_cfg(run, "model.path") or _cfg(run, "model.backbone") or "?")
        for tr, to in zip(
            _stage_values(run, "trainable_parameters"), _stage_values(run, "total_parameters"), strict=False
        ):
            measured.setdefault(backbone, []).extend((t, o) for t, o in zip(tr, to, strict=False) if t > 0)
    for backbone, pairs in measured.items():
        worst = min(pairs, key=lambda p: p[1] / p[0])
        lines.append(
            f"| {backbone} (shipped), the stage with the most trainable parameters relative to its total | "
            f"{worst[1]:,.0f} | {worst[0]:,.0f} | {worst[1] / worst[0]:,.0f}x | measured (metrics.json) |"
        )
    holds = "holds" if ratio > PARAM_CUT else "does not hold"
    lines += [
        "",
        f"- For LLaMA-7B the cut is {ratio:,.0f}x, so the claim {holds} there by arithmetic. The measured rows "
        "count the classification head as trainable, which weighs more on a small model: the ratio grows with it.",
        "",
        "### (b) Each Static ConPET (*) version beats its PET-only baseline by at least 5 points",
        "",
    ]
    header = [
        "| claim | comparison | benchmark | pairs | difference (mean ± std) | 95 % CI | p (paired t) | p (Wilcoxon) "
        "| verdict |",
        "|---|---|---|---:|---:|---:|---:|---:|---|",
    ]
    benches = list(dict.fromkeys(r.benchmark for r in runs))
    rows, sentences = [], []
    for star, base in STAR_PAIRS:
        r, s = _claim_rows(runs, star, base, benches, STAR_GAIN, "(b)")
        rows += r
        sentences += s
    lines += [*header, *rows, "", *sentences, ""]
    lines += ["### (c) Dynamic ConPET beats the best Static ConPET method on the largest benchmark", ""]
    largest = [r for r in runs if r.benchmark == LARGEST_BENCHMARK]
    static = [g for g in aggregate(largest, ["experiment"]) if g["group"]["experiment"] in STATIC_METHODS]
    static = [g for g in static if CLAIM_METRIC in g["metrics"]]
    dynamic = [e for e in dict.fromkeys(r.experiment for r in largest) if e.split("+")[0] == "dynamic_conpet"]
    if not static or not dynamic:
        lines += [
            f"- No `dynamic_conpet` or Static ConPET runs on {LARGEST_BENCHMARK}: the claim is not established.",
            "",
        ]
        return lines
    best = max(static, key=lambda g: g["metrics"][CLAIM_METRIC]["mean"])["group"]["experiment"]
    lines.append(
        f"The best Static method on {LARGEST_BENCHMARK} by mean {CLAIM_METRIC} is `{best}` (of "
        + ", ".join(f"`{g['group']['experiment']}` {fmt(g['metrics'][CLAIM_METRIC]['mean'])}" for g in static)
        + ")."
    )
    lines.append("")
    rows, sentences = [], []
    for exp in dynamic:
        r, s = _claim_rows(runs, exp, best, [LARGEST_BENCHMARK], 0.0, "(c)")
        rows += r
        sentences += s
    return [*lines, *header, *rows, "", *sentences, ""]


def build_page(source: str | Path, repo: Path | None = None) -> str:
    """The whole results page as markdown."""
    repo = repo or PROJECT_ROOT
    runs, notes, name = sweep_runs(source)
    if not runs:
        raise FileNotFoundError(f"no finished run in {source}: run the sweep first (make sweep SWEEP=...)")
    lines = [
        "# Measured results",
        "",
        f"Generated by `make results SWEEP={source}` from the run folders; every number below is computed from their "
        "metrics.json and config.yaml, none is typed. Do not edit by hand: rerun the sweep and `make results`. "
        "Reproduce one run with "
        '`make run EXP=<experiment> ARGS="data.benchmark=<benchmark> seed=<seed> train.num_threads=<threads>"` plus '
        "the sweep's args (its index.json lists every run's overrides; the threads per run are in the conditions, "
        "since the summation order of a CPU matmul may depend on them).",
        "",
        *conditions(runs, name, repo),
        *budget_table(runs),
        *results_tables(runs),
        *claims(runs),
        *routing_section(runs),
    ]
    if notes:
        lines += ["## Left out", "", *(f"- {n}" for n in notes), ""]
    return "\n".join(lines).rstrip() + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m conpet_lightning.reporting.results_page SWEEP [--out docs/results.md]``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep", help="sweep YAML, sweep folder, or its index.json")
    parser.add_argument("--out", default="docs/results.md")
    args = parser.parse_args(argv)
    try:
        page = build_page(args.sweep)
    except (FileNotFoundError, ValueError) as err:
        print(f"results: error: {err}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, out)
    print(f"[results] wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
