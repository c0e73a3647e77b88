"""The declared contract: capabilities checked at composition, options checked before loading, no hidden seams."""

from __future__ import annotations

import ast
from dataclasses import fields
from pathlib import Path

import pytest

import conpet_lightning.loop as loop_module
from conpet_lightning.cli import main
from conpet_lightning.config import (
    LICENSED_BENCHMARKS,
    SHIPPED_BENCHMARKS,
    ConfigError,
    experiment_names,
    load_config,
)
from conpet_lightning.contract import CAPABILITIES, missing_capabilities
from conpet_lightning.registry import CALLBACKS, METHODS

SRC = Path(__file__).resolve().parents[1] / "src" / "conpet_lightning"


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
    return out


def test_no_callback_imports_a_method():
    offenders = {p.name: m for p in (SRC / "callbacks").glob("*.py") for m in _imports(p) if ".methods" in m}
    assert offenders == {}


def test_no_seam_is_found_by_hasattr_or_by_scanning_trainer_callbacks():
    for folder in ("callbacks", "methods"):
        for path in (SRC / folder).rglob("*.py"):
            tree = ast.parse(path.read_text())
            for node in ast.walk(tree):
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):  # probing: hasattr, getattr(x, n, d)
                    probe = node.func.id == "hasattr" or (node.func.id == "getattr" and len(node.args) == 3)
                    assert not probe, f"{path.name}:{node.lineno}"
                if isinstance(node, ast.Attribute) and node.attr == "callbacks":
                    owner = node.value
                    assert not (isinstance(owner, ast.Attribute) and owner.attr == "trainer"), f"{path.name}"


def test_every_method_declares_its_options_and_implements_what_its_callbacks_require():
    for name in METHODS.names():
        cls = METHODS.get(name)
        assert hasattr(cls, "options_cls"), name
        cls.options_cls()  # the defaults themselves are valid
    for name in CALLBACKS.names():
        cb = CALLBACKS.get(name)
        assert all(proto in CAPABILITIES.values() for proto in cb.requires), name
    dynamic = METHODS.get("dynamic_conpet")
    assert missing_capabilities(dynamic, CALLBACKS.get("topk_routing").requires) == []
    assert missing_capabilities(METHODS.get("emr"), CALLBACKS.get("topk_routing").requires) == ["Routable"]


@pytest.mark.parametrize("experiment", experiment_names())
def test_every_experiment_composes_at_every_scale_and_benchmark(experiment):
    for scale in ("cpu", "paper"):
        for bench in (*SHIPPED_BENCHMARKS, *LICENSED_BENCHMARKS):
            data = (
                ["data.benchmark=conpet_json", f"data.conpet_dataset={bench}", "data.local_path=/x"]
                if bench in LICENSED_BENCHMARKS
                else [f"data.benchmark={bench}"]
            )
            cfg = load_config(experiment, [f"scale={scale}", *data])
            options = METHODS.get(cfg.method["name"]).options_cls
            assert set(cfg.method) == {f.name for f in fields(options)}  # every option filled in from its dataclass
    paper = load_config(experiment, ["scale=paper", "data.benchmark=fewnerd"])
    if "replay" in paper.callbacks:
        assert paper.callbacks["replay"]["batch_limit"] == 2500  # ConPET's FewNERD budget, from the one table


def test_a_callback_paired_with_a_method_that_lacks_its_capability_is_refused():
    with pytest.raises(ConfigError, match="MemoryFeatureSource"):
        load_config("dynamic_conpet", ["callbacks.memory.preset=episodic_memory"])
    with pytest.raises(ConfigError, match="Routable"):
        load_config("emr_star", ["callbacks.routing.preset=topk_routing"])


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("callbacks.routing.topk=0", "callbacks.routing.topk=0"),
        ("method.selector_init=x", "method.selector_init='x'"),
        ("callbacks.replay.batch_limit=-3", "callbacks.replay.batch_limit=-3"),
        ("callbacks.routing.bogus=1", "callbacks.routing.bogus"),
        ("callbacks.routing=selector method.selector=false", "callbacks.routing"),
    ],
)
def test_bad_options_exit_2_with_one_line_before_anything_loads(override, named, capsys, monkeypatch, tmp_path):
    def no_load(*args, **kwargs):
        raise AssertionError("the model or data was loaded before the options were checked")

    monkeypatch.setattr(loop_module, "load_backbone", no_load)
    monkeypatch.setattr(loop_module, "load_benchmark", no_load)
    assert main(["run", "dynamic_conpet", *override.split(), f"output_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("conpet: error:") and named in err[0], err
    assert not any(tmp_path.iterdir())  # no run folder was made


def test_a_scale_overlay_for_a_slot_the_experiment_lacks_is_an_error(tmp_path):
    exp = tmp_path / "exps"
    exp.mkdir()
    (exp / "mine.yaml").write_text(
        "method: {name: naive}\nscales:\n  paper:\n    fewrel:\n      callbacks: {replay: {batch_limit: 4}}\n"
    )
    with pytest.raises(ConfigError, match="tunes a callback slot the experiment does not have"):
        load_config("mine", experiments_dir=exp)


def test_config_command_prints_every_option_with_its_doc(capsys):
    assert main(["config", "dynamic_conpet", "callbacks.routing.topk=2"]) == 0
    out = capsys.readouterr().out
    assert "topk: 2  # " in out and "(default: 1)" in out
    assert "selector_init: 'from_prev_expert'  # from_prev_expert (from expert k-1 at every task" in out
    assert "batch_limit: 50  # Batches per epoch" in out


def test_one_override_swaps_a_callback_for_a_preset():
    cfg = load_config("dynamic_conpet", ["callbacks.routing=prototype"])
    assert cfg.callbacks["routing"]["name"] == "prototype_routing"
    with pytest.raises(ConfigError, match="no such preset"):
        load_config("dynamic_conpet", ["callbacks.routing=nope"])
    # the swapped preset's own options follow it on the same command line; the old router's options do not
    swap = ["callbacks.routing.topk=2", "callbacks.routing=prototype", "callbacks.routing.features=backbone"]
    cfg = load_config("dynamic_conpet", swap)
    assert cfg.callbacks["routing"]["name"] == "prototype_routing"
    assert cfg.callbacks["routing"]["features"] == "backbone" and "teacher_forcing" not in cfg.callbacks["routing"]
    assert load_config("dynamic_conpet", ["callbacks.routing=prototype_backbone"]).callbacks["routing"] == dict(
        cfg.callbacks["routing"]
    )
    with pytest.raises(ConfigError, match="featurs"):
        load_config("dynamic_conpet", ["callbacks.routing=prototype", "callbacks.routing.featurs=backbone"])
