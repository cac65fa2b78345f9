"""A slimmable network trained with US3L through the real driver (Ray Train, the evaluation actor, MLflow on SQLite):
every chunk's eval run holds each width's kNN top-1, params and MACs (params and MACs fall with the width), and
`streamssl report` gives the accuracy-vs-width table and PNG from the last chunk."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from rich.console import Console

from orchestrator.report import make_report
from orchestrator.run.launch import run_experiment
from orchestrator.spec.experiment import validate_spec
from orchestrator.tracking import tags as tr
from orchestrator.tracking.tracker import Tracker
from tests.specs import tiny_spec

WIDTHS = ("1.0", "0.5", "0.25")


@pytest.mark.slow
def test_us3l_line_is_evaluated_at_every_width_and_reported(tmp_path: Path, synthetic_url: str, ray_local) -> None:
    spec = validate_spec(tiny_spec(
        "us3l", synthetic_url, stream={"kind": "distant_class", "chunks": 2, "seed": 0},
        lines={"method": ["us3l"], "strategy": ["sequential"]},
        backbone={"name": "slimmable_resnet18", "width": 8, "cifar_stem": False},
        methods={"us3l": {"proj_hidden": 32, "proj_out": 16, "pred_hidden": 16}},
        optim={"epochs_per_chunk": 1}, resources={"workers": 1},
        eval={"every_chunk": ["knn"], "widths": [float(w) for w in WIDTHS], "baseline": False},
        storage={"workdir": str(tmp_path / "runs")}))
    run_experiment(spec, console=Console(file=io.StringIO(), width=120))

    client = MlflowClient(spec.tracking_uri)
    exp = client.get_experiment_by_name(spec.experiment_name)
    evals = client.search_runs([exp.experiment_id], filter_string=f"tags.`{tr.RUN_TYPE}` = 'eval'")
    assert sorted(int(r.data.tags[tr.CHUNK]) for r in evals) == [0, 1]
    for run in evals:
        metrics = run.data.metrics
        for width in WIDTHS:
            assert 0.0 <= metrics[f"knn_top1_w{width}"] <= 1.0
        assert "knn_top1_w0.75" not in metrics  # only eval.widths
        for cost in ("params", "macs"):
            assert metrics[f"{cost}_w0.25"] < metrics[f"{cost}_w0.5"] < metrics[f"{cost}_w1.0"]
        assert 0.0 <= metrics["knn_top1"] <= 1.0  # the full-width protocol as before

    report, paths = make_report(Tracker(spec.tracking_uri), spec.experiment_name, tmp_path / "report")
    (table,) = [t for t in report.tables if t.name == "accuracy_by_width.knn"]
    (row,) = table.rows
    last = next(r for r in evals if r.data.tags[tr.CHUNK] == "1")
    assert {c: row.cells[c].value for c in table.value_columns} == {
        f"w{w}": last.data.metrics[f"knn_top1_w{w}"] for w in WIDTHS}
    png = tmp_path / "report" / "figures" / "distant_class" / "accuracy_by_width.knn.png"
    assert png in paths and png.stat().st_size > 0
    plan_run = client.search_runs([exp.experiment_id], filter_string=f"tags.`{tr.RUN_TYPE}` = 'plan'")[0]
    assert "report/accuracy_by_width.knn.png" in [a.path for a in client.list_artifacts(plan_run.info.run_id,
                                                                                          "report")]
