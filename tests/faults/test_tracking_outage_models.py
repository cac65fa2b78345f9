"""Checkpoints as LoggedModels through a tracking outage and a driver death: never two models for one checkpoint,
never a READY model whose source run a resume deleted. Real MLflow on SQLite; lost answers as in
test_tracking_outage.py (the call lands, its answer is lost).
"""

from __future__ import annotations

import pytest

from orchestrator.tracking import tags as tr
from orchestrator.tracking.client import RETRY_ENV
from orchestrator.tracking.tracker import Tracker
from tests.faults.test_tracking_outage import LosesFirstAnswer


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """One SQLite store for the module (building its schema takes seconds); each test has its own experiment."""
    return f"sqlite:///{tmp_path_factory.mktemp('models') / 'mlflow.db'}"


def _models(uri: str, experiment: str) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    return list(client.search_logged_models([client.get_experiment_by_name(experiment).experiment_id]))


def test_lost_create_logged_model_answer_makes_one_model(store, monkeypatch):
    monkeypatch.setenv(RETRY_ENV, "30")
    uri = store
    tracker = Tracker(uri, "lost-model-answer")
    run_id = tracker.create_run("line-a/chunk-0", {tr.RUN_TYPE: "chunk"})
    spy = LosesFirstAnswer(tracker.client._client,
                            ["create_logged_model", "finalize_logged_model", "log_outputs"])
    tracker.client._client = spy
    model_id = tracker.log_checkpoint_model(run_id, "line-a/chunk-0", 0, {tr.CHECKPOINT: "file:///ckpt/0"},
                                            {"chunk": "0"})
    tracker.end_run(run_id)

    models = _models(uri, "lost-model-answer")
    assert [m.model_id for m in models] == [model_id], "the retried create_logged_model made a second model"
    assert str(models[0].status) == "READY" and models[0].source_run_id == run_id
    assert len(spy.calls["create_logged_model"]) == 1  # the retry found the first model by its client token
    assert tracker.outages  # each lost answer was ridden out


def test_resume_deletes_the_model_of_a_run_it_deletes(store):
    """A driver died after creating chunk 0's READY model and before ending the run: the resume marks the run
    FAILED and deletes it as superseded; its model must go with it (the FINISHED run's model stays)."""
    uri = store
    tracker = Tracker(uri, "dead-driver-model")
    plan = tracker.create_run("plan", {tr.RUN_TYPE: "plan"})
    done = tracker.create_run("line-a/chunk-0", {tr.RUN_TYPE: "chunk", tr.PARENT: plan})
    kept = tracker.log_checkpoint_model(done, "line-a/chunk-0", 0, {}, {})
    tracker.end_run(done)
    dying = tracker.create_run("line-a/chunk-1", {tr.RUN_TYPE: "chunk", tr.PARENT: plan})
    tracker.log_checkpoint_model(dying, "line-a/chunk-1", 1, {}, {})  # ...and the driver dies here

    resumed = Tracker(uri, "dead-driver-model")  # the --resume driver
    assert resumed.fail_running(plan) == [dying]
    resumed.delete_runs([dying])

    models = _models(uri, "dead-driver-model")
    assert [(m.model_id, m.source_run_id) for m in models] == [(kept, done)]
    resumed.delete_runs([dying])  # a second resume after a death in between: nothing left, nothing raised
    assert len(_models(uri, "dead-driver-model")) == 1
