"""Report: the table shows formatted values; the plots are real PNGs of sane size."""

import io
import math

import numpy as np
import pytest
from PIL import Image
from rich.console import Console

from evaluators.continual import AccuracyMatrix
from evaluators.report import plot_accuracy_matrix, plot_metric_curves, results_table


def _render(table) -> str:
    console = Console(record=True, width=160, file=io.StringIO())
    console.print(table)
    return console.export_text()


def test_results_table_formats_values():
    rows = [
        {"run": "simclr-seq", "method": "simclr", "knn_acc": 0.61234, "bwt": -0.0456, "chunks": 5},
        {"run": "[byol] joint", "method": "byol", "knn_acc": np.float32(0.7), "bwt": None, "chunks": 5},
        {"run": "lost", "method": "simclr", "knn_acc": math.nan},
    ]
    table = results_table(rows, ["run", "knn_acc", "bwt", "chunks"], title="Results")
    assert [c.header.plain for c in table.columns] == ["run", "knn_acc", "bwt", "chunks"]
    assert table.row_count == 3
    text = _render(table)
    assert "Results" in text
    for value in ("simclr-seq", "0.612", "-0.046", "0.700", "[byol] joint", "5"):
        assert value in text
    assert "0.61234" not in text and "method" not in text
    lines = {line.split("│")[1].strip(): line for line in text.splitlines() if line.count("│") >= 4}
    # None, NaN and absent keys all print as an em dash
    assert [c.strip() for c in lines["[byol] joint"].split("│")[1:-1]] == ["[byol] joint", "0.700", "—", "5"]
    assert [c.strip() for c in lines["lost"].split("│")[1:-1]] == ["lost", "—", "—", "—"]
    # numeric columns right-aligned, text left-aligned
    assert [c.justify for c in table.columns] == ["left", "right", "right", "right"]


def test_results_table_rejects_bad_columns_and_rows():
    with pytest.raises(ValueError, match="columns is empty"):
        results_table([{"a": 1}], [])
    with pytest.raises(ValueError, match=r"duplicates: \['a'\]"):
        results_table([{"a": 1}], ["a", "a"])
    with pytest.raises(ValueError, match=r"rows\[1\] must be a dict"):
        results_table([{"a": 1}, [1]], ["a"])


def _png(path):
    assert path.is_file() and path.stat().st_size > 5_000
    with Image.open(path) as image:
        assert image.format == "PNG"
        return image.size


def test_plot_accuracy_matrix_writes_png(tmp_path):
    acc = np.array([[0.9, 0.2, np.nan], [0.7, 0.8, 0.3], [0.6, 0.5, 0.85]])
    out = plot_accuracy_matrix(acc, tmp_path / "nested" / "acc.png", title="simclr")
    assert out == tmp_path / "nested" / "acc.png"
    width, height = _png(out)
    assert 300 <= width <= 2500 and 300 <= height <= 2500

    # an AccuracyMatrix and task names work too; a bigger matrix gives a bigger figure
    matrix = AccuracyMatrix(12, task_names=[f"task {i}" for i in range(12)])
    for i in range(12):
        matrix.record_row(i, list(np.linspace(0.1, 0.9, 12)))
    big_width, big_height = _png(plot_accuracy_matrix(matrix, str(tmp_path / "big.png"), "12 tasks", matrix.task_names))
    assert big_height > height and big_width <= 2500


def test_plot_accuracy_matrix_validates(tmp_path):
    with pytest.raises(ValueError, match="square"):
        plot_accuracy_matrix(np.zeros((2, 3)), tmp_path / "x.png")
    with pytest.raises(ValueError, match="task_names has 1"):
        plot_accuracy_matrix(np.zeros((2, 2)), tmp_path / "x.png", task_names=["a"])
    with pytest.raises(ValueError, match=r"must end in \.png"):
        plot_accuracy_matrix(np.zeros((2, 2)), tmp_path / "x.pdf")
    assert not any(tmp_path.iterdir())


def test_plot_metric_curves_writes_png(tmp_path):
    series = {"knn": [0.3, 0.42, None, 0.5], "linear": [0.35, 0.5, 0.55], "gap": [float("nan"), 0.1, 0.08, 0.05]}
    out = plot_metric_curves(series, tmp_path / "curves.png", title="accuracy per chunk", ylabel="accuracy")
    width, height = _png(out)
    assert (width, height) == (700, 450)


def test_plot_metric_curves_validates(tmp_path):
    with pytest.raises(ValueError, match="series is empty"):
        plot_metric_curves({}, tmp_path / "c.png")
    with pytest.raises(ValueError, match=r"series\['knn'\] is empty"):
        plot_metric_curves({"knn": []}, tmp_path / "c.png")
    with pytest.raises(ValueError, match=r"series\['knn'\] must be a sequence of numbers"):
        plot_metric_curves({"knn": ["high"]}, tmp_path / "c.png")
    with pytest.raises(ValueError, match=r"series\['knn'\] has 3 values but x only 2 positions"):
        plot_metric_curves({"knn": [0.1, 0.2, 0.3]}, tmp_path / "c.png", x=[5, 10])


def test_plot_metric_curves_draws_each_value_at_its_x(tmp_path, monkeypatch):
    # Online curves are drawn against the stream batches seen (2, 5, 9), not the points' order.
    from matplotlib.axes import Axes

    drawn = []
    original = Axes.plot
    monkeypatch.setattr(Axes, "plot", lambda self, xs, ys, **kw: drawn.append((list(xs), list(ys)))
                        or original(self, xs, ys, **kw))
    plot_metric_curves({"a": [0.1, 0.2, 0.3], "b": [0.4]}, tmp_path / "c.png", x=[2, 5, 9])
    assert drawn == [([2.0, 5.0, 9.0], [0.1, 0.2, 0.3]), ([2.0], [0.4])]


def test_unknown_accuracies_show_as_a_dash_in_tables_and_plots(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    from evaluators.continual import continual_metrics

    # task 1 had no query rows: its column is unknown after every chunk
    matrix = AccuracyMatrix(3)
    for i, row in enumerate([[0.9, None, 0.1], [0.7, None, 0.3], [0.6, None, 0.85]]):
        matrix.record_row(i, row)
    metrics = continual_metrics(matrix, baseline=[0.1, None, 0.05])
    text = _render(results_table([{"line": "simclr-sequential", **metrics}], ["line", "avg_acc", "bwt", "fwt"]))
    (line,) = [ln for ln in text.splitlines() if "simclr-sequential" in ln]
    assert [c.strip() for c in line.split("│")[1:-1]] == ["simclr-sequential", "—", "—", "—"]

    figures = []
    save = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: (figures.append(fig), save(fig, *a, **k))[1])
    out = plot_accuracy_matrix(matrix, tmp_path / "acc.png")
    (fig,) = figures
    (ax,) = [a for a in fig.axes if a.get_xlabel() == "evaluated on task"]
    cells = {(round(t.get_position()[1]), round(t.get_position()[0])): t.get_text() for t in ax.texts}
    assert cells == {(0, 0): "0.90", (0, 1): "—", (0, 2): "0.10", (1, 0): "0.70", (1, 1): "—", (1, 2): "0.30",
                     (2, 0): "0.60", (2, 1): "—", (2, 2): "0.85"}
    # an unknown cell is drawn in the colour map's grey (0.85 * 255 = 216.75), away from its dash
    x, y = ax.transData.transform((1.3, 0.3))
    with Image.open(out) as image:
        r, g, b = image.convert("RGB").getpixel((int(x), image.height - int(y)))
    assert r == g == b and abs(r - 216.75) < 1
