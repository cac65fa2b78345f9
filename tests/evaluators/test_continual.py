"""Continual metrics against values worked out by hand on a 3x3 matrix; AccuracyMatrix filling and round trip."""

import json
import math

import numpy as np
import pytest

from evaluators.continual import (
    AccuracyMatrix,
    STJTGap,
    average_accuracy,
    backward_transfer,
    continual_metrics,
    forgetting,
    forward_transfer,
    st_jt_gap,
)

# acc[i][j]: accuracy on task j after training chunk i
ACC = np.array(
    [
        [0.90, 0.20, 0.10],
        [0.95, 0.80, 0.30],
        [0.60, 0.50, 0.85],
    ]
)
BASELINE = [0.10, 0.15, 0.05]


def test_average_accuracy_is_mean_of_last_row():
    # (0.60 + 0.50 + 0.85) / 3
    assert average_accuracy(ACC) == pytest.approx(0.65)


def test_backward_transfer_uses_the_diagonal():
    # ((0.60 - 0.90) + (0.50 - 0.80)) / 2
    assert backward_transfer(ACC) == pytest.approx(-0.30)


def test_forward_transfer_uses_the_superdiagonal_against_baseline():
    # ((0.20 - 0.15) + (0.30 - 0.05)) / 2
    assert forward_transfer(ACC, BASELINE) == pytest.approx(0.15)


def test_forgetting_uses_the_best_earlier_accuracy():
    # task 0: max(0.90, 0.95) - 0.60 = 0.35 ; task 1: max(0.80) - 0.50 = 0.30 -> 0.325 (BWT would say 0.30)
    assert forgetting(ACC) == pytest.approx(0.325)


def test_forgetting_ignores_accuracy_before_the_task_was_trained():
    # Task 1 scores 0.85 after chunk 0, before its own chunk 1 (0.80). Chaudhry et al.'s max runs over l >= j:
    #   task 0: max(acc[0,0], acc[1,0]) - acc[2,0] = max(0.90, 0.95) - 0.60 = 0.35
    #   task 1: max(acc[1,1])           - acc[2,1] = 0.80 - 0.50             = 0.30
    #   forgetting = (0.35 + 0.30) / 2 = 0.325   (a max over every l < T-1 takes 0.85 and gives 0.350)
    acc = ACC.copy()
    acc[0, 1] = 0.85
    assert forgetting(acc) == pytest.approx(0.325)
    # T = 4, with two columns whose best entry lies above the diagonal (the window for task j is rows j..T-2):
    #   task 0: max(0.70, 0.90, 0.60) - 0.50 = 0.40
    #   task 1: max(0.40, 0.30) - 0.35       = 0.05   (0.95 at l = 0 precedes task 1's chunk: left out)
    #   task 2: max(0.80) - 0.20             = 0.60   (0.99 at l = 1 precedes task 2's chunk: left out)
    #   forgetting = (0.40 + 0.05 + 0.60) / 3 = 0.35  (a max over l < 3 would give (0.40 + 0.60 + 0.79) / 3)
    four = np.array(
        [
            [0.70, 0.95, 0.10, 0.10],
            [0.90, 0.40, 0.99, 0.10],
            [0.60, 0.30, 0.80, 0.10],
            [0.50, 0.35, 0.20, 0.90],
        ]
    )
    assert forgetting(four) == pytest.approx(0.35)
    assert continual_metrics(four)["forgetting"] == pytest.approx(0.35)


def test_st_jt_gap_per_chunk_over_seen_tasks():
    jt = np.array(
        [
            [0.91, np.nan, np.nan],
            [0.92, 0.88, np.nan],
            [0.90, 0.80, 0.85],
        ]
    )
    gap = st_jt_gap(ACC, jt)
    # chunk 0: 0.91 - 0.90 ; chunk 1: (0.92 + 0.88)/2 - (0.95 + 0.80)/2 = 0.900 - 0.875 ; chunk 2: 0.85 - 0.65
    assert isinstance(gap, STJTGap)
    assert gap.per_chunk == pytest.approx((0.01, 0.025, 0.20))
    assert gap.final == pytest.approx(0.20) == pytest.approx(average_accuracy(jt) - average_accuracy(ACC))
    assert gap.to_dict() == {"final": gap.final, "per_chunk": list(gap.per_chunk)}


def test_continual_metrics_collects_all():
    metrics = continual_metrics(ACC, BASELINE)
    assert metrics == pytest.approx({"avg_acc": 0.65, "bwt": -0.30, "forgetting": 0.325, "fwt": 0.15})
    assert set(continual_metrics(ACC)) == {"avg_acc", "bwt", "forgetting"}


