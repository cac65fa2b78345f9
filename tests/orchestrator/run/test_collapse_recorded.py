"""A US-Net + SimSiam line whose representation collapses is stopped and recorded like a diverged one: the runner
sends RepresentationCollapseError (a NonFiniteLossError) as a `diverged` event, and the driver records the chunk as a
FAILED run whose error tag names the method, the width and the step, and the line as stopped in the plan's summary."""

from __future__ import annotations

import io

import pytest
import torch
from mlflow.tracking import MlflowClient
from rich.console import Console

from orchestrator.plan.planner import build_plan
from orchestrator.run.experiment import ChunkedDriver
from orchestrator.spec.experiment import validate_spec
from orchestrator.tracking import tags as tr
from orchestrator.tracking.tracker import Tracker
from tests.specs import tiny_spec
from trainers.engine.collapse import RepresentationCollapseError, check_collapse
from trainers.engine.step import NonFiniteLossError
from trainers.methods.us3l import PRESETS


@pytest.fixture(scope="module")
def driver(tmp_path_factory, synthetic_url: str):
    workdir = tmp_path_factory.mktemp("collapse")
    spec = validate_spec(tiny_spec(
        "collapse", synthetic_url, lines={"method": ["us3l"], "strategy": ["sequential"]},
        backbone={"name": "slimmable_resnet18", "width": 8, "cifar_stem": False},
        methods={"us3l": {**PRESETS["usnet_simsiam"], "proj_hidden": 32}}, storage={"workdir": str(workdir)}))
    plan = build_plan(spec)
    driver = ChunkedDriver(plan, Tracker(spec.tracking_uri, spec.experiment_name), Console(file=io.StringIO()), None)
    driver.parent = driver.open_parent(resume=False)
    return driver


def test_a_collapsed_line_is_a_failed_chunk_run_naming_width_and_step(driver) -> None:
    collapsed = torch.ones(16, 8) + 1e-6 * torch.randn(16, 8, generator=torch.Generator().manual_seed(0))
    with pytest.raises(RepresentationCollapseError) as caught:
        check_collapse(collapsed, 0.1, method="us3l", width=0.25, step=7)
    assert isinstance(caught.value, NonFiniteLossError)  # what the runner catches: no retry, the line stops
    job = driver.plan.jobs[1]  # chunk 1 of the line
    # the runner's event for it (orchestrator.train.runner: `except NonFiniteLossError`)
    driver.on_event({"type": "diverged", "line": job.line.id, "chunk": job.chunk, "job_key": job.key,
                     "message": str(caught.value)})

    assert driver.diverged == {job.line.id: f"stopped at chunk 1 (not retried): {caught.value}"}
    client = MlflowClient(driver.spec.tracking_uri)
    (run,) = client.search_runs([driver.tracker.experiment_id], filter_string=f"tags.`{tr.RUN_TYPE}` = 'chunk'")
    assert run.info.status == "FAILED"
    assert (run.data.tags[tr.LINE], run.data.tags[tr.CHUNK]) == ("us3l-sequential", "1")
    error = run.data.tags[tr.TAG + "error"]
    assert error.startswith("stopped at chunk 1 (not retried): us3l: representation collapsed at width 0.25, step 7")
    assert driver.missing_records() == []  # a stopped line is not reported as missing runs (--resume skips it)
