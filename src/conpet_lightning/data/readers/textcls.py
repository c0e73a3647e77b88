"""Intent classification benchmarks (CLINC150, Banking77) as class-incremental task sequences.

These are not in the ConPET paper; they give the framework two complete, openly licensed benchmarks. Class ids
follow the alphabetical order of the intent names (as ConPET's label maps do). CLINC150's tasks are its 10
domains; Banking77 has no domains, so its 77 intents are split into 7 tasks of 11 by a seeded permutation.

Both official releases repeat a few utterances (CLINC150: 5 across train/val/test, some with different intents;
Banking77: 7 train rows are also in test, 4 repeat within train, 1 within test). A repeat would leak test items
into training, so each utterance is kept once (case-insensitive), with priority test, then valid, then train:
the official test and validation sets stay whole except for Banking77's one in-test repeat.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np

from conpet_lightning.data.readers import open_text, read_json, text_classification_text
from conpet_lightning.data.records import Benchmark, DataError
from conpet_lightning.data.splits import assemble, check_task_split, split_per_class

CLINC_DIR = "textcls/clinc150"
BANKING_DIR = "textcls/banking77"
#: CLINC150 part names -> ours; the out-of-scope parts (oos_*) are left out.
CLINC_PARTS: dict[str, str] = {"train": "train", "val": "valid", "test": "test"}
BANKING_TASKS, BANKING_TASK_SIZE = 7, 11
#: Parts in the order they claim an utterance: a repeat is dropped from the later part.
DEDUP_PRIORITY: tuple[str, ...] = ("test", "valid", "train")

logger = logging.getLogger(__name__)


def drop_repeats(name: str, examples: dict[str, list[tuple[int, str]]]) -> dict[str, list[tuple[int, str]]]:
    """Keep each text once (case-insensitive): test first, then valid, then train; order within a part is kept."""
    seen: set[str] = set()
    kept: dict[str, list[tuple[int, str]]] = {}
    for part in DEDUP_PRIORITY:
        kept[part] = []
        for label, text in examples.get(part, []):
            if text.lower() not in seen:
                seen.add(text.lower())
                kept[part].append((label, text))
    dropped = {part: len(examples.get(part, [])) - len(kept[part]) for part in DEDUP_PRIORITY}
    if any(dropped.values()):
        logger.info("%s: dropped repeated utterances per part: %s", name, dropped)
    return kept


def load_clinc150(*, root: str | Path = "data", seed: int = 100) -> Benchmark:
    """Load CLINC150's 150 in-scope intents as 10 tasks (its domains, in ``domains.json`` order).

    The official train/val/test parts are kept; ``seed`` is accepted for a uniform interface and unused.
    """
    del seed  # official split, nothing random
    folder = Path(root) / CLINC_DIR
    domains = read_json(folder / "domains.json")
    if not isinstance(domains, dict) or not all(isinstance(v, list) for v in domains.values()):
        raise DataError(f"{folder / 'domains.json'}: expected a JSON object domain -> list of intents")
    label_names = sorted({intent for intents in domains.values() for intent in intents})
    class_id = {name: i for i, name in enumerate(label_names)}
    tasks = [sorted(class_id[intent] for intent in intents) for intents in domains.values()]
    check_task_split(tasks, len(label_names), str(folder / "domains.json"))

    path = folder / "data_full.json"
    data = read_json(path)
    examples: dict[str, list[tuple[int, str]]] = {}
    for source, part in CLINC_PARTS.items():
        rows = data.get(source) if isinstance(data, dict) else None
        if not isinstance(rows, list):
            raise DataError(f"{path}: missing list {source!r}")
        examples[part] = []
        for i, row in enumerate(rows):
            if not (isinstance(row, list) and len(row) == 2 and all(isinstance(x, str) for x in row)):
                raise DataError(f"{path}: {source}[{i}]: malformed row {row!r} (expected [text, intent])")
            text, intent = row
            if intent not in class_id:
                raise DataError(f"{path}: {source}[{i}]: label {intent!r} is not in {folder / 'domains.json'}")
            examples[part].append((class_id[intent], text_classification_text(text)))
    return assemble("clinc150", "text_classification", label_names, tasks, drop_repeats("clinc150", examples))


def _read_banking_csv(path: Path, class_id: dict[str, int]) -> list[tuple[int, str]]:
    """Rows of a Banking77 ``text,category`` CSV (CRLF endings, some quoted texts span lines)."""
    rows: list[tuple[int, str]] = []
    with open_text(path, newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header != ["text", "category"]:
            raise DataError(f"{path}: line 1: expected header 'text,category', got {header!r}")
        for row in reader:
            if len(row) != 2:
                raise DataError(f"{path}: line {reader.line_num}: malformed row {row!r} (expected text,category)")
            text, category = row
            if category not in class_id:
                raise DataError(f"{path}: line {reader.line_num}: label {category!r} is not in categories.json")
            rows.append((class_id[category], text_classification_text(text)))
    return rows


def banking77_tasks(num_classes: int, seed: int) -> list[list[int]]:
    """Seeded permutation of the class ids cut into 7 tasks of 11 (ids sorted within a task)."""
    if num_classes != BANKING_TASKS * BANKING_TASK_SIZE:
        raise DataError(f"banking77 needs {BANKING_TASKS * BANKING_TASK_SIZE} categories, got {num_classes}")
    order = np.random.default_rng(seed).permutation(num_classes).tolist()
    return [sorted(order[k * BANKING_TASK_SIZE : (k + 1) * BANKING_TASK_SIZE]) for k in range(BANKING_TASKS)]


def load_banking77(*, root: str | Path = "data", seed: int = 100) -> Benchmark:
    """Load Banking77's 77 intents as 7 seeded tasks of 11; validation is 10% per class carved from train.

    Args:
        root: the shipped data folder (holds ``textcls/banking77/``).
        seed: seed of the task permutation and of the train/validation carve.
    """
    folder = Path(root) / BANKING_DIR
    categories = read_json(folder / "categories.json")
    if not isinstance(categories, list) or not all(isinstance(c, str) for c in categories):
        raise DataError(f"{folder / 'categories.json'}: expected a JSON list of category names")
    label_names = sorted(set(categories))
    class_id = {name: i for i, name in enumerate(label_names)}
    tasks = banking77_tasks(len(label_names), seed)

    rows = drop_repeats(
        "banking77",
        {
            "train": _read_banking_csv(folder / "train.csv", class_id),
            "test": _read_banking_csv(folder / "test.csv", class_id),
        },
    )
    train_rows, test_rows = rows["train"], rows["test"]
    carve = split_per_class([label for label, _ in train_rows], seed, fractions=(0.9, 0.1, 0.0))
    examples = {
        "train": [row for row, part in zip(train_rows, carve, strict=True) if part == "train"],
        "valid": [row for row, part in zip(train_rows, carve, strict=True) if part == "valid"],
        "test": test_rows,
    }
    return assemble("banking77", "text_classification", label_names, tasks, examples)
