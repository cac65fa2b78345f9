"""Continual-learning metrics over an accuracy matrix.

``acc[i, j]`` is the accuracy on task ``j``'s test set after training on stream chunk ``i`` (numpy ``[T, T]``,
values in [0, 1]). Usage::

    from evaluators.continual import AccuracyMatrix, continual_metrics, st_jt_gap
    matrix = AccuracyMatrix(num_tasks=3)
    matrix.record_row(0, [0.61, 0.12, 0.10])     # after chunk 0, evaluated on tasks 0..2
    ...
    continual_metrics(matrix, baseline=[0.1, 0.1, 0.1])   # {"avg_acc": ..., "bwt": ..., "fwt": ..., "forgetting": ...}
    json.dump(matrix.to_dict(), f)                          # NaN (not measured) is written as null

Definitions (T tasks, 0-based):

* average accuracy: ``mean_j acc[T-1, j]``.
* backward transfer (Lopez-Paz & Ranzato 2017, GEM): ``mean_{j<T-1} acc[T-1, j] - acc[j, j]``.
* forward transfer (same paper): ``mean_{j>0} acc[j-1, j] - baseline[j]``, ``baseline[j]`` being the accuracy
  on task j of the model before any training (random initialisation).
* forgetting (Chaudhry et al. 2018, RWalk, eq. 9): ``mean_{j<T-1} max_{j<=l<T-1} acc[l, j] - acc[T-1, j]``; the
  max runs only over chunks from task j's own onwards, so accuracy on a task before it was trained does not count.
* ST/JT gap: joint (i.i.d.) training minus sequential (streaming) training, in average accuracy over the tasks
  seen so far, after each chunk; the last entry is the gap in final average accuracy.

Unknown entries are NaN: not measured yet, or measured with nothing to measure on (a task with no evaluation
rows; record those as NaN or None). A metric that needs an unknown entry is itself unknown (NaN), never an error:
``AccuracyMatrix.missing_for(metric)`` names the entries it lacks and ``unknown_entries()`` the entries recorded
as unknown. Metrics that average over an empty set (BWT, FWT, forgetting with T == 1) are NaN as well.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "METRICS",
    "AccuracyMatrix",
    "STJTGap",
    "average_accuracy",
    "backward_transfer",
    "continual_metrics",
    "forgetting",
    "forward_transfer",
    "st_jt_gap",
]

METRICS = ("avg_acc", "bwt", "fwt", "forgetting", "st_jt_gap")  # the names missing_for knows


def _needed(metric: str, size: int) -> list[tuple[int, int]]:
    """The entries (chunk, task) of a [size, size] matrix that `metric` reads; one list for computing and naming."""
    last = size - 1
    if metric == "avg_acc":
        return [(last, j) for j in range(size)]
    if metric == "bwt":
        return [(i, j) for j in range(last) for i in (j, last)]
    if metric == "fwt":
        return [(j - 1, j) for j in range(1, size)]
    if metric == "forgetting":
        return [(l, j) for j in range(last) for l in range(j, size)]
    if metric == "st_jt_gap":
        return [(i, j) for i in range(size) for j in range(i + 1)]
    raise ValueError(f"unknown metric {metric!r}; expected one of {list(METRICS)}")


class AccuracyMatrix:
    """A ``[T, T]`` accuracy matrix filled as the stream advances; NaN marks entries not measured (yet) and
    entries recorded as unknown (NaN or None given for a task that had no evaluation rows).

    Passes to every metric function directly (it converts with ``np.asarray``).
    """

    def __init__(self, num_tasks: int, task_names: Sequence[str] | None = None) -> None:
        if isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or num_tasks < 1:
            raise ValueError(f"num_tasks must be an integer >= 1, got {num_tasks!r}")
        if task_names is not None:
            task_names = [str(name) for name in task_names]
            if len(task_names) != num_tasks:
                raise ValueError(f"task_names has {len(task_names)} names, expected num_tasks={num_tasks}")
        self._acc = np.full((num_tasks, num_tasks), np.nan)
        # Which entries were recorded, unknown ones included: a row with an unknown entry is still complete.
        self._recorded = np.zeros((num_tasks, num_tasks), dtype=bool)
        self.task_names: list[str] | None = task_names

    @property
    def num_tasks(self) -> int:
        return self._acc.shape[0]

    @property
    def values(self) -> np.ndarray:
        """A copy of the ``[T, T]`` float64 matrix (NaN where unknown)."""
        return self._acc.copy()

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        return self._acc.astype(dtype) if dtype is not None else self._acc.copy()

    def set(self, chunk: int, task: int, value: float | None) -> None:
        """Record the accuracy on ``task`` after training chunk ``chunk`` (overwrites a previous value).

        NaN or None records the entry as unknown (evaluated, but the task had no rows to evaluate on).
        """
        self._check_index("chunk", chunk)
        self._check_index("task", task)
        self._acc[chunk, task] = _check_accuracy(value, f"acc[{chunk}][{task}]")
        self._recorded[chunk, task] = True

    def record_row(self, chunk: int, accuracies: Sequence[float | None]) -> None:
        """Record the accuracies on all T tasks after training chunk ``chunk``; NaN or None for unknown ones."""
        self._check_index("chunk", chunk)
        if len(accuracies) != self.num_tasks:
            raise ValueError(f"row for chunk {chunk} has {len(accuracies)} values, expected {self.num_tasks}")
        row = [_check_accuracy(v, f"acc[{chunk}][{task}]") for task, v in enumerate(accuracies)]
        self._acc[chunk] = row
        self._recorded[chunk] = True

    def get(self, chunk: int, task: int) -> float:
        """The recorded accuracy, NaN if not measured or unknown."""
        self._check_index("chunk", chunk)
        self._check_index("task", task)
        return float(self._acc[chunk, task])

    @property
    def completed_rows(self) -> int:
        """Number of leading chunks whose row is fully recorded (unknown entries count as recorded): the
        metrics on ``values[:n, :n]`` are then as defined as the data allows."""
        full = self._recorded.all(axis=1)
        return int(np.argmin(full)) if not full.all() else self.num_tasks

    def unknown_entries(self) -> list[tuple[int, int]]:
        """``(chunk, task)`` of every entry recorded as unknown, row by row (entries not recorded yet excluded)."""
        return [(int(i), int(j)) for i, j in np.argwhere(self._recorded & np.isnan(self._acc))]

    def missing_for(self, metric: str) -> list[tuple[int, int]]:
        """``(chunk, task)`` of the entries ``metric`` needs that are unknown or not measured; empty when the
        metric is defined. ``metric`` is a :func:`continual_metrics` key or ``"st_jt_gap"``. FWT also needs
        the baseline, which is not part of the matrix."""
        return [(i, j) for i, j in _needed(metric, self.num_tasks) if math.isnan(self._acc[i, j])]

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form: ``{"num_tasks": T, "task_names": [...] | None, "acc": [[float | None]],
        "unknown": [[chunk, task], ...]}``; ``unknown`` lists the null entries that were recorded as unknown."""
        acc = [[None if math.isnan(v) else float(v) for v in row] for row in self._acc.tolist()]
        unknown = [[i, j] for i, j in self.unknown_entries()]
        return {"num_tasks": self.num_tasks, "task_names": self.task_names, "acc": acc, "unknown": unknown}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AccuracyMatrix:
        """Inverse of :meth:`to_dict`; validates shape and values."""
        if not isinstance(data, dict) or "num_tasks" not in data or "acc" not in data:
            raise ValueError("accuracy matrix dict needs keys 'num_tasks' and 'acc'")
        matrix = cls(data["num_tasks"], data.get("task_names"))
        rows = data["acc"]
        if not isinstance(rows, list) or len(rows) != matrix.num_tasks:
            raise ValueError(f"'acc' must be a list of {matrix.num_tasks} rows")
        for i, row in enumerate(rows):
            if not isinstance(row, list) or len(row) != matrix.num_tasks:
                raise ValueError(f"'acc' row {i} must be a list of {matrix.num_tasks} values")
            for j, value in enumerate(row):
                if value is not None:
                    matrix.set(i, j, value)
        unknown = data.get("unknown", [])  # absent in dicts written before unknown entries were kept apart
        if not isinstance(unknown, list):
            raise ValueError("'unknown' must be a list of [chunk, task] pairs")
        for pair in unknown:
            if not isinstance(pair, (list, tuple)) or len(pair) != 2:
                raise ValueError(f"'unknown' entries must be [chunk, task] pairs, got {pair!r}")
            i, j = pair
            matrix._check_index("chunk", i)
            matrix._check_index("task", j)
            if rows[i][j] is not None:
                raise ValueError(f"'unknown' lists [{i}, {j}] but acc[{i}][{j}] = {rows[i][j]!r}")
            matrix.set(i, j, None)
        return matrix

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, AccuracyMatrix):
            return NotImplemented
        return (self.task_names == other.task_names and np.array_equal(self._acc, other._acc, equal_nan=True)
                and np.array_equal(self._recorded, other._recorded))

    def __repr__(self) -> str:
        return f"AccuracyMatrix(num_tasks={self.num_tasks}, completed_rows={self.completed_rows})"

    def _check_index(self, name: str, index: int) -> None:
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or not 0 <= index < self.num_tasks:
            raise ValueError(f"{name} must be an integer in [0, {self.num_tasks - 1}], got {index!r}")