def test_unknown_upper_triangle_is_fine_except_for_forward_transfer():
    lower = np.where(np.tril(np.ones((3, 3))) > 0, ACC, np.nan)
    assert average_accuracy(lower) == pytest.approx(0.65)
    assert backward_transfer(lower) == pytest.approx(-0.30)
    # forgetting never reads above the diagonal: same 0.325
    assert forgetting(lower) == pytest.approx(0.325)
    # forward transfer needs acc[0][1] and acc[1][2]: unknown, not an error
    assert math.isnan(forward_transfer(lower, BASELINE))


def test_missing_required_entry_is_named():
    acc = ACC.copy()
    acc[1, 1] = np.nan
    assert math.isnan(backward_transfer(acc)) and math.isnan(forgetting(acc))
    assert average_accuracy(acc) == pytest.approx(0.65)  # the last row is all it needs
    matrix = AccuracyMatrix(3)
    for i, row in enumerate(acc):
        matrix.record_row(i, row)
    assert matrix.missing_for("bwt") == [(1, 1)] and matrix.missing_for("forgetting") == [(1, 1)]
    assert matrix.missing_for("avg_acc") == [] and matrix.missing_for("fwt") == []
    assert matrix.unknown_entries() == [(1, 1)]
    acc = ACC.copy()
    acc[2, 0] = np.nan
    assert math.isnan(average_accuracy(acc))
    gap = st_jt_gap(acc, ACC)
    assert gap.per_chunk[:2] == (0.0, 0.0) and math.isnan(gap.per_chunk[2]) and math.isnan(gap.final)
    with pytest.raises(ValueError, match="unknown metric 'top5'"):
        AccuracyMatrix(3).missing_for("top5")


def test_a_task_without_queries_leaves_only_the_metrics_that_need_it_unknown():
    # Task 1 had no query rows: its whole column is unknown after every chunk (what evaluate_backbone returns).
    matrix = AccuracyMatrix(3)
    for i, row in enumerate(ACC):
        matrix.record_row(i, [row[0], float("nan") if i % 2 else None, row[2]])  # NaN and None both mean unknown
    assert matrix.completed_rows == 3  # every row was evaluated, so the driver goes on to the metrics
    assert matrix.unknown_entries() == [(0, 1), (1, 1), (2, 1)]
    metrics = continual_metrics(matrix, baseline=[0.10, None, 0.05])
    assert set(metrics) == {"avg_acc", "bwt", "forgetting", "fwt"}
    assert all(math.isnan(v) for v in metrics.values())  # each averages over task 1 (or its baseline)
    assert matrix.missing_for("avg_acc") == [(2, 1)]
    assert matrix.missing_for("bwt") == [(1, 1), (2, 1)]
    assert matrix.missing_for("forgetting") == [(1, 1), (2, 1)]
    assert matrix.missing_for("fwt") == [(0, 1)]
    # st_jt_gap: chunk 0 reads task 0 only, so it stays known (0.91 - 0.90)
    jt = np.where(np.isnan(matrix.values), np.nan, 0.91)
    gap = st_jt_gap(matrix, jt)
    assert gap.per_chunk[0] == pytest.approx(0.01) and math.isnan(gap.per_chunk[1]) and math.isnan(gap.final)
    # forgetting and BWT over T = 2 skip task 1's column entirely once it is the last task
    two = AccuracyMatrix(2)
    two.record_row(0, [0.90, None])
    two.record_row(1, [0.60, None])
    assert backward_transfer(two) == pytest.approx(-0.30) and forgetting(two) == pytest.approx(0.30)
    assert math.isnan(average_accuracy(two))


def test_unknown_baseline_entry_makes_forward_transfer_unknown():
    assert math.isnan(forward_transfer(ACC, [0.1, np.nan, 0.1]))
    assert math.isnan(forward_transfer(ACC, [0.1, 0.15, None]))
    # baseline[0] is never used (task 0 has no earlier chunk)
    assert forward_transfer(ACC, [None, 0.15, 0.05]) == pytest.approx(0.15)


