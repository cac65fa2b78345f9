"""A loss that turns NaN inside a Ray Train worker stops that line at once, naming the method, the step and the LR:
Ray Train does not restart the group (the same checkpoint would diverge again), the newest checkpoint on storage
holds finite weights, the diverged chunk is a FAILED run holding the error, and the plan's other lines go on to
the end, evaluated and summarised."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from rich.console import Console

from orchestrator.errors import TrainingError
from orchestrator.run.launch import run_experiment
from orchestrator.spec.experiment import validate_spec
from orchestrator.tracking import tags as tr
from orchestrator.train.checkpoints import checkpoint_order
from tests.specs import tiny_spec
from trainers.engine.checkpoint import load_state

pytestmark = pytest.mark.slow

DIVERGING, STEADY = "simclr-sequential-mas", "simclr-sequential"


def test_a_diverging_line_fails_alone_and_the_others_finish(tmp_path: Path, synthetic_url: str, ray_local,
                                                            fresh_mlflow_store) -> None:
    fresh_mlflow_store(tmp_path / "runs" / "mlflow.db")  # a copy of the session's migrated empty store
    # MAS's penalty is zero in chunk 0 (no importances yet); in chunk 1 a λ of 1e30 blows the loss up within steps.
    spec = validate_spec(tiny_spec(
        "diverge", synthetic_url,
        lines={"method": ["simclr"], "strategy": [["sequential", "mas"], "sequential"]},  # the diverging one first
        strategy={"mas": {"lambd": 1e30, "batches": 2}},
        # One epoch of global batch 64: 9 steps a chunk (600 rows), each checkpointed; the MAS line diverges within
        # its first steps of chunk 1, after its step-1 checkpoint. More steps only add checkpoints of the steady line.
        optim={"epochs_per_chunk": 1, "batch_size": 64},
        resources={"checkpoint_every_steps": 1, "max_failures": 3},
        storage={"workdir": str(tmp_path / "runs")},
    ))
    log = io.StringIO()
    with pytest.raises(TrainingError, match=rf"training of {DIVERGING} stopped at chunk 1 \(not retried\): "
                                            r"simclr: the loss became (nan|inf) at step \d+ of chunk 1 \(lr [\d.e+-]+\)"
                                            r".*the other 1 line\(s\) of plan run \w+ ran to the end"):
        run_experiment(spec, console=Console(file=log, width=200))
    output = log.getvalue()
    assert "worker group restarted" not in output, output[-3000:]
    assert f"{DIVERGING} diverged in chunk 1" in output

    client = MlflowClient(spec.tracking_uri)
    exp = client.get_experiment_by_name(spec.experiment_name)
    chunk_runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`{tr.RUN_TYPE}` = 'chunk'")
    states = {(r.data.tags[tr.LINE], int(r.data.tags[tr.CHUNK])): r for r in chunk_runs}
    assert {k: r.info.status for k, r in states.items()} == {
        (DIVERGING, 0): "FINISHED", (DIVERGING, 1): "FAILED", (STEADY, 0): "FINISHED", (STEADY, 1): "FINISHED"}
    assert "the loss became" in states[(DIVERGING, 1)].data.tags[tr.TAG + "error"]
    evals = client.search_runs([exp.experiment_id], filter_string=f"tags.`{tr.RUN_TYPE}` = 'eval'")
    evaluated = sorted((r.data.tags[tr.LINE], int(r.data.tags[tr.CHUNK])) for r in evals)
    assert evaluated == sorted([(DIVERGING, 0), (STEADY, 0), (STEADY, 1)])
    parent = client.search_runs([exp.experiment_id], filter_string=f"tags.`{tr.RUN_TYPE}` = 'plan'")[0]
    assert parent.info.status == "FAILED"
    assert list(json.loads(parent.data.tags[tr.TAG + "diverged"])) == [DIVERGING]
    # the steady line's continual metrics were computed and logged; the diverged line has none
    assert 0 < parent.data.metrics[f"{STEADY}.knn.avg_acc"] <= 1
    assert not any(k.startswith(f"{DIVERGING}.knn.") for k in parent.data.metrics)

    folders = [p for p in (tmp_path / "runs" / "checkpoints").glob("*/*") if checkpoint_order(p.name, [DIVERGING])]
    newest = max(folders, key=lambda p: checkpoint_order(p.name, [DIVERGING]))
    assert "chunk-001" in newest.name  # saved inside chunk 1, before the bad step
    state = load_state(newest)
    assert all(torch.isfinite(v).all() for v in state["method"].values() if v.is_floating_point())
