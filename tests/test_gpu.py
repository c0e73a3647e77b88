"""GPU runs (``make test-gpu``): mixed precision and two-GPU NCCL DDP; every test skips without CUDA."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import tiny_loop

pytestmark = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@needs_cuda
@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_dynamic_conpet_in_mixed_precision_on_one_gpu(precision: str, tmp_path: Path) -> None:
    loop = tiny_loop("dynamic_conpet", tmp_path, "train.accelerator=gpu", f"train.precision={precision}", num_tasks=3)
    out = loop.run()
    assert len(out["accuracy_matrix"]) == 3
    assert all(v is not None for v in out["accuracy_matrix"][2])
    assert out["summary"]["budget_steps"] > 0


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_two_gpu_nccl_ddp_matches_one_gpu(tmp_path: Path) -> None:
    driver = tmp_path / "driver.py"
    driver.write_text(
        "import sys\nfrom pathlib import Path\nrepo, out, n = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])\n"
        "sys.path.insert(0, str(repo))\nimport torch\nfrom conpet_lightning.loop import TaskLoop\n"
        "from tests.helpers import tiny_config\n"
        "cfg = tiny_config('dynamic_conpet', out, 'train.accelerator=gpu', 'model.dropout=0', 'train.epochs=2',\n"
        "                  f'train.devices={n}', 'train.strategy=' + ('ddp' if n > 1 else 'auto'), num_tasks=3)\n"
        "TaskLoop(cfg, out / 'run').run()\n"
        "if torch.distributed.is_initialized():\n    torch.distributed.barrier()\n"
    )
    repo = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "LOCAL_RANK"}
    R = {}
    for n in (1, 2):
        folder = tmp_path / f"gpu{n}"
        folder.mkdir()
        proc = subprocess.run([sys.executable, str(driver), str(repo), str(folder), str(n)], env=env, timeout=900)
        assert proc.returncode == 0
        R[n] = json.loads((folder / "run" / "metrics.json").read_text())
    tasks = R[1]["tasks"]
    for row1, row2 in zip(R[1]["accuracy_matrix"], R[2]["accuracy_matrix"], strict=True):
        for j, (a, b) in enumerate(zip(row1, row2, strict=True)):
            assert (a is None and b is None) or abs(a - b) <= 100 / tasks[j]["n_test"] + 1e-6
