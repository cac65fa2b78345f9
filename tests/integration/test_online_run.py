"""An online plan through the real driver: 2 DDP workers (gloo) under ONE Ray Train job learn stream batches of a
3-task class-incremental stream with the per-batch LR cycle, a replay memory and RALS; the losses stream into the
line's online run batch by batch, and every `segment_batches` batches a segment run holds its checkpoint and
evaluation."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from rich.console import Console

from orchestrator.errors import SpecError
from orchestrator.plan.planner import build_plan
from orchestrator.run.launch import run_experiment
from orchestrator.spec.experiment import validate_spec
from orchestrator.tracking import tags as tr
from tests.specs import tiny_spec
from trainers.engine.checkpoint import load_state

ONLINE = {"order": "class_incremental", "batch_size": 16, "steps_per_batch": 4, "max_lr": 0.05, "memory_size": 64,
          "memory_batch": 16, "rals": True, "rals_k": 24, "rals_part_size": 4, "segment_batches": 25}


def runs_of_type(client: MlflowClient, experiment: str):
    """`runs(kind)`: the experiment's runs of one streamssl run type (plan, chunk, segment, eval)."""
    exp = client.get_experiment_by_name(experiment)

    def runs(kind: str) -> list:
        return client.search_runs([exp.experiment_id], filter_string=f"tags.`{tr.RUN_TYPE}` = '{kind}'")

    return runs


def _online_spec(name: str, url: str, tmp_path: Path, **online) -> dict:
    return tiny_spec(name, url, stream={"kind": "online", "chunks": 3}, online={**ONLINE, **online},
                     storage={"workdir": str(tmp_path / "runs")}, eval={"every_chunk": ["knn"], "baseline": False})


def test_online_specs_that_cannot_work_are_refused(synthetic_url: str, tmp_path: Path) -> None:
    with pytest.raises(SpecError, match=r"online: only applies to stream.kind online"):
        validate_spec(tiny_spec("x", synthetic_url, online={"batch_size": 16}))
    with pytest.raises(SpecError, match=r"lines.strategy: an online stream trains each line sequentially"):
        validate_spec({**_online_spec("x", synthetic_url, tmp_path), "lines": {"method": ["simclr"],
                                                                              "strategy": ["joint"]}})
    with pytest.raises(SpecError, match=r"online.batch_size \(15\) must be divisible by resources.workers \(2\)"):
        validate_spec(_online_spec("x", synthetic_url, tmp_path, batch_size=15))
    with pytest.raises(SpecError, match=r"online.*steps_per_batch"):  # one step cannot hold a cycle
        validate_spec(_online_spec("x", synthetic_url, tmp_path, steps_per_batch=1))
    with pytest.raises(SpecError, match=r"online.rals_k \(64\) must be below the candidates per step"):
        validate_spec(_online_spec("x", synthetic_url, tmp_path, rals_k=64))
    cassle = {**_online_spec("x", synthetic_url, tmp_path), "lines": {"method": ["simclr"],
                                                                     "strategy": ["sequential+cassle"]}}
    assert validate_spec(cassle).lines.strategy == ["sequential+cassle"]  # CaSSLe, the online baseline
    plan = build_plan(validate_spec(_online_spec("x", synthetic_url, tmp_path)))
    assert [(j.line.id, j.chunk, j.training_chunks) for j in plan.jobs] == [("simclr-sequential", 0, (0, 1, 2))]
    # class-incremental: every class in exactly one task
    classes = [set(c.classes) for c in plan.stream.chunks]
    assert sum(map(len, classes)) == 12 and set().union(*classes) == set(range(12))