@dataclass(frozen=True)
class STJTGap:
    """JT minus ST average accuracy: ``per_chunk[i]`` over tasks ``0..i`` after chunk ``i``; ``final`` is the last."""

    final: float
    per_chunk: tuple[float, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"final": self.final, "per_chunk": list(self.per_chunk)}


def average_accuracy(acc: np.ndarray | AccuracyMatrix) -> float:
    """Mean accuracy over all tasks after the last chunk: ``mean_j acc[T-1, j]``; NaN if one is unknown."""
    acc = _as_matrix(acc, "acc")
    if _lacks(acc, "avg_acc"):
        return math.nan
    return float(acc[-1].mean())


def backward_transfer(acc: np.ndarray | AccuracyMatrix) -> float:
    """BWT = ``mean_{j<T-1} acc[T-1, j] - acc[j, j]``; negative means forgetting. NaN when T == 1 or an entry it
    needs is unknown."""
    acc = _as_matrix(acc, "acc")
    last = acc.shape[0] - 1
    if last == 0 or _lacks(acc, "bwt"):
        return math.nan
    return float(np.mean([acc[last, j] - acc[j, j] for j in range(last)]))


def forward_transfer(acc: np.ndarray | AccuracyMatrix, baseline: Sequence[float | None] | np.ndarray) -> float:
    """FWT = ``mean_{j>0} acc[j-1, j] - baseline[j]`` with ``baseline`` ``[T]`` (accuracy before training).

    Needs the superdiagonal: each task evaluated once before its own chunk. NaN when T == 1, or when an entry it
    needs (of ``acc`` or of ``baseline``; NaN or None there) is unknown.
    """
    acc = _as_matrix(acc, "acc")
    size = acc.shape[0]
    base = np.asarray(baseline, dtype=np.float64)  # numpy turns None into NaN here
    if base.shape != (size,):
        raise ValueError(f"baseline must have shape [{size}] (one accuracy per task), found {list(base.shape)}")
    if size == 1 or _lacks(acc, "fwt") or np.isnan(base[1:]).any():
        return math.nan
    return float(np.mean([acc[j - 1, j] - base[j] for j in range(1, size)]))


