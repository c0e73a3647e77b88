"""Experiment composition and strict validation."""

from pathlib import Path

import pytest

from conpet_lightning.config import ConfigError, load_config
from conpet_lightning.registry import CALLBACKS, METHODS

EXPERIMENTS = sorted(p.stem for p in Path("experiments").glob("*.yaml") if not p.stem.startswith("_"))


def test_experiment_is_base_plus_diff():
    cfg = load_config("dynamic_conpet")
    assert cfg.experiment == "dynamic_conpet"
    assert cfg.method["name"] == "dynamic_conpet"
    assert cfg.data.benchmark == "fewrel"  # from _base.yaml
    assert cfg.callbacks["replay"]["name"] == "dynamic_replay"  # preset expanded
    assert cfg.callbacks["routing"]["topk"] == 1


def test_extends_and_null_removes_a_callback():
    cfg = load_config("dynamic_no_selector")
    assert "routing" not in cfg.callbacks
    assert cfg.method["selector"] is False
    assert cfg.callbacks["replay"]["policy"] == 2


def test_command_line_overrides_win_and_ablate_callbacks():
    cfg = load_config("dynamic_conpet", ["callbacks.replay.policy=1", "callbacks.routing.topk=2", "train.epochs=5"])
    assert cfg.callbacks["replay"]["policy"] == 1
    assert cfg.callbacks["routing"]["topk"] == 2
    assert cfg.train.epochs == 5


def test_scale_paper_applies_dataset_budget_and_cli_still_wins():
    cfg = load_config("naive", ["scale=paper", "data.benchmark=fewnerd"])
    assert cfg.data.max_seq_len == 256 and cfg.train.epochs == 10
    assert cfg.data.max_train_per_class is None
    cfg = load_config("naive", ["scale=paper", "train.epochs=3"])
    assert cfg.train.epochs == 3


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match="trian"):
        load_config("naive", ["trian.epochs=3"])
    with pytest.raises(ConfigError, match="epochs"):
        load_config("naive", ["train.epochs=many"])


def test_unknown_experiment_and_scale():
    with pytest.raises(ConfigError, match="available"):
        load_config("no_such_experiment")
    with pytest.raises(ConfigError, match="scale='huge'"):
        load_config("naive", ["scale=huge"])


def test_missing_preset_file_is_named(tmp_path):
    exp = tmp_path / "x.yaml"
    exp.write_text("method: {name: naive}\ncallbacks:\n  replay: {preset: nope}\n")
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(exp, experiments_dir=Path("experiments"))


@pytest.mark.parametrize("scale", ["cpu", "paper"])
@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_composes_with_registered_names(name, scale):
    cfg = load_config(name, [f"scale={scale}"])
    assert cfg.method["name"] in METHODS.names()
    for entry in cfg.callbacks.values():
        assert entry["name"] in CALLBACKS.names()


def test_scale_overlay_tunes_callbacks_but_never_adds_one():
    # dynamic_sim_pro removes the replay callback that dynamic_conpet's paper overlay gives a batch_limit
    assert "replay" not in load_config("dynamic_sim_pro", ["scale=paper"]).callbacks
    assert load_config("dynamic_conpet", ["scale=paper"]).callbacks["replay"]["batch_limit"] == 400
    fewnerd = load_config("dynamic_conpet", ["scale=paper", "data.benchmark=fewnerd"])
    assert fewnerd.callbacks["replay"]["batch_limit"] == 2500
    assert fewnerd.method["selector_logit_adjustment"] == 0.0  # ConPET's plain selector CE at paper scale


def test_every_registered_method_has_an_experiment():
    used = {load_config(name).method["name"] for name in EXPERIMENTS}
    assert set(METHODS.names()) <= used
