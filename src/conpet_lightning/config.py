"""Structured run configuration: schema, experiment composition and strict validation.

Merge order (later wins): schema defaults -> ``experiments/_base.yaml`` -> the experiment file (and the files it
``extends``) -> callback presets from ``callbacks/`` -> the ``scales.<scale>`` overlays -> command-line dotlist.
Unknown or mistyped keys fail before any model is loaded, with the offending key in the message.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A configuration problem: unknown key, wrong type, missing file, bad value."""


@dataclass
class DataConfig:
    """Which benchmark, and how it is cut down and encoded."""

    benchmark: str = "fewrel"
    root: str = "data"
    """Folder of the shipped public data (relative paths are taken from the project root)."""
    local_path: str | None = None
    """Folder of ConPET key-JSON files, for ``benchmark=conpet_json`` (licensed sets)."""
    conpet_dataset: str | None = None
    """Which shipped label map/split a ``conpet_json`` folder uses (tacred, ace, ontonotes, bbn, fewrel, fewnerd)."""
    split_seed: int = 100
    max_seq_len: int = 64
    max_train_per_class: int | None = None
    max_valid_per_class: int | None = None
    max_test_per_class: int | None = None
    num_tasks: int | None = None
    """Run only the first N tasks of the sequence (smoke tests, quick looks)."""
    task_order: Any = None
    """Order of the tasks: null = the benchmark's, a permutation of 0..T-1, or ``"perm:<seed>"`` (seeded shuffle).

    Typed ``Any`` because OmegaConf has no list-or-string union; ``data.benchmarks.resolve_task_order`` checks it.
    Applied before ``num_tasks``, so ``num_tasks=2`` runs the first two tasks of the new order.
    """
    template_filter: int | None = 50
    """Drop training examples whose template part has more than this many words (ConPET); None = keep all."""
    eval_batch_size: int = 32
    num_workers: int = 0


@dataclass
class LoraSettings:
    """LoRA hyper-parameters; ConPET uses r=4, alpha=1, no dropout, on the query and key projections."""

    r: int = 4
    alpha: float = 1.0
    dropout: float = 0.0
    target_modules: list[str] | None = None
    """None = the query/key projections of the backbone's architecture."""


@dataclass
class ModelConfig:
    """Backbone and PET settings."""

    backbone: str = "minilm"
    """minilm | smollm2 | tiny-bert | tiny-llama, or a local HF folder through ``path``."""
    path: str | None = None
    dtype: str = "float32"
    lora: LoraSettings = field(default_factory=LoraSettings)


@dataclass
class TrainConfig:
    """Optimisation and Trainer settings shared by every stage (a method may override epochs per stage)."""

    epochs: int = 2
    batch_size: int = 8
    """Global training batch size; each DDP rank gets batch_size / world_size."""
    lr: float = 5e-4
    lr_by_task: list[float] | None = None
    """Per-task learning rates (0-based task index); the last value repeats. Overrides ``lr``."""
    weight_decay: float = 0.01
    adam_eps: float = 1e-8
    grad_clip: float | None = None
    accelerator: str = "cpu"
    devices: int = 1
    strategy: str = "auto"
    precision: str = "32-true"
    num_threads: int | None = 2
    """torch intra-op threads on CPU; None leaves torch's default."""
    deterministic: bool = False

    def lr_for(self, task: int) -> float:
        """Learning rate for a 0-based task index."""
        if self.lr_by_task:
            return float(self.lr_by_task[min(task, len(self.lr_by_task) - 1)])
        return float(self.lr)


@dataclass
class EvalConfig:
    """Evaluation extras beyond the end-of-task test."""

    every_n_steps: int | None = None
    """Evaluate all seen tasks every N training steps (stability-gap curves, min-ACC / WC-ACC)."""
    reference_run: str | None = None
    """Folder (or metrics.json) of a ``joint`` run of the same config: enables intransigence in the summary."""


@dataclass
class LoggingConfig:
    """Loggers and console output."""

    wandb: bool = False
    wandb_mode: str = "offline"
    wandb_project: str = "conpet-lightning"
    wandb_group: str | None = None
    """W&B group of the run (a sweep sets its name, so all its runs show together); None = the experiment name."""
    progress_bar: bool = True


