"""A training worker SIGKILLed while a polled online stream (`online.source`) is learned: Ray Train restarts the
group from the newest checkpoint, which holds the shard order consumed so far; the restarted stream reads only the
rows it has not learned (the producer deleted a shard learned whole meanwhile), continues at the next unseen batch,
and then takes the shard that arrived meanwhile."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from orchestrator.spec.experiment import validate_spec
from orchestrator.tracking import tags as tr
from tests.faults.test_worker_death import run_in_background, train_worker_pids, wait_for_checkpoint
from tests.integration.test_online_run import _online_spec
from tests.orchestrator.shard_producer import publish, train_rows
from trainers.engine.checkpoint import load_state

pytestmark = pytest.mark.slow


def test_a_killed_worker_resumes_a_polled_stream_in_the_same_shard_order(
        tmp_path: Path, synthetic_url: str, ray_local) -> None:
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    rows = train_rows(synthetic_url)
    now = time.time()
    for i, name in enumerate(["z.parquet", "y.parquet"]):  # arrival order (sidecar times), not name order
        publish(incoming, name, rows.slice(48 * i, 48))
        os.utime(incoming / f"{name}.sha256", (now - 10 + i, now - 10 + i))
    spec = validate_spec({**_online_spec("polled-kill", synthetic_url, tmp_path, rals=False, segment_batches=4,
                                         checkpoint_every_batches=2, memory_size=32,
                                         source={"poll": str(incoming), "interval_s": 0.5, "stall_after_s": 20}),
                          "resources": {"workers": 2, "max_failures": 2}})
    thread, outcome, log = run_in_background(spec)
    saved = wait_for_checkpoint(tmp_path / "runs" / "checkpoints", "simclr-sequential.chunk-000.step-0000004",
                                outcome, log)
    victims = train_worker_pids()
    assert len(victims) == 2
    os.kill(victims[-1], signal.SIGKILL)
    # Retention: the producer deletes z, learned whole before the checkpoint; the restart must not need it again.
    (incoming / "z.parquet").unlink()
    (incoming / "z.parquet.sha256").unlink()
    publish(incoming, "a-late.parquet", rows.slice(96, 48))  # arrives while the group restarts
    thread.join(timeout=600)
    assert not thread.is_alive(), "the run did not finish after the worker was killed"
    assert "error" not in outcome, outcome.get("error")
    assert outcome["summary"].restarts == 1
    assert [a["name"] for a in load_state(saved)["source"]["arrivals"]] == ["z.parquet", "y.parquet"]

    client = MlflowClient(spec.tracking_uri)
    exp = client.get_experiment_by_name(spec.experiment_name)
    runs = client.search_runs([exp.experiment_id])
    assert not [r for r in runs if r.info.status != "FINISHED"], "runs left RUNNING or FAILED"
    (online,) = [r for r in runs if r.data.tags.get(tr.RUN_TYPE) == "chunk"]
    (resumed,) = client.get_metric_history(online.info.run_id, "resumed_at_batch")
    assert resumed.value >= 4 and resumed.value % 2 == 0
    # 144 rows in 9 batches, each logged once; segments of 4 and the final partial one, each once.
    assert sorted(int(m.step) for m in client.get_metric_history(online.info.run_id, "loss")) == list(range(1, 10))
    segments = sorted((r for r in runs if r.data.tags.get(tr.RUN_TYPE) == "segment"),
                      key=lambda r: r.data.metrics["stream_batches"])
    assert [r.data.metrics["stream_batches"] for r in segments] == [4, 8, 9]
    assert segments[-1].data.tags.get(tr.TAG + "final_segment") == "true"
    final = load_state(Path(segments[-1].data.tags[tr.CHECKPOINT]))
    assert final["online"]["batches_done"] == 9
    assert [a["name"] for a in final["source"]["arrivals"]] == ["z.parquet", "y.parquet", "a-late.parquet"]
