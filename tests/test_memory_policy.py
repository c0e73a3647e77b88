"""Episodic memory: exemplar selection (k-means, herding, random), reservoir, memory split, EMR replay frequency."""

from __future__ import annotations

import numpy as np
import pytest

from conpet_lightning.policies import (
    ReservoirBuffer,
    emr_replay_frequency,
    herding_order,
    select_exemplars,
    split_memory,
)


def blobs(centres: list[tuple[float, float]], start: int = 0) -> np.ndarray:
    """Each blob: its centre point plus 4 points around it, so the centroid is exactly the centre sample.

    Rows per blob: [centre, +x, -x, +y, -y]; centre rows are start, start+5, start+10, ...
    """
    offsets = np.array([[0, 0], [0.1, 0], [-0.1, 0], [0, 0.1], [0, -0.1]])
    return np.concatenate([np.asarray(c) + offsets for c in centres])


def test_kmeans_picks_the_point_nearest_each_centre() -> None:
    x = blobs([(0, 0), (10, 0), (0, 10)])
    rng = np.random.default_rng(0)
    order = rng.permutation(len(x))  # shuffle rows so the answer is not just "the first row of each block"
    x = x[order]
    centres = np.sort(np.flatnonzero(np.isin(order, [0, 5, 10])))
    picked = select_exemplars(x, np.zeros(len(x), dtype=int), per_class=3, method="kmeans", seed=0)
    assert picked.tolist() == centres.tolist()


def test_kmeans_per_class_and_two_classes() -> None:
    x = np.concatenate([blobs([(0, 0), (10, 0), (0, 10)]), blobs([(50, 50), (60, 50), (50, 60), (60, 60)])])
    labels = np.array([0] * 15 + [1] * 20)
    picked = select_exemplars(x, labels, per_class=4, method="kmeans", seed=1)
    # class 1 has 4 blobs: exactly its 4 centres; class 0 has 3 blobs for 4 centroids: its 4 picks stay distinct
    assert set(picked[labels[picked] == 1].tolist()) == {15, 20, 25, 30}
    assert (labels[picked] == 0).sum() == 4 and len(set(picked.tolist())) == 8
    many = select_exemplars(x, labels, per_class=17, method="kmeans", seed=1)
    assert len(many) == 32 and len(set(many.tolist())) == 32  # all 15 of class 0, 17 distinct of class 1
    assert (labels[many] == 0).sum() == 15


@pytest.mark.parametrize("method", ["kmeans", "herding", "random"])
def test_per_class_larger_than_class_keeps_the_class(method: str) -> None:
    rng = np.random.default_rng(3)
    x, labels = rng.normal(size=(12, 4)), np.array([0] * 3 + [1] * 9)
    picked = select_exemplars(x, labels, per_class=5, method=method, seed=0)
    assert picked.tolist() == sorted(picked.tolist())
    assert set(picked[labels[picked] == 0].tolist()) == {0, 1, 2}
    assert (labels[picked] == 1).sum() == 5 and len(set(picked.tolist())) == 8
    assert select_exemplars(x, labels, per_class=0, method=method).size == 0


def test_herding_first_pick_is_nearest_the_mean() -> None:
    # unit vectors at these angles; normalised mean points near 20 degrees, so 20 is nearest, then the greedy
    # pair that keeps the running mean closest to it
    angles = np.deg2rad([0, 20, 45, 90, -30])
    x = np.stack([np.cos(angles), np.sin(angles)], 1) * np.array([[1], [3], [0.5], [2], [7]])  # norms do not matter
    order = herding_order(x, 5)
    assert order[0] == 1
    assert sorted(order.tolist()) == [0, 1, 2, 3, 4]
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    mu = unit.mean(0)
    second = min((i for i in range(5) if i != 1), key=lambda i: np.linalg.norm(mu - (unit[1] + unit[i]) / 2))
    assert order[1] == second
    assert select_exemplars(x, np.zeros(5, dtype=int), per_class=1, method="herding").tolist() == [1]


def test_random_selection_is_seeded() -> None:
    labels = np.repeat([0, 1, 2], 20)
    x = np.zeros((60, 2))
    a = select_exemplars(x, labels, per_class=4, method="random", seed=11)
    assert a.tolist() == select_exemplars(x, labels, per_class=4, method="random", seed=11).tolist()
    assert a.tolist() != select_exemplars(x, labels, per_class=4, method="random", seed=12).tolist()
    assert np.bincount(labels[a]).tolist() == [4, 4, 4]


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="kmeans, herding, random"):
        select_exemplars(np.zeros((2, 2)), np.zeros(2), 1, method="icarl")
    with pytest.raises(ValueError, match=r"\(3,\)"):
        select_exemplars(np.zeros((2, 2)), np.zeros(3), 1)
    with pytest.raises(ValueError, match="capacity"):
        ReservoirBuffer(-1)


