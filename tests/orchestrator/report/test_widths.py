"""The report's accuracy-vs-width table and PNG: slimmable lines only, from the last chunk's eval run's
`{name}_top1_w*` (an earlier chunk's are not read), cost by width, and the figure logged to the plan run."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from orchestrator.report.collect import collect
from orchestrator.report.widths import width_figures, width_tables
from orchestrator.tracking.tracker import Tracker
from tests.orchestrator.study_store import Recipe, build_study

STREAM, SLIM, PLAIN = "random_class", "simclr-sequential", "simclr-joint"
WIDTHS = {"1.0": 0.62, "0.5": 0.55, "0.25": 0.41}


@pytest.fixture(scope="module")
def store(migrated_mlflow_store, tmp_path_factory):
    """simclr ST and JT over 2 chunks; the ST line's eval runs also log per-width metrics (a slimmable line)."""
    db = tmp_path_factory.mktemp("widths") / "mlflow.db"
    shutil.copyfile(migrated_mlflow_store, db)  # the session's migrated empty store: no migrations here
    store = build_study(db, recipes=[Recipe(STREAM, "ssl")], chunks=2,
                        downstream=(), plans={"ssl": ("simclr", ["sequential", "joint"])})
    client = MlflowClient(store.uri)
    last, first = store.eval_runs[(STREAM, SLIM, 1)], store.eval_runs[(STREAM, SLIM, 0)]
    for width, acc in WIDTHS.items():
        client.log_metric(last, f"knn_top1_w{width}", acc)
        client.log_metric(first, f"knn_top1_w{width}", acc - 0.3)  # not the last chunk: never read
        client.log_metric(last, f"params_w{width}", 1e6 * float(width) ** 2)
    for width, acc in (("1.0", 0.6), ("0.5", 0.5)):  # the linear probe's last chunk lacks width 0.25
        client.log_metric(last, f"linear_top1_w{width}", acc)
    client.log_metric(first, "linear_top1_w0.25", 0.2)
    return store


def test_accuracy_by_width_reads_the_last_chunks_eval_run(store) -> None:
    last = store.eval_runs[(STREAM, SLIM, 1)]
    tables = {t.name: t for t in width_tables(collect(Tracker(store.uri), "study"))}
    assert sorted(tables) == ["accuracy_by_width.knn", "accuracy_by_width.linear", "cost_by_width.params"]
    knn = tables["accuracy_by_width.knn"]
    assert knn.value_columns == ["w1.0", "w0.5", "w0.25"]
    (row,) = knn.rows  # the joint line logs no per-width metric: not slimmable, no row
    assert row.index["line"] == SLIM
    assert {c: row.cells[c].value for c in knn.value_columns} == {f"w{w}": a for w, a in WIDTHS.items()}
    assert row.cells["w0.5"].runs == (last,) and row.cells["w0.5"].source == "knn_top1_w0.5"
    (linear,) = tables["accuracy_by_width.linear"].rows
    assert linear.cells["w0.5"].value == 0.5
    assert tables["accuracy_by_width.linear"].value_columns == ["w1.0", "w0.5"]  # chunk 0's w0.25 is not read
    (params,) = tables["cost_by_width.params"].rows
    assert params.cells["w0.25"].value < params.cells["w0.5"].value < params.cells["w1.0"].value


def test_one_png_per_protocol_drawn_at_the_widths(store, tmp_path: Path) -> None:
    # (make_report publishing it to the plan run is run by tests/integration/test_us3l_run.py)
    drawn = width_figures(collect(Tracker(store.uri), "study"), tmp_path)
    assert [(p.relative_to(tmp_path).as_posix(), runs) for p, runs, _ in drawn] == [
        (f"{STREAM}/accuracy_by_width.knn.png", [store.plan_of_line[(STREAM, SLIM)]]),
        (f"{STREAM}/accuracy_by_width.linear.png", [store.plan_of_line[(STREAM, SLIM)]])]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p, _, _ in drawn)