def forgetting(acc: np.ndarray | AccuracyMatrix) -> float:
    """Average forgetting (Chaudhry et al. 2018, "Riemannian Walk for Incremental Learning", eq. 9):
    ``mean_{j<T-1} max_{j<=l<T-1} acc[l, j] - acc[T-1, j]``.

    The max starts at task j's own chunk: an accuracy on task j measured before it was trained on is not
    knowledge the model later forgot. NaN when T == 1 or an entry it needs (on or below the diagonal) is unknown.
    """
    acc = _as_matrix(acc, "acc")
    last = acc.shape[0] - 1
    if last == 0 or _lacks(acc, "forgetting"):
        return math.nan
    return float(np.mean([acc[j:last, j].max() - acc[last, j] for j in range(last)]))


def st_jt_gap(st_acc: np.ndarray | AccuracyMatrix, jt_acc: np.ndarray | AccuracyMatrix) -> STJTGap:
    """Gap between joint training (``jt_acc``, i.i.d. over the chunks seen so far) and sequential streaming
    training (``st_acc``), both ``[T, T]``: ``per_chunk[i] = A_jt(i) - A_st(i)`` with
    ``A(i) = mean_{j<=i} acc[i, j]``; ``final = per_chunk[T-1]``, the gap in :func:`average_accuracy`.
    Positive means streaming falls short of joint training. A chunk whose ``A(i)`` needs an unknown entry of
    either matrix has a NaN gap.
    """
    st = _as_matrix(st_acc, "st_acc")
    jt = _as_matrix(jt_acc, "jt_acc")
    if st.shape != jt.shape:
        raise ValueError(f"st_acc and jt_acc must have the same shape, found {list(st.shape)} and {list(jt.shape)}")
    # NaN propagates through the mean: an unknown entry makes exactly its own chunk's gap unknown.
    per_chunk = tuple(float(jt[i, : i + 1].mean() - st[i, : i + 1].mean()) for i in range(st.shape[0]))
    return STJTGap(final=per_chunk[-1], per_chunk=per_chunk)


