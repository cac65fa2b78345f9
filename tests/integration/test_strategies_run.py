"""Continual aids through the real driver: a `sequential+replay+mas` line on 2 DDP workers (gloo) under Ray Train.
Each rank holds a shard of the replay buffer: the chunk-end checkpoint stores both shards, their union is the
buffer (no row twice), and MAS's importances are the same on both ranks."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from rich.console import Console

from orchestrator.errors import SpecError
from orchestrator.plan.planner import build_plan
from orchestrator.run.launch import run_experiment
from orchestrator.spec.experiment import validate_spec
from orchestrator.tracking import tags as tr
from tests.specs import tiny_spec
from trainers.engine.checkpoint import folder_bytes, load_state, tensor_bytes


def test_a_replay_buffer_larger_than_the_stream_before_its_last_chunk_is_refused(synthetic_url: str) -> None:
    spec = validate_spec(tiny_spec("too-big", synthetic_url,
                                   lines={"method": ["simclr"], "strategy": [["sequential", "replay"]]},
                                   strategy={"replay": {"size": 100_000}}))
    with pytest.raises(SpecError, match=r"strategy\.replay\.size: 100000 rows, but the stream delivers only 600 rows"):
        build_plan(spec)


@pytest.mark.slow
def test_replay_and_mas_under_ddp(tmp_path: Path, synthetic_url: str, ray_local) -> None:
    line = "simclr-sequential-replay-mas"
    spec = validate_spec(tiny_spec(
        "aids", synthetic_url,
        lines={"method": ["simclr"], "strategy": [["sequential", "replay", "mas"]]},
        strategy={"replay": {"size": 201, "ratio": 0.5}, "mas": {"lambd": 0.5, "batches": 3}},
        optim={"epochs_per_chunk": 2}, storage={"workdir": str(tmp_path / "runs")},
        # the optional studies through the real actor: few-shot each chunk, interpolation from chunk 0's weights,
        # and an evaluation after the first of each chunk's two epochs
        eval={"fewshot": {"way": 3, "shot": 2, "query": 3, "episodes": 20}, "interpolation": {"points": 3},
              "every_epochs": 1,
              # a downstream set that is the training data itself: its numbers must equal the held-out ones
              "downstream": [{"name": "again", "url": synthetic_url}]},
    ))
    summary = run_experiment(spec, console=Console(file=io.StringIO(), width=120))
    client = MlflowClient(spec.tracking_uri)
    exp = client.get_experiment_by_name(spec.experiment_name)
    chunks = client.search_runs([exp.experiment_id], filter_string=f"tags.`{tr.RUN_TYPE}` = 'chunk'")
    assert sorted(int(r.data.params["chunk"]) for r in chunks) == [0, 1]
    assert {r.data.params["line.strategy"] for r in chunks} == {"sequential+replay+mas"}
    assert summary is not None
    folders = sorted((tmp_path / "runs" / "checkpoints").glob(f"*/{line}.chunk-001"))
    assert len(folders) == 1
    state = load_state(folders[0])
    shards = [rank_state["replay"] for rank_state in state["strategy"]]
    assert len(shards) == 2  # both ranks' shards, gathered into the checkpoint
    sizes = [len(shard["buffer"]["index"]) for shard in shards]
    assert sizes == [101, 100]  # 201 split over 2 ranks, full after two chunks of 600 rows
    union = torch.cat([shard["buffer"]["index"] for shard in shards])
    assert len(set(union.tolist())) == 201  # no row held by both ranks
    assert set(torch.cat([s["buffer"]["chunk"] for s in shards]).tolist()) == {0, 1}
    masses = [rank_state["mas"] for rank_state in state["strategy"]]
    assert masses[0]["chunks"] == 2
    for name, omega in masses[0]["omega"].items():
        assert torch.equal(omega, masses[1]["omega"][name]), name  # averaged over ranks: identical
    assert any(v.abs().sum() > 0 for v in masses[0]["omega"].values())
    # What the chunk cost, on its run: the data the line keeps (the buffer's 201 rows over both ranks, as held) apart
    # from its model state (the checkpoint as written less the buffer inside it; MAS's Omega and theta* in it).
    last = next(r for r in chunks if r.data.params["chunk"] == "1").data.metrics
    assert last["checkpoint_bytes"] == folder_bytes(folders[0])
    buffers = tensor_bytes([[shard["buffer"], shard["staged"]] for shard in shards])
    assert last["buffer_rows"] == last["data_kept_rows"] == 201
    assert last["buffer_bytes"] == last["data_kept_bytes"] == buffers > 201 * 3 * 16 * 16  # the buffer's images alone
    assert last["strategy_state_bytes"] == tensor_bytes(state["strategy"]) - buffers >= tensor_bytes(
        [[m["omega"], m["anchor"]] for m in masses])
    assert last["model_state_bytes"] == last["checkpoint_bytes"] - buffers
    assert last["stored_bytes"] == last["checkpoint_bytes"]  # the buffer is inside the checkpoint, not added to it
    assert last["wall_seconds"] >= last["train_seconds"] > 0
    assert last["device_hours"] == pytest.approx(last["wall_seconds"] * 2 * spec.resources.cpus_per_worker / 3600)
    evals = {r.data.tags[tr.CHUNK]: r.data.metrics
             for r in client.search_runs([exp.experiment_id], filter_string=f"tags.`{tr.RUN_TYPE}` = 'eval'")}
    assert sorted(evals) == ["0", "1"]
    assert all(0 < m["fewshot_mean"] <= 1 and m["fewshot_ci95"] > 0 for m in evals.values())
    assert all(m["again.knn_top1"] == m["knn_top1"] and m["again.linear_top1"] == m["linear_top1"]
               for m in evals.values())
    assert "interpolation_barrier" not in evals["0"]  # nothing to start from before the first chunk
    assert evals["1"]["interpolation_barrier"] >= 0 and 0 <= evals["1"]["interpolation_min_accuracy"] <= 1
    # eval.every_epochs: one mid-chunk evaluation per chunk, of a checkpoint written after its first epoch
    mids = client.search_runs([exp.experiment_id], filter_string=f"tags.`{tr.RUN_TYPE}` = 'epoch_eval'")
    assert sorted((r.data.tags[tr.CHUNK], r.data.tags["streamssl.epoch"]) for r in mids) == [("0", "1"), ("1", "1")]
    for run in mids:
        assert load_state(run.data.tags[tr.CHECKPOINT])["position"]["epoch"] == 1
        assert 0 < run.data.metrics["knn_top1"] <= 1 and run.data.metrics["epoch"] == 1
    plan = client.search_runs([exp.experiment_id], filter_string=f"tags.`{tr.RUN_TYPE}` = 'plan'")[0]
    curve = client.get_metric_history(plan.info.run_id, f"{line}.knn_top1_by_epoch")
    assert sorted(m.step for m in curve) == [1, 2, 3, 4]  # epochs the line has trained: mid and end of each chunk
    ends = {m.step: m.value for m in curve}
    assert ends[2] == evals["0"]["knn_top1"] and ends[4] == evals["1"]["knn_top1"]
