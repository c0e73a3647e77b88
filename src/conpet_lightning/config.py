"""Structured run configuration: schema, experiment composition and strict validation.

Merge order (later wins): schema defaults -> ``experiments/_base.yaml`` -> the experiment file (and the files it
``extends``) -> callback presets from ``callbacks/`` -> the ``scales.<scale>`` overlays -> command-line dotlist.
Unknown or mistyped keys fail before any model is loaded, with the offending key in the message.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from conpet_lightning.paths import PROJECT_ROOT


class ConfigError(ValueError):
    """A configuration problem: unknown key, wrong type, missing file, bad value."""


class OptionError(ConfigError):
    """A bad value of one option, raised by an options dataclass; ``check_options`` prefixes the section."""

    def __init__(self, key: str, value: Any, allowed: str) -> None:
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"{key}={value!r} is not allowed: {allowed}")


def require_choice(key: str, value: Any, allowed: tuple[Any, ...]) -> None:
    """``value`` must be one of ``allowed``."""
    if value not in allowed:
        raise OptionError(key, value, "one of " + ", ".join(str(a) for a in allowed))


def require_range(
    key: str, value: float | None, *, low: float | None = None, high: float | None = None, open_low: bool = False
) -> None:
    """``low <= value <= high`` (``low < value`` with ``open_low``); None passes (an unset optional)."""
    if value is None:
        return
    too_low = low is not None and (value <= low if open_low else value < low)
    if too_low or (high is not None and value > high):
        lo = "" if low is None else (f"> {low}" if open_low else f">= {low}")
        hi = "" if high is None else f"<= {high}"
        raise OptionError(key, value, " and ".join(x for x in (lo, hi) if x))


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
    pad_to_multiple_of: int | None = None
    """Round every batch's width up to a multiple of this (null: the longest sample's). Fewer distinct shapes keep
    the CPU kernels' per-shape caches small (bench task_cost's heap_in_use); the extra tokens are masked."""
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
    valid_scope: str = "auto"
    """Validation data for best-epoch selection: ``current`` task, all ``seen`` tasks, or ``auto``: the data the
    learner holds (the current task for replay-free methods, every seen task when a replay callback keeps them)."""


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
    dropout: float | None = None
    """Every dropout probability of the backbone (None: the checkpoint's; 0 makes training a deterministic function
    of the batches, e.g. to compare DDP with one process)."""
    lora: LoraSettings = field(default_factory=LoraSettings)


@dataclass
class TrainConfig:
    """Optimisation and Trainer settings shared by every stage (a method may override epochs per stage)."""

    epochs: int = 2
    steps_per_task: int | None = None
    """Equal budgets: every task trains exactly this many optimizer steps, split over its stages (in proportion to
    their epochs, or by the method's stated shares), validated as often as it has epochs. None: ConPET's own
    ratios, each stage runs its epochs over its data plan."""
    zero_shot_validation: bool = False
    """Validate each stage before it trains too, and keep the untrained weights when they score best (ConPET's
    step-0 candidate, True in its code); False: the best of the trained epochs."""
    batch_size: int = 8
    """Global training batch size; each DDP rank gets batch_size / world_size."""
    lr: float = 2e-3
    """The CPU default; ``scale=paper`` sets ConPET's per dataset (experiments/_conpet_budgets.yaml)."""
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
    split: str = "test"
    """test | valid: the split of every end-of-task evaluation (R, routing panel). ``valid`` is how defaults are
    chosen without touching test data (sweeps/cpu_validation.yaml); its R is then a validation figure."""


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


#: Accepted values of ``data.valid_scope``.
VALID_SCOPES = ("auto", "current", "seen")
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
    """Replace each ``callbacks.<slot>.preset`` by the preset file merged under the slot's own keys.

    A slot given as a bare name (``callbacks.routing=prototype``) is that preset with no overrides: one override
    swaps a callback.
    """
    if cfg.get("callbacks") is None:
        return
    for slot in list(cfg.callbacks.keys()):
        entry = cfg.callbacks[slot]
        if entry is None:
            del cfg.callbacks[slot]
            continue
        if isinstance(entry, str):
            cfg.callbacks[slot] = _read_yaml(_preset_path(slot, entry, callbacks_dir))
            continue
        preset = entry.get("preset")
        if preset is None:
            if entry.get("name") is None:
                raise ConfigError(f"callbacks.{slot}: needs 'preset' (a file in {callbacks_dir}) or 'name'")
            continue
        overrides = OmegaConf.masked_copy(entry, [k for k in entry if k != "preset"])
        cfg.callbacks[slot] = OmegaConf.merge(_read_yaml(_preset_path(slot, preset, callbacks_dir)), overrides)


def _preset_path(slot: str, preset: str, callbacks_dir: Path) -> Path:
    """The preset file of a slot, or one line naming the slot, the preset and the presets there are."""
    path = callbacks_dir / f"{preset}.yaml"
    if not path.is_file():
        presets = ", ".join(sorted(p.stem for p in callbacks_dir.glob("*.yaml")))
        raise ConfigError(f"callbacks.{slot}={preset!r}: no such preset ({path}); presets: {presets}")
    return path


#: Benchmark keys a scale overlay may name besides ``all``: the shipped benchmarks and ConPET's licensed sets.
SHIPPED_BENCHMARKS = ("fewrel", "fewnerd", "clinc150", "banking77")
LICENSED_BENCHMARKS = ("tacred", "ace", "ontonotes", "bbn")
#: The file of ConPET's per-benchmark budgets (METHOD.md §7) that scale overlays reference as ``${conpet_budget.X}``.
BUDGETS_FILE = "_conpet_budgets.yaml"


def _benchmark_key(cfg: DictConfig) -> str:
    """The benchmark whose overlay and budget row apply: a ``conpet_json`` run takes its dataset's."""
    data = cfg.get("data") or {}
    bench = str(data.get("benchmark", DataConfig.benchmark))
    if bench == "conpet_json" and data.get("conpet_dataset"):
        return str(data.get("conpet_dataset"))
    return bench


def _apply_scale(cfg: DictConfig, scales: DictConfig | None, defined_slots: set[str], where: str) -> DictConfig:
    """Merge the ``all`` and the benchmark's overlay of the active scale.

    An overlay tunes the callbacks the experiment defines and never adds one: an overlay for a slot the experiment
    files never define is an error (a typo or a stale overlay); one for a slot removed on the command line is dropped.
    """
    scale, bench = str(cfg.get("scale", "cpu")), _benchmark_key(cfg)
    block = (scales or {}).get(scale)
    if block is None:
        if scale != "cpu":
            raise ConfigError(f"scale={scale!r} is not defined in {where}; defined: {sorted((scales or {}).keys())}")
        return cfg
    for key in block:
        if key != "all" and key not in (*SHIPPED_BENCHMARKS, *LICENSED_BENCHMARKS):
            allowed = ", ".join(("all", *SHIPPED_BENCHMARKS, *LICENSED_BENCHMARKS))
            raise ConfigError(f"{where}: scales.{scale}.{key} names no benchmark; allowed: {allowed}")
    present = {slot for slot, entry in (cfg.get("callbacks") or {}).items() if entry is not None}
    for key in ("all", bench):
        overlay = block.get(key)
        if overlay is None:
            continue
        if overlay.get("callbacks") is not None:
            overlay = overlay.copy()
            for slot in list(overlay.callbacks):
                if overlay.callbacks[slot] is None:  # an extending experiment says: nothing to tune here
                    del overlay.callbacks[slot]
                    continue
                if slot not in defined_slots:
                    raise ConfigError(
                        f"{where}: scales.{scale}.{key}.callbacks.{slot} tunes a callback slot the experiment does not "
                        f"have; its slots: {', '.join(sorted(defined_slots)) or 'none'}"
                    )
                if slot not in present:  # removed on the command line (an ablation): nothing to tune
                    del overlay.callbacks[slot]
        cfg = OmegaConf.merge(cfg, overlay)
    return cfg


def _resolve_budgets(cfg: DictConfig, budgets: DictConfig, where: str) -> DictConfig:
    """Resolve ``${conpet_budget.X}`` against the active benchmark's row of the budget table, then drop the row."""
    bench = _benchmark_key(cfg)
    cfg = cfg.copy()
    cfg.conpet_budget = budgets.get(bench, {})
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as err:
        raise ConfigError(f"{where}: {_one_line(err)} (benchmark {bench}; budget table {BUDGETS_FILE})") from err
    cfg.pop("conpet_budget")
    return cfg


def _one_line(err: Exception) -> str:
    """An OmegaConf error's message without its multi-line context."""
    return str(getattr(err, "msg", None) or err).strip().splitlines()[0]


def overlay_points(scales: DictConfig | None) -> list[tuple[str, str]]:
    """Every (scale, benchmark) an experiment can run at: each defined scale with every benchmark key."""
    return [(str(scale), bench) for scale in (scales or {}) for bench in (*SHIPPED_BENCHMARKS, *LICENSED_BENCHMARKS)]


def _point_overrides(scale: str, bench: str) -> DictConfig:
    if bench in LICENSED_BENCHMARKS:
        data = {"benchmark": "conpet_json", "conpet_dataset": bench, "local_path": "<licensed>"}
    else:
        data = {"benchmark": bench}
    return OmegaConf.create({"scale": scale, "data": data})


def load_config(
    experiment: str | Path,
    overrides: list[str] | None = None,
    *,
    experiments_dir: Path | None = None,
    callbacks_dir: Path | None = None,
) -> RunConfig:
    """Compose and validate a run configuration.

    Every scale overlay of every benchmark the experiment defines is composed and validated too, so a bad overlay
    fails every run of the experiment at once, not the first run at that scale.

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
            names = ", ".join(experiment_names(experiments_dir))
            raise ConfigError(f"unknown experiment '{experiment}'; available: {names}")
    chain = _experiment_chain(path.resolve())
    base = experiments_dir / "_base.yaml"
    layers = ([_read_yaml(base)] if base.is_file() and base.resolve() != path.resolve() else []) + chain
    budgets_path = experiments_dir / BUDGETS_FILE
    budgets = _read_yaml(budgets_path) if budgets_path.is_file() else OmegaConf.create({})
    overrides, swaps = _preset_swaps(list(overrides or []))
    try:
        cli = OmegaConf.from_dotlist(overrides)
    except Exception as err:
        raise ConfigError(f"bad command-line override {overrides}: {_one_line(err)}") from err
    files = OmegaConf.merge(*layers)
    files.setdefault("experiment", path.stem)
    scales = files.pop("scales", None)
    defined = {str(slot) for slot, entry in (files.get("callbacks") or {}).items() if entry is not None}
    where = str(path)

    def compose(extra: DictConfig, swapped: Mapping[str, DictConfig] | None = None) -> RunConfig:
        merged = OmegaConf.merge(files, extra)
        merged = _apply_scale(merged, scales, defined, where)
        merged = OmegaConf.merge(merged, extra)  # the command line always wins over scale overlays
        for slot, entry in (swapped or {}).items():  # a swapped preset replaces the slot, options included
            if merged.get("callbacks") is None:
                merged.callbacks = {}
            merged.callbacks[slot] = entry
        merged = _resolve_budgets(merged, budgets, where)
        _expand_callback_presets(merged, callbacks_dir)
        return validate(merged)

    files_key = (where, str(callbacks_dir), *(OmegaConf.to_yaml(layer) for layer in layers), OmegaConf.to_yaml(budgets))
    if files_key not in _CHECKED_FILES:  # each experiment's overlays are checked once per process
        for scale, bench in overlay_points(scales):
            try:
                compose(_point_overrides(scale, bench))
            except ConfigError as err:
                raise ConfigError(f"at scale={scale}, benchmark={bench}: {err}") from err
        _CHECKED_FILES.add(files_key)
    return compose(cli, swaps)


def _preset_swaps(overrides: list[str]) -> tuple[list[str], dict[str, DictConfig]]:
    """Pull ``callbacks.<slot>=<preset>`` and the ``callbacks.<slot>.<key>=<value>`` after it out of a dotlist.

    A dotlist cannot set a slot to a name and then a key under it, so ``callbacks.routing=prototype
    callbacks.routing.features=backbone`` becomes one entry ``{preset: prototype, features: backbone}`` that replaces
    the experiment's slot: options given before the swap addressed the replaced callback and are dropped with it.
    """
    rest: list[str] = []
    swaps: dict[str, list[str]] = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        parts, value = key.strip().split("."), value.strip()
        slot = parts[1] if len(parts) >= 2 and parts[0] == "callbacks" else None
        if slot is not None and len(parts) == 2 and sep and value not in ("", "null", "None") and value[:1] != "{":
            swaps[slot] = [f"preset={value}"]  # a later swap of the same slot starts over
            rest = [r for r in rest if not r.strip().startswith(f"callbacks.{slot}.")]
        elif slot is not None and len(parts) > 2 and slot in swaps:
            swaps[slot].append(item.strip().removeprefix(f"callbacks.{slot}."))
        else:
            rest.append(item)
    try:
        return rest, {slot: OmegaConf.from_dotlist(items) for slot, items in swaps.items()}
    except Exception as err:
        raise ConfigError(f"bad command-line override {overrides}: {_one_line(err)}") from err


_CHECKED_FILES: set[tuple[str, ...]] = set()


def experiment_names(experiments_dir: Path | None = None) -> list[str]:
    """The experiments a user can run (files in ``experiments/`` not starting with ``_``)."""
    folder = experiments_dir or PROJECT_ROOT / "experiments"
    return sorted(p.stem for p in folder.glob("*.yaml") if not p.stem.startswith("_"))


def validate(raw: DictConfig | dict[str, Any]) -> RunConfig:
    """Check a raw mapping against the schema; unknown keys and wrong types raise ConfigError."""
    schema = OmegaConf.structured(RunConfig)
    try:
        merged = OmegaConf.merge(schema, raw)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or getattr(err, "key", None)
        raise ConfigError(f"invalid config key '{key}': {_one_line(err)}") from err
    cfg: RunConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
    if cfg.eval.split not in ("test", "valid"):
        raise ConfigError(f"eval.split={cfg.eval.split!r} is not allowed: one of test, valid")
    if cfg.data.valid_scope not in VALID_SCOPES:
        raise ConfigError(f"data.valid_scope={cfg.data.valid_scope!r} is not allowed: one of {', '.join(VALID_SCOPES)}")
    if cfg.train.steps_per_task is not None and cfg.train.steps_per_task < 1:
        raise ConfigError(f"train.steps_per_task={cfg.train.steps_per_task} is not allowed: an integer >= 1 or null")
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
    if cfg.data.pad_to_multiple_of is not None and cfg.data.pad_to_multiple_of < 1:
        raise ConfigError(f"data.pad_to_multiple_of must be at least 1 (or null), got {cfg.data.pad_to_multiple_of}")
    if cfg.data.num_tasks is not None and cfg.data.num_tasks < 1:
        # the upper bound needs the benchmark: data.benchmarks.check_num_tasks, where it is loaded
        raise ConfigError(f"data.num_tasks must be at least 1 (or null for all tasks), got {cfg.data.num_tasks}")
    cfg.method, cfg.callbacks = check_composition(cfg)
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


def check_options(cls: type, options: Any, where: str) -> Any:
    """Build a component's options dataclass from a mapping; unknown keys, wrong types and bad values name the key."""
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cls), options))
    except OptionError as err:
        raise ConfigError(f"{where}.{err.key}={err.value!r} is not allowed: {err.allowed}") from err
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or getattr(err, "key", None)
        raise ConfigError(f"invalid key '{where}.{key}': {_one_line(err)}") from err