@pytest.mark.slow
def test_an_online_stream_is_one_worker_group_with_segments_in_mlflow(tmp_path: Path, synthetic_url: str,
                                                                       ray_local) -> None:
    # The first 30 of the stream's 75 batches (1200 rows / 16), in segments of 10: RALS, the memory, segments and their
    # models are the same from the third batch on; the whole order only trained longer (issue 23).
    spec = validate_spec(_online_spec("online", synthetic_url, tmp_path, max_batches=30, segment_batches=10))
    run_experiment(spec, console=Console(file=io.StringIO(), width=120))
    client = MlflowClient(spec.tracking_uri)
    runs = runs_of_type(client, spec.experiment_name)

    (plan,) = runs("plan")
    assert plan.info.status == "FINISHED"
    assert plan.data.metrics["worker_group_starts"] == 1  # 30 stream batches, one Ray Train job
    (online,) = runs("chunk")
    assert online.info.status == "FINISHED" and online.info.run_name == "simclr-sequential/online"
    losses = client.get_metric_history(online.info.run_id, "loss")
    assert sorted(m.step for m in losses) == list(range(1, 31))  # one point per stream batch
    steps = client.get_metric_history(online.info.run_id, "steps")
    assert {m.value for m in steps} == {4.0}  # no deadline: every batch gets its steps
    assert online.data.metrics["late_batches"] == 0
    fractions = sorted((m.step, m.value) for m in client.get_metric_history(online.info.run_id, "rals_new_fraction"))
    # The first batch has an empty memory: its 8 candidates a rank are within k (12), nothing to choose. From the
    # second on, 16 candidates a rank (8 new, 8 from memory) and RALS trains on 12 of them.
    assert [step for step, _ in fractions] == list(range(2, 31))
    assert all(0.25 <= f <= 1.0 for _, f in fractions)  # at least 4 of the 12 chosen are new on every step
    assert min(f for _, f in fractions) < 1.0  # some memory rows are chosen
    # The selection profile (the RALS paper's Fig. 3b): the mean new share per step index within a batch, 4 steps.
    profile = sorted((m.step, m.value) for m in client.get_metric_history(online.info.run_id,
                                                                          "rals_new_fraction_by_local_step"))
    assert [step for step, _ in profile] == [0, 1, 2, 3] and all(0.25 <= f <= 1.0 for _, f in profile)

    segments = sorted(runs("segment"), key=lambda r: int(r.data.tags[tr.TAG + "segment"]))
    assert [r.data.metrics["stream_batches"] for r in segments] == [10, 20, 30]
    assert all(r.info.status == "FINISHED" and 0 < r.data.metrics["knn_top1"] <= 1 for r in segments)
    # What a segment keeps: the memory is its data, inside its checkpoint (not added on top of it).
    for m in (r.data.metrics for r in segments):
        assert m["data_kept_bytes"] == m["memory_file_bytes"] > 0 and m["stored_bytes"] == m["checkpoint_bytes"]
        assert m["model_state_bytes"] == m["state_bytes"] == m["checkpoint_bytes"] - m["memory_file_bytes"] > 0
        assert m["data_kept_rows"] == 64  # both ranks' memory shards, full (32 rows each)
    curve = client.get_metric_history(online.info.run_id, "knn_top1_by_batch")
    assert sorted((m.step, m.value) for m in curve) == [(r.data.metrics["stream_batches"], r.data.metrics["knn_top1"])
                                                         for r in segments]
    # Each segment's checkpoint is a LoggedModel of its run, made at the batch it ends at, scored by its kNN.
    exp = client.get_experiment_by_name(spec.experiment_name)
    models = {m.model_id: m for m in client.search_logged_models([exp.experiment_id])}
    assert len(models) == len(segments)
    for segment in segments:
        model = models[segment.data.tags[tr.MODEL_ID]]
        assert model.source_run_id == segment.info.run_id and model.tags[tr.CHECKPOINT] == segment.data.tags[tr.CHECKPOINT]
        assert [o.step for o in segment.outputs.model_outputs] == [segment.data.metrics["stream_batches"]]
        assert {m.key: m.value for m in model.metrics}["knn_top1"] == segment.data.metrics["knn_top1"]
    # The last segment's checkpoint is the stream's end: the line's evaluation, and a state a resume continues.
    (evaluation,) = runs("eval")
    assert evaluation.data.tags[tr.EVALUATES] == online.info.run_id
    assert evaluation.data.metrics["knn_top1"] == segments[-1].data.metrics["knn_top1"]
    last = Path(segments[-1].data.tags[tr.CHECKPOINT])
    state = load_state(last)
    assert state["online"]["batches_done"] == 30 and state["online"]["steps_done"] == 120
    memory = state["memory_files"]  # each rank's share in its own file of the checkpoint
    assert len(memory) == 2 and sum(m["rows"] for m in memory) == 64  # both ranks' shards, full
    assert {a["name"] for a in [{"name": f.path} for f in client.list_artifacts(plan.info.run_id, "plots")]} >= {
        "plots/knn_top1_by_batch.png", "plots/rals_new_fraction.png", "plots/rals_new_fraction_by_local_step.png"}


def test_a_chunked_spec_keeps_its_identity_and_params_without_an_online_section() -> None:
    from orchestrator.spec.experiment import flatten, identity_digest

    spec = validate_spec(tiny_spec("x", "/tmp/x"))  # a fixed URL: it is part of the identity
    assert spec.online is None and not any(k.startswith("online") for k in flatten(spec))
    # The digest the last version before online streams (ab935f4) gave this spec: plan keys, and so `--resume` of
    # plans made then, do not change with the new section.
    assert identity_digest(spec) == "8fd57fd1c5bf15db"


