"""`streamssl ui` looked at in a real browser (issue 12): a real driver run on the synthetic set logs two lines
whose chunk runs differ in one param (line.strategy) and carry knn_top1; headless Chromium opens the experiment's
runs table and MLflow's compare view of the two runs, reads the names, the param and the metric off the page, and
saves full-page screenshots (test-artifacts/ui/, or $STREAMSSL_UI_ARTIFACTS)."""

from __future__ import annotations

import io

import pytest
from mlflow.tracking import MlflowClient
from rich.console import Console

from orchestrator.tracking import lineage as tr
from tests.cli import browser
from tests.cli.ui_process import streamssl_ui
from tests.specs import tiny_spec

pytestmark = pytest.mark.slow
NAME = "ui-browser"


@pytest.fixture(scope="session")
def chromium() -> str:
    """Session-scoped so that it comes before the session's data and Ray: a missing browser skips (or fails, in CI)
    before a minute of training."""
    return browser.chromium_executable()


@pytest.fixture(scope="module")
def two_lines(chromium: str, tmp_path_factory, synthetic_url: str, ray_local):
    """One chunk of simclr-sequential and of simclr-joint, trained, evaluated (kNN) and logged by the driver."""
    from orchestrator.experiment import run_experiment
    from orchestrator.spec import validate_spec

    work = tmp_path_factory.mktemp("ui-browser")
    spec = validate_spec(tiny_spec(NAME, synthetic_url, stream={"chunks": 1},
                                   lines={"method": ["simclr"], "strategy": ["sequential", "joint"]},
                                   optim={"epochs_per_chunk": 1, "batch_size": 64}, eval={"every_chunk": ["knn"]},
                                   storage={"workdir": str(work / "runs")}))
    run_experiment(spec, console=Console(file=io.StringIO(), width=120))
    client = MlflowClient(spec.tracking_uri)
    experiment = client.get_experiment_by_name(NAME)
    (plan,) = client.search_runs([experiment.experiment_id], f"tags.`{tr.RUN_TYPE}` = 'plan'")
    chunks = client.search_runs([experiment.experiment_id], f"tags.`{tr.RUN_TYPE}` = 'chunk'",
                                order_by=["attributes.run_name ASC"])
    assert len(chunks) == 2 and {r.data.params["line.strategy"] for r in chunks} == {"sequential", "joint"}
    return {"uri": spec.tracking_uri, "experiment_id": experiment.experiment_id, "plan": plan.info.run_name,
            "chunks": chunks}


def _shown(value: str, logged: float) -> bool:
    """The page shows the logged value (the compare view rounds to 4 significant digits or so)."""
    return abs(float(value) - logged) <= max(1e-3, 1e-3 * abs(logged))


def test_runs_table_and_compare_view_show_both_runs_params_and_metric(two_lines) -> None:
    chunks, experiment_id = two_lines["chunks"], two_lines["experiment_id"]
    folder = browser.artifacts_folder()
    shots = [folder / "runs-table.png", folder / "compare-runs.png"]
    for old in shots:
        old.unlink(missing_ok=True)
    with streamssl_ui(two_lines["uri"], NAME) as ui, browser.chromium_page() as page:
        ui.wait_for_line(f"{ui.base_url}/#/experiments/{experiment_id}/runs?workflowType=machine_learning")

        # The runs table: the plan run, expanded to its chunk runs, with the param and the metric as columns.
        browser.open_runs_table(page, ui.base_url, experiment_id, expand=[two_lines["plan"]],
                                columns=["line.strategy", "knn_top1"])
        for run in chunks:
            name = run.info.run_name
            assert browser.runs_table_cell(page, name, "line.strategy") == run.data.params["line.strategy"], name
            assert _shown(browser.runs_table_cell(page, name, "knn_top1"), run.data.metrics["knn_top1"]), name
        assert browser.screenshot(page, "runs-table", folder) == shots[0]

        # The compare view of the two chunk runs, differing params only.
        browser.open_compare(page, ui.base_url, experiment_id, [r.info.run_id for r in chunks],
                             diff_only=["Parameters"])
        assert browser.compare_param(page, "line.strategy") == [r.data.params["line.strategy"] for r in chunks]
        # a param both runs share is hidden by "Show diff only", so the table shown is the diff
        assert page.get_by_role("rowheader", name="optim.lr", exact=True).count() == 0
        run_names = page.get_by_role("row").filter(has_text="Run Name:")
        assert run_names.first.inner_text().split()[2:] == [r.info.run_name for r in chunks]
        values = browser.compare_metric(page, "knn_top1")  # scrolls the metrics grid to it, for the screenshot
        assert len(values) == 2 and all(_shown(v, r.data.metrics["knn_top1"]) for v, r in zip(values, chunks)), values
        assert browser.screenshot(page, "compare-runs", folder) == shots[1]

    for shot in shots:
        data = shot.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n", shot
        assert len(data) > 50_000, f"{shot} is only {len(data)} bytes"
