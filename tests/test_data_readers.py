"""The four shipped benchmarks, loaded from the real files under data/: shapes, splits, stats, caps, determinism."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import pytest

from conpet_lightning.data.benchmarks import BENCHMARKS, load_benchmark
from conpet_lightning.data.records import (
    HEAD_END,
    HEAD_START,
    MASK,
    PARTS,
    TAIL_END,
    TAIL_START,
    TEMPLATE_START,
    Benchmark,
)

DATA = Path(__file__).resolve().parents[1] / "data"
SHAPES = {"fewrel": (80, 10), "fewnerd": (66, 10), "clinc150": (150, 10), "banking77": (77, 7)}


@pytest.fixture(scope="module")
def loaded() -> dict[str, Benchmark]:
    """Each shipped benchmark, loaded once for the module (FewNERD takes a few seconds)."""
    return {name: load_benchmark(name, root=DATA) for name in SHAPES}


def _class_counts(benchmark: Benchmark, part: str) -> Counter[int]:
    return Counter(record.label for record in benchmark.iter_records(part))


def test_registry_names() -> None:
    assert set(BENCHMARKS) == {*SHAPES, "conpet_json"}


@pytest.mark.parametrize("name", list(SHAPES))
def test_shapes_and_validate(loaded: dict[str, Benchmark], name: str) -> None:
    benchmark = loaded[name]
    assert (benchmark.num_classes, benchmark.num_tasks) == SHAPES[name]
    assert benchmark.name == name
    benchmark.validate()
    assert set(benchmark.parts) == set(PARTS)
    for part in PARTS:  # every class has data in every part
        assert set(_class_counts(benchmark, part)) == set(range(benchmark.num_classes))


@pytest.mark.parametrize("name", ["fewrel", "fewnerd"])
def test_conpet_split_and_label_map_are_used(loaded: dict[str, Benchmark], name: str) -> None:
    benchmark = loaded[name]
    label_map = json.loads((DATA / f"conpet_splits/{name}_label_to_tag.json").read_text())
    split = json.loads((DATA / f"conpet_splits/{name}_class_split_p10_tags.json").read_text())
    assert {label: i for i, label in enumerate(benchmark.label_names)} == label_map
    assert benchmark.tasks == [split[f"p{k}"] for k in range(1, 11)]


def test_clinc150_tasks_are_domains(loaded: dict[str, Benchmark]) -> None:
    benchmark = loaded["clinc150"]
    domains = json.loads((DATA / "textcls/clinc150/domains.json").read_text())
    assert benchmark.label_names == sorted(benchmark.label_names)
    for task, intents in zip(benchmark.tasks, domains.values(), strict=True):
        assert {benchmark.label_names[c] for c in task} == set(intents)
    # official 100/20/30 per intent; only 5 train repeats of valid/test utterances are dropped
    assert set(_class_counts(benchmark, "valid").values()) == {20}
    assert set(_class_counts(benchmark, "test").values()) == {30}
    assert sum(_class_counts(benchmark, "train").values()) == 15000 - 5


def test_banking77_tasks_and_validation_carve(loaded: dict[str, Benchmark]) -> None:
    benchmark = loaded["banking77"]
    categories = json.loads((DATA / "textcls/banking77/categories.json").read_text())
    assert benchmark.label_names == sorted(categories)
    assert [len(task) for task in benchmark.tasks] == [11] * 7
    assert benchmark.tasks != load_benchmark("banking77", root=DATA, seed=7).tasks  # the permutation follows the seed
    train, valid = _class_counts(benchmark, "train"), _class_counts(benchmark, "valid")
    for label in range(77):
        assert valid[label] == math.floor((train[label] + valid[label]) * 0.1 + 0.5)
    assert sum(train.values()) + sum(valid.values()) == 10003 - 11  # 7 test repeats + 4 in-train repeats dropped
    assert sum(_class_counts(benchmark, "test").values()) == 3080 - 1


@pytest.mark.parametrize("name", list(SHAPES))
def test_no_duplicates_within_or_across_parts(loaded: dict[str, Benchmark], name: str) -> None:
    texts = Counter(record.text.lower() for part in PARTS for record in loaded[name].iter_records(part))
    assert texts.most_common(1)[0][1] == 1


@pytest.mark.parametrize("name", ["fewrel", "fewnerd"])
def test_split_is_80_10_10_per_class(loaded: dict[str, Benchmark], name: str) -> None:
    benchmark = loaded[name]
    counts = {part: _class_counts(benchmark, part) for part in PARTS}
    for label in range(benchmark.num_classes):
        n = sum(counts[part][label] for part in PARTS)
        assert counts["valid"][label] == counts["test"][label] == math.floor(n * 0.1 + 0.5)
        assert abs(counts["train"][label] / n - 0.8) < 0.02


def test_fewrel_sources_are_pooled(loaded: dict[str, Benchmark]) -> None:
    benchmark = loaded["fewrel"]
    totals = Counter(record.label for part in PARTS for record in benchmark.iter_records(part))
    val_wiki = json.loads((DATA / "fewrel/fewrel1.0/val_wiki.json").read_text())
    for pid in val_wiki:  # the 16 official val relations: all 700 (only one exact repeat in the file)
        assert totals[benchmark.label_names.index(pid)] >= 699
    assert min(totals.values()) >= 200  # the other 64 come from Wiki80 + CFRL
    assert totals[benchmark.label_names.index("P364")] > 0  # CFRL's renamed "original language of work"


@pytest.mark.parametrize("name", list(SHAPES))
def test_text_format(loaded: dict[str, Benchmark], name: str) -> None:
    benchmark = loaded[name]
    markers = {"relation": [HEAD_START, HEAD_END, TAIL_START, TAIL_END], "entity_typing": [HEAD_START, HEAD_END]}
    for record in benchmark.iter_records("valid"):
        assert record.text.count(MASK) == 1 and record.text.count(TEMPLATE_START) == 1
        sentence = record.text.split(TEMPLATE_START)[0].split(" ")
        for marker in markers.get(benchmark.task_type, []):
            assert sentence.count(marker) == 1, record
        assert "" not in sentence and "\n" not in record.text


def test_fewrel_record_text(loaded: dict[str, Benchmark]) -> None:
    record = loaded["fewrel"].parts["train"][0][0]
    sentence, template = record.text.split(TEMPLATE_START)
    tokens = sentence.split()
    head = " ".join(tokens[tokens.index(HEAD_START) + 1 : tokens.index(HEAD_END)])
    tail = " ".join(tokens[tokens.index(TAIL_START) + 1 : tokens.index(TAIL_END)])
    assert template == f" {tail} is the {MASK} of {head}."
    assert record.key == "train-0-0" and record.label in loaded["fewrel"].tasks[0]


@pytest.mark.parametrize("name", list(SHAPES))
def test_stats_match_recount(loaded: dict[str, Benchmark], name: str) -> None:
    benchmark = loaded[name]
    stats = benchmark.stats()
    assert stats["benchmark"] == name and stats["num_classes"] == SHAPES[name][0]
    assert len(stats["tasks"]) == SHAPES[name][1]
    for k, task in enumerate(stats["tasks"]):
        assert task["classes"] == benchmark.tasks[k]
        for part in PARTS:
            recount = sum(1 for record in benchmark.iter_records(part) if record.label in set(benchmark.tasks[k]))
            assert task[part] == recount
    assert stats["totals"] == {part: sum(1 for _ in benchmark.iter_records(part)) for part in PARTS}


def test_keys_follow_conpet_scheme(loaded: dict[str, Benchmark]) -> None:
    benchmark = loaded["clinc150"]
    for part in PARTS:
        records = list(benchmark.iter_records(part))
        assert [r.key for r in records] == [f"{part}-{r.task}-{i}" for i, r in enumerate(records)]


def test_capped(loaded: dict[str, Benchmark]) -> None:
    benchmark = loaded["fewrel"]
    small = benchmark.capped(train=5, valid=2, seed=3)
    small.validate()
    for part, cap in (("train", 5), ("valid", 2)):
        assert set(_class_counts(small, part).values()) == {cap}
        for full, kept in zip(benchmark.parts[part], small.parts[part], strict=True):
            positions = [full.index(record) for record in kept]
            assert positions == sorted(positions)  # a subset in the original order
    assert small.parts["test"] == benchmark.parts["test"]  # None = uncapped
    assert small.parts == benchmark.capped(train=5, valid=2, seed=3).parts
    assert small.parts["train"] != benchmark.capped(train=5, valid=2, seed=4).parts["train"]
    assert benchmark.stats()["totals"]["train"] == 22762  # the original is untouched


def test_same_seed_same_records(loaded: dict[str, Benchmark]) -> None:
    for name in SHAPES:
        assert load_benchmark(name, root=DATA) == loaded[name]
    other = load_benchmark("fewrel", root=DATA, seed=101)
    assert other.parts["test"] != loaded["fewrel"].parts["test"]
    assert other.stats() == loaded["fewrel"].stats()  # same per-class sizes, different members