@pytest.mark.slow
def test_a_stream_faster_than_training_counts_its_late_batches(tmp_path: Path, synthetic_url: str, ray_local) -> None:
    # Batches arrive every 10 ms, far faster than a step (~0.1 s here): with the queue policy every batch takes its
    # steps and every one from the second on is late (at most the first makes its deadline).
    spec = validate_spec(_online_spec("late", synthetic_url, tmp_path, rals=False, max_batches=12, segment_batches=6,
                                      time_budget_s=0.01, late_policy="queue"))
    console = io.StringIO()
    run_experiment(spec, console=Console(file=console, width=200))
    client = MlflowClient(spec.tracking_uri)
    exp = client.get_experiment_by_name(spec.experiment_name)
    (online,) = client.search_runs([exp.experiment_id], filter_string=f"tags.`{tr.RUN_TYPE}` = 'chunk'")
    late = sorted((m.step, m.value) for m in client.get_metric_history(online.info.run_id, "late"))
    assert [step for step, _ in late] == list(range(1, 13))
    assert online.data.metrics["late_batches"] == sum(v for _, v in late) >= 11  # the counter is the per-batch sum
    assert {m.value for m in client.get_metric_history(online.info.run_id, "steps")} == {4.0}  # queue: no step lost
    assert online.data.metrics["dropped_steps"] == 0
    warning = online.data.tags[tr.TAG + "warning"]
    assert "online.time_budget_s (0.01 s) is shorter than one training step" in warning
    assert "shorter than one training step" in console.getvalue()


@pytest.mark.slow
def test_a_diverging_online_line_fails_alone(tmp_path: Path, synthetic_url: str, ray_local) -> None:
    from orchestrator.errors import TrainingError

    # CaSSLe with an absurd weight: harmless in task 0 (nothing to distil from), infinite once task 0 has ended.
    spec = validate_spec({**_online_spec("online-diverge", synthetic_url, tmp_path, rals=False, max_batches=30),
                          "lines": {"method": ["simclr"], "strategy": ["sequential+cassle", "sequential"]},
                          "strategy": {"cassle": {"lambd": 1e38, "hidden": 16}}})
    with pytest.raises(TrainingError, match=r"training of simclr-sequential-cassle stopped at stream batch 2\d"):
        run_experiment(spec, console=Console(file=io.StringIO(), width=120))
    client = MlflowClient(spec.tracking_uri)
    exp = client.get_experiment_by_name(spec.experiment_name)
    runs = {r.data.tags[tr.LINE]: r for r in client.search_runs(
        [exp.experiment_id], filter_string=f"tags.`{tr.RUN_TYPE}` = 'chunk'")}
    assert runs["simclr-sequential-cassle"].info.status == "FAILED"
    assert "non-finite" in runs["simclr-sequential-cassle"].data.tags[tr.TAG + "error"]
    assert runs["simclr-sequential"].info.status == "FINISHED"  # the other line went on, in the same job
    (plan,) = client.search_runs([exp.experiment_id], filter_string=f"tags.`{tr.RUN_TYPE}` = 'plan'")
    assert plan.info.status == "FAILED" and "simclr-sequential-cassle" in plan.data.tags[tr.TAG + "diverged"]