@dataclass
class RunConfig:
    """One experiment run."""

    experiment: str = "unnamed"
    seed: int = 100
    scale: str = "cpu"
    output_dir: str = "runs"
    run_id: str | None = None
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    method: dict[str, Any] = field(default_factory=lambda: {"name": "naive"})
    """``name`` picks a registered method; the other keys are validated by that method's config class."""
    callbacks: dict[str, Any] = field(default_factory=dict)
    """Named callback entries ``{preset: <file in callbacks/>, ...overrides}``; ``null`` removes one."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


PROJECT_ROOT = Path(__file__).resolve().parents[2]
#: Accepted values of ``logging.wandb_mode`` (``wandb.init``'s ``mode``).
WANDB_MODES = ("offline", "online", "disabled")


def _read_yaml(path: Path) -> DictConfig:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        cfg = OmegaConf.load(path)
    except Exception as err:  # yaml errors carry the line number
        raise ConfigError(f"cannot parse {path}: {err}") from err
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"{path} must hold a mapping at the top level")
    return cfg


def _experiment_chain(path: Path, seen: tuple[Path, ...] = ()) -> list[DictConfig]:
    """The experiment file and the files it ``extends``, base first."""
    if path in seen:
        raise ConfigError(f"circular 'extends' through {path}")
    cfg = _read_yaml(path)
    parent = cfg.pop("extends", None)
    if parent is None:
        return [cfg]
    parent_path = (path.parent / f"{parent}.yaml").resolve()
    return [*_experiment_chain(parent_path, (*seen, path)), cfg]


def _expand_callback_presets(cfg: DictConfig, callbacks_dir: Path) -> None:
    """Replace each ``callbacks.<slot>.preset`` by the preset file merged under the slot's own keys."""
    if cfg.get("callbacks") is None:
        return
    for slot in list(cfg.callbacks.keys()):
        entry = cfg.callbacks[slot]
        if entry is None:
            del cfg.callbacks[slot]
            continue
        preset = entry.get("preset")
        if preset is None:
            if entry.get("name") is None:
                raise ConfigError(f"callbacks.{slot}: needs 'preset' (a file in {callbacks_dir}) or 'name'")
            continue
        overrides = OmegaConf.masked_copy(entry, [k for k in entry if k != "preset"])
        cfg.callbacks[slot] = OmegaConf.merge(_read_yaml(callbacks_dir / f"{preset}.yaml"), overrides)


def _apply_scale(cfg: DictConfig, scales: DictConfig | None) -> DictConfig:
    if not scales:
        return cfg
    data = cfg.get("data") or {}
    scale, bench = cfg.get("scale", "cpu"), data.get("benchmark", "fewrel")
    if bench == "conpet_json" and data.get("conpet_dataset"):
        bench = data.get("conpet_dataset")  # licensed sets take their own dataset's budgets
    block = scales.get(scale)
    if block is None:
        if scale != "cpu":
            raise ConfigError(f"scale '{scale}' is not defined; defined scales: {sorted(scales.keys())}")
        return cfg
    present = {slot for slot, entry in (cfg.get("callbacks") or {}).items() if entry is not None}
    for key in ("all", bench):
        overlay = block.get(key)
        if overlay is None:
            continue
        if overlay.get("callbacks") is not None:  # an overlay tunes the experiment's callbacks, never adds one
            overlay = overlay.copy()
            for slot in [s for s in overlay.callbacks if s not in present]:
                del overlay.callbacks[slot]
        cfg = OmegaConf.merge(cfg, overlay)
    return cfg


