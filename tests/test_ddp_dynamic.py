"""Dynamic ConPET on two CPU processes (gloo) gives the one-process run's R, with each router it ships by default.

The CPU default routes by backbone prototypes (every rank fits the same statistics from the whole task's training
data); ``scale=paper`` and ``callbacks.routing=selector`` route by ConPET's selector, trained under DDP like an expert.

With backbone dropout off (``model.dropout=0``) a step's gradient is the mean over the global batch either way (two
equal shards of one global plan), so the runs differ only by the order of floating-point sums; R may differ where a
prediction sits on a tie. The stated tolerance: at most one test sample per task (100 / n_test points).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.helpers import run_world

DRIVER = """
import sys
from pathlib import Path
repo, out, devices = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
sys.path.insert(0, str(repo))
import torch
from conpet_lightning.loop import TaskLoop
from tests.helpers import tiny_config
strategy = "ddp" if devices > 1 else "auto"
cfg = tiny_config("dynamic_conpet", out, "train.num_threads=1", "train.epochs=2", "model.dropout=0",
                  f"train.devices={devices}", f"train.strategy={strategy}", "callbacks.routing=ROUTER", num_tasks=3)
TaskLoop(cfg, out / "run").run()
if torch.distributed.is_initialized():
    torch.distributed.barrier()
"""


@pytest.mark.slow
@pytest.mark.parametrize("router", ["prototype_backbone", "selector"])
def test_two_process_ddp_matches_one_process(tmp_path: Path, router: str) -> None:
    results = {}
    for world in (1, 2):
        folder = tmp_path / f"ws{world}"
        run_world(DRIVER.replace("ROUTER", router), folder, world)
        results[world] = json.loads((folder / "run" / "metrics.json").read_text())
    one, two = results[1], results[2]
    ran = yaml.safe_load((tmp_path / "ws2" / "run" / "config.yaml").read_text())["callbacks"]["routing"]["name"]
    assert ran == {"prototype_backbone": "prototype_routing", "selector": "topk_routing"}[router]
    assert [t["n_test"] for t in one["tasks"]] == [t["n_test"] for t in two["tasks"]]
    for row_one, row_two in zip(one["accuracy_matrix"], two["accuracy_matrix"], strict=True):
        for j, (a, b) in enumerate(zip(row_one, row_two, strict=True)):
            if a is None:
                assert b is None
                continue
            assert abs(a - b) <= 100 / one["tasks"][j]["n_test"] + 1e-6, (
                one["accuracy_matrix"],
                two["accuracy_matrix"],
            )
    steps = [[s["steps"] for s in t["stages"].values()] for t in one["per_task"]]
    assert steps == [[s["steps"] for s in t["stages"].values()] for t in two["per_task"]]
