"""Sweeps: a resumable grid of experiments x benchmarks x override sets x task orders x seeds.

A sweep file (YAML) names the grid::

    name: cpu_equal_budget
    output_dir: runs/sweeps
    experiments: [naive, emr, {name: limitless, seeds: [100]}]   # an entry may narrow seeds or benchmarks
    benchmarks: [fewrel, fewnerd]
    seeds: [100, 200, 300]
    task_orders: [default, [2, 0, 1], {permutation: 7}]          # optional, default [default]
    overrides:                                                   # optional override sets, default one empty set
      - []                                                       # unnamed: "default" (empty) or "set<i>"
      - {name: conpet_selector, args: [...], experiments: [dynamic_conpet]}
    args: [...]                                                  # optional, passed to every point
    slurm: {time: "24:00:00", cpus-per-task: 8}                  # optional #SBATCH lines for --emit slurm

Every grid point has a fixed run folder ``<output_dir>/<name>/<experiment>/<point id>`` (the run's ``output_dir``
and ``run_id``), so a restarted sweep finds what it did: a folder whose metrics.json has every task is skipped, one
with some tasks is resumed (``conpet resume``), any other point is run. Points run as subprocesses (one process per run
folder, as the loop requires), one after another or in N lanes that split the cores. ``index.json`` beside the
run folders lists every point with its folder and status; ``conpet report`` reads it.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from conpet_lightning.config import ConfigError, check_task_order_spec, load_config

INDEX_FILE = "index.json"
#: Statuses a point can have in the index.
STATUSES = ("done", "partial", "pending", "running", "failed", "broken")


@dataclass(frozen=True)
class GridPoint:
    """One run of the sweep; ``index`` is its position in the grid (the SLURM array index / ``--point``)."""

    index: int
    experiment: str
    benchmark: str
    seed: int
    task_order: Any
    """``None`` (the benchmark's order), a list of task indices, or ``"perm:<seed>"``."""
    override_set: str
    overrides: tuple[str, ...]
    point_id: str
    run_dir: Path

    def describe(self) -> dict[str, Any]:
        """The grid coordinates, as written to the index."""
        return {
            "index": self.index,
            "experiment": self.experiment,
            "benchmark": self.benchmark,
            "seed": self.seed,
            "task_order": self.task_order,
            "override_set": self.override_set,
            "overrides": list(self.overrides),
            "point_id": self.point_id,
        }


@dataclass
class Sweep:
    """A parsed sweep file: its name, folder and grid points in a fixed order."""

    name: str
    path: Path
    root: Path
    """``<output_dir>/<name>``: the run folders and ``index.json`` live here."""
    points: list[GridPoint] = field(default_factory=list)
    slurm: dict[str, Any] = field(default_factory=dict)

    @property
    def index_path(self) -> Path:
        """Where the sweep index is written."""
        return self.root / INDEX_FILE


# ------------------------------------------------------------------------------------------------- parsing
def _order_spec(entry: Any, where: str) -> Any:
    """A ``task_orders`` entry as a ``data.task_order`` value."""
    if entry is None or entry == "default":
        return None
    if isinstance(entry, dict):
        if set(entry) != {"permutation"} or not isinstance(entry["permutation"], int):
            raise ConfigError(f"{where}: a seeded order is {{permutation: <int seed>}}, got {entry!r}")
        return f"perm:{entry['permutation']}"
    try:
        check_task_order_spec(entry)
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}; or 'default' or {{permutation: <seed>}}") from None
    return list(entry) if isinstance(entry, list) else entry


def order_label(spec: Any) -> str:
    """A short folder-safe label of a task order: ``default``, ``perm7``, ``o2.0.1``."""
    if spec is None:
        return "default"
    if isinstance(spec, str):
        return "perm" + spec.partition(":")[2]
    return "o" + ".".join(str(t) for t in spec)


def _point_id(benchmark: str, set_name: str, order: Any, seed: int) -> str:
    """The run id of a point: ``fewrel-s100``, ``fewrel-conpet_selector-perm7-s100`` (defaults left out)."""
    parts = [benchmark, set_name if set_name != "default" else "", order_label(order) if order is not None else ""]
    return "-".join([p for p in parts if p] + [f"s{seed}"])


