"""The CPU kernel caches are capped and free heap pages go back to the system (conpet_lightning.native_memory)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.common import heap_in_use_mb
from conpet_lightning.native_memory import KERNEL_CACHE_CAPACITY, KERNEL_CACHE_ENV, cap_kernel_caches

REPO = Path(__file__).resolve().parents[1]
GLIBC = heap_in_use_mb() is not None

#: A child that runs a bf16 linear layer over 200 new row counts and reports its heap in use after 100 and 200.
SHAPES_CHILD = """
import json, sys
import conpet_lightning  # caps the kernel caches unless the environment names a capacity
import torch
from bench.common import heap_in_use_mb
torch.set_num_threads(1)
layer = torch.nn.Linear(64, 256)
x = torch.randn(200, 16, 64)
heap = []
with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
    for rows in range(1, 201):
        layer(x[:rows])
        if rows in (100, 200):
            heap.append(heap_in_use_mb())
print(json.dumps(heap))
"""


def _heap_growth(env: dict[str, str]) -> float:
    """MiB the child's heap grew over its last 100 new shapes."""
    base = {k: v for k, v in os.environ.items() if k not in KERNEL_CACHE_ENV}
    out = subprocess.run(
        [sys.executable, "-c", SHAPES_CHILD],
        cwd=REPO,
        env={**base, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **env},
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    first, last = json.loads(out.stdout.strip().splitlines()[-1])
    return last - first


def test_cap_sets_a_default_and_keeps_a_capacity_the_user_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(KERNEL_CACHE_ENV[0], raising=False)
    monkeypatch.setenv(KERNEL_CACHE_ENV[1], "512")
    values = cap_kernel_caches()
    assert values == {KERNEL_CACHE_ENV[0]: str(KERNEL_CACHE_CAPACITY), KERNEL_CACHE_ENV[1]: "512"}
    assert os.environ[KERNEL_CACHE_ENV[0]] == str(KERNEL_CACHE_CAPACITY)


@pytest.mark.skipif(not GLIBC, reason="needs glibc's mallinfo2")
def test_capped_kernel_caches_stop_growing_with_new_shapes() -> None:
    uncapped = _heap_growth({name: "1024" for name in KERNEL_CACHE_ENV})  # the libraries' own default
    if uncapped < 4:
        pytest.skip(f"this CPU's kernels keep no per-shape state ({uncapped:.1f} MiB over 100 shapes)")
    capped = _heap_growth({})
    assert capped < 0.25 * uncapped, (capped, uncapped)


RELEASE_CHILD = """
import sys
from pathlib import Path
from conpet_lightning.native_memory import release_free_heap

def rss_mb():
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024

blocks = [bytearray(64 * 1024) for _ in range(3000)]  # 190 MiB of heap chunks (below the mmap threshold)
kept = blocks[::16] + [blocks[-1]]  # live blocks between the freed ones, and at the top, so nothing trims itself
del blocks
before = rss_mb()
released = release_free_heap()
print(released, before - rss_mb())
"""


@pytest.mark.skipif(not GLIBC or not Path("/proc/self/status").is_file(), reason="needs glibc and /proc")
def test_release_free_heap_gives_freed_pages_back() -> None:
    out = subprocess.run(
        [sys.executable, "-c", RELEASE_CHILD],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO / "src")},
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    released, dropped = out.stdout.split()
    assert released == "True"
    assert float(dropped) > 100, f"RSS dropped only {dropped} MiB"
