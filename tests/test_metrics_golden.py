"""Golden tests: every metric on small matrices whose values were computed by hand (written out below)."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from conpet_lightning.metrics import (
    SUMMARY_KEYS,
    acc_macro,
    acc_micro,
    average_forgetting,
    average_incremental_accuracy,
    bwt,
    forgetting,
    fwt,
    intransigence,
    learning_accuracy,
    min_acc,
    summarize,
    validate_matrix,
    wc_acc,
)

# Class-incremental 3x3: after task 0 -> 90; after task 1 -> 70, 80; after task 2 -> 60, 75, 85.
R = [[90.0, None, None], [70.0, 80.0, None], [60.0, 75.0, 85.0]]
N_TEST = [100, 200, 100]
# A matrix where tasks improve after being learned: forgetting goes negative.
R_UP = [[50.0, None, None], [60.0, 70.0, None], [55.0, 80.0, 40.0]]
# Joint reference (trained on tasks 0..k): diagonal 95, 92, 91.
R_JOINT = [[95.0, None, None], [90.0, 92.0, None], [88.0, 89.0, 91.0]]
# Task-incremental variant of R: future tasks were evaluated too (above the diagonal).
R_TI = [[90.0, 30.0, 20.0], [70.0, 80.0, 40.0], [60.0, 75.0, 85.0]]
BASELINE = [10.0, 25.0, 35.0]
# Continual-evaluation log for R's run (a_{2,2} = 85 at the end).
CURVE = [
    {"task": 0, "step": 0, "acc": [50.0]},
    {"task": 0, "step": 10, "acc": [90.0]},
    {"task": 1, "step": 0, "acc": [88.0, 10.0]},
    {"task": 1, "step": 10, "acc": [60.0, 50.0]},
    {"task": 1, "step": 20, "acc": [70.0, 80.0]},
    {"task": 2, "step": 0, "acc": [72.0, 78.0, 5.0]},
    {"task": 2, "step": 10, "acc": [65.0, 40.0, 70.0]},
    {"task": 2, "step": 20, "acc": [60.0, 75.0, 85.0]},
]


def test_acc_macro_per_step() -> None:
    assert acc_macro(R, 0) == pytest.approx(90.0)
    assert acc_macro(R, 1) == pytest.approx(75.0)  # (70 + 80) / 2
    assert acc_macro(R) == pytest.approx(220 / 3)  # (60 + 75 + 85) / 3 = 73.33
    assert acc_macro(R, -2) == pytest.approx(75.0)


def test_acc_micro_weights_by_test_size() -> None:
    assert acc_micro(R, N_TEST, 0) == pytest.approx(90.0)
    assert acc_micro(R, N_TEST, 1) == pytest.approx(23000 / 300)  # (70*100 + 80*200) / 300 = 76.67
    assert acc_micro(R, N_TEST) == pytest.approx(73.75)  # (6000 + 15000 + 8500) / 400
    # Equal test sizes make micro == macro.
    assert acc_micro(R, [7, 7, 7]) == pytest.approx(acc_macro(R))


def test_average_incremental_accuracy() -> None:
    assert average_incremental_accuracy(R) == pytest.approx(715 / 9)  # (90 + 75 + 220/3) / 3 = 79.44
    assert average_incremental_accuracy(R, N_TEST) == pytest.approx(2885 / 36)  # (90 + 76.67 + 73.75) / 3 = 80.14


def test_bwt() -> None:
    assert bwt(R) == pytest.approx(-17.5)  # ((60 - 90) + (75 - 80)) / 2
    assert bwt(R_UP) == pytest.approx(7.5)  # ((55 - 50) + (80 - 70)) / 2
    assert bwt([[80.0]]) is None


def test_fwt_task_incremental() -> None:
    assert fwt(R_TI, BASELINE) == pytest.approx(5.0)  # ((30 - 25) + (40 - 35)) / 2; b_0 unused


def test_fwt_not_applicable() -> None:
    assert fwt(R, BASELINE) is None  # class-incremental: nothing above the diagonal
    assert fwt(R_TI, None) is None
    assert fwt([[80.0]], [10.0]) is None


def test_fwt_errors() -> None:
    with pytest.raises(ValueError, match=r"missing R\[1\]\[2\]"):
        fwt([[90.0, 30.0, None], [70.0, 80.0, None], [60.0, 75.0, 85.0]], BASELINE)
    with pytest.raises(ValueError, match="one value per task"):
        fwt(R_TI, [10.0, 20.0])


def test_forgetting_matrix() -> None:
    assert forgetting(R) == [
        [None, None, None],
        [20.0, None, None],  # 90 - 70
        [30.0, 5.0, None],  # max(90, 70) - 60, 80 - 75
    ]
    assert forgetting(R_UP) == [
        [None, None, None],
        [-10.0, None, None],  # 50 - 60: improved, not clipped
        [5.0, -10.0, None],  # max(50, 60) - 55, 70 - 80
    ]


def test_forgetting_ignores_entries_before_a_task_was_learned() -> None:
    # R_TI has R[0][1] = 30 and R[0][2] = 20 above the diagonal; they must not enter the max.
    assert forgetting(R_TI) == forgetting(R)
    high_before = [[90.0, 99.0, None], [70.0, 80.0, None], [60.0, 75.0, 85.0]]
    assert forgetting(high_before)[2][1] == pytest.approx(5.0)  # 80 - 75, not 99 - 75


def test_average_forgetting() -> None:
    assert average_forgetting(R, 0) is None
    assert average_forgetting(R, 1) == pytest.approx(20.0)
    assert average_forgetting(R) == pytest.approx(17.5)  # (30 + 5) / 2
    assert average_forgetting(R_UP) == pytest.approx(-2.5)  # (5 - 10) / 2


def test_learning_accuracy_and_identity() -> None:
    assert learning_accuracy(R) == pytest.approx(85.0)  # (90 + 80 + 85) / 3
    assert learning_accuracy(R_UP) == pytest.approx(160 / 3)  # (50 + 70 + 40) / 3
    # ACC = LA + (T-1)/T * BWT holds exactly.
    for m in (R, R_UP):
        assert acc_macro(m) == pytest.approx(learning_accuracy(m) + 2 / 3 * bwt(m))


def test_intransigence() -> None:
    result = intransigence(R, R_JOINT)
    assert result.per_task == pytest.approx([5.0, 12.0, 6.0])  # 95-90, 92-80, 91-85
    assert result.mean == pytest.approx(23 / 3)
    with pytest.raises(ValueError, match="R_joint has 2 tasks but R has 3"):
        intransigence(R, [[95.0, None], [90.0, 92.0]])


def test_min_acc_and_wc_acc() -> None:
    # Task 0 during tasks 1..2: 88, 60, 70, 72, 65, 60 -> 60. Task 1 during task 2: 78, 40, 75 -> 40.
    assert min_acc(CURVE) == pytest.approx(50.0)
    assert wc_acc(CURVE) == pytest.approx(85 / 3 + 2 / 3 * 50)  # 61.67
    # k = 1: task 0 during task 1: 88, 60, 70 -> 60; a_{1,1} = 80 -> 80/2 + 60/2.
    assert min_acc(CURVE, 1) == pytest.approx(60.0)
    assert wc_acc(CURVE, 1) == pytest.approx(70.0)
    # k = 0: no old task.
    assert min_acc(CURVE, 0) is None
    assert wc_acc(CURVE, 0) == pytest.approx(90.0)


def test_eval_curve_order_does_not_matter() -> None:
    shuffled = list(CURVE)
    random.Random(0).shuffle(shuffled)
    assert min_acc(shuffled) == pytest.approx(50.0)
    assert wc_acc(shuffled) == pytest.approx(185 / 3)


def test_eval_curve_errors() -> None:
    with pytest.raises(ValueError, match=r"eval_curve\[0\]\['acc'\] must hold one accuracy per seen task \(2\)"):
        min_acc([{"task": 1, "step": 0, "acc": [50.0]}])
    with pytest.raises(ValueError, match=r"eval_curve\[0\] must be a dict with keys"):
        min_acc([{"task": 0, "acc": [50.0]}])
    with pytest.raises(ValueError, match="no evaluation during task 3"):
        wc_acc(CURVE, 3)
    with pytest.raises(ValueError, match=r"eval_curve\[0\]\['acc'\]\[0\] = 120"):
        min_acc([{"task": 0, "step": 0, "acc": [120.0]}])


def test_summarize_all_keys() -> None:
    s = summarize(R, N_TEST, R_joint=R_JOINT, fwt_baseline=BASELINE, eval_curve=CURVE)
    assert tuple(s) == SUMMARY_KEYS
    expected = {
        "acc_macro": 220 / 3,
        "acc_micro": 73.75,
        "aia": 715 / 9,
        "aia_micro": 2885 / 36,
        "bwt": -17.5,
        "fwt": None,  # class-incremental
        "forgetting": 17.5,
        "learning_accuracy": 85.0,
        "intransigence": 23 / 3,
        "min_acc": 50.0,
        "wc_acc": 185 / 3,
    }
    for key, value in expected.items():
        assert s[key] == (None if value is None else pytest.approx(value)), key
    assert all(v is None or isinstance(v, float) for v in s.values())


def test_summarize_without_optional_inputs() -> None:
    s = summarize([[80.0]], None)
    assert s["acc_macro"] == pytest.approx(80.0)
    assert s["aia"] == pytest.approx(80.0)
    assert s["learning_accuracy"] == pytest.approx(80.0)
    for key in ("acc_micro", "aia_micro", "bwt", "fwt", "forgetting", "intransigence", "min_acc", "wc_acc"):
        assert s[key] is None, key
    assert summarize(R_TI, N_TEST, fwt_baseline=BASELINE)["fwt"] == pytest.approx(5.0)


def test_numpy_input_with_nan_above_diagonal() -> None:
    a = np.array([[90.0, np.nan], [70.0, 80.0]])
    assert acc_macro(a) == pytest.approx(75.0)
    assert bwt(a) == pytest.approx(-20.0)
    assert acc_micro(a, np.array([1, 3])) == pytest.approx(77.5)  # (70 + 240) / 4


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ([], "non-empty list of rows"),
        ("90", "non-empty list of rows"),
        ([[90.0, None, None], [70.0, 80.0, None]], "must be square .* row 0 has 3 entries"),
        ([[90.0, None], [70.0]], "row 1 has 1 entries"),
        ([[None]], r"R\[0\]\[0\] is missing"),
        ([[90.0, None], [None, 80.0]], r"R\[1\]\[0\] is missing, .* lower-triangular"),
        ([[101.0]], r"R\[0\]\[0\] = 101.0: accuracies are percentages in \[0, 100\]"),
        ([[-1.0]], r"\[0, 100\]"),
        ([[math.nan]], r"R\[0\]\[0\] is missing"),
        ([[math.inf]], r"\[0, 100\]"),
        ([["90"]], "expected an accuracy in percent"),
        ([[True]], "expected an accuracy in percent"),
        ([90.0], r"R\[0\] must be a list"),
        ([[90.0, 200.0], [70.0, 80.0]], r"R\[0\]\[1\] = 200.0"),
    ],
)
def test_shape_validation(bad: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        validate_matrix(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=message):
        summarize(bad, None)  # type: ignore[arg-type]


def test_index_and_count_errors() -> None:
    with pytest.raises(IndexError, match="i=3 is out of range for 3 trained tasks"):
        acc_macro(R, 3)
    with pytest.raises(IndexError, match="k=-4"):
        average_forgetting(R, -4)
    with pytest.raises(ValueError, match="test-set size of each of the 3 seen tasks"):
        acc_micro(R, [100, 200])
    with pytest.raises(ValueError, match=r"n_test\[1\] = -5"):
        acc_micro(R, [100, -5, 100])
    with pytest.raises(ValueError, match=r"n_test\[0\] = 1.5"):
        acc_micro(R, [1.5, 2, 3])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="all 0"):
        acc_micro(R, [0, 0, 0])