def _str_list(value: Any, where: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str | int) for v in value):
        raise ConfigError(f"{where}: expected a list, got {value!r}")
    return [str(v) for v in value]


def _override_sets(raw: Any) -> list[tuple[str, list[str], list[str] | None]]:
    """``(name, args, experiments or None)`` per override set; one empty set when the file has none."""
    if raw is None:
        return [("default", [], None)]
    if not isinstance(raw, list) or not raw:
        raise ConfigError("sweep 'overrides' must be a non-empty list of override sets")
    out = []
    for i, entry in enumerate(raw):
        where = f"overrides[{i}]"
        if isinstance(entry, list):
            args = _str_list(entry, where)
            out.append(("default" if not args else f"set{i}", args, None))
        elif isinstance(entry, dict):
            unknown = set(entry) - {"name", "args", "experiments"}
            if unknown or "name" not in entry:
                raise ConfigError(f"{where}: keys are name, args, experiments; got {sorted(entry)}")
            only = _str_list(entry["experiments"], f"{where}.experiments") if "experiments" in entry else None
            out.append((str(entry["name"]), _str_list(entry.get("args"), f"{where}.args"), only))
        else:
            raise ConfigError(f"{where}: expected a list of key=value or {{name, args, experiments}}, got {entry!r}")
    names = [name for name, _, _ in out]
    if len(set(names)) != len(names):
        raise ConfigError(f"sweep override sets need distinct names, got {names}")
    return out


