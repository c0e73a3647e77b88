"""Bad inputs fail with a DataError that names the file, line, label or class ids; small fixtures built in tmp_path."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import pytest

from conpet_lightning.data.benchmarks import load_benchmark
from conpet_lightning.data.readers.fewnerd import load_fewnerd
from conpet_lightning.data.readers.fewrel import load_fewrel
from conpet_lightning.data.readers.textcls import load_banking77, load_clinc150
from conpet_lightning.data.records import MASK, TEMPLATE_START, Benchmark, DataError, Record
from conpet_lightning.data.splits import load_task_split, split_per_class

DATA = Path(__file__).resolve().parents[1] / "data"
CFRL = "fewrel/cfrl_fewrel_lowercased"


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".gz":
        with gzip.open(path, "wt", encoding="utf-8") as handle:
            handle.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def _splits(root: Path) -> Path:
    shutil.copytree(DATA / "conpet_splits", root / "conpet_splits")
    return root


def _fewrel_root(root: Path) -> Path:
    """A tiny FewRel tree: 3 val_wiki instances, 1 Wiki80 line, 1 CFRL line (a lowercased repeat), real maps."""
    _splits(root)
    shutil.copy(DATA / "fewrel/fewrel1.0/pid2name.json", _write(root / "fewrel/fewrel1.0/pid2name.json", ""))
    shutil.copy(DATA / f"{CFRL}/relation_name.txt", _write(root / f"{CFRL}/relation_name.txt", ""))
    tokens = ["The", "Bridge", "crosses", "the", "River", "Thames", "."]
    instances = [
        {"tokens": tokens, "h": ["bridge", "Q1", [[1]]], "t": ["river thames", "Q2", [[4, 5]]]},
        {"tokens": ["A", "\u00a0", "B", "C"], "h": ["a", "Q3", [[0]]], "t": ["c", "Q4", [[3]]]},
        {"tokens": tokens, "h": ["bridge", "Q1", [[1]]], "t": ["bridge", "Q1", [[1]]]},  # overlap: skipped
    ]
    _write(root / "fewrel/fewrel1.0/val_wiki.json", json.dumps({"P177": instances}))
    row = {"token": ["X", "is", "in", "Y"], "h": {"pos": [0, 1]}, "t": {"pos": [3, 4]}, "relation": "country"}
    _write(root / "fewrel/wiki80/dev.txt", json.dumps(row) + "\n")
    for name in ("train_0.1.txt", "train_0.01.txt"):
        _write(root / "fewrel/wiki80" / name, "")
    # label 65 = "crosses" (P177): the lowercased copy of the first val_wiki instance
    cfrl_row = "65\t1 2\tthe bridge crosses the river thames .\tbridge\t1\triver thames\t4 5\tQ1\tQ2\n"
    for config in ("CFRLdata_10_100_10_2", "CFRLdata_10_100_10_5", "CFRLdata_10_100_10_10"):
        _write(root / CFRL / config / "test_0.txt", cfrl_row)
        _write(root / CFRL / config / "train_0.txt", "")
    return root


def test_fewrel_fixture_loads_dedups_and_skips(tmp_path: Path) -> None:
    benchmark = load_fewrel(root=_fewrel_root(tmp_path), seed=1)
    texts = sorted(r.text for part in ("train", "valid", "test") for r in benchmark.iter_records(part))
    assert texts == sorted(
        [
            "The [unused0] Bridge [unused1] crosses the [unused2] River Thames [unused3] . In this sentence, "
            f"River Thames is the {MASK} of Bridge.",  # cased val_wiki version kept, CFRL repeats dropped
            f"[unused0] A [unused1] B [unused2] C [unused3]{TEMPLATE_START} C is the {MASK} of A.",  # NBSP token gone
            f"[unused0] X [unused1] is in [unused2] Y [unused3]{TEMPLATE_START} Y is the {MASK} of X.",
        ]
    )


def test_missing_file_names_path(tmp_path: Path) -> None:
    root = _fewrel_root(tmp_path)
    (root / "fewrel/wiki80/train_0.01.txt").unlink()
    with pytest.raises(DataError, match=r"missing data file: .*wiki80/train_0\.01\.txt"):
        load_fewrel(root=root)
    with pytest.raises(DataError, match=r"missing data file: .*clinc150/domains\.json"):
        load_clinc150(root=tmp_path)
    with pytest.raises(DataError, match=r"missing data file: .*conpet_splits/fewnerd_label_to_tag\.json"):
        load_benchmark("fewnerd", root=tmp_path / "empty")


def test_fewnerd_missing_dev_file(tmp_path: Path) -> None:
    _splits(tmp_path)
    shutil.copy(DATA / "fewnerd/o_cilner_tasks/labels.txt", _write(tmp_path / "fewnerd/o_cilner_tasks/labels.txt", ""))
    with pytest.raises(DataError, match=r"missing data file: .*task_0/dev\.txt\.gz"):
        load_fewnerd(root=tmp_path)


def test_malformed_rows_name_file_and_line(tmp_path: Path) -> None:
    root = _fewrel_root(tmp_path)
    _write(root / "fewrel/wiki80/dev.txt", (root / "fewrel/wiki80/dev.txt").read_text() + '{"token": [\n')
    with pytest.raises(DataError, match=r"wiki80/dev\.txt: line 2: malformed row"):
        load_fewrel(root=root)

    root = _fewrel_root(tmp_path / "b")
    _write(root / CFRL / "CFRLdata_10_100_10_5/test_0.txt", "\n12\t1 2\tonly four\tcolumns\n")
    with pytest.raises(DataError, match=r"CFRLdata_10_100_10_5/test_0\.txt: line 2: expected 9 tab-separated"):
        load_fewrel(root=root)

    path = _write(tmp_path / "fewnerd/task_0/dev.txt.gz", "Paris\tlocation-GPE\nis nice\n")
    from conpet_lightning.data.readers.fewnerd import read_mentions

    with pytest.raises(DataError, match=r"task_0/dev\.txt\.gz: line 2: malformed row"):
        list(read_mentions(path, {"location-GPE"}))


def test_malformed_csv_row(tmp_path: Path) -> None:
    folder = tmp_path / "textcls/banking77"
    shutil.copy(DATA / "textcls/banking77/categories.json", _write(folder / "categories.json", ""))
    _write(folder / "train.csv", 'text,category\r\n"multi\r\nline text",card_arrival\r\nbad,row,here\r\n')
    _write(folder / "test.csv", "text,category\r\n")
    with pytest.raises(DataError, match=r"train\.csv: line 4: malformed row"):
        load_banking77(root=tmp_path)


def test_label_not_in_label_map(tmp_path: Path) -> None:
    path = _write(tmp_path / "dev.txt.gz", "Merlin\tperson-wizard\n\n")
    from conpet_lightning.data.readers.fewnerd import read_mentions

    with pytest.raises(DataError, match=r"dev\.txt\.gz: line 1: label 'person-wizard' is not in the FewNERD label map"):
        list(read_mentions(path, {"person-artist/author"}))

    root = _fewrel_root(tmp_path / "fr")
    row = {"token": ["a", "b"], "h": {"pos": [0, 1]}, "t": {"pos": [1, 2]}, "relation": "made up relation"}
    _write(root / "fewrel/wiki80/train_0.1.txt", json.dumps(row) + "\n")
    with pytest.raises(DataError, match=r"train_0\.1\.txt: line 1: relation 'made up relation' is not in the FewRel"):
        load_fewrel(root=root)

    folder = tmp_path / "textcls/banking77"
    shutil.copy(DATA / "textcls/banking77/categories.json", _write(folder / "categories.json", ""))
    _write(folder / "train.csv", "text,category\r\nbeam me up,teleport\r\n")
    _write(folder / "test.csv", "text,category\r\n")
    with pytest.raises(DataError, match=r"train\.csv: line 2: label 'teleport' is not in categories\.json"):
        load_banking77(root=tmp_path)


def test_task_split_repeats_or_misses_classes(tmp_path: Path) -> None:
    path = _write(tmp_path / "split.json", json.dumps({"p1": [0, 1], "p2": [1, 3], "all": [0, 1, 2, 3]}))
    with pytest.raises(DataError, match=r"repeated class ids: \[1\], missing class ids: \[2\]"):
        load_task_split(path, num_classes=4)
    ok = _write(tmp_path / "ok.json", json.dumps({"p2": [2, 3], "p1": [1, 0]}))
    assert load_task_split(ok, 4) == [[1, 0], [2, 3]]  # task order by number, ids as stored

    root = _fewrel_root(tmp_path / "fr")  # a broken shipped split stops the reader too
    split_path = root / "conpet_splits/fewrel_class_split_p10_tags.json"
    split = json.loads(split_path.read_text())
    split["p10"] = split["p10"][:-1] + [0]
    split_path.write_text(json.dumps(split))
    with pytest.raises(DataError, match=r"repeated class ids: \[0\], missing class ids: \[78\]"):
        load_fewrel(root=root)


def test_unknown_benchmark_lists_names() -> None:
    names = "banking77, clinc150, conpet_json, fewnerd, fewrel"
    with pytest.raises(DataError, match=rf"unknown benchmark 'fewrell'; valid names: {names}"):
        load_benchmark("fewrell")


def _ace_folder(folder: Path, bad_tag: bool = False) -> Path:
    """ConPET key files for ACE (p5): one record per task and part; tags taken from the shipped split."""
    split = json.loads((DATA / "conpet_splits/ace_class_split_p5_tags.json").read_text())
    text = f"[unused0] A [unused1] met [unused2] B [unused3] .{TEMPLATE_START} B is the {MASK} of A."
    for part in ("train", "valid", "test"):
        entries = [[[f"{part}-{k}-{k}", split[f"p{k + 1}"][0], text]] for k in range(5)]
        if bad_tag and part == "valid":
            entries[1][0][1] = split["p1"][0]  # a p1 class inside the p2 entry
        _write(folder / f"ace_split_{part}_dataset_p5_key.json", json.dumps(entries))
    return folder


def test_conpet_json_loads_a_valid_folder(tmp_path: Path) -> None:
    benchmark = load_benchmark("conpet_json", root=DATA, local_path=_ace_folder(tmp_path), conpet_dataset="ace")
    labels = json.loads((DATA / "conpet_splits/ace_label_to_tag.json").read_text())
    assert (benchmark.name, benchmark.task_type) == ("ace", "relation")
    assert (benchmark.num_classes, benchmark.num_tasks) == (18, 5)
    assert benchmark.label_names == sorted(labels, key=labels.get)
    assert benchmark.tasks == [[3, 7, 9, 13], [0, 1, 10, 17], [5, 6, 8, 15], [2, 11, 12], [4, 14, 16]]
    assert [r.label for r in benchmark.iter_records("test")] == [3, 0, 5, 2, 4]
    assert benchmark.parts["train"][2][0] == Record("train-2-2", 5, 2, benchmark.parts["train"][2][0].text)
    assert benchmark.stats()["totals"] == {"train": 5, "valid": 5, "test": 5}


def test_conpet_json_errors(tmp_path: Path) -> None:
    folder = _ace_folder(tmp_path / "bad", bad_tag=True)
    with pytest.raises(DataError, match=r"ace_split_valid_dataset_p5_key\.json: task entry 1, item 0 .*tag 3 "):
        load_benchmark("conpet_json", root=DATA, local_path=folder, conpet_dataset="ace")
    with pytest.raises(DataError, match="needs local_path"):
        load_benchmark("conpet_json", root=DATA, conpet_dataset="ace")
    with pytest.raises(DataError, match="needs conpet_dataset"):
        load_benchmark("conpet_json", root=DATA, local_path=folder)
    with pytest.raises(DataError, match=r"missing data file: .*tacred_split_train_dataset_p10_key\.json"):
        load_benchmark("conpet_json", root=DATA, local_path=folder, conpet_dataset="tacred")
    with pytest.raises(DataError, match="unknown ConPET dataset 'conll'"):
        load_benchmark("conpet_json", root=DATA, local_path=folder, conpet_dataset="conll")


def test_benchmark_validate_catches_bad_records() -> None:
    good = Record("train-0-0", 0, 0, "x")
    parts = {"train": [[good], []], "valid": [[], []], "test": [[], []]}
    bench = Benchmark("t", "relation", ["a", "b"], [[0], [1]], parts)
    bench.validate()
    bench.parts["valid"][1].append(Record("valid-1-0", 0, 1, "y"))  # class 0 is task 0's
    with pytest.raises(DataError, match=r"record 'valid-1-0' .* task 1 holds classes \[1\]"):
        bench.validate()
    bench.parts["valid"][1][0] = Record("train-0-0", 1, 1, "y")
    with pytest.raises(DataError, match="duplicate record key 'train-0-0'"):
        bench.validate()
    bench.tasks = [[0, 1], [1]]
    with pytest.raises(DataError, match=r"repeated: \[1\]"):
        bench.validate()


def test_split_per_class_small_classes() -> None:
    labels = [0] * 10 + [1] * 5 + [2]
    parts = split_per_class(labels, seed=5)
    assert [parts[:10].count(p) for p in ("train", "valid", "test")] == [8, 1, 1]
    assert [parts[10:15].count(p) for p in ("train", "valid", "test")] == [3, 1, 1]
    assert parts[15] == "train"  # a single example always trains
    assert parts == split_per_class(labels, seed=5)
    assert parts != split_per_class(labels, seed=6)