def load_config(
    experiment: str | Path,
    overrides: list[str] | None = None,
    *,
    experiments_dir: Path | None = None,
    callbacks_dir: Path | None = None,
) -> RunConfig:
    """Compose and validate a run configuration.

    Args:
        experiment: an experiment name (``dynamic_conpet``) or a path to its YAML file.
        overrides: ``key=value`` dotlist entries from the command line.
        experiments_dir: where experiment names are looked up (default: ``<project>/experiments``).
        callbacks_dir: where callback presets live (default: ``<project>/callbacks``).
    """
    experiments_dir = experiments_dir or PROJECT_ROOT / "experiments"
    callbacks_dir = callbacks_dir or PROJECT_ROOT / "callbacks"
    path = Path(experiment)
    if path.suffix not in (".yaml", ".yml"):
        path = experiments_dir / f"{experiment}.yaml"
        if not path.is_file():
            names = sorted(p.stem for p in experiments_dir.glob("*.yaml") if not p.stem.startswith("_"))
            raise ConfigError(f"unknown experiment '{experiment}'; available: {', '.join(names)}")
    chain = _experiment_chain(path.resolve())
    base = experiments_dir / "_base.yaml"
    layers = ([_read_yaml(base)] if base.is_file() and base.resolve() != path.resolve() else []) + chain
    try:
        cli = OmegaConf.from_dotlist(list(overrides or []))
    except Exception as err:
        raise ConfigError(f"bad command-line override {overrides}: {err}") from err
    merged = OmegaConf.merge(*layers, cli)
    merged.setdefault("experiment", path.stem)
    scales = merged.pop("scales", None)
    merged = _apply_scale(merged, scales)
    merged = OmegaConf.merge(merged, cli)  # the command line always wins over scale overlays
    merged.pop("scales", None)
    _expand_callback_presets(merged, callbacks_dir)
    return validate(merged)


def validate(raw: DictConfig | dict[str, Any]) -> RunConfig:
    """Check a raw mapping against the schema; unknown keys and wrong types raise ConfigError."""
    schema = OmegaConf.structured(RunConfig)
    try:
        merged = OmegaConf.merge(schema, raw)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or getattr(err, "key", None)
        raise ConfigError(f"invalid config key '{key}': {err.msg if hasattr(err, 'msg') else err}") from err
    cfg: RunConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
    if cfg.train.batch_size <= 0 or cfg.train.epochs < 0:
        raise ConfigError("train.batch_size must be > 0 and train.epochs >= 0")
    if cfg.train.batch_size % max(cfg.train.devices, 1):
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} must divide by train.devices={cfg.train.devices}")
    if "name" not in cfg.method:
        raise ConfigError("method.name is required")
    if cfg.logging.wandb_mode not in WANDB_MODES:
        raise ConfigError(f"logging.wandb_mode must be one of {WANDB_MODES}, not {cfg.logging.wandb_mode!r}")
    check_task_order_spec(cfg.data.task_order)
    if cfg.eval.every_n_steps is not None and cfg.eval.every_n_steps < 1:
        raise ConfigError(f"eval.every_n_steps must be a positive integer or null, got {cfg.eval.every_n_steps}")
    if cfg.data.num_tasks is not None and cfg.data.num_tasks < 1:
        # the upper bound needs the benchmark: data.benchmarks.check_num_tasks, where it is loaded
        raise ConfigError(f"data.num_tasks must be at least 1 (or null for all tasks), got {cfg.data.num_tasks}")
    return cfg


def check_task_order_spec(spec: Any) -> None:
    """Fail before any data loads when ``data.task_order`` has the wrong shape (the length is checked on load)."""
    if spec is None:
        return
    if isinstance(spec, str):
        head, _, seed = spec.partition(":")
        if head == "perm" and seed.strip().lstrip("-").isdigit():
            return
    elif isinstance(spec, list | tuple) and all(isinstance(t, int) and not isinstance(t, bool) for t in spec):
        return
    raise ConfigError(
        f"data.task_order must be null, a list of task indices (e.g. [2,0,1]) or 'perm:<seed>', got {spec!r}"
    )


def check_options(cls: type, options: dict[str, Any], where: str) -> Any:
    """Build a per-component config dataclass from a mapping, failing on unknown keys or wrong types."""
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cls), options))
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or getattr(err, "key", None)
        raise ConfigError(f"invalid key '{where}.{key}': {getattr(err, 'msg', err)}") from err


def to_yaml(cfg: RunConfig) -> str:
    """The resolved configuration as YAML, for the run folder."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
