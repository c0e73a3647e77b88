"""``conpet eval``: a finished run re-tested from its saved weights, as it ran or with another router."""

from __future__ import annotations

import json

import pytest

from conpet_lightning.cli import main
from conpet_lightning.config import ConfigError
from conpet_lightning.evaluate import eval_config, eval_name
from tests.helpers import tiny_loop


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A tiny 3-task dynamic_conpet run with ConPET's selector."""
    loop = tiny_loop("dynamic_conpet", tmp_path_factory.mktemp("evalrun"), "callbacks.routing=selector", num_tasks=3)
    return loop.run_dir, loop.run()


def test_eval_without_override_reproduces_the_run_exactly(finished_run):
    run_dir, metrics = finished_run
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    assert main(["eval", str(run_dir)]) == 0
    out = json.loads((run_dir / "evals" / "as_run" / "metrics.json").read_text())
    assert out["accuracy_matrix"] == metrics["accuracy_matrix"]
    timing = "test_samples_per_s"  # a wall-clock rate, the one panel entry that cannot repeat
    for ran, again in zip(metrics["per_task"][1:], out["per_task"][1:], strict=True):
        assert again["selector"][timing] > 0 and ran["selector"][timing] > 0
        del again["selector"][timing], ran["selector"][timing]
        assert again["selector"] == ran["selector"]  # the same routes, sample by sample (confusion matrices)
    assert out["summary"]["acc_macro"] == metrics["summary"]["acc_macro"]
    after = {p: p.read_bytes() for p in before}
    assert after == before  # nothing of the run itself was rewritten


def test_eval_with_another_router_writes_its_own_eval(finished_run):
    run_dir, metrics = finished_run
    assert main(["eval", str(run_dir), "callbacks.routing=prototype", "callbacks.routing.features=backbone"]) == 0
    folder = run_dir / "evals" / "routing=prototype,features=backbone"
    out = json.loads((folder / "metrics.json").read_text())
    assert out["router"]["name"] == "prototype_routing" and out["router"]["features"] == "backbone"
    assert [len(r) for r in out["accuracy_matrix"]] == [len(r) for r in metrics["accuracy_matrix"]]
    panels = [t["selector"] for t in out["per_task"][1:]]
    assert all(p["router"] == "prototype_routing" for p in panels)
    assert [p["confusion"] for p in panels] != [t["selector"]["confusion"] for t in metrics["per_task"][1:]]
    assert "prototype_routing" in (folder / "config.yaml").read_text()


def test_eval_takes_overrides_after_its_name_option(finished_run, capsys):
    run_dir, _ = finished_run
    assert main(["eval", str(run_dir), "--name", "named", "callbacks.routing=prototype_backbone"]) == 0
    out = json.loads((run_dir / "evals" / "named" / "metrics.json").read_text())
    assert out["router"]["name"] == "prototype_routing" and out["router"]["features"] == "backbone"
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", str(run_dir), "--name", "x", "--bogus"])
    assert exit_info.value.code == 2 and "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_eval_refuses_training_keys_and_unknown_presets(finished_run):
    run_dir, _ = finished_run
    with pytest.raises(ConfigError, match="not allowed"):
        eval_config(run_dir, ["train.lr=0.1"])
    with pytest.raises(ConfigError, match="no preset"):
        eval_config(run_dir, ["callbacks.routing=nonexistent"])
    assert main(["eval", str(run_dir), "method.selector=false"]) == 2


def test_eval_name_and_selector_override():
    assert eval_name([]) == "as_run"
    assert eval_name(["callbacks.routing.preset=energy", "callbacks.routing.kind=max_logit"]) == (
        "routing=energy,kind=max_logit"
    )


def test_report_shows_evals_beside_their_run(finished_run):
    from conpet_lightning.reporting.report import report

    run_dir, metrics = finished_run
    assert main(["eval", str(run_dir), "callbacks.routing=energy", "--name", "energy"]) == 0
    table = report([run_dir])
    header = table.splitlines()[0]
    assert "eval:energy" in header and header.index("dynamic_conpet (run)") < header.index("eval:energy")
    assert "routing_task_id_acc_macro" in table
    out = json.loads((run_dir / "evals" / "energy" / "metrics.json").read_text())
    assert out["summary"]["routing_task_id_acc_macro"] == out["per_task"][-1]["selector"]["acc_macro"]
