"""Human-facing reports: a rich results table and PNG plots of continual-learning results.

Usage::

    from rich.console import Console
    from evaluators.report import plot_accuracy_matrix, plot_metric_curves, results_table
    Console().print(results_table(rows, ["run", "method", "knn_acc", "bwt"]))
    plot_accuracy_matrix(matrix, "out/acc_matrix.png", title="simclr / class-incremental")
    plot_metric_curves({"knn": knn_per_chunk, "linear": lin_per_chunk}, "out/acc.png", "accuracy", "accuracy")

Plots are drawn on a bare ``matplotlib.figure.Figure`` with the Agg canvas, never through pyplot: no global
figure state, no GUI backend, safe in worker threads and headless machines. matplotlib is imported only when a
plot is drawn, so importing this module for the table stays cheap.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from rich.table import Table
from rich.text import Text

__all__ = ["MISSING", "plot_accuracy_matrix", "plot_metric_curves", "results_table"]

MISSING = "—"  # shown for None, NaN and absent keys


def results_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str], title: str | None = None) -> Table:
    """One row per dict, one column per name in ``columns`` (in that order).

    Floats print with 3 decimals; None, NaN and keys a row lacks print as "—"; other values with ``str``.
    Columns whose values are all numbers are right-aligned. Cell text is literal (no rich markup), so a run
    name like "[baseline]" shows as written.
    """
    columns = list(columns)
    if not columns:
        raise ValueError("columns is empty: name at least one column to show")
    duplicates = sorted({c for c in columns if columns.count(c) > 1})
    if duplicates:
        raise ValueError(f"columns has duplicates: {duplicates}")
    for index, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise ValueError(f"rows[{index}] must be a dict, got {type(row).__name__}")

    table = Table(title=title)
    for column in columns:
        present = [row[column] for row in rows if _is_present(row.get(column))]
        numeric = bool(present) and all(_is_number(v) for v in present)
        table.add_column(Text(column), justify="right" if numeric else "left")
    for row in rows:
        table.add_row(*(Text(_format_cell(row.get(column))) for column in columns))
    return table


def plot_accuracy_matrix(
    acc: Any,
    path: str | os.PathLike[str],
    title: str = "Accuracy matrix",
    task_names: Sequence[str] | None = None,
) -> Path:
    """Heatmap of ``acc`` ``[T, T]`` (rows: after training chunk i; columns: evaluated on task j) with each
    value written in its cell (for T <= 20; beyond that the numbers would not fit). NaN cells (unknown or not
    measured) are grey and marked "—", like the tables. Accepts a numpy array or an ``AccuracyMatrix``. Writes a
    PNG at ``path`` and returns it."""
    matrix = np.asarray(acc, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1] or matrix.shape[0] == 0:
        raise ValueError(f"acc must be a non-empty square [T, T] matrix, found shape {list(matrix.shape)}")
    size = matrix.shape[0]
    if task_names is not None and len(task_names) != size:
        raise ValueError(f"task_names has {len(task_names)} names, expected {size}")
    path = _png_path(path)

    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    side = min(max(4.0, 0.55 * size + 2.5), 20.0)
    fig = Figure(figsize=(side + 1.0, side), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    cmap = colormaps["viridis"].with_extremes(bad="0.85")
    image = ax.imshow(np.ma.masked_invalid(matrix), cmap=cmap, vmin=0.0, vmax=1.0, origin="upper")
    fig.colorbar(image, ax=ax, label="accuracy", shrink=0.8)
    if size <= 20:
        fontsize = max(6.0, 11.0 - 0.3 * size)
        for i in range(size):
            for j in range(size):
                if math.isnan(matrix[i, j]):
                    # Marked, so an unknown cell is not read as a rendering gap.
                    ax.text(j, i, MISSING, ha="center", va="center", color="0.35", fontsize=fontsize)
                else:
                    # Dark text on the bright (high) end of viridis, white on the dark end.
                    color = "black" if matrix[i, j] > 0.6 else "white"
                    ax.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", color=color, fontsize=fontsize)
    ax.set_xlabel("evaluated on task")
    ax.set_ylabel("after training chunk")
    ax.set_title(title)
    if task_names is not None:
        ax.set_xticks(range(size), [str(n) for n in task_names], rotation=45, ha="right")
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    fig.savefig(path, format="png")
    return path


def plot_metric_curves(
    series: Mapping[str, Sequence[float | None]],
    path: str | os.PathLike[str],
    title: str = "",
    ylabel: str = "",
    xlabel: str = "chunk",
    x: Sequence[float] | None = None,
    integer_x: bool = True,
) -> Path:
    """One line per named series, value ``k`` plotted at ``x[k]`` (default: at index ``k``, the chunk); None/NaN
    values leave a gap. Series may differ in length (up to ``len(x)``). ``integer_x``: ticks on whole numbers only
    (chunks, segments; not widths). Writes a PNG at ``path`` and returns it."""
    if not series:
        raise ValueError("series is empty: give at least one named sequence of values")
    xs = None if x is None else np.asarray(x, dtype=np.float64)
    curves: dict[str, np.ndarray] = {}
    for name, values in series.items():
        try:
            curve = np.array([math.nan if v is None else float(v) for v in values], dtype=np.float64)
        except (TypeError, ValueError):
            raise ValueError(f"series[{name!r}] must be a sequence of numbers or None") from None
        if curve.size == 0:
            raise ValueError(f"series[{name!r}] is empty")
        if xs is not None and curve.size > xs.size:
            raise ValueError(f"series[{name!r}] has {curve.size} values but x only {xs.size} positions")
        curves[str(name)] = curve
    path = _png_path(path)

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(7.0, 4.5), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for name, curve in curves.items():
        ax.plot(np.arange(curve.size) if xs is None else xs[:curve.size], curve, marker="o", markersize=4, label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if integer_x:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    fig.savefig(path, format="png")
    return path


def _png_path(path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"path must end in .png (plots are written as PNG), got {str(path)!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _is_present(value: Any) -> bool:
    return value is not None and not (_is_number(value) and math.isnan(float(value)))


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _format_cell(value: Any) -> str:
    if not _is_present(value):
        return MISSING
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return str(int(value))
    if _is_number(value):
        return f"{float(value):.3f}"
    return str(value)