def test_reservoir_capacity_seed_and_uniformity() -> None:
    buf = ReservoirBuffer(10, seed=3)
    buf.add(range(1000))
    assert len(buf) == 10 and buf.seen == 1000 and len(set(buf.items.tolist())) == 10
    again = ReservoirBuffer(10, seed=3)
    again.add(range(500))
    again.add(range(500, 1000))  # chunking the stream does not matter
    assert again.items.tolist() == buf.items.tolist()
    other = ReservoirBuffer(10, seed=4)
    other.add(range(1000))
    assert other.items.tolist() != buf.items.tolist()
    short = ReservoirBuffer(10)
    short.add([7, 8, 9])
    assert short.items.tolist() == [7, 8, 9]
    # resume: state after 500 items, then the rest, equals one uninterrupted stream
    half = ReservoirBuffer(10, seed=3)
    half.add(range(500))
    resumed = ReservoirBuffer(10, seed=99)
    resumed.load_state_dict(half.state_dict())
    resumed.add(range(500, 1000))
    assert resumed.items.tolist() == buf.items.tolist()
    # every stream position is kept with probability capacity / length = 0.25
    hits = np.zeros(20)
    for s in range(2000):
        r = ReservoirBuffer(5, seed=s)
        r.add(range(20))
        hits[r.items] += 1
    assert np.abs(hits / 2000 - 0.25).max() < 0.04


def test_split_memory_per_class_ceil() -> None:
    indices = np.arange(100, 118)
    labels = np.array([0] * 10 + [1] * 3 + [2] * 5)
    train, valid = split_memory(indices, labels, train_fraction=0.8, seed=0)
    lab = dict(zip(indices.tolist(), labels.tolist()))
    assert [sum(lab[i] == c for i in train) for c in range(3)] == [8, 3, 4]  # ceil(8.0), ceil(2.4), ceil(4.0)
    assert [sum(lab[i] == c for i in valid) for c in range(3)] == [2, 0, 1]
    assert sorted(train.tolist() + valid.tolist()) == indices.tolist()
    assert train.tolist() == sorted(train.tolist())
    again = split_memory(indices, labels, 0.8, seed=0)
    assert again[0].tolist() == train.tolist()
    with pytest.raises(ValueError, match="equal-length"):
        split_memory(indices, labels[:-1])


def test_emr_replay_frequency_worked_numbers() -> None:
    # FewRel-like: 8 new classes x 448 train, M=50 -> 40 train exemplars per class, 8 old classes, batch 8
    # limit 1000: room = 800*8 - 3584 = 2816; 2816 / (40*8) = 8.8 -> 9
    assert emr_replay_frequency(1000, 8, 3584, 40, 8, base=5) == 9
    # limit 400: 320*8 = 2560 < 3584 new samples -> no room, the base value
    assert emr_replay_frequency(400, 8, 3584, 40, 8, base=5) == 5
    # exact division: ceil(0.8*35) = 28 (not 29), room = 28*8 - 104 = 120 = 4 * (10*3)
    assert emr_replay_frequency(35, 8, 104, 10, 3, base=5) == 4
    assert emr_replay_frequency(1000, 8, 3584, 40, 0, base=5) == 1  # first task: no memory to repeat
    with pytest.raises(ValueError, match="batch_size"):
        emr_replay_frequency(1000, 0, 3584, 40, 8, base=5)


def test_kmeans_centroids_sharing_a_nearest_sample_take_the_next_nearest(monkeypatch: pytest.MonkeyPatch) -> None:
    class FixedCentres:
        """Stands in for KMeans with two centroids whose nearest sample is the same (row 0)."""

        def __init__(self, **kwargs: object) -> None:
            self.cluster_centers_ = np.array([[0.0, 0.0], [0.01, 0.0], [5.0, 5.0]])

        def fit(self, x: np.ndarray) -> FixedCentres:
            return self

    monkeypatch.setattr("conpet_lightning.policies.memory.KMeans", FixedCentres)
    x = np.array([[0.0, 0.0], [1.0, 0.0], [5.0, 5.0], [6.0, 6.0], [9.0, 9.0]])
    assert select_exemplars(x, np.zeros(5, dtype=int), per_class=3, method="kmeans").tolist() == [0, 1, 2]
