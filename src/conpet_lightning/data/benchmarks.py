"""Benchmark registry: one name per benchmark, so configs say ``data.benchmark: fewrel`` instead of an import path."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from conpet_lightning.paths import in_project
from conpet_lightning.config import ConfigError, check_task_order_spec
from conpet_lightning.data.readers.conpet_json import TASK_TYPES, load_conpet_json
from conpet_lightning.data.readers.fewnerd import load_fewnerd
from conpet_lightning.data.readers.fewrel import load_fewrel
from conpet_lightning.data.readers.textcls import load_banking77, load_clinc150
from conpet_lightning.data.records import Benchmark, DataError

#: Benchmark name -> loader. Shipped ones take ``root`` and ``seed``; ``conpet_json`` takes ``root``,
#: ``local_path`` and ``dataset``.
BENCHMARKS: dict[str, Callable[..., Benchmark]] = {
    "fewrel": load_fewrel,
    "fewnerd": load_fewnerd,
    "clinc150": load_clinc150,
    "banking77": load_banking77,
    "conpet_json": load_conpet_json,
}

def resolve_root(root: str | Path) -> Path:
    """The data folder to read: ``root`` as given if it exists, else under the project root (``paths.in_project``)."""
    return in_project(root)


def load_benchmark(
    name: str,
    *,
    root: str | Path = "data",
    seed: int = 100,
    local_path: str | Path | None = None,
    conpet_dataset: str | None = None,
) -> Benchmark:
    """Load a registered benchmark by name.

    Args:
        name: one of `BENCHMARKS`.
        root: the shipped data folder.
        seed: split/permutation seed of the shipped benchmarks (ignored by ``conpet_json``, whose split is stored).
        local_path: ``conpet_json`` only: folder with the user's ConPET key-JSON files.
        conpet_dataset: ``conpet_json`` only: which ConPET dataset the files hold (fewrel, fewnerd, tacred, ace,
            ontonotes, bbn), selecting its label map, split and task type.

    Raises:
        DataError: for an unknown name (listing the valid ones), missing ``conpet_json`` arguments, or bad data.
    """
    if name not in BENCHMARKS:
        raise DataError(f"unknown benchmark {name!r}; valid names: {', '.join(sorted(BENCHMARKS))}")
    root = resolve_root(root)
    if name != "conpet_json":
        return BENCHMARKS[name](root=root, seed=seed)
    if local_path is None:
        raise DataError("benchmark 'conpet_json' needs local_path: the folder with ConPET's *_key.json files")
    if conpet_dataset is None:
        raise DataError(f"benchmark 'conpet_json' needs conpet_dataset, one of {', '.join(sorted(TASK_TYPES))}")
    return BENCHMARKS[name](root=root, local_path=local_path, dataset=conpet_dataset)


def resolve_task_order(spec: Any, num_tasks: int) -> list[int]:
    """The task order that ``data.task_order`` names, as a permutation of ``0..num_tasks-1``.

    ``None`` is the benchmark's own order; a list is taken as given; ``"perm:<seed>"`` is a seeded shuffle
    (``numpy.random.default_rng(seed).permutation``), the same on every machine, so a sweep's orders are reproducible.

    Raises:
        ConfigError: a spec of another shape, or a list that is not a permutation of all task indices.
    """
    check_task_order_spec(spec)
    if spec is None:
        return list(range(num_tasks))
    if isinstance(spec, str):
        seed = int(spec.partition(":")[2])
        if seed < 0:
            raise ConfigError(f"data.task_order={spec!r}: the permutation seed must be >= 0")
        return [int(t) for t in np.random.default_rng(seed).permutation(num_tasks)]
    order = [int(t) for t in spec]
    if sorted(order) != list(range(num_tasks)):
        raise ConfigError(
            f"data.task_order={order} must list each task index 0..{num_tasks - 1} exactly once "
            f"(the benchmark has {num_tasks} tasks)"
        )
    return order


def check_num_tasks(num_tasks: int | None, available: int, benchmark: str = "the benchmark") -> None:
    """``data.num_tasks`` must lie in 1..``available`` (None = all): a slice past the end would silently run fewer.

    Raises:
        ConfigError: naming the value and the allowed range.
    """
    if num_tasks is None:
        return
    if not 1 <= num_tasks <= available:
        raise ConfigError(f"data.num_tasks={num_tasks} but {benchmark} has {available} tasks; allowed 1..{available}")