@pytest.mark.slow
def test_a_polled_folder_is_learned_as_its_shards_arrive_and_a_bad_shard_is_skipped(
        tmp_path: Path, synthetic_url: str, ray_local) -> None:
    import json
    import threading
    import time

    from tests.orchestrator.shard_producer import publish, train_rows

    incoming = tmp_path / "incoming"
    incoming.mkdir()
    rows = train_rows(synthetic_url)
    publish(incoming, "s2.parquet", rows.slice(0, 48))  # there when the stream starts: 3 batches of 16
    raw = _online_spec("polled", synthetic_url, tmp_path, rals=False, segment_batches=2, memory_size=32,
                       source={"poll": str(incoming), "interval_s": 0.5, "stall_after_s": 15, "grace_s": 1})
    spec = validate_spec(raw)
    client = MlflowClient(spec.tracking_uri)
    produced: list[str] = []

    def producer() -> None:
        # Once the first segment is logged (the stream is polling), a shard with a wrong digest, then a good one.
        deadline = time.time() + 600
        while time.time() < deadline:
            exp = client.get_experiment_by_name(spec.experiment_name)
            if exp is not None and client.search_runs([exp.experiment_id],
                                                      filter_string=f"tags.`{tr.RUN_TYPE}` = 'segment'"):
                break
            time.sleep(0.5)
        publish(incoming, "s0-bad.parquet", rows.slice(48, 32), digest="0" * 64)
        time.sleep(3.0)  # past the bad shard's 1 s grace: it is skipped before the good one arrives
        publish(incoming, "s1.parquet", rows.slice(80, 40))
        produced.append("done")

    thread = threading.Thread(target=producer, daemon=True)
    thread.start()
    console = io.StringIO()
    run_experiment(spec, console=Console(file=console, width=200))
    thread.join(timeout=5)
    assert produced == ["done"]  # the shards were written while the run was polling

    runs = runs_of_type(client, spec.experiment_name)

    (plan,) = runs("plan")
    (online,) = runs("chunk")
    assert plan.info.status == online.info.status == "FINISHED"
    assert online.data.tags[tr.TAG + "stream_ended_by"] == "stalled"
    # 48 + 40 good rows: 5 batches of 16 (the last 8 rows are no whole batch); the bad shard's 32 rows not among them.
    assert sorted(m.step for m in client.get_metric_history(online.info.run_id, "loss")) == [1, 2, 3, 4, 5]
    assert online.data.metrics["skipped_shards"] == 1 and online.data.metrics["arrived_shards"] == 2
    assert json.loads(online.data.tags[tr.TAG + "skipped_shards"]) == ["s0-bad.parquet"]
    assert "skipped shard s0-bad.parquet" in console.getvalue() and "sha256 mismatch" in console.getvalue()
    assert "1s grace period" in console.getvalue()  # retried first: a sidecar may be caught mid-write
    # The 8 rows after the last whole batch: kept in the memory, counted and said.
    assert "the stream ended with 8 rows after its last full batch of 16" in online.data.tags[tr.TAG + "warning"]
    record = json.loads(Path(client.download_artifacts(online.info.run_id, "source_shards.json",
                                                       str(tmp_path))).read_text())
    assert record["arrived"] == [{"name": "s2.parquet", "rows": 48}, {"name": "s1.parquet", "rows": 40}]
    assert [s["name"] for s in record["skipped"]] == ["s0-bad.parquet"]

    # Segments of 2 batches; the stream stalled after batch 5: the last, partial segment is final and evaluated.
    segments = sorted(runs("segment"), key=lambda r: int(r.data.tags[tr.TAG + "segment"]))
    assert [r.data.metrics["stream_batches"] for r in segments] == [2, 4, 5]
    assert all(r.info.status == "FINISHED" and 0 < r.data.metrics["knn_top1"] <= 1 for r in segments)
    assert [r.data.tags.get(tr.TAG + "final_segment") for r in segments] == [None, None, "true"]
    assert segments[-1].data.metrics["skipped_shards"] == 1
    (evaluation,) = runs("eval")
    assert evaluation.data.tags[tr.EVALUATES] == online.info.run_id
    assert evaluation.data.metrics["knn_top1"] == segments[-1].data.metrics["knn_top1"]
    # The checkpoint holds the order consumed, so a resume reads the same shards in the same order.
    state = load_state(Path(segments[-1].data.tags[tr.CHECKPOINT]))
    assert state["online"]["batches_done"] == 5 and state["stream_ended"] is True
    # The memory: each rank's share once, in its own file of the newest checkpoint only (state.pt holds no rows);
    # the older segments' checkpoints keep their state.pt, which their runs and models point at.
    assert state["online"]["memory"] == [] and [m["file"] for m in state["memory_files"]] == [
        "memory-rank-00000.pt", "memory-rank-00001.pt"]
    assert sum(m["rows"] for m in state["memory_files"]) == 32
    for older in segments[:-1]:
        assert sorted(p.name for p in Path(older.data.tags[tr.CHECKPOINT]).iterdir()) == ["state.pt"]
    assert sorted(p.name for p in Path(segments[-1].data.tags[tr.CHECKPOINT]).iterdir()) == [
        "memory-rank-00000.pt", "memory-rank-00001.pt", "state.pt"]
    assert all(r.data.metrics["checkpoint_bytes"] > 0 for r in segments)
    assert [a["name"] for a in state["source"]["arrivals"]] == ["s2.parquet", "s1.parquet"]
    assert [s["name"] for s in state["source"]["skipped"]] == ["s0-bad.parquet"]

    # status, lineage and report read the online plan: its segments, their checkpoints and scores, the skipped shard.
    _online_plan_through_the_cli(tmp_path, raw, spec, plan.info.run_id, online.info.run_id, segments)


