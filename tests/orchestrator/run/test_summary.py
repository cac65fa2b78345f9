"""The end of a plan on a real MLflow SQLite store: evaluation runs logged by the driver's `log_eval`, read back
by `read_logged` (as a resumed driver does), then `summarise`: top-1 and top-5 continual metrics and the ST-JT gap
of every non-joint line, checked against hand-worked matrices."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from rich.console import Console

from evaluators.continual import AccuracyMatrix
from orchestrator.plan.planner import build_plan
from orchestrator.run.display import print_summary
from orchestrator.run.experiment import ChunkedDriver
from orchestrator.run.recovery import read_logged
from orchestrator.run.summary import ExperimentSummary, summarise
from orchestrator.spec.experiment import validate_spec
from orchestrator.tracking import tags as tr
from orchestrator.tracking.tracker import Tracker
from tests.specs import tiny_spec

SEQ, REPLAY, JOINT = "simclr-sequential", "simclr-sequential-replay", "simclr-joint"
# acc[i][j]: task j after chunk i (3 class-incremental tasks).
TOP1 = {
    SEQ: [[0.60, 0.10, 0.10], [0.40, 0.70, 0.15], [0.30, 0.50, 0.80]],
    REPLAY: [[0.60, 0.10, 0.10], [0.55, 0.70, 0.15], [0.50, 0.65, 0.80]],
    JOINT: [[0.60, 0.10, 0.10], [0.60, 0.72, 0.20], [0.58, 0.70, 0.82]],
}
TOP5 = {
    SEQ: [[0.90, 0.40, 0.30], [0.80, 0.95, 0.50], [0.70, 0.85, 1.00]],
    REPLAY: [[0.90, 0.40, 0.30], [0.85, 0.95, 0.50], [0.80, 0.90, 1.00]],
    JOINT: [[0.90, 0.40, 0.30], [0.90, 0.96, 0.55], [0.88, 0.93, 1.00]],
}
BASELINE = {"knn_top1": 0.08, "knn_top5": 0.35, "knn_task_acc": [0.10, 0.10, 0.05],
            "knn_task_acc_top5": [0.40, 0.35, 0.30]}


def _plan(synthetic_url: str, tmp_path: Path, strategies: list[str]):
    spec = validate_spec(tiny_spec("summary", synthetic_url, stream={"kind": "random_class", "chunks": 3},
                                   lines={"method": ["simclr"], "strategy": strategies},
                                   strategy={"replay": {"size": 100}}, eval={"every_chunk": ["knn"]},
                                   storage={"workdir": str(tmp_path)}))
    plan = build_plan(spec)
    tracker = Tracker(spec.tracking_uri, spec.experiment_name, (tmp_path / "artifacts").as_uri())
    parent = tracker.create_run("plan", {tr.RUN_TYPE: "plan", tr.PLAN_KEY: plan.key})
    return plan, tracker, parent


def _chunk_run(tracker: Tracker, plan, parent: str, job) -> str:
    run_id = tracker.create_run(job.name, {tr.RUN_TYPE: "chunk", tr.PARENT: parent, tr.PLAN_KEY: plan.key,
                                           tr.JOB_KEY: job.key, tr.LINE: job.line.id, tr.CHUNK: str(job.chunk),
                                           tr.CHECKPOINT: f"file:///nowhere/{job.key}"})
    tracker.log_metrics(run_id, {"final_loss": 1.0, "train_seconds": 2.0, "samples_per_s": 3.0})
    tracker.end_run(run_id, "FINISHED")
    return run_id


def _result(line: str, chunk: int) -> dict:
    top1, top5 = TOP1[line][chunk], TOP5[line][chunk]
    return {"knn_top1": float(np.mean(top1)), "knn_top5": float(np.mean(top5)), "knn_task_acc": top1,
            "knn_task_acc_top5": top5, "eval_seconds": 0.5}


def test_summarise_logs_top5_metrics_and_every_lines_gap(synthetic_url, tmp_path) -> None:
    plan, tracker, parent = _plan(synthetic_url, tmp_path, ["sequential", "sequential+replay", "joint"])
    driver = ChunkedDriver(plan, tracker, Console(file=open("/dev/null", "w")), None)
    driver.parent = parent
    for job in plan.jobs:
        driver.chunk_runs[job.key] = _chunk_run(tracker, plan, parent, job)
        driver.log_eval(job, _result(job.line.id, job.chunk))
    client = MlflowClient(tracker.uri)

    # The eval run and its chunk run carry top-5 next to top-1 (overall, and per task on the eval run).
    job = next(j for j in plan.jobs if j.line.id == SEQ and j.chunk == 1)
    chunk_run = client.get_run(driver.chunk_runs[job.key])
    eval_run = client.get_run(chunk_run.data.tags[tr.TAG + "eval_run"])
    assert eval_run.data.metrics["knn_top5"] == pytest.approx((0.80 + 0.95 + 0.50) / 3)
    assert [eval_run.data.metrics[f"knn_task{t}_top5"] for t in range(3)] == TOP5[SEQ][1]
    assert [eval_run.data.metrics[f"knn_task{t}"] for t in range(3)] == TOP1[SEQ][1]
    assert chunk_run.data.metrics["knn_top5"] == eval_run.data.metrics["knn_top5"]
    assert chunk_run.data.metrics["knn_top1"] == eval_run.data.metrics["knn_top1"]

    # A resumed driver reads back exactly what was logged, top-5 included.
    record = read_logged(tracker, plan, ["knn"])
    assert not record.unevaluated and not record.partial
    for job in plan.jobs:
        expected = {k: v for k, v in _result(job.line.id, job.chunk).items() if k != "eval_seconds"}
        assert record.results[job.key] == expected  # MLflow keeps float64 metrics exactly

    summary = ExperimentSummary(parent, plan.key, baseline=dict(BASELINE))
    summarise(summary, plan, tracker, record.chunk_rows, record.results)
    m = client.get_run(parent).data.metrics
    # By hand, top-1 of the sequential line: avg (0.3 + 0.5 + 0.8) / 3; BWT mean(0.3 - 0.6, 0.5 - 0.7);
    # forgetting mean(0.6 - 0.3, 0.7 - 0.5); FWT mean(0.10 - 0.10, 0.15 - 0.05).
    assert m[f"{SEQ}.knn.avg_acc"] == pytest.approx(1.6 / 3)
    assert m[f"{SEQ}.knn.bwt"] == pytest.approx(-0.25)
    assert m[f"{SEQ}.knn.forgetting"] == pytest.approx(0.25)
    assert m[f"{SEQ}.knn.fwt"] == pytest.approx(0.05)
    # Top-5: avg (0.7 + 0.85 + 1.0) / 3; BWT mean(0.7 - 0.9, 0.85 - 0.95); forgetting the same negated;
    # FWT against the baseline's top-5: mean(0.40 - 0.35, 0.50 - 0.30).
    assert m[f"{SEQ}.knn_top5.avg_acc"] == pytest.approx(0.85)
    assert m[f"{SEQ}.knn_top5.bwt"] == pytest.approx(-0.15)
    assert m[f"{SEQ}.knn_top5.forgetting"] == pytest.approx(0.15)
    assert m[f"{SEQ}.knn_top5.fwt"] == pytest.approx(0.125)
    # replay, top-5: avg (0.8 + 0.9 + 1.0) / 3, BWT mean(0.8 - 0.9, 0.9 - 0.95)
    assert m[f"{REPLAY}.knn_top5.avg_acc"] == pytest.approx(0.9)
    assert m[f"{REPLAY}.knn_top5.bwt"] == pytest.approx(-0.075)
    assert {f"{JOINT}.knn_top5.{k}" for k in ("avg_acc", "bwt", "fwt", "forgetting")} <= set(m)

    # ST-JT gap, JT minus ST in mean accuracy over the tasks seen: sequential after chunk 1 is
    # (0.60 + 0.72) / 2 - (0.40 + 0.70) / 2 = 0.11, after chunk 2 (0.58 + 0.70 + 0.82) / 3 - 1.6 / 3;
    # replay after chunk 1 0.66 - (0.55 + 0.70) / 2 = 0.035, after chunk 2 0.70 - (0.50 + 0.65 + 0.80) / 3 = 0.05.
    assert m[f"{SEQ}.knn.st_jt_gap"] == pytest.approx(0.7 - 1.6 / 3)
    assert m["simclr.knn.st_jt_gap"] == m[f"{SEQ}.knn.st_jt_gap"]  # the name earlier plans logged
    assert m[f"{REPLAY}.knn.st_jt_gap"] == pytest.approx(0.05)
    assert f"{JOINT}.knn.st_jt_gap" not in m
    for line, expected in ((SEQ, [0.0, 0.11, 0.7 - 1.6 / 3]), (REPLAY, [0.0, 0.035, 0.05])):
        history = sorted(client.get_metric_history(parent, f"{line}.knn.st_jt_gap_by_chunk"), key=lambda h: h.step)
        assert [h.step for h in history] == [0, 1, 2]
        assert [h.value for h in history] == pytest.approx(expected)
    assert summary.gaps == {SEQ: {"knn": pytest.approx(0.7 - 1.6 / 3)}, REPLAY: {"knn": pytest.approx(0.05)}}
    assert summary.gaps_by_chunk[REPLAY]["knn"] == pytest.approx([0.0, 0.035, 0.05])

    # Artifacts: the top-5 matrix as written is the hand-built one; heatmaps and curves under plots/.
    names = {a.path for a in client.list_artifacts(parent)}
    assert {f"accuracy_matrix.{SEQ}.knn.json", f"accuracy_matrix.{SEQ}.knn_top5.json", "summary.json"} <= names
    local = Path(client.download_artifacts(parent, f"accuracy_matrix.{SEQ}.knn_top5.json", str(tmp_path)))
    assert AccuracyMatrix.from_dict(json.loads(local.read_text())).values.tolist() == TOP5[SEQ]
    plots = {a.path for a in client.list_artifacts(parent, "plots")}
    assert {f"plots/accuracy_matrix.{line}.knn_top5.png" for line in (SEQ, REPLAY, JOINT)} <= plots
    assert {"plots/knn_top1_by_chunk.png", "plots/knn_top5_by_chunk.png"} <= plots
    saved = json.loads(Path(client.download_artifacts(parent, "summary.json", str(tmp_path))).read_text())
    assert saved["lines"][SEQ]["knn_top5"]["fwt"] == pytest.approx(0.125)
    assert set(saved["gaps"]) == {SEQ, REPLAY} and saved["gaps_by_chunk"][SEQ]["knn"][1] == pytest.approx(0.11)
    row = next(r for r in saved["rows"] if r["line"] == REPLAY and r["chunk"] == 2)
    assert row["knn_top5"] == pytest.approx((0.80 + 0.90 + 1.00) / 3)

    # What the terminal shows: a gap per line, and the top-5 rows of the continual-metrics table.
    console = Console(record=True, width=200, file=open("/dev/null", "w"))
    print_summary(summary, console, plan.spec)
    out = console.export_text()
    assert f"ST-JT gap ({SEQ}): knn +0.167" in out and f"ST-JT gap ({REPLAY}): knn +0.050" in out
    assert "knn_top5" in out and "random-init baseline: knn_top1 0.080, knn_top5 0.350" in out


def test_an_evaluation_logged_before_top5_existed_keeps_its_top1_metrics(synthetic_url, tmp_path) -> None:
    plan, tracker, parent = _plan(synthetic_url, tmp_path, ["sequential"])
    for job in plan.jobs:  # eval runs as an earlier streamssl logged them: top-1 only
        chunk_run = _chunk_run(tracker, plan, parent, job)
        eval_run = tracker.create_run(f"{job.name}/eval", {tr.RUN_TYPE: "eval", tr.PARENT: parent,
                                                           tr.PLAN_KEY: plan.key, tr.EVALUATES: chunk_run})
        tracker.log_metrics(eval_run, {"knn_top1": 0.5, **{f"knn_task{t}": TOP1[SEQ][job.chunk][t] for t in range(3)}})
        tracker.end_run(eval_run, "FINISHED")
    record = read_logged(tracker, plan, ["knn"])
    assert all(set(r) == {"knn_top1", "knn_task_acc"} for r in record.results.values())
    summary = ExperimentSummary(parent, plan.key)
    summarise(summary, plan, tracker, record.chunk_rows, record.results)
    m = MlflowClient(tracker.uri).get_run(parent).data.metrics
    assert m[f"{SEQ}.knn.bwt"] == pytest.approx(-0.25)
    assert not any("_top5" in key for key in m)
    assert summary.unknown == [f"{SEQ}: knn_top5 was not recorded by the evaluation of chunk(s) 0, 1, 2 (logged "
                               "before top-5 existed), so its top-5 continual metrics are not computed"]


def test_the_gap_on_each_downstream_set_and_their_mean(synthetic_url, tmp_path) -> None:
    spec = validate_spec(tiny_spec("summary-ds", synthetic_url, stream={"kind": "random_class", "chunks": 3},
                                   lines={"method": ["simclr"], "strategy": ["sequential", "joint"]},
                                   eval={"every_chunk": ["knn"], "downstream": [{"name": "a", "url": synthetic_url},
                                                                                {"name": "b", "url": synthetic_url}]},
                                   storage={"workdir": str(tmp_path)}))
    plan = build_plan(spec)
    tracker = Tracker(spec.tracking_uri, spec.experiment_name, (tmp_path / "artifacts").as_uri())
    parent = tracker.create_run("plan", {tr.RUN_TYPE: "plan", tr.PLAN_KEY: plan.key})
    downstream = {SEQ: {"a": [0.30, 0.35, 0.40], "b": [0.20, 0.22, 0.30]},
                  JOINT: {"a": [0.30, 0.45, 0.55], "b": [0.20, 0.30, 0.36]}}
    results = {}
    for job in plan.jobs:
        result = _result(SEQ if job.line.strategy == "sequential" else JOINT, job.chunk)
        result.update({f"{s}.knn_top1": v[job.chunk] for s, v in downstream[job.line.id].items()})
        results[job.key] = result
    summary = ExperimentSummary(parent, plan.key)
    summarise(summary, plan, tracker, {}, results)
    # JT minus ST per chunk: a [0, 0.10, 0.15], b [0, 0.08, 0.06]; their mean [0, 0.09, 0.105]
    assert summary.gaps_by_chunk[SEQ]["a.knn"] == pytest.approx([0.0, 0.10, 0.15])
    assert summary.gaps_by_chunk[SEQ]["downstream.knn"] == pytest.approx([0.0, 0.09, 0.105])
    m = MlflowClient(tracker.uri).get_run(parent).data.metrics
    assert m[f"{SEQ}.b.knn.st_jt_gap"] == pytest.approx(0.06)
    assert m[f"{SEQ}.downstream.knn.st_jt_gap"] == pytest.approx(0.105)
    history = MlflowClient(tracker.uri).get_metric_history(parent, f"{SEQ}.downstream.knn.st_jt_gap_by_chunk")
    assert sorted((h.step, round(h.value, 9)) for h in history) == [(0, 0.0), (1, 0.09), (2, 0.105)]
