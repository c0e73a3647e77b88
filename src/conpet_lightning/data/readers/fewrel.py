"""FewRel (80 relations, ConPET p10 split) rebuilt from the public FewRel, Wiki80 and CFRL copies.

The complete FewRel train set is not shippable here, so the reader pools what is: the official ``val_wiki.json``
(16 relations x 700), Wiki80's ``dev``/``train_0.1``/``train_0.01`` and CFRL's ``test_0``/``train_0`` of its three
configs. Pooled instances are deduplicated case-insensitively on (sentence tokens, head words, tail words), keeping
the first one seen in source order val_wiki, Wiki80, CFRL, so the cased version wins over CFRL's lowercased copy.
The same sentence with a different entity pair is a different instance and is kept. Each class is then split
80/10/10 with the seed (as ConPET did for FewRel).

Structural problems (bad JSON, wrong column count, non-integer fields, unknown relation) raise `DataError` naming
the file and line. Instances that are well-formed but inconsistent (span out of range, overlapping or
non-contiguous spans, an entity made only of whitespace, CFRL entity text that does not match its indices) are
skipped and counted in a logged warning.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from conpet_lightning.data.readers import open_text, read_json, relation_text
from conpet_lightning.data.records import Benchmark, DataError
from conpet_lightning.data.splits import assemble, load_conpet_split, split_per_class

logger = logging.getLogger(__name__)

CFRL_CONFIGS: tuple[str, ...] = ("CFRLdata_10_100_10_2", "CFRLdata_10_100_10_5", "CFRLdata_10_100_10_10")
WIKI80_FILES: tuple[str, ...] = ("dev.txt", "train_0.1.txt", "train_0.01.txt")
#: CFRL's relation_name.txt renames one Wiki80/Wikidata relation.
CFRL_ALIASES: dict[str, str] = {"original language of work": "original language of film or TV show"}

Span = tuple[int, int]
_Raw = tuple[str, list[str], Sequence[int], Sequence[int]]  # (PID, tokens, head indices, tail indices)


class _Pool:
    """Deduplicating collector of cleaned relation instances, with counts of what it dropped."""

    def __init__(self) -> None:
        self.items: list[tuple[str, tuple[str, ...], Span, Span]] = []
        self.seen: set[tuple[tuple[str, ...], str, str]] = set()
        self.skipped: Counter[str] = Counter()
        self.duplicates = 0

    def add(self, pid: str, tokens: Sequence[str], head: Sequence[int], tail: Sequence[int]) -> None:
        """Clean one instance (drop whitespace-only tokens) and keep it unless broken or already seen."""
        keep = [i for i, token in enumerate(tokens) if token.strip()]
        new_index = {old: new for new, old in enumerate(keep)}
        spans: list[Span] = []
        for indices in (head, tail):
            if not indices or any(not 0 <= i < len(tokens) for i in indices):
                self.skipped["span out of range"] += 1
                return
            if list(indices) != list(range(indices[0], indices[0] + len(indices))):
                self.skipped["non-contiguous span"] += 1
                return
            mapped = [new_index[i] for i in indices if i in new_index]
            if not mapped:
                self.skipped["whitespace-only entity"] += 1
                return
            spans.append((mapped[0], mapped[-1] + 1))
        if max(spans[0][0], spans[1][0]) < min(spans[0][1], spans[1][1]):
            self.skipped["overlapping head and tail"] += 1
            return
        clean = tuple(tokens[i].strip() for i in keep)
        lower = tuple(token.lower() for token in clean)
        key = (lower, " ".join(lower[slice(*spans[0])]), " ".join(lower[slice(*spans[1])]))
        if key in self.seen:
            self.duplicates += 1
            return
        self.seen.add(key)
        self.items.append((pid, clean, spans[0], spans[1]))


def _val_wiki(path: Path, pids: set[str]) -> Iterator[_Raw]:
    """Instances of the official FewRel JSON (PID -> list of instances); first mention of each entity."""
    data = read_json(path)
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object mapping relation PID -> list of instances")
    for pid, instances in data.items():
        if pid not in pids:
            raise DataError(f"{path}: relation {pid!r} is not in the FewRel label map")
        if not isinstance(instances, list):
            raise DataError(f"{path}: relation {pid}: expected a list of instances")
        for i, inst in enumerate(instances):
            try:
                tokens, head, tail = inst["tokens"], inst["h"][2][0], inst["t"][2][0]
                _check_tokens(tokens)
                _check_ints(head)
                _check_ints(tail)
            except (KeyError, IndexError, TypeError, ValueError) as err:
                raise DataError(f"{path}: relation {pid} instance {i}: malformed instance ({err!r})") from err
            yield pid, tokens, head, tail


def _wiki80(path: Path, pid_of_name: dict[str, str]) -> Iterator[_Raw]:
    """Instances of a Wiki80 JSON-lines file (``pos`` is a [start, end) span; relation given by name)."""
    with open_text(path) as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row: Any = json.loads(line)
                tokens, relation = row["token"], row["relation"]
                (h0, h1), (t0, t1) = row["h"]["pos"], row["t"]["pos"]
                _check_tokens(tokens)
                _check_ints([h0, h1, t0, t1])
                if not isinstance(relation, str):
                    raise TypeError("relation must be a string")
            except (KeyError, TypeError, ValueError) as err:
                raise DataError(f"{path}: line {line_no}: malformed row ({err!r})") from err
            if relation not in pid_of_name:
                raise DataError(f"{path}: line {line_no}: relation {relation!r} is not in the FewRel label map")
            yield pid_of_name[relation], tokens, range(h0, h1), range(t0, t1)


def _cfrl(path: Path, relation_names: list[str], pid_of_name: dict[str, str], pool: _Pool) -> Iterator[_Raw]:
    """Instances of a CFRL tab-separated file (1-based label into relation_name.txt, inclusive token indices)."""
    with open_text(path) as handle:
        for line_no, line in enumerate(handle, start=1):
            line = line.rstrip("\r\n")
            if not line:
                continue
            cols = line.split("\t")
            if len(cols) != 9:
                raise DataError(f"{path}: line {line_no}: expected 9 tab-separated columns, got {len(cols)}")
            try:
                label = int(cols[0])
                head = [int(i) for i in cols[4].split()]
                tail = [int(i) for i in cols[6].split()]
            except ValueError as err:
                raise DataError(f"{path}: line {line_no}: non-integer label or token index ({err})") from err
            if not 1 <= label <= len(relation_names):
                raise DataError(f"{path}: line {line_no}: label {label} is not in 1..{len(relation_names)}")
            name = CFRL_ALIASES.get(relation_names[label - 1], relation_names[label - 1])
            if name not in pid_of_name:
                raise DataError(f"{path}: line {line_no}: relation {name!r} is not in the FewRel label map")
            tokens = cols[2].split(" ")
            if not _surface_matches(tokens, head, cols[3]) or not _surface_matches(tokens, tail, cols[5]):
                pool.skipped["entity text does not match its indices"] += 1
                continue
            yield pid_of_name[name], tokens, head, tail


def _surface_matches(tokens: list[str], indices: list[int], text: str) -> bool:
    """True when the indexed tokens spell the given entity text (CFRL stores both)."""
    return bool(indices) and all(0 <= i < len(tokens) for i in indices) and " ".join(tokens[i] for i in indices) == text


def _check_tokens(tokens: object) -> None:
    """Raise TypeError unless `tokens` is a list of strings."""
    if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
        raise TypeError("tokens must be a list of strings")


def _check_ints(values: object) -> None:
    """Raise TypeError unless `values` is a list of integers."""
    if not isinstance(values, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise TypeError("token indices must be a list of integers")


def load_fewrel(*, root: str | Path = "data", seed: int = 100) -> Benchmark:
    """Load FewRel's 80 relations in ConPET's p10 task order, pooled from the shipped sources and split 80/10/10.

    Args:
        root: the shipped data folder (holds ``fewrel/`` and ``conpet_splits/``).
        seed: seed of the per-class 80/10/10 split.
    """
    root = Path(root)
    label_names, tasks = load_conpet_split(root, "fewrel")
    pids = set(label_names)
    names = read_json(root / "fewrel/fewrel1.0/pid2name.json")
    if not isinstance(names, dict):
        raise DataError(f"{root / 'fewrel/fewrel1.0/pid2name.json'}: expected a JSON object PID -> [name, description]")
    pid_of_name = {entry[0]: pid for pid, entry in names.items() if pid in pids}
    if len(pid_of_name) != len(pids):
        raise DataError(f"{root / 'fewrel/fewrel1.0/pid2name.json'}: no name for PIDs {sorted(pids - set(names))}")
    cfrl_dir = root / "fewrel/cfrl_fewrel_lowercased"
    with open_text(cfrl_dir / "relation_name.txt") as handle:
        relation_names = [line.strip() for line in handle if line.strip()]

    pool = _Pool()
    sources: list[Iterator[_Raw]] = [_val_wiki(root / "fewrel/fewrel1.0/val_wiki.json", pids)]
    sources += [_wiki80(root / "fewrel/wiki80" / name, pid_of_name) for name in WIKI80_FILES]
    sources += [
        _cfrl(cfrl_dir / config / f"{part}.txt", relation_names, pid_of_name, pool)
        for config in CFRL_CONFIGS
        for part in ("test_0", "train_0")
    ]
    for source in sources:
        for pid, tokens, head, tail in source:
            pool.add(pid, tokens, head, tail)
    if pool.skipped:
        logger.warning("fewrel: skipped broken instances: %s", dict(pool.skipped))
    logger.info("fewrel: %d instances kept, %d duplicates dropped", len(pool.items), pool.duplicates)

    class_id = {pid: i for i, pid in enumerate(label_names)}
    labels = [class_id[pid] for pid, _, _, _ in pool.items]
    examples: dict[str, list[tuple[int, str]]] = {"train": [], "valid": [], "test": []}
    for part, label, (_, tokens, head, tail) in zip(split_per_class(labels, seed), labels, pool.items, strict=True):
        examples[part].append((label, relation_text(tokens, head, tail)))
    return assemble("fewrel", "relation", label_names, tasks, examples)
