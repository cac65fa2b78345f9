"""The MLflow tracking server goes down: fail fast at start, ride out an outage mid-run, lose and duplicate nothing.

A real `mlflow server` process (SQLite store, served artifacts) is started once for the module
(tests/faults/mlflow_server.py), stopped (SIGTERM) and started again on the same port and store.
Outage deadlines are shortened through STREAMSSL_TRACKING_RETRY_SECONDS, as a user would.
"""

from __future__ import annotations

import logging
import threading
import time

import pytest

from orchestrator.errors import TrackingError
from orchestrator.tracking import tags as tr
from orchestrator.tracking.client import CONNECT_ENV, REQUEST_TIMEOUT_ENV, RETRY_ENV
from orchestrator.tracking.tracker import Tracker
from tests.faults.mlflow_server import MlflowServer, free_port

pytestmark = pytest.mark.slow

SERIES = 2500  # points per chunk run: three log_batch requests of <= 1000 points


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with MlflowServer(tmp_path_factory.mktemp("mlflow-server")) as srv:
        yield srv


@pytest.fixture
def live(server):
    """The module's server, started again if an earlier test left it stopped."""
    return server.start()


def _fresh(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _series(i: int) -> list[float]:
    return [round(i + 1.0 / (s + 1), 9) for s in range(SERIES)]


def _log_chunk_run(tracker: Tracker, parent: str, i: int, folder, before_series=None) -> str:
    started = int(time.time() * 1000) - 60_000
    run_id = tracker.create_run(f"line-a/chunk-{i}", {tr.PARENT: parent, tr.RUN_TYPE: "chunk", tr.JOB_KEY: f"job-{i}",
                                                       tr.CHUNK: str(i)}, start_ms=started)
    tracker.log_params(run_id, {"chunk": str(i), "optim.lr": "0.3", **{f"p{k}": str(k) for k in range(120)}})
    if before_series is not None:
        before_series()
    tracker.log_metric_series(run_id, "train_loss", _series(i), started, started + 50_000)
    tracker.log_metrics(run_id, {"final_loss": float(i), "steps": float(SERIES)})
    tracker.set_tags(run_id, {tr.CHECKPOINT: f"file:///ckpt/{i}", tr.TAG + "eval_run": f"eval-{i}"})
    tracker.log_json(run_id, "report.json", {"chunk": i})
    path = folder / f"notes-{i}.txt"
    path.write_text(f"chunk {i}\n")
    tracker.log_file(run_id, path, "notes")
    tracker.log_dataset(run_id, "file:///data", f"chunks-{i}", f"digest-{i}", "train")
    tracker.end_run(run_id, "FINISHED", end_ms=started + 55_000)
    return run_id


def _check_chunk_run(client, run_id: str, i: int) -> None:
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED", (run_id, run.info.status)
    history = client.get_metric_history(run_id, "train_loss")
    assert len(history) == SERIES, f"run {i}: {len(history)} train_loss points, expected {SERIES} exactly once"
    assert sorted(m.step for m in history) == list(range(SERIES))
    assert [m.value for m in sorted(history, key=lambda m: m.step)] == _series(i)
    for key in ("final_loss", "steps"):
        assert len(client.get_metric_history(run_id, key)) == 1, (i, key)
    assert run.data.params["chunk"] == str(i) and len(run.data.params) == 122
    assert run.data.tags[tr.CHECKPOINT] == f"file:///ckpt/{i}"
    assert run.data.tags[tr.TAG + "eval_run"] == f"eval-{i}"
    assert [a.path for a in client.list_artifacts(run_id)] == ["notes", "report.json"]
    assert [a.path for a in client.list_artifacts(run_id, "notes")] == [f"notes/notes-{i}.txt"]
    assert len(run.inputs.dataset_inputs) == 1


def test_server_down_at_start_fails_fast_naming_the_uri(monkeypatch):
    monkeypatch.delenv(CONNECT_ENV, raising=False)
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    started = time.monotonic()
    with pytest.raises(TrackingError, match=uri.replace(".", r"\.")) as info:
        Tracker(uri, "never-created")
    took = time.monotonic() - started
    assert took < 15, f"start-up check took {took:.1f}s"
    assert "cannot be reached" in str(info.value)


def test_outage_mid_run_loses_and_duplicates_nothing(live, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv(RETRY_ENV, "240")  # restarting the server takes 10-50 s on a busy 2-core machine
    caplog.set_level(logging.WARNING, logger="streamssl.tracking")
    tracker = Tracker(live.uri, "outage-mid-run")
    parent = tracker.create_run("plan", {tr.RUN_TYPE: "plan"})
    tracker.log_params(parent, {"name": "outage"})

    times: dict[str, float] = {}
    down = threading.Event()
    failure: list[BaseException] = []

    def outage() -> None:
        try:
            live.stop()
            times["stopped"] = time.monotonic()
            down.set()
            time.sleep(5)
            live.start()
            times["healthy"] = live.started_at
        except BaseException as exc:  # surfaced by the main thread
            failure.append(exc)
            down.set()

    def go_down() -> None:
        threading.Thread(target=outage, daemon=True).start()
        down.wait(120)

    def timed_go_down() -> None:
        go_down()
        times["blocked_from"] = time.monotonic()

    runs = []
    for i in range(8):
        hook = timed_go_down if i == 3 else None
        runs.append(_log_chunk_run(tracker, parent, i, tmp_path, before_series=hook))
        if i == 3:
            times["run_done"] = time.monotonic()
    tracker.log_metrics(parent, {"avg_acc": 0.5})
    tracker.end_run(parent, "FINISHED")
    assert not failure, failure
    assert "healthy" in times, "the server did not come back"

    recovery = times["run_done"] - times["healthy"]
    outage_s = times["healthy"] - times["stopped"]
    print(f"\noutage {outage_s:.1f}s (stop -> healthy); run 3 finished {recovery:.1f}s after the server was "
          f"healthy again; tracker saw outages {[round(o, 1) for o in tracker.outages]}, {tracker.retries} retries")
    assert tracker.outages, "no outage was noticed"
    assert recovery < 30, f"logging resumed {recovery:.1f}s after the server came back"

    warnings = [r.getMessage() for r in caplog.records if r.name == "streamssl.tracking"]
    assert sum("is not answering" in w for w in warnings) == 1, warnings  # once per outage
    assert sum("answers again" in w for w in warnings) == 1, warnings
    assert live.uri in warnings[0]

    client = _fresh(live.uri)  # read back through a client that never saw the outage
    experiment = client.get_experiment_by_name("outage-mid-run")
    everything = client.search_runs([experiment.experiment_id], max_results=1000)
    assert len(everything) == len(runs) + 1, "duplicate or missing runs"
    assert not [r.info.run_id for r in everything if r.info.status == "RUNNING"]
    for i, run_id in enumerate(runs):
        _check_chunk_run(client, run_id, i)
    assert client.get_run(parent).data.metrics["avg_acc"] == 0.5


class LosesFirstAnswer:
    """Passes calls to a real MlflowClient; the first call of each named method lands, then its answer is lost.
    `calls[name]` lists every call of a method (its `metrics` argument, for log_batch)."""

    def __init__(self, client, methods):
        self._client, self._lose = client, set(methods)
        self.calls: dict[str, list] = {}

    def __getattr__(self, name):
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr

        def call(*args, **kwargs):
            self.calls.setdefault(name, []).append(kwargs.get("metrics"))
            out = attr(*args, **kwargs)
            if name in self._lose:
                self._lose.discard(name)
                import requests

                raise requests.exceptions.ConnectionError(f"simulated: the answer to {name} was lost")
            return out

        return call


@pytest.mark.parametrize("store", ["server", "file"])
def test_landed_write_whose_answer_was_lost_is_not_repeated(store, live, tmp_path, monkeypatch):
    """A write can land while its answer is lost (timeout, reset); the retry must not store it twice. A file
    store keeps exact duplicate metric points (SQL stores drop them), so it shows the read-back check works."""
    monkeypatch.setenv(RETRY_ENV, "30")
    if store == "file":
        monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
        uri = f"file://{tmp_path / 'mlruns'}"
    else:
        uri = live.uri
    tracker = Tracker(uri, f"lost-answers-{store}")
    spy = LosesFirstAnswer(tracker.client._client, ["create_run", "log_batch", "set_terminated"])
    tracker.client._client = spy
    run_id = tracker.create_run("chunk", {tr.JOB_KEY: "k"})
    tracker.log_metric_series(run_id, "train_loss", _series(0), 1_000, 60_000)
    tracker.end_run(run_id, "FINISHED")

    client = _fresh(uri)
    experiment = client.get_experiment_by_name(f"lost-answers-{store}")
    assert len(client.search_runs([experiment.experiment_id])) == 1, "the lost create_run made a second run"
    history = client.get_metric_history(run_id, "train_loss")
    assert len(history) == SERIES and sorted(m.step for m in history) == list(range(SERIES))
    assert client.get_run(run_id).info.status == "FINISHED"
    assert len(spy.calls["create_run"]) == 1  # the retry found the run by its client token
    sent = [len(m or []) for m in spy.calls["log_batch"]]
    assert sent == [1000, 1000, 500], sent  # the landed first batch was not re-sent (its retry was a no-op)
    assert tracker.outages  # each lost answer counted as a (short) outage


def test_fail_running_marks_children_failed(live, monkeypatch):
    tracker = Tracker(live.uri, "fail-running")
    parent = tracker.create_run("plan", {tr.RUN_TYPE: "plan"})
    children = [tracker.create_run(f"c{i}", {tr.PARENT: parent}) for i in range(3)]
    tracker.end_run(children[0], "FINISHED")
    other = tracker.create_run("unrelated", {})
    failed = tracker.fail_running(parent, include_parent=True)
    assert sorted(failed) == sorted(children[1:] + [parent])
    client = _fresh(live.uri)
    assert [client.get_run(c).info.status for c in children] == ["FINISHED", "FAILED", "FAILED"]
    assert client.get_run(parent).info.status == "FAILED"
    assert client.get_run(other).info.status == "RUNNING"
    assert tracker.fail_running(parent) == []


def test_hung_server_times_out_and_resumes_without_duplicates(live, monkeypatch):
    """A hung server (SIGSTOP) accepts connections and answers nothing: attempts time out (the request may still
    be processed once the server wakes up), are retried, and every point ends up stored exactly once."""
    monkeypatch.setenv(RETRY_ENV, "60")
    monkeypatch.setenv(REQUEST_TIMEOUT_ENV, "2")
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_TIMEOUT", raising=False)
    tracker = Tracker(live.uri, "hung-server")
    run_id = tracker.create_run("chunk", {})
    live.pause()
    timer = threading.Timer(5, live.resume)
    timer.start()
    try:
        started = time.monotonic()
        tracker.log_metric_series(run_id, "train_loss", _series(1), 1_000, 60_000)
        tracker.end_run(run_id, "FINISHED")
        took = time.monotonic() - started
    finally:
        timer.join()
        live.resume()
    assert tracker.outages and took < 40, (took, tracker.outages)
    client = _fresh(live.uri)
    history = client.get_metric_history(run_id, "train_loss")
    assert len(history) == SERIES and sorted(m.step for m in history) == list(range(SERIES))
    assert client.get_run(run_id).info.status == "FINISHED"
    assert len(client.search_runs([client.get_experiment_by_name("hung-server").experiment_id])) == 1


def test_outage_longer_than_deadline_raises_naming_the_uri(live, monkeypatch):
    """Runs last in the module: leaves the server stopped (the fixture's teardown is then a no-op)."""
    monkeypatch.setenv(RETRY_ENV, "3")
    tracker = Tracker(live.uri, "outage-too-long")
    run_id = tracker.create_run("chunk", {})
    live.stop()
    started = time.monotonic()
    with pytest.raises(TrackingError, match=live.uri.replace(".", r"\.")) as info:
        tracker.log_metrics(run_id, {"loss": 1.0})
    took = time.monotonic() - started
    assert 2.5 <= took < 15, f"gave up after {took:.1f}s with a 3 s deadline"
    assert "unreachable" in str(info.value) and RETRY_ENV in str(info.value)
    started = time.monotonic()  # the same outage: the next write fails fast instead of waiting again
    with pytest.raises(TrackingError, match=live.uri.replace(".", r"\.")):
        tracker.end_run(run_id, "FAILED")
    assert time.monotonic() - started < 5
