"""Continual-learning metrics as pure functions of the accuracy matrix R.

``R[i][j]`` is the accuracy **in percent** on task ``j``'s test set after training task ``i`` (0-based), and
``None`` where ``j > i`` (a task is not evaluated before it is learned, which is always the case
class-incrementally). Every metric here has one definition, written out with its paper in ``docs/metrics.md``.
"Not applicable" is ``None``, never NaN, so summaries stay JSON-clean and comparable across runs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from numbers import Integral, Real
from typing import Any, NamedTuple

import numpy as np

Matrix = Sequence[Sequence[float | None]]
EvalCurve = Sequence[Mapping[str, Any]]

#: Names of the summary metrics, in the order reports show them (``metrics.json`` ``summary`` keys).
SUMMARY_KEYS: tuple[str, ...] = (
    "acc_macro",
    "acc_micro",
    "aia",
    "aia_micro",
    "bwt",
    "fwt",
    "forgetting",
    "learning_accuracy",
    "intransigence",
    "min_acc",
    "wc_acc",
)


class Intransigence(NamedTuple):
    """RWalk intransigence: ``per_task[k] = a*_k - a_{k,k}`` and their mean over tasks."""

    per_task: list[float]
    mean: float


def _is_number(v: object) -> bool:
    return isinstance(v, Real) and not isinstance(v, bool)


def _percent(v: object, where: str) -> float:
    if not _is_number(v):
        raise ValueError(f"{where} = {v!r}: expected an accuracy in percent (a number), got {type(v).__name__}")
    x = float(v)  # type: ignore[arg-type]
    if not math.isfinite(x) or not 0.0 <= x <= 100.0:
        raise ValueError(f"{where} = {v!r}: accuracies are percentages in [0, 100]")
    return x


def validate_matrix(R: Matrix | np.ndarray, name: str = "R") -> np.ndarray:
    """Check that R is a square, lower-triangular accuracy matrix and return it as floats (NaN = missing).

    Entries on and below the diagonal must be percentages; entries above it may be ``None`` (or NaN), or a number
    where a method did evaluate a future task (task-incremental settings, used only by FWT).

    Args:
        R: One row per trained task, each with one entry per trained task.
        name: How to refer to R in error messages (e.g. the metrics.json path).

    Returns:
        A ``[T, T]`` float array; NaN marks the missing entries above the diagonal.

    Raises:
        ValueError: R is empty, not square, or has a missing/non-numeric/out-of-range entry (named by index).
    """
    rows = R.tolist() if isinstance(R, np.ndarray) else R
    if isinstance(rows, str | bytes) or not isinstance(rows, Sequence) or len(rows) == 0:
        raise ValueError(f"{name} must be a non-empty list of rows (one per trained task), got {rows!r}")
    n = len(rows)
    out = np.full((n, n), np.nan)
    for i, row in enumerate(rows):
        if isinstance(row, str | bytes) or not isinstance(row, Sequence):
            raise ValueError(f"{name}[{i}] must be a list of accuracies, got {type(row).__name__}")
        if len(row) != n:
            raise ValueError(
                f"{name} must be square ({n} rows, one per trained task, so {n} columns), but row {i} has "
                f"{len(row)} entries"
            )
        for j, v in enumerate(row):
            missing = v is None or (_is_number(v) and math.isnan(float(v)))  # type: ignore[arg-type]
            if missing and j > i:
                continue
            if missing:
                raise ValueError(
                    f"{name}[{i}][{j}] is missing, but task {j} was learned by step {i}: entries on and below "
                    "the diagonal are required (R must be lower-triangular)"
                )
            out[i, j] = _percent(v, f"{name}[{i}][{j}]")
    return out


def _vector(values: Sequence[float] | np.ndarray, n: int, name: str) -> np.ndarray:
    values = values.tolist() if isinstance(values, np.ndarray) else values
    if isinstance(values, str | bytes) or not isinstance(values, Sequence) or len(values) != n:
        got = len(values) if isinstance(values, Sequence) else type(values).__name__
        raise ValueError(f"{name} must have one value per task ({n}), got {got}")
    return np.array([_percent(v, f"{name}[{j}]") for j, v in enumerate(values)])


def _index(i: int, n: int, name: str) -> int:
    k = i + n if i < 0 else i
    if not 0 <= k < n:
        raise IndexError(f"{name}={i} is out of range for {n} trained tasks")
    return k


def acc_macro(R: Matrix, i: int = -1) -> float:
    """Average accuracy after task i: ``ACC_i = mean_{j<=i} R[i][j]`` (GEM, Lopez-Paz & Ranzato 2017).

    Every seen task weighs the same, whatever its test-set size (ConPET's ``accuracy``).
    """
    a = validate_matrix(R)
    i = _index(i, a.shape[0], "i")
    return float(a[i, : i + 1].mean())


def acc_micro(R: Matrix, n_test: Sequence[int] | np.ndarray, i: int = -1) -> float:
    """Whole accuracy after task i: ``sum_{j<=i} R[i][j] n_j / sum_{j<=i} n_j``, i.e. correct / total.

    This is ConPET's ``total_accuracy``: every seen test sample weighs the same.
    """
    n_test = n_test.tolist() if isinstance(n_test, np.ndarray) else n_test
    a = validate_matrix(R)
    n = a.shape[0]
    i = _index(i, n, "i")
    if isinstance(n_test, str | bytes) or not isinstance(n_test, Sequence) or len(n_test) < i + 1:
        raise ValueError(f"n_test must give the test-set size of each of the {i + 1} seen tasks, got {n_test!r}")
    for j, c in enumerate(n_test[: i + 1]):
        if not isinstance(c, Integral) or isinstance(c, bool) or c < 0:
            raise ValueError(f"n_test[{j}] = {c!r}: test-set sizes are non-negative integers")
    w = np.array(n_test[: i + 1], dtype=float)
    if w.sum() == 0:
        raise ValueError(f"n_test[0..{i}] are all 0: no test samples to average over")
    return float((a[i, : i + 1] * w).sum() / w.sum())


def average_incremental_accuracy(R: Matrix, n_test: Sequence[int] | None = None) -> float:
    """Average incremental accuracy ``AIA = mean_k ACC_k`` over all trained tasks (iCaRL, Rebuffi et al. 2017).

    Uses the macro ACC_k, or the micro one when ``n_test`` is given (iCaRL's own accuracy is over samples).
    """
    n = validate_matrix(R).shape[0]
    accs = [acc_macro(R, k) if n_test is None else acc_micro(R, n_test, k) for k in range(n)]
    return float(np.mean(accs))


def bwt(R: Matrix) -> float | None:
    """Backward transfer ``BWT = 1/(T-1) sum_{j<T-1} (R[T-1][j] - R[j][j])`` (GEM); None for a single task.

    Negative values are forgetting: the final model does worse on an old task than right after learning it.
    """
    a = validate_matrix(R)
    n = a.shape[0]
    if n < 2:
        return None
    j = np.arange(n - 1)
    return float((a[n - 1, j] - a[j, j]).mean())


def fwt(R: Matrix, baseline: Sequence[float] | None) -> float | None:
    """Forward transfer ``FWT = 1/(T-1) sum_{j>=1} (R[j-1][j] - b_j)`` (GEM).

    ``b_j`` is the accuracy of a baseline (e.g. a randomly initialised model) on task j. FWT needs task j to be
    evaluated *before* it is learned; class-incrementally a task's classes are not predictable then, so R has no
    entries above the diagonal and FWT is not applicable (None). Also None without a baseline or with one task.

    Raises:
        ValueError: only some of the needed entries ``R[j-1][j]`` exist, or the baseline has the wrong length.
    """
    a = validate_matrix(R)
    n = a.shape[0]
    if baseline is None or n < 2:
        return None
    b = _vector(baseline, n, "fwt baseline")
    above = a[np.arange(n - 1), np.arange(1, n)]
    present = ~np.isnan(above)
    if not present.any():
        return None
    if not present.all():
        missing = [f"R[{j}][{j + 1}]" for j in np.flatnonzero(~present)]
        raise ValueError(f"FWT needs every R[j-1][j]; missing {', '.join(missing)}")
    return float((above - b[1:]).mean())


def forgetting(R: Matrix) -> list[list[float | None]]:
    """Forgetting matrix ``f[k][j] = max_{j<=l<k} R[l][j] - R[k][j]`` for ``j < k`` (RWalk, Chaudhry et al. 2018).

    The max runs over evaluations after task j was learned (RWalk writes ``l`` in ``[0, k-1]``; entries before
    ``j`` are undefined class-incrementally). Values can be negative when a task improved. None where ``j >= k``.
    """
    a = validate_matrix(R)
    n = a.shape[0]
    return [[float(a[j:k, j].max() - a[k, j]) if j < k else None for j in range(n)] for k in range(n)]


def average_forgetting(R: Matrix, k: int = -1) -> float | None:
    """Average forgetting after task k: ``F_k = 1/k sum_{j<k} f[k][j]`` (RWalk); None after the first task."""
    f = forgetting(R)
    k = _index(k, len(f), "k")
    if k == 0:
        return None
    return float(np.mean([f[k][j] for j in range(k)]))


def learning_accuracy(R: Matrix) -> float:
    """Learning accuracy ``LA = mean_j R[j][j]`` (MER, Riemer et al. 2019): plasticity, before any forgetting."""
    a = validate_matrix(R)
    return float(np.diag(a).mean())


def intransigence(R: Matrix, R_joint: Matrix) -> Intransigence:
    """Intransigence ``I_k = a*_k - R[k][k]`` per task and its mean (RWalk).

    ``a*_k = R_joint[k][k]``: the accuracy on task k of a reference model trained jointly on the data of tasks
    0..k (the ``joint`` experiment's own accuracy matrix). Positive values mean the method cannot learn new tasks
    as well as joint training.
    """
    a = validate_matrix(R)
    j = validate_matrix(R_joint, "R_joint")
    if j.shape != a.shape:
        raise ValueError(f"R_joint has {j.shape[0]} tasks but R has {a.shape[0]}; they must cover the same tasks")
    per_task = (np.diag(j) - np.diag(a)).tolist()
    return Intransigence(per_task=per_task, mean=float(np.mean(per_task)))


def validate_eval_curve(eval_curve: EvalCurve) -> list[tuple[int, int, np.ndarray]]:
    """Check a continual-evaluation log and return it as ``(task, step, acc)`` tuples in time order.

    Each entry is ``{"task": i, "step": s, "acc": [a_0, ..., a_i]}``: an evaluation made while (or right after)
    training task i at step s (any counter that grows within a task), with the percent accuracy of each seen task.

    Raises:
        ValueError: an entry lacks a key, or its ``acc`` does not have one value per seen task (named by index).
    """
    if isinstance(eval_curve, str | bytes) or not isinstance(eval_curve, Sequence) or len(eval_curve) == 0:
        raise ValueError(f"eval_curve must be a non-empty list of evaluations, got {eval_curve!r}")
    out = []
    for e, entry in enumerate(eval_curve):
        if not isinstance(entry, Mapping) or not {"task", "step", "acc"} <= entry.keys():
            raise ValueError(f"eval_curve[{e}] must be a dict with keys 'task', 'step' and 'acc', got {entry!r}")
        task, step, acc = entry["task"], entry["step"], entry["acc"]
        for key, v in (("task", task), ("step", step)):
            if not isinstance(v, Integral) or isinstance(v, bool) or v < 0:
                raise ValueError(f"eval_curve[{e}]['{key}'] = {v!r}: expected a non-negative integer")
        if isinstance(acc, str | bytes) or not isinstance(acc, Sequence) or len(acc) != task + 1:
            raise ValueError(f"eval_curve[{e}]['acc'] must hold one accuracy per seen task ({task + 1}), got {acc!r}")
        vals = np.array([_percent(v, f"eval_curve[{e}]['acc'][{j}]") for j, v in enumerate(acc)])
        out.append((int(task), int(step), vals))
    return sorted(out, key=lambda t: (t[0], t[1]))


def _curve_task(curve: list[tuple[int, int, np.ndarray]], k: int) -> int:
    last = max(t for t, _, _ in curve)
    k = k + last + 1 if k < 0 else k
    if not any(t == k for t, _, _ in curve):
        raise ValueError(f"eval_curve has no evaluation during task {k} (tasks logged: 0..{last})")
    return k


def min_acc(eval_curve: EvalCurve, k: int = -1) -> float | None:
    """Average minimum accuracy ``min-ACC_k`` (De Lange et al. 2023, continual evaluation).

    For each old task ``j < k``: the minimum of its accuracy over all evaluations after it was learned, i.e. those
    logged during tasks ``j+1..k``; then the mean over ``j``. It is the worst-case counterpart of ACC. None for
    k = 0 (no old task). ``k=-1`` is the last task in the log.
    """
    curve = validate_eval_curve(eval_curve)
    k = _curve_task(curve, k)
    if k == 0:
        return None
    mins = [min(acc[j] for t, _, acc in curve if j < t <= k) for j in range(k)]
    return float(np.mean(mins))


def wc_acc(eval_curve: EvalCurve, k: int = -1) -> float:
    """Worst-case accuracy ``WC-ACC_k = a_{k,k} / K + (1 - 1/K) min-ACC_k`` with ``K = k + 1`` tasks (De Lange).

    ``a_{k,k}`` is the current task's accuracy at the last evaluation logged during task k. For k = 0 it is just
    ``a_{0,0}`` (the min-ACC term has weight 0).
    """
    curve = validate_eval_curve(eval_curve)
    k = _curve_task(curve, k)
    current = [acc for t, _, acc in curve if t == k][-1][k]
    m = min_acc(eval_curve, k)
    n_seen = k + 1
    return float(current if m is None else current / n_seen + (1 - 1 / n_seen) * m)


def summarize(
    R: Matrix,
    n_test: Sequence[int] | None,
    *,
    R_joint: Matrix | None = None,
    fwt_baseline: Sequence[float] | None = None,
    eval_curve: EvalCurve | None = None,
) -> dict[str, float | None]:
    """All summary metrics after the last trained task, keyed by ``SUMMARY_KEYS`` (None = not applicable).

    Args:
        R: The accuracy matrix (percent).
        n_test: Test-set size per task; without it the micro metrics are None.
        R_joint: The joint reference's accuracy matrix, for intransigence.
        fwt_baseline: Per-task baseline accuracies, for FWT (applicable only with entries above the diagonal).
        eval_curve: The continual-evaluation log, for min-ACC and WC-ACC at the last task of R.

    Returns:
        ``{name: value}`` for every name in ``SUMMARY_KEYS``, values plain floats or None.
    """
    last = validate_matrix(R).shape[0] - 1
    return {
        "acc_macro": acc_macro(R),
        "acc_micro": None if n_test is None else acc_micro(R, n_test),
        "aia": average_incremental_accuracy(R),
        "aia_micro": None if n_test is None else average_incremental_accuracy(R, n_test),
        "bwt": bwt(R),
        "fwt": fwt(R, fwt_baseline),
        "forgetting": average_forgetting(R),
        "learning_accuracy": learning_accuracy(R),
        "intransigence": None if R_joint is None else intransigence(R, R_joint).mean,
        "min_acc": None if eval_curve is None else min_acc(eval_curve, last),
        "wc_acc": None if eval_curve is None else wc_acc(eval_curve, last),
    }