def _online_plan_through_the_cli(tmp_path: Path, raw: dict, spec, plan_run: str, online_run: str, segments: list) -> None:
    import json

    import yaml
    from typer.testing import CliRunner

    from cli.app import app

    spec_file = tmp_path / "polled.yaml"
    spec_file.write_text(yaml.safe_dump(raw))
    cli = CliRunner()
    status = cli.invoke(app, ["status", str(spec_file)], terminal_width=250)
    assert status.exit_code == 0, status.output
    assert "online segments (3)" in status.output and "1 FINISHED" in status.output
    assert all(r.info.run_id[:8] in status.output for r in segments)  # (rich shortens the ids to fit)

    chain = json.loads(cli.invoke(app, ["lineage", plan_run, "--json", "--tracking-uri", spec.tracking_uri]).output)
    assert [(s["segment"], s["batches"], s["final"]) for s in chain["segments"]] == [
        (0, "0-2", False), (1, "2-4", False), (2, "4-5", True)]
    assert all(s["checkpoint_uri"] == r.data.tags[tr.CHECKPOINT] and s["model_id"] == r.data.tags[tr.MODEL_ID]
               for s, r in zip(chain["segments"], segments))
    assert chain["segments"][-1]["skipped_shards"] == 1
    up = json.loads(cli.invoke(app, ["lineage", segments[-1].info.run_id, "--json",
                                     "--tracking-uri", spec.tracking_uri]).output)
    assert up["online_run"] == online_run and up["plan"] == plan_run and up["final"] is True
    tree = cli.invoke(app, ["lineage", online_run, "--tracking-uri", spec.tracking_uri], terminal_width=250).output
    assert tree.count("segment run") == 3 and "final" in tree and "skipped_shards=1" in tree

    out = tmp_path / "report"
    report = cli.invoke(app, ["report", spec.experiment_name, "--format", "json", "--out", str(out),
                              "--tracking-uri", spec.tracking_uri], terminal_width=250)
    assert report.exit_code == 0, report.output  # complete: the online line is one job, and its segments a table
    built = json.loads((out / "report.json").read_text())
    (table,) = [t for t in built["tables"] if t["name"] == "segments"]
    assert [(r["index"]["segment"], r["index"]["final"], r["cells"]["stream_batches"]["value"],
             r["cells"]["skipped_shards"]["value"]) for r in table["rows"]] == [
        ("0", "", 2.0, 0.0), ("1", "", 4.0, 1.0), ("2", "yes", 5.0, 1.0)]  # the bad shard came after segment 0
    assert [r["cells"]["knn_top1"]["value"] for r in table["rows"]] == [r.data.metrics["knn_top1"] for r in segments]


@pytest.mark.slow
def test_a_stream_that_ends_on_a_segment_boundary_makes_that_segment_final(
        tmp_path: Path, synthetic_url: str, ray_local) -> None:
    from tests.orchestrator.shard_producer import publish, train_rows

    incoming = tmp_path / "incoming"
    incoming.mkdir()
    publish(incoming, "only.parquet", train_rows(synthetic_url).slice(0, 64))  # 4 batches: 2 whole segments
    (incoming / "_STREAM_END").write_text("")  # the producer is done: no stall to wait for
    spec = validate_spec(_online_spec("polled-end", synthetic_url, tmp_path, rals=False, segment_batches=2,
                                      memory_size=32, source={"poll": str(incoming), "stall_after_s": 600}))
    run_experiment(spec, console=Console(file=io.StringIO(), width=120))
    client = MlflowClient(spec.tracking_uri)
    runs = runs_of_type(client, spec.experiment_name)

    (online,) = runs("chunk")
    assert online.info.status == "FINISHED" and online.data.tags[tr.TAG + "stream_ended_by"] == "ended"
    segments = sorted(runs("segment"), key=lambda r: int(r.data.tags[tr.TAG + "segment"]))
    # The second segment was logged before the stream knew it had ended; it became the final one after.
    assert [r.data.metrics["stream_batches"] for r in segments] == [2, 4]
    assert [r.data.tags.get(tr.TAG + "final_segment") for r in segments] == [None, "true"]
    (evaluation,) = runs("eval")
    assert evaluation.data.tags[tr.EVALUATES] == online.info.run_id
    assert evaluation.data.metrics["knn_top1"] == segments[-1].data.metrics["knn_top1"]
    assert online.data.metrics["skipped_shards"] == 0 and online.data.metrics["arrived_shards"] == 1
