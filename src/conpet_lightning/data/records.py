"""The one shape every benchmark is read into: labels, tasks, and train/valid/test records per task."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np

TaskType = Literal["entity_typing", "relation", "text_classification"]
PARTS: tuple[str, ...] = ("train", "valid", "test")

#: Canonical marker strings (ConPET's stored format). Tokenizer-specific tokens replace them at encoding time.
HEAD_START, HEAD_END, TAIL_START, TAIL_END = "[unused0]", "[unused1]", "[unused2]", "[unused3]"
MASK = "[MASK]"
#: Everything from this phrase on is the cloze template (ConPET's >50-token filter and truncation split here).
TEMPLATE_START = " In this sentence,"


class DataError(ValueError):
    """Bad input data: the message names the file, the line or row, and the problem."""


@dataclass(frozen=True)
class Record:
    """One example in ConPET's canonical text form.

    `text` is the sentence with whitespace-separated markers around the span(s) (`[unused0] head [unused1]`,
    `[unused2] tail [unused3]`; entity typing uses only the first pair), followed by the template that starts
    with ``TEMPLATE_START`` and holds exactly one ``[MASK]``.
    """

    key: str
    """Stable id, unique across parts: ``"{part}-{task}-{running index}"`` as in ConPET's key files."""
    label: int
    """Global class id: index into ``Benchmark.label_names``."""
    task: int
    """0-based index of the task whose class list holds ``label``."""
    text: str


@dataclass
class Benchmark:
    """A class-incremental benchmark: label names, the task sequence and its records."""

    name: str
    task_type: TaskType
    label_names: list[str]
    tasks: list[list[int]]
    """Class ids per task, in arrival order (ConPET's p1..pN)."""
    parts: dict[str, list[list[Record]]] = field(default_factory=dict)
    """``parts[part][task]`` is the list of records of that task in that part (train/valid/test)."""

    @property
    def num_tasks(self) -> int:
        """Number of tasks in the sequence."""
        return len(self.tasks)

    @property
    def num_classes(self) -> int:
        """Number of classes over all tasks."""
        return len(self.label_names)

    def records(self, part: str, task: int) -> list[Record]:
        """Records of one task in one part."""
        return self.parts[part][task]

    def iter_records(self, part: str) -> Iterator[Record]:
        """All records of one part, task by task."""
        for task_records in self.parts[part]:
            yield from task_records

    def stats(self) -> dict[str, Any]:
        """Per-task class lists and record counts, recounted from the records (never hard-coded).

        Returns:
            ``{"benchmark", "task_type", "num_classes", "num_tasks", "tasks": [{"classes", "train", "valid", "test"}],
            "totals": {"train", "valid", "test"}}``.
        """
        tasks = [
            {"classes": list(classes), **{part: len(self.parts.get(part, [[]] * self.num_tasks)[k]) for part in PARTS}}
            for k, classes in enumerate(self.tasks)
        ]
        totals = {part: sum(task[part] for task in tasks) for part in PARTS}
        return {
            "benchmark": self.name,
            "task_type": self.task_type,
            "num_classes": self.num_classes,
            "num_tasks": self.num_tasks,
            "tasks": tasks,
            "totals": totals,
        }

    def capped(
        self, *, train: int | None = None, valid: int | None = None, test: int | None = None, seed: int = 0
    ) -> Benchmark:
        """A copy with at most N records per class in each part, for quick runs at a fixed small size.

        The kept records are a seeded random choice per (part, class), drawn independently of the other caps, and
        keep their original order and keys. ``None`` leaves a part uncapped.
        """
        caps = {"train": train, "valid": valid, "test": test}
        parts: dict[str, list[list[Record]]] = {}
        for part_index, (part, per_task) in enumerate(self.parts.items()):
            cap = caps.get(part)
            if cap is None:
                parts[part] = [list(records) for records in per_task]
                continue
            if cap < 0:
                raise ValueError(f"cap for part {part!r} must be >= 0, got {cap}")
            parts[part] = [_cap_per_class(records, cap, (seed, part_index)) for records in per_task]
        return Benchmark(self.name, self.task_type, list(self.label_names), [list(t) for t in self.tasks], parts)

    def reordered(self, order: list[int]) -> Benchmark:
        """A copy whose task ``i`` is this benchmark's task ``order[i]`` (a permutation of all task indices).

        Records move with their task and get its new index in ``task`` (every consumer indexes by it); labels,
        label names and keys stay, so class ids and per-sample caches mean the same under any order.
        """
        if sorted(order) != list(range(self.num_tasks)):
            raise ValueError(f"{self.name}: task order {order} is not a permutation of 0..{self.num_tasks - 1}")
        parts = {
            part: [[replace(r, task=new) for r in per_task[old]] for new, old in enumerate(order)]
            for part, per_task in self.parts.items()
        }
        return Benchmark(self.name, self.task_type, list(self.label_names), [list(self.tasks[o]) for o in order], parts)

    def validate(self) -> None:
        """Check the invariants every consumer relies on; raise `DataError` naming the first problem found.

        Tasks are disjoint and cover every class id exactly once; each part holds one record list per task; every
        record's label is in its task's class list; keys are unique across all parts.
        """
        seen = Counter(c for classes in self.tasks for c in classes)
        repeated = sorted(c for c, n in seen.items() if n > 1)
        missing = sorted(set(range(self.num_classes)) - set(seen))
        unknown = sorted(c for c in seen if not 0 <= c < self.num_classes)
        if repeated or missing or unknown:
            raise DataError(
                f"{self.name}: task split must use each class id 0..{self.num_classes - 1} exactly once "
                f"(repeated: {repeated}, missing: {missing}, out of range: {unknown})"
            )
        keys: set[str] = set()
        for part, per_task in self.parts.items():
            if len(per_task) != self.num_tasks:
                raise DataError(f"{self.name}: part {part!r} has {len(per_task)} task lists, expected {self.num_tasks}")
            for k, records in enumerate(per_task):
                allowed = set(self.tasks[k])
                for record in records:
                    if record.task != k or record.label not in allowed:
                        raise DataError(
                            f"{self.name}: record {record.key!r} in {part}/task {k} has task={record.task}, "
                            f"label={record.label}; task {k} holds classes {sorted(allowed)}"
                        )
                    if record.key in keys:
                        raise DataError(f"{self.name}: duplicate record key {record.key!r} (part {part!r})")
                    keys.add(record.key)


def _cap_per_class(records: list[Record], cap: int, seed: tuple[int, int]) -> list[Record]:
    """Keep at most `cap` records per label: a seeded choice per label, original order kept."""
    by_label: dict[int, list[int]] = {}
    for i, record in enumerate(records):
        by_label.setdefault(record.label, []).append(i)
    keep: list[int] = []
    for label, indices in by_label.items():
        if len(indices) <= cap:
            keep.extend(indices)
        else:
            rng = np.random.default_rng([*seed, label])
            keep.extend(indices[j] for j in rng.choice(len(indices), size=cap, replace=False))
    return [records[i] for i in sorted(keep)]
