"""A training worker SIGKILLed in the middle of an online stream: Ray Train restarts the group from the newest
in-stream checkpoint, the stream continues at the next unseen batch with the memory as checkpointed, in the same
MLflow run, and every segment is logged once."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from orchestrator.spec.experiment import validate_spec
from orchestrator.tracking import tags as tr
from tests.faults.test_worker_death import run_in_background, train_worker_pids, wait_for_checkpoint
from tests.integration.test_online_run import _online_spec
from trainers.engine.checkpoint import load_state

pytestmark = pytest.mark.slow
KILL_AFTER = 15  # the in-segment checkpoint (every 5 batches; segments of 10) whose completion triggers the kill
BATCHES = 30  # online.max_batches: three segments of 10, not the whole 75-batch order (issue 23)


def test_a_killed_worker_resumes_the_stream_at_the_next_batch(tmp_path: Path, synthetic_url: str, ray_local) -> None:
    # 3 steps a stream batch, not 4 (the shortest cycle with a warm-up of more than one step at pct_start 0.5), and
    # the stream cut at 30 batches in segments of 10 (issue 23): the kill still lands on a checkpoint inside a
    # segment with segments before and after it, and the memory is full (batch 4) long before it.
    spec = validate_spec({**_online_spec("online-kill", synthetic_url, tmp_path, checkpoint_every_batches=5,
                                         steps_per_batch=3, segment_batches=10, max_batches=BATCHES),
                          "resources": {"workers": 2, "max_failures": 2}})
    thread, outcome, log = run_in_background(spec)
    checkpoints = tmp_path / "runs" / "checkpoints"

    saved = wait_for_checkpoint(checkpoints, f"simclr-sequential.chunk-000.step-{KILL_AFTER:07d}", outcome, log)
    victims = train_worker_pids()
    assert len(victims) == 2
    os.kill(victims[-1], signal.SIGKILL)
    thread.join(timeout=600)
    assert not thread.is_alive(), "the run did not finish after the worker was killed"
    assert "error" not in outcome, outcome.get("error")

    client = MlflowClient(spec.tracking_uri)
    exp = client.get_experiment_by_name(spec.experiment_name)
    runs = client.search_runs([exp.experiment_id])
    assert not [r for r in runs if r.info.status != "FINISHED"], "runs left RUNNING or FAILED"
    (online,) = [r for r in runs if r.data.tags.get(tr.RUN_TYPE) == "chunk"]  # the same run before and after
    assert outcome["summary"].restarts == 1
    (resumed,) = client.get_metric_history(online.info.run_id, "resumed_at_batch")
    assert resumed.value % 5 == 0 and KILL_AFTER <= resumed.value < BATCHES, log.getvalue()[-3000:]
    # Every stream batch was learned (those after the resume point and before the kill twice: the restart redoes
    # them from the checkpoint), and the stream ends where it would have.
    # Each stream batch once: the batches learned again after the restart are not logged a second time.
    steps = sorted(int(m.step) for m in client.get_metric_history(online.info.run_id, "loss"))
    assert steps == list(range(1, BATCHES + 1))
    segments = [r for r in runs if r.data.tags.get(tr.RUN_TYPE) == "segment"]
    assert sorted(r.data.metrics["stream_batches"] for r in segments) == [10, 20, 30]  # each once
    final = load_state(Path(max(segments, key=lambda r: r.data.metrics["stream_batches"]).data.tags[tr.CHECKPOINT]))
    assert final["online"]["batches_done"] == BATCHES and final["online"]["steps_done"] == BATCHES * 3
    # The resume started from the memory as checkpointed (full: 32 rows a rank from batch 4 on), not an empty one.
    assert all(m.value == 32 for m in client.get_metric_history(online.info.run_id, "memory_rows") if m.step >= 4)
    assert sum(m["rows"] for m in final["memory_files"]) == 64
    # What is kept: every checkpoint's state.pt (Ray's run snapshot lists them all); the memory in the newest alone.
    holding = sorted(p.parent.name for p in saved.parent.glob("simclr-sequential*/memory-rank-*.pt"))
    assert holding == ["simclr-sequential.chunk-000"] * 2
