"""The driver of an online plan SIGKILLed mid-stream (with the local Ray it started), then `streamssl run --resume`:
the same plan and online runs go on, the stream continues at the batch after the newest checkpoint, every segment
ends up logged and evaluated exactly once, and nothing is left RUNNING."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from orchestrator.tracking import tags as tr
from tests.faults.test_driver_death import kill, resume, runs_of, start_driver, wait_for
from tests.integration.test_online_run import _online_spec

pytestmark = pytest.mark.slow
NAME = "online-driver-death"
BATCHES = 30  # online.max_batches: three segments of 10, not the whole 75-batch order (issue 23)


def test_an_online_stream_resumes_after_its_driver_died(tmp_path: Path, synthetic_url: str, fresh_mlflow_store) -> None:
    # 3 steps a stream batch, not 4 (the shortest cycle with a warm-up of more than one step at pct_start 0.5), and
    # 30 batches in segments of 10 (issue 23): the kill and the resume are about batches and segments. The kill comes
    # once segment 1 is logged (segment 0's evaluation is collected then), 10 batches before the stream's end.
    spec = _online_spec(NAME, synthetic_url, tmp_path, rals=False, checkpoint_every_batches=5, steps_per_batch=3,
                        segment_batches=10, max_batches=BATCHES)
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    client = MlflowClient(fresh_mlflow_store(tmp_path / "runs" / "mlflow.db"))  # the session's migrated empty store
    command = [sys.executable, "-m", "cli.app", "run", str(path)]
    driver = start_driver(command, tmp_path / "driver.log")
    try:
        # Past the first segment's evaluation and into the second segment (a checkpoint every 5 batches).
        wait_for("segment 0 evaluated and batch 15 checkpointed",
                 lambda: any(r.info.status == "FINISHED" for r in runs_of(client, NAME, "segment"))
                 and any((tmp_path / "runs" / "checkpoints").glob("*/simclr-sequential.chunk-000.step-0000015")),
                 driver)
    finally:
        kill(driver)
    (online_before,) = runs_of(client, NAME, "chunk")
    (plan_before,) = runs_of(client, NAME, "plan")

    resume(command)
    (plan,) = runs_of(client, NAME, "plan")
    assert plan.info.run_id == plan_before.info.run_id and plan.info.status == "FINISHED"
    (online,) = runs_of(client, NAME, "chunk")  # the same run, continued
    assert online.info.run_id == online_before.info.run_id and online.info.status == "FINISHED"
    (resumed,) = client.get_metric_history(online.info.run_id, "resumed_at_batch")
    assert resumed.value % 5 == 0 and 15 <= resumed.value < BATCHES
    # Each stream batch once, those the dead driver heard but never logged included (said again from the checkpoint).
    steps = sorted(int(m.step) for m in client.get_metric_history(online.info.run_id, "loss"))
    assert steps == list(range(1, BATCHES + 1))
    segments = runs_of(client, NAME, "segment")
    assert sorted(r.data.metrics["stream_batches"] for r in segments) == [10, 20, 30]  # each once
    assert all(r.info.status == "FINISHED" and "knn_top1" in r.data.metrics for r in segments)
    curve = sorted(m.step for m in client.get_metric_history(online.info.run_id, "knn_top1_by_batch"))
    assert curve == [10, 20, 30]
    (evaluation,) = runs_of(client, NAME, "eval")
    assert evaluation.data.tags[tr.EVALUATES] == online.info.run_id
    exp = client.get_experiment_by_name(NAME)
    assert not [r for r in client.search_runs([exp.experiment_id]) if r.info.status == "RUNNING"]
