"""Few-NERD mention-level entity typing (66 fine types, ConPET p10 split) from the O_CILNER task files.

ConPET's own FewNERD p10 files are not public, so the records are rebuilt the way the paper frames the task: one
example per labelled mention. The O_CILNER files are CoNLL ``token<TAB>label`` without BIO tags, so a maximal run
of one non-``O`` label is one mention. All 11 dev files (the whole Few-NERD dev split, every type) are read, plus
the train and test files that are shipped. Mentions are deduplicated on (sentence tokens, span) and each class is
split 80/10/10 with the seed.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

from conpet_lightning.data.readers import entity_text, open_text
from conpet_lightning.data.records import Benchmark, DataError
from conpet_lightning.data.splits import assemble, load_conpet_split, split_per_class

logger = logging.getLogger(__name__)

NUM_SOURCE_TASKS = 11
SOURCE_DIR = "fewnerd/o_cilner_tasks"

Mention = tuple[tuple[str, ...], int, int, str]  # (sentence tokens, start, end, label)


def source_files(root: str | Path) -> list[Path]:
    """The O_CILNER files the reader uses, in reading order: per task, dev (required), then train and test if shipped.

    Raises:
        DataError: naming the path of a missing dev file (train/test files are optional).
    """
    base = Path(root) / SOURCE_DIR
    files: list[Path] = []
    for task in range(NUM_SOURCE_TASKS):
        dev = base / f"task_{task}" / "dev.txt.gz"
        if not dev.is_file():
            raise DataError(f"missing data file: {dev}")
        files.append(dev)
        files += [p for p in (base / f"task_{task}" / f"{part}.txt.gz" for part in ("train", "test")) if p.is_file()]
    return files


def read_mentions(path: str | Path, labels: set[str]) -> Iterator[Mention]:
    """Yield every mention of one CoNLL file (a maximal run of the same non-``O`` label).

    Raises:
        DataError: naming the file and line for a row that is not ``token<TAB>label``, or for a label that is
            neither ``O`` nor in `labels`.
    """
    with open_text(path) as handle:
        lines = handle.read().split("\n")
    tokens: list[str] = []
    tags: list[str] = []
    for line_no, line in enumerate(lines, start=1):
        line = line.rstrip("\r")
        if not line:
            if tokens:
                yield from _runs(tuple(tokens), tags)
                tokens, tags = [], []
            continue
        token, sep, tag = line.partition("\t")
        if not sep or "\t" in tag or not token.strip() or not tag:
            raise DataError(f"{path}: line {line_no}: malformed row {line!r} (expected 'token<TAB>label')")
        if tag != "O" and tag not in labels:
            raise DataError(f"{path}: line {line_no}: label {tag!r} is not in the FewNERD label map")
        tokens.append(token.strip())
        tags.append(tag)
    if tokens:
        yield from _runs(tuple(tokens), tags)


def _runs(tokens: tuple[str, ...], tags: list[str]) -> Iterator[Mention]:
    """Maximal runs of one non-O tag in a sentence."""
    start = 0
    for i in range(1, len(tags) + 1):
        if i == len(tags) or tags[i] != tags[start]:
            if tags[start] != "O":
                yield tokens, start, i, tags[start]
            start = i


def load_fewnerd(*, root: str | Path = "data", seed: int = 100) -> Benchmark:
    """Load Few-NERD's 66 fine types in ConPET's p10 task order, one record per mention, split 80/10/10 per class.

    Args:
        root: the shipped data folder (holds ``fewnerd/o_cilner_tasks/`` and ``conpet_splits/``).
        seed: seed of the per-class 80/10/10 split.
    """
    root = Path(root)
    label_names, tasks = load_conpet_split(root, "fewnerd")
    _check_labels_file(root / SOURCE_DIR / "labels.txt", label_names)
    class_id = {name: i for i, name in enumerate(label_names)}

    seen: dict[tuple[tuple[str, ...], int, int], str] = {}
    mentions: list[Mention] = []
    conflicts = 0
    for path in source_files(root):
        for mention in read_mentions(path, set(label_names)):
            key = mention[:3]
            if key in seen:
                conflicts += seen[key] != mention[3]
                continue
            seen[key] = mention[3]
            mentions.append(mention)
    if conflicts:
        logger.warning("fewnerd: %d repeated mentions had a different label; kept the first", conflicts)

    labels = [class_id[tag] for _, _, _, tag in mentions]
    examples: dict[str, list[tuple[int, str]]] = {"train": [], "valid": [], "test": []}
    for part, label, (tokens, start, end, _) in zip(split_per_class(labels, seed), labels, mentions, strict=True):
        examples[part].append((label, entity_text(tokens, (start, end))))
    return assemble("fewnerd", "entity_typing", label_names, tasks, examples)


def _check_labels_file(path: Path, label_names: list[str]) -> None:
    """The O_CILNER type list must equal the ConPET label map, or class ids would silently differ."""
    with open_text(path) as handle:
        types = {line.strip() for line in handle if line.strip()} - {"O"}
    if types != set(label_names):
        raise DataError(
            f"{path}: types differ from the FewNERD label map "
            f"(only in file: {sorted(types - set(label_names))}, only in map: {sorted(set(label_names) - types)})"
        )
