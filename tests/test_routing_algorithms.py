"""Routing algorithms (conpet_lightning.routing) on synthetic Gaussian tasks: pure torch, no Trainer, no model."""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Iterator

import pytest
import torch

from conpet_lightning.routing import (
    ClassStatistics,
    TaskStatistics,
    class_level_task_scores,
    class_to_task_map,
    combine,
    energy_scores,
    fit_temperature,
    likelihood_ratio_score,
    mahalanobis_task_scores,
    oracle_gap,
    per_expert_mahalanobis_scores,
    recency_bias,
    rerank_topm,
    routing_confusion,
    routing_report,
    shrinkage_intensity,
    task_id_accuracy,
)
from conpet_lightning.routing.scores import reduce_by_task

TASKS, PER_TASK, DIM = 4, 3, 16
CLASSES = TASKS * PER_TASK
C2T = class_to_task_map([list(range(t * PER_TASK, (t + 1) * PER_TASK)) for t in range(TASKS)])


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _world(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Class means and the mixing matrix of an anisotropic shared covariance (variances 0.05 .. 50)."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(DIM, DIM, generator=g, dtype=torch.float64))
    mix = q @ torch.diag(torch.logspace(math.log10(0.05), math.log10(50.0), DIM, dtype=torch.float64).sqrt())
    means = 1.5 * torch.randn(CLASSES, DIM, generator=g, dtype=torch.float64)
    return means, mix


def _draw(n_per_class: int, seed: int, world: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    means, mix = _world(world)
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(CLASSES).repeat_interleave(n_per_class)
    x = means[y] + torch.randn(len(y), DIM, generator=g, dtype=torch.float64) @ mix.T
    return x.float(), y


def _fit(x: torch.Tensor, y: torch.Tensor, shrinkage: str | float = "rblw") -> ClassStatistics:
    stats = ClassStatistics(DIM, shrinkage=shrinkage)
    for t in range(TASKS):  # task by task, as the router would see them
        rows = C2T[y] == t
        stats.update(x[rows], y[rows])
    return stats


def _pooled(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch reference: class means and the pooled within-class covariance scatter / (N - C)."""
    x = x.double()
    classes = torch.unique(y)
    means = torch.stack([x[y == c].mean(0) for c in classes])
    centered = x - means[torch.searchsorted(classes, y)]
    return means, centered.T @ centered / (len(y) - len(classes))


# --------------------------------------------------------------------------------------------------- statistics
def test_mahalanobis_routes_clearly_better_than_euclidean() -> None:
    stats = _fit(*_draw(60, seed=1)).finalize()
    x, y = _draw(50, seed=2)
    gold = C2T[y]
    acc = {
        m: float((mahalanobis_task_scores(x, stats, C2T, metric=m).argmax(1) == gold).double().mean())
        for m in ("mahalanobis", "euclidean")
    }
    assert acc["mahalanobis"] > 0.9
    assert acc["mahalanobis"] - acc["euclidean"] > 0.2, acc


def test_streaming_statistics_equal_the_batch_computation() -> None:
    x, y = _draw(30, seed=3)
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(y), generator=g)  # classes split over uneven batches in random order
    stats = ClassStatistics(DIM)
    for chunk in torch.split(order, [1, 7, 50, 3, 99, 200]):
        stats.update(x[chunk], y[chunk])
    means, cov = _pooled(x, y)
    idx = torch.tensor(stats.class_ids)
    assert stats.num_samples == len(y)
    assert torch.allclose(stats.means[torch.argsort(idx)], means, atol=1e-9)
    assert torch.allclose(stats.covariance_mle(), cov, atol=1e-9)
    assert torch.equal(stats.counts[torch.argsort(idx)], torch.bincount(y))
    fin = stats.finalize()
    rho = shrinkage_intensity(cov, len(y) - CLASSES, "rblw")
    target = float(torch.trace(cov)) / DIM
    expected = (1 - rho) * cov + rho * target * torch.eye(DIM, dtype=torch.float64)
    assert fin.shrinkage == pytest.approx(rho)
    assert torch.allclose(fin.covariance, expected, rtol=1e-5, atol=1e-5)
    assert torch.allclose(fin.precision @ fin.covariance, torch.eye(DIM, dtype=torch.float64), atol=1e-8)
    assert fin.logdet == pytest.approx(float(torch.logdet(fin.covariance)))


def test_fixed_shrinkage_and_rblw_close_to_exact_ledoit_wolf() -> None:
    x, y = _draw(8, seed=4)  # few samples per dimension: shrinkage matters
    fixed = _fit(x, y, shrinkage=0.3).finalize()
    means, cov = _pooled(x, y)
    target = float(torch.trace(cov)) / DIM * torch.eye(DIM, dtype=torch.float64)
    assert torch.allclose(fixed.covariance, 0.7 * cov + 0.3 * target, rtol=1e-5, atol=1e-5)
    # Exact Ledoit-Wolf (2004) intensity from the centred samples, as sklearn computes it.
    xc = x.double() - means[y]
    n = len(y) - CLASSES
    s = xc.T @ xc / n
    mu = float(torch.trace(s)) / DIM
    delta = float(((s - mu * torch.eye(DIM, dtype=torch.float64)) ** 2).sum())
    beta = float(sum(((v[:, None] * v[None, :] - s) ** 2).sum() for v in xc)) / n**2
    rho_lw = min(beta, delta) / delta
    rho_rblw = _fit(x, y).finalize().shrinkage
    assert 0.0 < rho_rblw < 1.0
    assert abs(rho_rblw - rho_lw) < 0.1, (rho_rblw, rho_lw)
    rho_oas = _fit(x, y, shrinkage="oas").finalize().shrinkage
    assert 0.0 < rho_oas < 1.0 and abs(rho_oas - rho_lw) < 0.1, (rho_oas, rho_lw)
    for bad in (1.5, "ledoit"):
        with pytest.raises(ValueError):
            ClassStatistics(DIM, shrinkage=bad)


def test_state_dict_round_trip_survives_resume() -> None:
    x, y = _draw(20, seed=5)
    a = ClassStatistics(DIM)
    for t in range(2):
        rows = C2T[y] == t
        a.update(x[rows], y[rows])
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    b = ClassStatistics(DIM)
    b.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
    for t in range(2, TASKS):
        rows = C2T[y] == t
        a.update(x[rows], y[rows])
        b.update(x[rows], y[rows])
    fa, fb = a.finalize(), b.finalize()
    assert torch.equal(fa.class_ids, fb.class_ids)
    assert torch.equal(fa.means, fb.means) and torch.equal(fa.covariance, fb.covariance)
    with pytest.raises(ValueError):
        ClassStatistics(DIM + 1).load_state_dict(a.state_dict())

    bank = TaskStatistics()
    for t in range(TASKS):
        rows = C2T[y] == t
        bank.add_task(DIM + t).update(torch.nn.functional.pad(x[rows], (0, t)), y[rows])
    other = TaskStatistics()
    other.load_state_dict(bank.state_dict())
    assert [s.dim for s in other.tasks] == [DIM + t for t in range(TASKS)]
    for fa, fb in zip(bank.finalize(), other.finalize()):
        assert torch.equal(fa.means, fb.means) and torch.equal(fa.precision, fb.precision)


# ------------------------------------------------------------------------------------------------ task scores
def _expert_spaces(seed: int = 7) -> list[torch.Tensor]:
    """Each task's 'expert' sees the features through its own invertible linear map."""
    g = torch.Generator().manual_seed(seed)
    return [torch.eye(DIM) + 0.3 * torch.randn(DIM, DIM, generator=g) for _ in range(TASKS)]


def test_per_expert_mahalanobis_routes_in_each_experts_space() -> None:
    maps = _expert_spaces()
    xtr, ytr = _draw(60, seed=1)
    bank = TaskStatistics()
    for t in range(TASKS):
        rows = C2T[ytr] == t
        bank.add_task(DIM).update(xtr[rows] @ maps[t].T, ytr[rows])
    x, y = _draw(50, seed=2)
    scores = per_expert_mahalanobis_scores([x @ a.T for a in maps], bank.finalize())
    assert scores.shape == (len(y), TASKS)
    acc = float((scores.argmax(1) == C2T[y]).double().mean())
    euclid = float(
        (mahalanobis_task_scores(x, _fit(xtr, ytr).finalize(), C2T, "euclidean").argmax(1) == C2T[y]).double().mean()
    )
    assert acc > 0.85 and acc - euclid > 0.2, (acc, euclid)
    ll = per_expert_mahalanobis_scores([x @ a.T for a in maps], bank.finalize(), loglik=True)
    shift = torch.tensor([-0.5 * (s.logdet + DIM * math.log(2 * math.pi)) for s in bank.finalize()])
    assert torch.allclose(ll - scores, shift.double().expand_as(ll))


def test_class_level_task_scores_golden() -> None:
    logits = torch.tensor([[0.0, math.log(3.0), 2.0], [1.0, 1.0, -5.0]])
    c2t = torch.tensor([0, 0, 1])
    out = class_level_task_scores(logits, c2t)
    assert torch.allclose(out, torch.tensor([[math.log(4.0), 2.0], [1.0 + math.log(2.0), -5.0]]))
    assert torch.allclose(
        reduce_by_task(logits, c2t, 3, "max")[:, :2], torch.tensor([[math.log(3.0), 2.0], [1.0, -5.0]])
    )
    assert bool(torch.isneginf(reduce_by_task(logits, c2t, 3, "max")[:, 2]).all())  # a task without classes


@pytest.mark.parametrize("true_t", [0.4, 2.5])
def test_fit_temperature_recovers_the_generating_temperature(true_t: float) -> None:
    g = torch.Generator().manual_seed(11)
    logits = 3.0 * torch.randn(4000, 10, generator=g)
    labels = torch.multinomial(torch.softmax(logits / true_t, 1), 1, generator=g).squeeze(1)
    fitted = fit_temperature(logits, labels)
    assert fitted > 0 and abs(fitted - true_t) / true_t < 0.2, fitted


def _expert_logits(
    n_per_task: int, seed: int, scales: list[float]
) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Logits of TASKS experts (PER_TASK classes each): peaked on own-task samples, flat on others, own scales."""
    g = torch.Generator().manual_seed(seed)
    gold = torch.arange(TASKS).repeat_interleave(n_per_task)
    label = torch.randint(0, PER_TASK, (len(gold),), generator=g)
    out = []
    for t, s in enumerate(scales):
        z = torch.randn(len(gold), PER_TASK, generator=g)
        own = gold == t
        z[own] += 3.0 * torch.nn.functional.one_hot(label[own], PER_TASK)
        out.append(s * z)
    return out, gold, label


def test_energy_with_fitted_temperatures_beats_raw_max_logit_across_scales() -> None:
    scales = [1.0, 6.0, 0.3, 2.0]
    val, vgold, vlabel = _expert_logits(200, seed=12, scales=scales)
    temps = [fit_temperature(val[t][vgold == t], vlabel[vgold == t]) for t in range(TASKS)]  # own task's data only
    test, gold, _ = _expert_logits(200, seed=13, scales=scales)

    def acc(s: torch.Tensor) -> float:
        return float((s.argmax(1) == gold).double().mean())

    raw = acc(energy_scores(test, kind="max_logit"))
    fitted = acc(energy_scores(test, temps))
    assert fitted > 0.75 and fitted - raw > 0.3, (fitted, raw, temps)
    assert acc(energy_scores(test, temps, kind="max_logit")) - raw > 0.3
    assert torch.allclose(
        energy_scores(test, temps, energy_temperature=2.0)[:, 1], 2.0 * torch.logsumexp(test[1] / (2.0 * temps[1]), 1)
    )


# ------------------------------------------------------------------------------------------------- re-ranking
def test_rerank_with_m1_equals_the_base_ranking_and_calls_no_expert() -> None:
    base = torch.randn(50, TASKS, generator=torch.Generator().manual_seed(3))

    def never(task: int, rows: torch.Tensor) -> torch.Tensor:
        raise AssertionError("m=1 must not run an expert")

    assert torch.equal(rerank_topm(base, 1, never), base.topk(1, dim=1).indices)


def test_rerank_calls_each_candidate_once_with_its_rows_and_reorders() -> None:
    base = torch.tensor([[3.0, 2.0, 1.0, 0.0], [0.0, 1.0, 3.0, 2.0], [0.0, 3.0, 2.0, 1.0]])
    calls: dict[int, list[int]] = {}
    prefer = torch.tensor([0.0, 10.0, 5.0, 20.0])  # rescores by task, favouring task 3, then 1, then 2

    def rescore(task: int, rows: torch.Tensor) -> torch.Tensor:
        calls[task] = rows.tolist()
        return prefer[task].expand(len(rows))

    ranking = rerank_topm(base, 2, rescore)
    assert ranking.tolist() == [[1, 0], [3, 2], [1, 2]]
    assert calls == {0: [0], 1: [0, 2], 2: [1, 2], 3: [1]}
    assert rerank_topm(base, 2, rescore, k=1).tolist() == [[1], [3], [1]]


def _tpl_setup() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Callable[[int, torch.Tensor], torch.Tensor]]:
    """A weak base router (Euclidean) and a TPL rescore in each candidate expert's space."""
    maps = _expert_spaces()
    xtr, ytr = _draw(60, seed=1)
    bank = TaskStatistics()
    for t in range(TASKS):
        rows = C2T[ytr] == t
        bank.add_task(DIM).update(xtr[rows] @ maps[t].T, ytr[rows])
    fin = bank.finalize()
    out_means = []
    for t in range(TASKS):  # other tasks' class means in expert t's space (as from replayed samples)
        rows = C2T[ytr] != t
        out_means.append(torch.stack([(xtr[ytr == c] @ maps[t].T).double().mean(0) for c in torch.unique(ytr[rows])]))
    x, y = _draw(50, seed=2)
    base = mahalanobis_task_scores(x, _fit(xtr, ytr).finalize(), C2T, "euclidean")

    def rescore(task: int, rows: torch.Tensor) -> torch.Tensor:
        return likelihood_ratio_score(x[rows] @ maps[task].T, fin[task], out_means[task])

    return x, y, base, rescore


def test_tpl_rerank_fixes_a_weak_base_router() -> None:
    _, y, base, rescore = _tpl_setup()
    gold = C2T[y]
    base_acc = float((base.argmax(1) == gold).double().mean())
    re_acc = float((rerank_topm(base, TASKS, rescore)[:, 0] == gold).double().mean())
    assert re_acc > 0.85 and re_acc - base_acc > 0.2, (re_acc, base_acc)


def test_likelihood_ratio_score_terms() -> None:
    x, y = _draw(40, seed=6)
    stats = _fit(x, y).finalize()
    xs = x[:5].double()

    def best(means: torch.Tensor) -> torch.Tensor:  # independent Mahalanobis: -0.5 (x-mu)^T P (x-mu), best class
        d = xs[:, None, :] - means[None]
        return (-0.5 * torch.einsum("bcd,de,bce->bc", d, stats.precision, d)).amax(1)

    assert torch.allclose(likelihood_ratio_score(x[:5], stats), best(stats.means))
    out = stats.means[:2] + 1.0
    lr = likelihood_ratio_score(x[:5], stats, out, energy=torch.ones(5), energy_weight=0.5)
    assert torch.allclose(lr, best(stats.means) - best(out) + 0.5)


def test_combine_z_normalises_rows_and_keeps_missing_tasks_out() -> None:
    a = torch.tensor([[1.0, 2.0, 3.0], [10.0, 0.0, float("-inf")]])
    b = 100.0 * torch.tensor([[3.0, 2.0, 1.0], [0.0, 10.0, float("-inf")]])
    out = combine(a, b, weight=0.5)
    z = math.sqrt(1.5)
    assert torch.allclose(out[0], torch.tensor([-z + 0.5 * z, 0.0, z - 0.5 * z], dtype=torch.float64))
    assert torch.allclose(out[1, :2], torch.tensor([1.0 - 0.5, -1.0 + 0.5], dtype=torch.float64))
    assert out[1, 2] == float("-inf")


def test_permuting_test_samples_permutes_routes_and_nothing_else() -> None:
    xtr, ytr = _draw(30, seed=1)
    stats = _fit(xtr, ytr).finalize()
    maps = _expert_spaces()
    bank = TaskStatistics()
    for t in range(TASKS):
        rows = C2T[ytr] == t
        bank.add_task(DIM).update(xtr[rows] @ maps[t].T, ytr[rows])
    fin = bank.finalize()
    x, _ = _draw(10, seed=2)

    def routes(xs: torch.Tensor) -> dict[str, torch.Tensor]:
        lg = [xs @ a.T[:, :PER_TASK] for a in maps]
        maha = mahalanobis_task_scores(xs, stats, C2T)

        def rescore(task: int, rows: torch.Tensor) -> torch.Tensor:
            return likelihood_ratio_score(xs[rows] @ maps[task].T, fin[task], energy=torch.logsumexp(lg[task][rows], 1))

        return {
            "maha": maha.topk(2).indices,
            "euclid": mahalanobis_task_scores(xs, stats, C2T, "euclidean", reduce="logsumexp").topk(2).indices,
            "expert": per_expert_mahalanobis_scores([xs @ a.T for a in maps], fin).topk(2).indices,
            "class": class_level_task_scores(xs[:, :CLASSES], C2T).topk(2).indices,
            "energy": energy_scores(lg, [1.0, 2.0, 0.5, 1.5]).topk(2).indices,
            "combine": combine(maha, energy_scores(lg)).topk(2).indices,
            "rerank": rerank_topm(maha, 3, rescore),
        }

    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(9))
    full, permuted = routes(x), routes(x[perm])
    head = routes(x[:4])  # nor does a route depend on which other samples share the batch
    for name in full:
        assert torch.equal(permuted[name], full[name][perm]), name
        assert torch.equal(head[name], full[name][:4]), name


# ---------------------------------------------------------------------------------------------- observability
def test_observability_golden() -> None:
    gold = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 2])
    route = torch.tensor([0, 2, 2, 1, 2, 2, 2, 0, 2, 2])
    tid = task_id_accuracy(route, gold, 3)
    assert tid["per_task"] == pytest.approx([100 / 3, 50.0, 80.0])
    assert tid["macro"] == pytest.approx((100 / 3 + 50 + 80) / 3)
    assert tid["micro"] == pytest.approx(60.0)
    assert routing_confusion(route, gold, 3).tolist() == [[1, 0, 2], [0, 1, 1], [1, 0, 4]]
    assert recency_bias(route, gold, 2) == pytest.approx(60.0)  # 3 of the 5 old-task samples went to task 2
    assert math.isnan(recency_bias(torch.tensor([0]), torch.tensor([0]), 0))
    labels = torch.arange(10)
    routed = torch.tensor([0, 9, 9, 3, 9, 5, 6, 9, 8, 1])  # right where routed right, except the last sample
    oracle = torch.tensor([0, 1, 9, 3, 4, 5, 6, 7, 8, 9])
    gap = oracle_gap(routed, oracle, labels, gold, 3)
    assert gap["acc_micro"] == pytest.approx(50.0) and gap["oracle_acc_micro"] == pytest.approx(90.0)
    assert gap["acc_macro"] == pytest.approx((100 / 3 + 50 + 60) / 3)
    assert gap["oracle_acc_macro"] == pytest.approx((200 / 3 + 100 + 100) / 3)
    assert gap["oracle_gap_micro"] == pytest.approx(40.0)
    assert gap["oracle_gap_macro"] == pytest.approx((200 / 3 + 100 + 100) / 3 - (100 / 3 + 50 + 60) / 3)
    report = routing_report(torch.stack([route, (route + 1) % 3], 1), gold, 3, routed, oracle, labels)
    assert report["topk"] == 2 and report["topk_hit_rate"] == pytest.approx(80.0)
    assert report["task_id_acc_micro"] == pytest.approx(60.0) and report["recency_bias"] == pytest.approx(60.0)
    assert report["oracle_gap_macro"] == pytest.approx(gap["oracle_gap_macro"])
    with pytest.raises(ValueError):
        task_id_accuracy(torch.tensor([3]), torch.tensor([0]), 3)