def continual_metrics(
    acc: np.ndarray | AccuracyMatrix, baseline: Sequence[float | None] | np.ndarray | None = None
) -> dict[str, float]:
    """All scalar metrics at once, keyed for logging: ``avg_acc``, ``bwt``, ``forgetting`` and, when a
    ``baseline`` is given, ``fwt``. A metric that needs an unknown entry is NaN (see ``missing_for``)."""
    metrics = {"avg_acc": average_accuracy(acc), "bwt": backward_transfer(acc), "forgetting": forgetting(acc)}
    if baseline is not None:
        metrics["fwt"] = forward_transfer(acc, baseline)
    return metrics


def _as_matrix(acc: np.ndarray | AccuracyMatrix, name: str) -> np.ndarray:
    matrix = np.asarray(acc, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1] or matrix.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty square [T, T] matrix, found shape {list(matrix.shape)}")
    outside = np.argwhere(~np.isnan(matrix) & ((matrix < 0) | (matrix > 1)))
    if len(outside):
        i, j = outside[0]
        raise ValueError(
            f"{name}[{i}][{j}] = {float(matrix[i, j])!r}: accuracies are fractions in [0, 1] (NaN for unknown)"
        )
    return matrix


def _lacks(matrix: np.ndarray, metric: str) -> bool:
    return any(math.isnan(matrix[i, j]) for i, j in _needed(metric, matrix.shape[0]))


def _check_accuracy(value: float | None, where: str) -> float:
    """A recordable value: a fraction in [0, 1], or NaN for unknown (None and NaN both mean unknown)."""
    if value is None:
        return math.nan
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where} must be a number in [0, 1], got {value!r}") from None
    if math.isnan(value):
        return value
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{where} must be in [0, 1] (NaN or None for unknown), got {value!r}")
    return value
