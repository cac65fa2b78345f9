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
* forgetting (Chaudhry et al. 2018, RWalk): ``mean_{j<T-1} max_{l<T-1} acc[l, j] - acc[T-1, j]``.
* ST/JT gap: joint (i.i.d.) training minus sequential (streaming) training, in average accuracy over the tasks
  seen so far, after each chunk; the last entry is the gap in final average accuracy.

Unknown entries are NaN. A metric raises ValueError naming the first entry it needs that is unknown; entries
above the diagonal (tasks not yet trained on) are only needed by forward transfer, and forgetting's max uses
them only where known. Metrics that average over an empty set (BWT, FWT, forgetting with T == 1) return NaN.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "AccuracyMatrix",
    "STJTGap",
    "average_accuracy",
    "backward_transfer",
    "continual_metrics",
    "forgetting",
    "forward_transfer",
    "st_jt_gap",
]


class AccuracyMatrix:
    """A ``[T, T]`` accuracy matrix filled as the stream advances; NaN marks entries not measured (yet).

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

    def set(self, chunk: int, task: int, value: float) -> None:
        """Record the accuracy on ``task`` after training chunk ``chunk`` (overwrites a previous value)."""
        self._check_index("chunk", chunk)
        self._check_index("task", task)
        self._acc[chunk, task] = _check_accuracy(value, f"acc[{chunk}][{task}]")

    def record_row(self, chunk: int, accuracies: Sequence[float]) -> None:
        """Record the accuracies on all T tasks after training chunk ``chunk``."""
        self._check_index("chunk", chunk)
        if len(accuracies) != self.num_tasks:
            raise ValueError(f"row for chunk {chunk} has {len(accuracies)} values, expected {self.num_tasks}")
        row = [_check_accuracy(v, f"acc[{chunk}][{task}]") for task, v in enumerate(accuracies)]
        self._acc[chunk] = row

    def get(self, chunk: int, task: int) -> float:
        """The recorded accuracy, NaN if not measured."""
        self._check_index("chunk", chunk)
        self._check_index("task", task)
        return float(self._acc[chunk, task])

    @property
    def completed_rows(self) -> int:
        """Number of leading chunks whose row is fully measured; metrics on ``values[:n, :n]`` are then defined."""
        full = ~np.isnan(self._acc).any(axis=1)
        return int(np.argmin(full)) if not full.all() else self.num_tasks

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form: ``{"num_tasks": T, "task_names": [...] | None, "acc": [[float | None]]}``."""
        acc = [[None if math.isnan(v) else float(v) for v in row] for row in self._acc.tolist()]
        return {"num_tasks": self.num_tasks, "task_names": self.task_names, "acc": acc}

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
        return matrix

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, AccuracyMatrix):
            return NotImplemented
        return self.task_names == other.task_names and np.array_equal(self._acc, other._acc, equal_nan=True)

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
    """Mean accuracy over all tasks after the last chunk: ``mean_j acc[T-1, j]``."""
    acc = _as_matrix(acc, "acc")
    last = acc.shape[0] - 1
    _require_known(acc, "acc", [(last, j) for j in range(acc.shape[0])])
    return float(acc[last].mean())


def backward_transfer(acc: np.ndarray | AccuracyMatrix) -> float:
    """BWT = ``mean_{j<T-1} acc[T-1, j] - acc[j, j]``; negative means forgetting. NaN when T == 1."""
    acc = _as_matrix(acc, "acc")
    last = acc.shape[0] - 1
    if last == 0:
        return math.nan
    _require_known(acc, "acc", [(i, j) for j in range(last) for i in (j, last)])
    return float(np.mean([acc[last, j] - acc[j, j] for j in range(last)]))


def forward_transfer(acc: np.ndarray | AccuracyMatrix, baseline: Sequence[float] | np.ndarray) -> float:
    """FWT = ``mean_{j>0} acc[j-1, j] - baseline[j]`` with ``baseline`` ``[T]`` (accuracy before training).

    Needs the superdiagonal: each task evaluated once before its own chunk. NaN when T == 1.
    """
    acc = _as_matrix(acc, "acc")
    size = acc.shape[0]
    base = np.asarray(baseline, dtype=np.float64)
    if base.shape != (size,):
        raise ValueError(f"baseline must have shape [{size}] (one accuracy per task), found {list(base.shape)}")
    if size == 1:
        return math.nan
    _require_known(acc, "acc", [(j - 1, j) for j in range(1, size)])
    for j in range(1, size):
        if not np.isfinite(base[j]):
            raise ValueError(f"baseline[{j}] is unknown (NaN); forward transfer needs it")
    return float(np.mean([acc[j - 1, j] - base[j] for j in range(1, size)]))


def forgetting(acc: np.ndarray | AccuracyMatrix) -> float:
    """Average forgetting = ``mean_{j<T-1} max_{l<T-1} acc[l, j] - acc[T-1, j]``. NaN when T == 1.

    Entries above the diagonal (task j evaluated before it was trained) enter the max only where known.
    """
    acc = _as_matrix(acc, "acc")
    last = acc.shape[0] - 1
    if last == 0:
        return math.nan
    _require_known(acc, "acc", [(l, j) for j in range(last) for l in range(j, last + 1)])
    return float(np.mean([np.nanmax(acc[:last, j]) - acc[last, j] for j in range(last)]))


def st_jt_gap(st_acc: np.ndarray | AccuracyMatrix, jt_acc: np.ndarray | AccuracyMatrix) -> STJTGap:
    """Gap between joint training (``jt_acc``, i.i.d. over the chunks seen so far) and sequential streaming
    training (``st_acc``), both ``[T, T]``: ``per_chunk[i] = A_jt(i) - A_st(i)`` with
    ``A(i) = mean_{j<=i} acc[i, j]``; ``final = per_chunk[T-1]``, the gap in :func:`average_accuracy`.
    Positive means streaming falls short of joint training.
    """
    st = _as_matrix(st_acc, "st_acc")
    jt = _as_matrix(jt_acc, "jt_acc")
    if st.shape != jt.shape:
        raise ValueError(f"st_acc and jt_acc must have the same shape, found {list(st.shape)} and {list(jt.shape)}")
    size = st.shape[0]
    seen = [(i, j) for i in range(size) for j in range(i + 1)]
    _require_known(st, "st_acc", seen)
    _require_known(jt, "jt_acc", seen)
    per_chunk = tuple(float(jt[i, : i + 1].mean() - st[i, : i + 1].mean()) for i in range(size))
    return STJTGap(final=per_chunk[-1], per_chunk=per_chunk)


def continual_metrics(
    acc: np.ndarray | AccuracyMatrix, baseline: Sequence[float] | np.ndarray | None = None
) -> dict[str, float]:
    """All scalar metrics at once, keyed for logging: ``avg_acc``, ``bwt``, ``forgetting`` and, when a
    ``baseline`` is given, ``fwt``."""
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


def _require_known(matrix: np.ndarray, name: str, entries: list[tuple[int, int]]) -> None:
    for i, j in entries:
        if np.isnan(matrix[i, j]):
            raise ValueError(f"{name}[{i}][{j}] is unknown (NaN): evaluate task {j} after chunk {i} first")


def _check_accuracy(value: float, where: str) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where} must be a number in [0, 1], got {value!r}") from None
    if not 0.0 <= value <= 1.0:  # also rejects NaN: unknown entries are simply not set
        raise ValueError(f"{where} must be in [0, 1], got {value!r}")
    return value