def check_composition(cfg: RunConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """Every section checked before anything loads: the method's options, each callback's options, and the pairing.

    A callback needs the capabilities (``contract`` Protocols) it names in ``requires`` from the method class, and
    may add cross-field rules (``check_pairing``: top-k routing needs a selector). Returns the ``method`` and
    ``callbacks`` sections with every option filled in from its dataclass, so config.yaml shows what ran.
    """
    from conpet_lightning.contract import missing_capabilities
    from conpet_lightning.registry import CALLBACKS, METHODS

    method_cls = METHODS.get(str(cfg.method["name"]))
    method_options = check_options(method_cls.options_cls, cfg.method, "method")
    provided: set[str] = set()
    callbacks: dict[str, Any] = {}
    for slot, entry in cfg.callbacks.items():
        if entry is None:
            continue
        if not isinstance(entry, dict) or "name" not in entry:
            raise ConfigError(f"callbacks.{slot}: needs 'preset' (a file in callbacks/) or 'name'")
        cb_cls = CALLBACKS.get(str(entry["name"]))
        options = cb_cls.parse_options(entry, slot)
        missing = missing_capabilities(method_cls, cb_cls.requires)
        if missing:
            raise ConfigError(
                f"callbacks.{slot}: '{entry['name']}' needs a method with {', '.join(missing)}; "
                f"method '{cfg.method['name']}' has none"
            )
        cb_cls.check_pairing(slot, options, method_options)
        provided.update(cb_cls.provides)
        callbacks[slot] = {"name": entry["name"]} if options is None else asdict(options)
    method_cls.check_pairing(method_options, provided)
    return asdict(method_options), callbacks


def to_yaml(cfg: RunConfig) -> str:
    """The resolved configuration as YAML, for the run folder."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