def test_single_task_transfer_metrics_are_nan():
    one = np.array([[0.7]])
    assert average_accuracy(one) == pytest.approx(0.7)
    assert math.isnan(backward_transfer(one)) and math.isnan(forgetting(one))
    assert math.isnan(forward_transfer(one, [0.1]))


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: average_accuracy(np.zeros((2, 3))), r"square \[T, T\] matrix, found shape \[2, 3\]"),
        (lambda: backward_transfer(np.zeros(3)), r"found shape \[3\]"),
        (lambda: forgetting(np.zeros((0, 0))), "non-empty"),
        (lambda: forward_transfer(ACC, [0.1, 0.1]), r"baseline must have shape \[3\]"),
        (lambda: st_jt_gap(ACC, ACC[:2, :2]), "same shape"),
        (lambda: average_accuracy(ACC * 100), r"acc\[0\]\[0\] = 90.0: accuracies are fractions"),
    ],
)
def test_invalid_inputs_raise(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_accuracy_matrix_fills_incrementally_and_feeds_metrics():
    matrix = AccuracyMatrix(3, task_names=["cls 0-3", "cls 4-6", "cls 7-9"])
    assert matrix.completed_rows == 0 and math.isnan(matrix.get(0, 0))
    matrix.record_row(0, ACC[0])
    matrix.set(1, 0, ACC[1, 0])
    assert matrix.completed_rows == 1
    for j in (1, 2):
        matrix.set(1, j, ACC[1, j])
    matrix.record_row(2, ACC[2].tolist())
    assert matrix.completed_rows == 3
    np.testing.assert_array_equal(matrix.values, ACC)
    assert average_accuracy(matrix) == pytest.approx(0.65)
    assert forward_transfer(matrix, BASELINE) == pytest.approx(0.15)
    matrix.values[0, 0] = 0.0  # a copy: the matrix is unchanged
    assert matrix.get(0, 0) == 0.9


def test_accuracy_matrix_json_round_trip_keeps_unknowns():
    matrix = AccuracyMatrix(3)
    matrix.record_row(0, [0.5, 0.25, 0.125])
    matrix.set(1, 1, 0.75)
    data = matrix.to_dict()
    assert data["acc"][1] == [None, 0.75, None]
    text = json.dumps(data, allow_nan=False)  # strict JSON: no NaN tokens
    restored = AccuracyMatrix.from_dict(json.loads(text))
    assert restored == matrix
    assert restored.num_tasks == 3 and restored.task_names is None and restored.completed_rows == 1
    np.testing.assert_array_equal(restored.values, matrix.values)

    named = AccuracyMatrix(2, task_names=["a", "b"])
    named.record_row(1, [0.1, 0.2])
    assert AccuracyMatrix.from_dict(json.loads(json.dumps(named.to_dict()))) == named
    assert named != AccuracyMatrix(2, task_names=["a", "b"])


def test_unknown_entries_survive_json_and_differ_from_not_measured():
    matrix = AccuracyMatrix(2)
    matrix.record_row(0, [0.5, None])
    matrix.set(1, 1, float("nan"))
    data = matrix.to_dict()
    assert data["acc"] == [[0.5, None], [None, None]] and data["unknown"] == [[0, 1], [1, 1]]
    restored = AccuracyMatrix.from_dict(json.loads(json.dumps(data, allow_nan=False)))
    assert restored == matrix and restored.unknown_entries() == [(0, 1), (1, 1)] and restored.completed_rows == 1
    # acc[1][0] was never measured: null in "acc" but not listed as unknown
    assert math.isnan(restored.get(1, 0)) and (1, 0) not in restored.unknown_entries()
    # a dict written before "unknown" existed still loads, its nulls read as not measured
    old = AccuracyMatrix.from_dict({"num_tasks": 2, "acc": data["acc"]})
    assert old.unknown_entries() == [] and old.completed_rows == 0 and old != matrix


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda m: m.set(3, 0, 0.5), r"chunk must be an integer in \[0, 2\]"),
        (lambda m: m.set(0, -1, 0.5), "task must be"),
        (lambda m: m.set(0, 0, 1.5), r"acc\[0\]\[0\] must be in \[0, 1\]"),
        (lambda m: m.set(0, 0, float("inf")), "must be in"),
        (lambda m: m.record_row(0, [0.1, -0.2, None]), r"acc\[0\]\[1\] must be in"),
        (lambda m: AccuracyMatrix.from_dict({"num_tasks": 1, "acc": [[0.5]], "unknown": [[0, 0]]}), "lists"),
        (lambda m: AccuracyMatrix.from_dict({"num_tasks": 1, "acc": [[None]], "unknown": [[1, 0]]}), "chunk"),
        (lambda m: m.record_row(0, [0.1, 0.2]), "has 2 values, expected 3"),
        (lambda m: AccuracyMatrix(0), "num_tasks"),
        (lambda m: AccuracyMatrix(2, task_names=["x"]), "task_names has 1"),
        (lambda m: AccuracyMatrix.from_dict({"num_tasks": 2, "acc": [[0.1, 0.2]]}), "list of 2 rows"),
        (lambda m: AccuracyMatrix.from_dict({"num_tasks": 2, "acc": [[0.1, 0.2], [0.3]]}), "row 1"),
        (lambda m: AccuracyMatrix.from_dict({"acc": []}), "needs keys"),
        (lambda m: AccuracyMatrix.from_dict({"num_tasks": 1, "acc": [["x"]]}), "must be a number"),
    ],
)
def test_accuracy_matrix_validation(call, message):
    with pytest.raises(ValueError, match=message):
        call(AccuracyMatrix(3))