def load_sweep(path: str | Path, *, validate_configs: bool = True) -> Sweep:
    """Read a sweep file and expand its grid.

    Args:
        path: the sweep YAML.
        validate_configs: compose every point's run config now (no data or model loads), so a mistyped key fails
            before the first run starts instead of hours into the sweep.

    Raises:
        ConfigError: a missing or malformed key, naming it.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConfigError(f"cannot parse {path}: {err}") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a mapping at the top level")
    known = {"name", "output_dir", "experiments", "benchmarks", "seeds", "task_orders", "overrides", "args", "slurm"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"{path}: unknown sweep key(s) {unknown}; known: {sorted(known)}")
    for key in ("name", "experiments", "benchmarks", "seeds"):
        if not raw.get(key):
            raise ConfigError(f"{path}: sweep key '{key}' is required and must not be empty")
    name = str(raw["name"])
    if "/" in name or name.startswith("."):
        raise ConfigError(f"{path}: sweep name {name!r} must be a plain folder name")
    root = Path(str(raw.get("output_dir") or "runs/sweeps")) / name
    seeds = [int(s) for s in raw["seeds"]]
    benchmarks = _str_list(raw["benchmarks"], "benchmarks")
    orders = [_order_spec(o, f"task_orders[{i}]") for i, o in enumerate(raw.get("task_orders") or ["default"])]
    common = _str_list(raw.get("args"), "args")
    sets = _override_sets(raw.get("overrides"))
    slurm = raw.get("slurm") or {}
    if not isinstance(slurm, dict):
        raise ConfigError(f"{path}: 'slurm' must be a mapping of sbatch options")

    points: list[GridPoint] = []
    for i, entry in enumerate(raw["experiments"]):
        if isinstance(entry, str):
            entry = {"name": entry}
        if not isinstance(entry, dict) or "name" not in entry or set(entry) - {"name", "seeds", "benchmarks"}:
            raise ConfigError(f"experiments[{i}]: a name or {{name, seeds, benchmarks}}, got {entry!r}")
        experiment = str(entry["name"])
        exp_seeds = [int(s) for s in entry.get("seeds") or seeds]
        exp_benchmarks = _str_list(entry.get("benchmarks"), f"experiments[{i}].benchmarks") or benchmarks
        for benchmark in exp_benchmarks:
            for set_name, set_args, only in sets:
                if only is not None and experiment not in only:
                    continue
                for order in orders:
                    for seed in exp_seeds:
                        point_id = _point_id(benchmark, set_name, order, seed)
                        points.append(
                            GridPoint(
                                index=len(points),
                                experiment=experiment,
                                benchmark=benchmark,
                                seed=seed,
                                task_order=order,
                                override_set=set_name,
                                overrides=(*common, *set_args),
                                point_id=point_id,
                                run_dir=root / experiment / point_id,
                            )
                        )
    ids = [(p.experiment, p.point_id) for p in points]
    if len(set(ids)) != len(ids):
        raise ConfigError(f"{path}: two grid points share a run folder (repeated experiment, seed or order?)")
    sweep = Sweep(name=name, path=path, root=root, points=points, slurm=slurm)
    if validate_configs:
        for point in points:
            cfg = load_config(point.experiment, run_args(sweep, point, threads=1))
            if cfg.experiment != point.experiment:  # the run folder is <output_dir>/<cfg.experiment>/<run_id>
                raise ConfigError(f"experiment file {point.experiment} names itself {cfg.experiment!r}")
    return sweep


# ----------------------------------------------------------------------------------------------- commands
def run_args(sweep: Sweep, point: GridPoint, threads: int) -> list[str]:
    """The ``conpet run`` overrides of a point; the grid coordinates and folder come last, so nothing moves them."""
    args = [f"train.num_threads={threads}", *point.overrides, f"data.benchmark={point.benchmark}", f"seed={point.seed}"]
    if point.task_order is not None:
        order = point.task_order
        args.append(
            f"data.task_order={order}" if isinstance(order, str) else f"data.task_order=[{','.join(map(str, order))}]"
        )
    return [*args, f"output_dir={sweep.root}", f"run_id={point.point_id}", f"logging.wandb_group={sweep.name}"]


def conpet_command() -> list[str]:
    """How the sweep starts ``conpet``: this interpreter, so the runs use the same environment as the sweep."""
    return [sys.executable, "-m", "conpet_lightning.cli"]


def point_status(point: GridPoint) -> str:
    """``done`` (metrics.json with every task), ``partial`` (some tasks: resume), ``pending``, or ``broken``."""
    metrics = point.run_dir / "metrics.json"
    if not metrics.is_file():
        return "pending"
    try:
        run = json.loads(metrics.read_text(encoding="utf-8"))
        done, total = len(run.get("per_task") or []), len(run["tasks"])
    except (ValueError, KeyError, TypeError, AttributeError):
        return "broken"
    return "done" if done >= total > 0 else "partial"


def point_command(sweep: Sweep, point: GridPoint, threads: int) -> list[str] | None:
    """The subprocess that brings a point to ``done``: ``run`` or ``resume``; None when there is nothing to do."""
    status = point_status(point)
    if status == "done":
        return None
    if status == "partial":
        return [*conpet_command(), "resume", str(point.run_dir)]
    if status == "broken":
        raise ConfigError(f"{point.run_dir}/metrics.json is unreadable; move the folder away to rerun the point")
    return [*conpet_command(), "run", point.experiment, *run_args(sweep, point, threads)]


def available_cores() -> int:
    """CPU cores this process may use (a scheduler's allocation, not the whole node's count)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def lane_threads(lanes: int, cores: int | None = None) -> int:
    """Torch threads per run when ``lanes`` runs share the cores."""
    return max(1, (cores or available_cores()) // max(1, lanes))


# ---------------------------------------------------------------------------------------------- the index
def write_index(sweep: Sweep, overrides: dict[int, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Write ``index.json`` atomically: every point with its run folder (relative to the index) and status.

    Statuses come from the run folders, except for points this process is running or saw fail (``overrides``),
    so concurrent writers (job-array tasks) each write a consistent picture.
    """
    points = []
    for p in sweep.points:
        entry = {**p.describe(), "run_dir": str(Path(p.experiment) / p.point_id), "status": point_status(p)}
        entry.update((overrides or {}).get(p.index, {}))
        if entry["status"] in ("running", "failed") and point_status(p) == "done":
            entry["status"] = "done"  # another writer's stale view of a point that has since finished
        points.append(entry)
    index = {"name": sweep.name, "sweep_file": str(sweep.path), "points": points}
    sweep.root.mkdir(parents=True, exist_ok=True)
    tmp = sweep.index_path.with_name(f".{INDEX_FILE}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, sweep.index_path)
    return index


def read_index(path: str | Path) -> list[Path]:
    """Run folders listed by a sweep index (``index.json`` or its folder), resolved against the index's folder."""
    path = Path(path)
    if path.is_dir():
        path = path / INDEX_FILE
    index = json.loads(path.read_text(encoding="utf-8"))
    return [path.parent / p["run_dir"] for p in index["points"]]


# ------------------------------------------------------------------------------------------------ running
Runner = Callable[[list[str], Path | None], int]


def run_order(points: Sequence[GridPoint], grid: Sequence[GridPoint] | None = None) -> list[GridPoint]:
    """Seed-major order: every point of the first seed (and task order) runs before any point of the next.

    A sweep stopped half-way then holds whole seeds of every experiment, which paired comparisons can use, instead of
    every seed of the first few experiments. Seeds and orders rank as they come in the whole ``grid`` (default:
    ``points``), so a subset that happens to start with a later seed still runs the earlier one first. Grid indices
    (the job-array numbering) do not change.
    """
    ranked = grid if grid is not None else points
    seed_rank = {seed: i for i, seed in enumerate(dict.fromkeys(p.seed for p in ranked))}
    order_rank = {key: i for i, key in enumerate(dict.fromkeys(repr(p.task_order) for p in ranked))}
    return sorted(points, key=lambda p: (seed_rank[p.seed], order_rank[repr(p.task_order)], p.index))


def _subprocess_runner(cmd: list[str], log: Path | None) -> int:
    """Run one point; with a log file (lanes) its output goes there instead of interleaving on the console."""
    if log is None:
        return subprocess.run(cmd, check=False).returncode
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        return subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, check=False).returncode


def run_sweep(
    sweep: Sweep,
    *,
    lanes: int = 1,
    dry_run: bool = False,
    only: Sequence[int] | None = None,
    cores: int | None = None,
    runner: Runner = _subprocess_runner,
    echo: Callable[[str], None] = print,
) -> dict[int, str]:
    """Bring every point (or the ``only`` indices) to ``done``; returns the final status per point run or planned.

    Points run seed-major (``run_order``). ``dry_run`` prints the commands and writes nothing. With ``lanes > 1``
    runs share the cores, each with ``train.num_threads = cores // lanes``, and log to
    ``<root>/logs/<experiment>/<point id>.log``.
    """
    if lanes < 1:
        raise ConfigError(f"--lanes must be >= 1, got {lanes}")
    todo = sweep.points if only is None else [sweep.points[i] for i in only]
    threads = lane_threads(lanes, cores)
    plan = [(p, point_command(sweep, p, threads)) for p in todo]
    statuses = {p.index: "done" for p, cmd in plan if cmd is None}
    skipped = len(statuses)
    echo(f"[sweep] {sweep.name}: {len(todo)} point(s), {skipped} done, {len(todo) - skipped} to run -> {sweep.root}")
    if dry_run:
        for p, cmd in plan:
            echo(f"[{p.index}] {p.experiment}/{p.point_id}: " + ("done (skip)" if cmd is None else shlex.join(cmd)))
        return {p.index: point_status(p) for p in todo}
    lock = threading.Lock()
    live: dict[int, dict[str, Any]] = {}

    def work(point: GridPoint, cmd: list[str]) -> None:
        with lock:
            live[point.index] = {"status": "running"}
            write_index(sweep, live)
            echo(f"[sweep] start [{point.index}] {point.experiment}/{point.point_id}: {shlex.join(cmd)}")
        log = sweep.root / "logs" / point.experiment / f"{point.point_id}.log" if lanes > 1 else None
        rc = runner(cmd, log)
        status = "done" if rc == 0 and point_status(point) == "done" else "failed"
        with lock:
            live[point.index] = {"status": status} if status == "done" else {"status": status, "returncode": rc}
            statuses[point.index] = status
            write_index(sweep, live)
            echo(f"[sweep] {status} [{point.index}] {point.experiment}/{point.point_id} (exit {rc})")

    write_index(sweep, live)
    commands = {p.index: cmd for p, cmd in plan if cmd is not None}
    jobs = [(p, commands[p.index]) for p in run_order(todo, grid=sweep.points) if p.index in commands]
    if lanes == 1:
        for p, cmd in jobs:
            work(p, cmd)
    else:
        with ThreadPoolExecutor(max_workers=lanes) as pool:
            for future in [pool.submit(work, p, cmd) for p, cmd in jobs]:
                future.result()
    failed = sorted(i for i, s in statuses.items() if s == "failed")
    echo(f"[sweep] {sweep.name}: {len(statuses) - len(failed)} done, {len(failed)} failed; index: {sweep.index_path}")
    return statuses


# ------------------------------------------------------------------------------------------ beyond one machine
def _sweep_ref(sweep: Sweep) -> str:
    return shlex.quote(str(sweep.path))


def emit_slurm(sweep: Sweep) -> str:
    """A SLURM job-array script: array task ``i`` runs grid point ``i`` (``conpet sweep FILE --point i``).

    The run starts under ``srun``, so Lightning's ``SLURMEnvironment`` takes ranks and devices from SLURM; resubmitting
    the array is safe because each point skips or resumes its own folder.
    """
    opts = {
        "job-name": f"conpet-{sweep.name}",
        "array": f"0-{len(sweep.points) - 1}",
        "ntasks-per-node": 1,
        "output": str(sweep.root / "logs" / "slurm-%A_%a.log"),
        **{str(k).replace("_", "-"): v for k, v in sweep.slurm.items()},
    }
    lines = ["#!/bin/bash", *(f"#SBATCH --{k}={v}" for k, v in opts.items())]
    lines += [
        f"# {len(sweep.points)} grid points of sweep '{sweep.name}', one per array task; a finished point is skipped",
        "# and a killed one resumed, so the array can be resubmitted. Submit from the project folder: sbatch <script>",
        "set -euo pipefail",
        f"mkdir -p {shlex.quote(str(sweep.root / 'logs'))}",
        f"srun {shlex.join(conpet_command())} sweep {_sweep_ref(sweep)} --point $SLURM_ARRAY_TASK_ID",
        "",
    ]
    return "\n".join(lines)


def emit_wandb(sweep: Sweep) -> str:
    """A W&B sweep config (grid over the point index) whose agent runs ``conpet sweep FILE --point=<i>``."""
    config = {
        "name": sweep.name,
        "program": "conpet_lightning/cli.py",
        "method": "grid",
        "parameters": {"point": {"values": list(range(len(sweep.points)))}},
        "command": [*conpet_command(), "sweep", str(sweep.path), "${args}"],
    }
    header = (
        f"# W&B sweep for '{sweep.name}': `wandb sweep <this file>`, then `wandb agent <sweep id>` on each machine.\n"
        "# Each agent job runs one grid point; add logging.wandb_mode=online to the sweep's args to see runs live.\n"
    )
    return header + yaml.safe_dump(config, sort_keys=False)


def emit(sweep: Sweep, kind: str, out: str | Path | None = None) -> Path:
    """Write the ``slurm`` or ``wandb`` file (default ``<root>/<name>.{sbatch,wandb.yaml}``) and return its path."""
    if kind not in ("slurm", "wandb"):
        raise ConfigError(f"--emit takes slurm or wandb, not {kind!r}")
    text = emit_slurm(sweep) if kind == "slurm" else emit_wandb(sweep)
    path = (
        Path(out) if out else sweep.root / (f"{sweep.name}.sbatch" if kind == "slurm" else f"{sweep.name}.wandb.yaml")
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    (sweep.root / "logs").mkdir(parents=True, exist_ok=True)  # SLURM opens --output before the script runs
    path.write_text(text, encoding="utf-8")
    return path
