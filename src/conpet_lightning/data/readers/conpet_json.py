"""A user's local copy of ConPET's key-JSON files (TACRED, ACE 2005, OntoNotes, BBN, or the paper's FewRel/FewNERD).

Licensed datasets cannot be shipped, but their ConPET label maps and task splits are, so a user who has the files
in ConPET's stored format gets the paper's exact tasks. Each file ``{ds}_split_{part}_dataset_{p10|p5}_key.json``
is a JSON list with one entry per task, each a list of ``[sample_key, tag, text]`` whose text already carries the
markers and the cloze template. The sample keys are kept as they are (ConPET's caches are keyed by them).
"""

from __future__ import annotations

from pathlib import Path

from conpet_lightning.data.readers import read_json
from conpet_lightning.data.records import MASK, PARTS, TEMPLATE_START, Benchmark, DataError, Record, TaskType
from conpet_lightning.data.splits import CONPET_SPLITS, load_conpet_split

#: Task type of each dataset ConPET ships a split for.
TASK_TYPES: dict[str, TaskType] = {
    "fewrel": "relation",
    "tacred": "relation",
    "ace": "relation",
    "fewnerd": "entity_typing",
    "ontonotes": "entity_typing",
    "bbn": "entity_typing",
}


def key_file(local_path: str | Path, dataset: str, part: str) -> Path:
    """Path of one ConPET key file, e.g. ``tacred_split_train_dataset_p10_key.json`` (``p5`` for ACE)."""
    return Path(local_path) / f"{dataset}_split_{part}_dataset_{CONPET_SPLITS[dataset]}_key.json"


def _read_part(path: Path, label_names: list[str], tasks: list[list[int]]) -> list[list[Record]]:
    """Records of one key file, checking each tag against the class list of its task entry."""
    data = read_json(path)
    if not isinstance(data, list) or len(data) != len(tasks):
        got = f"{len(data)} entries" if isinstance(data, list) else type(data).__name__
        raise DataError(f"{path}: expected a JSON list of {len(tasks)} task entries (one per task), got {got}")
    per_task: list[list[Record]] = []
    for k, entry in enumerate(data):
        if not isinstance(entry, list):
            raise DataError(f"{path}: task entry {k}: expected a list of [sample_key, tag, text]")
        if not entry:  # a task with nothing to train, select on or test would fail after the tasks before it
            raise DataError(f"{path}: task entry {k} (task {k + 1}) is empty; every task needs at least one record")
        allowed = set(tasks[k])
        records: list[Record] = []
        for i, item in enumerate(entry):
            where = f"{path}: task entry {k}, item {i}"
            if not (
                isinstance(item, list)
                and len(item) == 3
                and isinstance(item[0], str)
                and isinstance(item[1], int)
                and not isinstance(item[1], bool)
                and isinstance(item[2], str)
            ):
                raise DataError(f"{where}: malformed item {item!r:.200} (expected [sample_key, tag, text])")
            key, tag, text = item
            if tag not in allowed:
                name = label_names[tag] if 0 <= tag < len(label_names) else "not in the label map"
                raise DataError(
                    f"{where} (key {key!r}): tag {tag} ({name}) is not in task p{k + 1}'s classes {sorted(allowed)}"
                )
            if text.count(MASK) != 1 or TEMPLATE_START not in text:
                raise DataError(f"{where} (key {key!r}): text must hold one {MASK} and the '{TEMPLATE_START}' template")
            records.append(Record(key, tag, k, text))
        per_task.append(records)
    return per_task


def load_conpet_json(*, root: str | Path = "data", local_path: str | Path, dataset: str) -> Benchmark:
    """Load ConPET key-JSON files from `local_path` with the shipped label map and split of `dataset`.

    Args:
        root: the shipped data folder (holds ``conpet_splits/``).
        local_path: folder with the three key files (train, valid, test).
        dataset: one of fewrel, fewnerd, tacred, ace, ontonotes, bbn.

    Raises:
        DataError: on an unknown dataset, a missing file, an empty task entry, a malformed item, a tag outside its
            task's classes, or duplicate sample keys.
    """
    if dataset not in TASK_TYPES:
        raise DataError(f"unknown ConPET dataset {dataset!r}; expected one of {sorted(TASK_TYPES)}")
    label_names, tasks = load_conpet_split(root, dataset)
    parts = {part: _read_part(key_file(local_path, dataset, part), label_names, tasks) for part in PARTS}
    benchmark = Benchmark(dataset, TASK_TYPES[dataset], label_names, tasks, parts)
    benchmark.validate()
    return benchmark
