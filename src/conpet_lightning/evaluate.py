"""``conpet eval RUN_DIR [key=value ...]``: test a finished (or partly finished) run again with another router.

Why: a router ablation should cost a test pass, not a run. The run is rebuilt task by task from its saved stage
weights with ``TaskLoop.train_task(task, rebuild=True)``, which sets up every stage as it ran, loads its weights and
runs every end-of-stage and end-of-task hook (so a router fits its statistics and temperatures from training and
validation data, as it would have during the run); then each finished task is tested. Only routing and inference
keys may change (``callbacks.routing...``, ``eval.*``, ``logging.*``): anything else would test other experts.

The eval writes ``RUN_DIR/evals/<name>/config.yaml`` and ``metrics.json`` (R, the routing panel of every task, the
summary), never touching the run's own files.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from conpet_lightning.config import PROJECT_ROOT, ConfigError, RunConfig, validate
from conpet_lightning.run_folder import CONFIG, RunFolder
from conpet_lightning.runfiles import atomic_write_json

#: Keys an eval may override: the routing slot, evaluation and logging options.
ALLOWED_PREFIXES = ("callbacks.routing", "eval.", "logging.")
EVALS = "evals"
ROUTING = "callbacks.routing"


def split_override(item: str) -> tuple[str, str]:
    """``key=value`` of the command line, the key checked against what an eval may change."""
    key, sep, value = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"eval override {item!r} is not key=value")
    if not (key == ROUTING or any(key.startswith(p) for p in ALLOWED_PREFIXES)):
        raise ConfigError(
            f"eval override {key!r} is not allowed: an eval re-tests the run's trained experts, so only "
            f"{', '.join(ALLOWED_PREFIXES)} keys may change"
        )
    return key, value


def eval_name(overrides: list[str]) -> str:
    """A folder name from the overrides (``as_run`` without any): ``routing=prototype,features=backbone``."""
    if not overrides:
        return "as_run"
    parts = []
    for item in overrides:
        key, value = split_override(item)
        key = key.removeprefix("callbacks.").removesuffix(".preset")
        key = key.removeprefix("routing.") if key != "routing" else key
        parts.append(f"{key}={value}")
    return re.sub(r"[^A-Za-z0-9_.=,-]", "_", ",".join(parts))[:120]


def _preset(name: str) -> DictConfig:
    path = PROJECT_ROOT / "callbacks" / f"{name}.yaml"
    if not path.is_file():
        names = ", ".join(sorted(p.stem for p in path.parent.glob("*.yaml")))
        raise ConfigError(f"{ROUTING}={name!r}: no preset callbacks/{name}.yaml; presets: {names}")
    loaded = OmegaConf.load(path)
    assert isinstance(loaded, DictConfig)
    return loaded


def eval_config(run_dir: Path, overrides: list[str]) -> RunConfig:
    """The run's config.yaml with the overrides; a routing preset replaces the whole routing slot.

    W&B stays off unless an override switches it on (an eval is not a new training run).

    Raises:
        ConfigError: not a run folder, an override outside the allowed keys, an unknown preset.
    """
    path = run_dir / CONFIG
    if not path.is_file():
        raise ConfigError(f"{run_dir} is not a run folder (no {CONFIG})")
    raw = OmegaConf.load(path)
    assert isinstance(raw, DictConfig)
    pairs = [split_override(item) for item in overrides]
    preset = next((v for k, v in pairs if k in (ROUTING, f"{ROUTING}.preset")), None)
    rest = [f"{k}={v}" for k, v in pairs if k not in (ROUTING, f"{ROUTING}.preset")]
    if preset is not None:  # a new router: its preset's defaults, not the old router's options
        slot = [item for item in rest if item.startswith(f"{ROUTING}.")]
        rest = [item for item in rest if not item.startswith(f"{ROUTING}.")]
        local = OmegaConf.from_dotlist([item.removeprefix(f"{ROUTING}.") for item in slot])
        raw.callbacks.routing = OmegaConf.merge(_preset(preset), local)
    raw.logging.wandb = False
    raw = OmegaConf.merge(raw, OmegaConf.from_dotlist(rest))
    return validate(raw)


def finished_tasks(run_dir: Path) -> tuple[int, dict[str, Any]]:
    """Tasks the run tested (its metrics.json ``per_task``), and that metrics.json."""
    metrics = RunFolder(run_dir).read_metrics()
    if not metrics or not metrics["per_task"]:
        raise ConfigError(f"{run_dir} has no finished task to evaluate (no per_task in metrics.json)")
    return len(metrics["per_task"]), metrics


def evaluate_run(run_dir: str | Path, overrides: list[str] | None = None, name: str | None = None) -> dict[str, Any]:
    """Rebuild the run's finished tasks from their saved weights, test each, and write the eval's metrics.json.

    Returns:
        What was written: ``accuracy_matrix``, ``summary``, ``per_task`` (test result and routing panel).
    """
    from conpet_lightning.loop import TaskLoop
    from conpet_lightning.metrics import summarize

    run_dir = Path(run_dir)
    overrides = list(overrides or [])
    done, source = finished_tasks(run_dir)
    cfg = eval_config(run_dir, overrides)
    name = name or eval_name(overrides)
    out_dir = run_dir / EVALS / name
    loop = TaskLoop(cfg, out_dir)  # writes the eval's own config.yaml there
    loop.folder = RunFolder(run_dir)  # the run's saved stage weights; nothing of the run is written
    ctx = loop.ctx
    for cb in loop.callbacks:
        cb.on_run_start(ctx)
    for task in range(done):
        loop.train_task(task, rebuild=True)
        record: dict[str, Any] = {"task": task, "test": loop.evaluate(task)}
        for cb in loop.callbacks:
            cb.on_task_tested(ctx, task)
        for recorder in [*loop.callbacks, loop.method]:
            record.update(recorder.task_record(task))
        ctx.per_task.append(record)
        print(f"[conpet] eval {name}: task {task + 1}/{done}: acc_macro={record['test']['macro']:.2f}", flush=True)
    n_test = [int(len(loop.datamodule.indices(cfg.eval.split, t))) for t in range(done)]
    square = [row[:done] for row in ctx.R]
    summary = summarize(square, n_test)
    panel = ctx.per_task[-1].get("selector") or {}
    summary["routing_task_id_acc_macro"] = panel.get("acc_macro")  # the last test's, over all seen tasks
    out = {
        "eval": name,
        "run_id": run_dir.name,
        "experiment": cfg.experiment,
        "benchmark": source.get("benchmark"),
        "seed": source.get("seed"),
        "overrides": overrides,
        "router": dict(cfg.callbacks.get("routing") or {}),
        "tasks": source.get("tasks", [])[:done],
        "accuracy_matrix": square,
        "summary": summary,
        "run_summary": source.get("summary", {}),
        "per_task": ctx.per_task,
    }
    atomic_write_json(out_dir / "metrics.json", out, run_dir=out_dir)
    return out
