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


def test_pad_to_multiple_of_rounds_the_width_and_masks_the_extra_tokens(tmp_path) -> None:
    import torch

    from conpet_lightning.data.datamodule import collate

    loop = tiny_loop("naive", tmp_path, "data.pad_to_multiple_of=7", num_tasks=1)
    dm = loop.datamodule
    items = [dm.item("test", int(i)) for i in dm.indices("test", 0)[:5]]
    plain, padded = collate(items, dm.pad_id), collate(items, dm.pad_id, dm.pad_to_multiple_of)
    width = plain["input_ids"].shape[1]
    assert width % 7 != 0 and padded["input_ids"].shape[1] == -(-width // 7) * 7
    assert torch.equal(padded["input_ids"][:, :width], plain["input_ids"])
    assert torch.equal(padded["attention_mask"].sum(1), plain["attention_mask"].sum(1))  # extra tokens are masked
    for batch in dm.test_dataloader():  # the loaders use it
        longest = int(batch["attention_mask"].sum(1).max())
        assert batch["input_ids"].shape[1] == -(-longest // 7) * 7
    loop.method.eval()
    with torch.no_grad():  # the masked tokens change no prediction
        assert torch.equal(loop.method.predict(plain), loop.method.predict(padded))
