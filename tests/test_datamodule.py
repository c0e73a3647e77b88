"""The data module's evaluation loaders: every seen sample exactly once, batched by length, sharded across ranks."""

from __future__ import annotations

from collections import Counter

import pytest

from tests.helpers import tiny_loop


@pytest.mark.parametrize("world", [1, 2])
def test_test_loader_serves_every_seen_sample_once_in_length_order(tmp_path, monkeypatch, world: int) -> None:
    dm = tiny_loop("naive", tmp_path, num_tasks=3).datamodule
    dm.set_task(2)
    expected = Counter(dm.item("test", int(i))["key"] for i in dm.seen_indices("test"))
    served: Counter[str] = Counter()
    for rank in range(world):
        monkeypatch.setattr(dm, "_rank_world", lambda rank=rank: (rank, world))
        lengths = []
        for batch in dm.test_dataloader():
            served.update(batch["keys"])
            lengths.extend(batch["attention_mask"].sum(dim=1).tolist())
        assert lengths == sorted(lengths) and len(set(lengths)) > 1  # grouped by length, and lengths do vary
    assert served == expected
