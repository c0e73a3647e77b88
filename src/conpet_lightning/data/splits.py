"""Label maps, task splits and train/valid/test splitting shared by all readers.

ConPET's label maps (``<ds>_label_to_tag.json``: label -> class id) and task splits
(``<ds>_class_split_p10_tags.json``: ``{"p1": [ids], ...}``) are shipped under ``data/conpet_splits`` so every run uses
the paper's class ids and task order. Loading them here validates them once, with errors that name the bad ids.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from conpet_lightning.data.readers import read_json
from conpet_lightning.data.records import PARTS, Benchmark, DataError, Record, TaskType

#: Datasets with a shipped ConPET label map and split, and the split-file suffix each uses.
CONPET_SPLITS: dict[str, str] = {
    "fewrel": "p10",
    "fewnerd": "p10",
    "tacred": "p10",
    "ace": "p5",
    "ontonotes": "p10",
    "bbn": "p10",
}
_TASK_KEY = re.compile(r"p(\d+)")


def load_label_map(path: str | Path) -> list[str]:
    """Read a ``label -> class id`` JSON map and return the label names ordered by id.

    Raises:
        DataError: when the file is missing, not a JSON object of ints, or the ids are not exactly 0..n-1.
    """
    data = read_json(path)
    if not isinstance(data, dict) or not all(isinstance(v, int) and not isinstance(v, bool) for v in data.values()):
        raise DataError(f"{path}: expected a JSON object mapping label -> integer class id")
    ids = Counter(data.values())
    repeated = sorted(i for i, n in ids.items() if n > 1)
    missing = sorted(set(range(len(data))) - set(ids))
    if repeated or missing:
        raise DataError(
            f"{path}: class ids must be 0..{len(data) - 1} once each (repeated: {repeated}, missing: {missing})"
        )
    names = [""] * len(data)
    for label, class_id in data.items():
        names[class_id] = label
    return names


def check_task_split(tasks: Sequence[Sequence[int]], num_classes: int, source: str) -> None:
    """Raise a `DataError` naming the class ids when `tasks` repeats, misses or invents classes."""
    seen = Counter(c for task in tasks for c in task)
    repeated = sorted(c for c, n in seen.items() if n > 1)
    missing = sorted(set(range(num_classes)) - set(seen))
    unknown = sorted(c for c in seen if not 0 <= c < num_classes)
    if any(len(task) == 0 for task in tasks):
        raise DataError(f"{source}: task split has an empty task")
    if repeated or missing or unknown:
        raise DataError(
            f"{source}: task split must hold each class id 0..{num_classes - 1} exactly once "
            f"(repeated class ids: {repeated}, missing class ids: {missing}, unknown class ids: {unknown})"
        )


def load_task_split(path: str | Path, num_classes: int) -> list[list[int]]:
    """Read ConPET's ``{"p1": [ids], ..., "pN": [ids]}`` split (an ``all`` key is ignored) in task order.

    Raises:
        DataError: on a missing file, keys other than p1..pN/all, non-integer ids, or a split that does not
            partition the class ids 0..num_classes-1.
    """
    data = read_json(path)
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object {{'p1': [class ids], ...}}")
    numbered: dict[int, list[int]] = {}
    for key, ids in data.items():
        if key == "all":
            continue
        match = _TASK_KEY.fullmatch(key)
        if match is None:
            raise DataError(f"{path}: unexpected key {key!r} (expected p1..pN or all)")
        if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise DataError(f"{path}: {key} must be a list of integer class ids")
        numbered[int(match.group(1))] = list(ids)
    if sorted(numbered) != list(range(1, len(numbered) + 1)):
        raise DataError(f"{path}: task keys must be p1..p{len(numbered)} without gaps, got {sorted(numbered)}")
    tasks = [numbered[k] for k in sorted(numbered)]
    check_task_split(tasks, num_classes, str(path))
    return tasks


def load_conpet_split(root: str | Path, dataset: str) -> tuple[list[str], list[list[int]]]:
    """Label names (by id) and task split of one ConPET dataset, from ``<root>/conpet_splits``."""
    if dataset not in CONPET_SPLITS:
        raise DataError(f"no ConPET split for dataset {dataset!r}; known: {sorted(CONPET_SPLITS)}")
    folder = Path(root) / "conpet_splits"
    names = load_label_map(folder / f"{dataset}_label_to_tag.json")
    tasks = load_task_split(folder / f"{dataset}_class_split_{CONPET_SPLITS[dataset]}_tags.json", len(names))
    return names, tasks


def split_per_class(
    labels: Sequence[int], seed: int, fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
) -> list[str]:
    """Assign each item to train/valid/test with a seeded shuffle inside each class (stratified split).

    Each class is shuffled by its own generator (seeded by ``(seed, label)``), so adding or removing a class never
    changes another class's split. Valid and test get ``round(n * fraction)`` items (half rounds up) and train
    keeps the rest.

    Args:
        labels: the class id of each item, in item order.
        seed: split seed.
        fractions: train/valid/test fractions; they must sum to 1.

    Returns:
        The part name (``"train"``, ``"valid"`` or ``"test"``) of each item, in item order.
    """
    if not math.isclose(sum(fractions), 1.0) or min(fractions) < 0:
        raise ValueError(f"fractions must be non-negative and sum to 1, got {fractions}")
    by_class: dict[int, list[int]] = {}
    for i, label in enumerate(labels):
        by_class.setdefault(label, []).append(i)
    assignment = ["train"] * len(labels)
    for label, indices in by_class.items():
        n = len(indices)
        n_valid = math.floor(n * fractions[1] + 0.5)
        n_test = min(math.floor(n * fractions[2] + 0.5), n - n_valid)
        order = np.random.default_rng([seed, label]).permutation(n)
        for rank, j in enumerate(order):
            if rank < n_valid:
                assignment[indices[j]] = "valid"
            elif rank < n_valid + n_test:
                assignment[indices[j]] = "test"
    return assignment


def assemble(
    name: str,
    task_type: TaskType,
    label_names: list[str],
    tasks: list[list[int]],
    examples: dict[str, list[tuple[int, str]]],
) -> Benchmark:
    """Group ``(label, text)`` examples by task and give them ConPET keys; validate the result.

    Keys are ``"{part}-{task}-{i}"`` where ``i`` runs over the whole part, task after task, so keys are unique
    across parts (ConPET's key files use the same scheme). Records keep their input order within a task.
    """
    task_of = {c: k for k, classes in enumerate(tasks) for c in classes}
    parts: dict[str, list[list[Record]]] = {}
    for part in PARTS:
        grouped: list[list[tuple[int, str]]] = [[] for _ in tasks]
        for label, text in examples.get(part, []):
            if label not in task_of:
                raise DataError(f"{name}: class id {label} ({part}) is in no task")
            grouped[task_of[label]].append((label, text))
        running = 0
        parts[part] = []
        for k, items in enumerate(grouped):
            records = [Record(f"{part}-{k}-{running + i}", label, k, text) for i, (label, text) in enumerate(items)]
            running += len(items)
            parts[part].append(records)
    benchmark = Benchmark(name, task_type, label_names, tasks, parts)
    benchmark.validate()
    return benchmark
