"""MLflow lineage: plan run -> chunk runs -> evaluation runs, linked by tags both ways (the tags are in
:mod:`orchestrator.tracking.tags`).

    tracker = Tracker(spec.tracking_uri, spec.experiment_name)
    run_id = tracker.create_run("chunk 0", {lineage.RUN_TYPE: "chunk", ...})
    tracker.log_metrics(run_id, {"final_loss": 0.4}); tracker.end_run(run_id)

Experiment = spec name. One parent run per plan (`streamssl.run_type=plan`), a child run per (line, chunk)
(`chunk`), and an evaluation run per evaluated chunk run (`eval`, tagged `streamssl.evaluates=<chunk run id>`).
Tags carry the lineage (data digest, stream-plan digest, job key, checkpoint URI, evaluation protocol, versions),
so `streamssl lineage RUN_ID` can walk it either way. Only the driver talks to MLflow, through one client that
retries through outages and never stores a write twice (:mod:`orchestrator.tracking.client`).
``fail_running(parent)`` marks every RUNNING run under a plan run FAILED (after a crash, before a resume).
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable

from orchestrator.errors import TrackingError
from orchestrator.tracking.client import RetryingClient, classify
from orchestrator.tracking.tags import EVALUATES, JOB_KEY, PARENT, PLAN_KEY, RUN_TYPE

log = logging.getLogger("streamssl.tracking")


def logged_model_name(name: str) -> str:
    """A run name as a LoggedModel name, which MLflow forbids to hold / : . % " '."""
    return "".join("-" if c in "/:.%\"'" else c for c in name)


def dataset_source(url: str):
    """The MLflow DatasetSource MLflow itself resolves `url` to: local paths and file:// a local source, s3:// an S3
    one, gs:// GCS, http(s):// HTTP. A URL no registered source resolves (e.g. memory://) is logged as HTTP."""
    import warnings

    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.http_dataset_source import HTTPDatasetSource
    from mlflow.exceptions import MlflowException

    with warnings.catch_warnings():  # "can be interpreted in multiple ways": two local resolvers agree on a path
        warnings.simplefilter("ignore", UserWarning)
        try:
            return resolve_dataset_source(url)
        except MlflowException:
            return HTTPDatasetSource(url)


def _gone(client, model_id: str) -> bool:
    try:
        client.get_logged_model(model_id)
    except Exception as exc:  # noqa: BLE001 - "not found" is what a deleted model answers
        return classify(exc) == "fatal"
    return False


def _chunks(items: list, size: int) -> Iterable[list]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


class Tracker:
    """Writes and reads the lineage of one experiment through a :class:`RetryingClient` (``tracker.client``).

    `retry_seconds` and `connect_seconds` are the client's (see there); `outages` and `retries` are what it rode out.
    """

    def __init__(self, uri: str, experiment: str | None = None, artifact_root: str | None = None, *,
                 retry_seconds: float | None = None, connect_seconds: float | None = None):
        self.uri = uri
        self.name_prefix = ""  # before every run name this tracker creates (a sweep trial's "trial-003/")
        self.client = RetryingClient(uri, retry_seconds=retry_seconds, connect_seconds=connect_seconds)
        self.experiment_id = None
        if experiment is not None:
            self.experiment_id = self._experiment_id(experiment, artifact_root)

    def _experiment_id(self, name: str, artifact_root: str | None) -> str:
        """The id of experiment `name`, created when it does not exist yet (by this or a racing driver)."""
        client, connect = self.client, self.client.connect_seconds
        found = client.call("get_experiment_by_name", lambda: client._client.get_experiment_by_name(name), connect)
        if found is not None:
            return found.experiment_id
        try:
            return client.call("create_experiment",
                               lambda: client._client.create_experiment(name, artifact_location=artifact_root), connect)
        except TrackingError:  # created meanwhile by another driver (or by an attempt that timed out)
            found = client.call("get_experiment_by_name", lambda: client._client.get_experiment_by_name(name), connect)
            if found is None:
                raise
            return found.experiment_id

    @property
    def outages(self) -> list[float]:
        return self.client.outages

    @property
    def retries(self) -> int:
        return self.client.retries

    # ---------------------------------------------------------------- writing
    def log_params(self, run_id: str, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v[:6000]) for k, v in params.items()]
        for batch in _chunks(items, 100):
            self.client.log_batch(run_id, params=batch)

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int = 0, timestamp_ms: int | None = None) -> None:
        from mlflow.entities import Metric

        ts = timestamp_ms or int(time.time() * 1000)
        items = [Metric(k, float(v), ts, step) for k, v in metrics.items() if v is not None]
        for batch in _chunks(items, 1000):
            self.client.log_batch(run_id, metrics=batch)

    def log_metric_series(self, run_id: str, name: str, values: list[float], start_ms: int, end_ms: int) -> None:
        """A per-step curve in one batch call (cheap: one request per 1000 points)."""
        from mlflow.entities import Metric

        span = max(1, end_ms - start_ms)
        n = max(1, len(values))
        items = [Metric(name, float(v), start_ms + span * i // n, i) for i, v in enumerate(values)]
        for batch in _chunks(items, 1000):
            self.client.log_batch(run_id, metrics=batch)

    def log_json(self, run_id: str, name: str, payload: Any) -> None:
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / name
            path.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str))
            self.client.log_artifact(run_id, str(path))

    def log_file(self, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(run_id, str(path), artifact_path)

    def log_dataset(self, run_id: str, url: str, name: str, digest: str, context: str) -> None:
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.entities import DatasetInput, InputTag

        dataset = MetaDataset(dataset_source(url), name=name, digest=digest[:36])
        self.client.log_inputs(
            run_id, datasets=[DatasetInput(dataset._to_mlflow_entity(), [InputTag("mlflow.data.context", context)])]
        )

    def log_checkpoint_model(self, run_id: str, name: str, step: int, tags: dict[str, str],
                             params: dict[str, str]) -> str:
        """A checkpoint as an MLflow 3 LoggedModel made by `run_id` at `step` (READY, an output of the run), so
        the UI's Models tab walks chunk -> checkpoint -> metrics. Returns the model id."""
        from mlflow.entities import LoggedModelOutput

        model = self.client.create_logged_model(self.experiment_id, name=logged_model_name(name), source_run_id=run_id,
                                                tags=tags, params={k: v[:6000] for k, v in params.items()})
        self.client.finalize_logged_model(model.model_id, "READY")
        self.client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step)])
        return model.model_id

    def log_model_metrics(self, run_id: str, model_id: str, metrics: dict[str, float], step: int,
                          dataset_name: str, dataset_digest: str) -> None:
        """Metrics of `run_id` that score the LoggedModel `model_id` on a dataset logged as the run's input."""
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = [Metric(k, float(v), ts, step, model_id=model_id, dataset_name=dataset_name,
                        dataset_digest=dataset_digest[:36]) for k, v in metrics.items() if v is not None]
        for batch in _chunks(items, 1000):
            self.client.log_batch(run_id, metrics=batch)

    def create_run(self, run_name: str, tags: dict[str, str], start_ms: int | None = None) -> str:
        run = self.client.create_run(self.experiment_id, run_name=self.name_prefix + run_name, tags=tags,
                                     start_time=start_ms)
        return run.info.run_id

    def end_run(self, run_id: str, status: str = "FINISHED", end_ms: int | None = None, *,
                retry_seconds: float | None = None) -> None:
        """Retried like every write, so a transient outage does not leave the run RUNNING. In a failure path
        pass a short `retry_seconds` not to hold a dying driver for the whole outage deadline."""
        self.client.call("set_terminated",
                   lambda: self.client._client.set_terminated(run_id, status=status, end_time=end_ms), retry_seconds)

    def update_run(self, run_id: str, status: str | None = None, name: str | None = None) -> None:
        """E.g. `update_run(plan_run, status="RUNNING")` when a resume reopens a plan run."""
        self.client.update_run(run_id, status=status, name=name)

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_tag(run_id, key, value)

    def fail_running(self, parent_run_id: str, include_parent: bool = False, end_ms: int | None = None) -> list[str]:
        """Mark every RUNNING run under `parent_run_id` (chunk and eval runs; the plan run too with
        `include_parent`) FAILED, e.g. after a driver crash and before a resume. Returns their ids."""
        ids = [r.info.run_id for r in self.runs(f"tags.`{PARENT}` = '{parent_run_id}' and attributes.status = 'RUNNING'")]
        if include_parent and self.get_run(parent_run_id).info.status == "RUNNING":
            ids.append(parent_run_id)
        for run_id in ids:
            self.end_run(run_id, "FAILED", end_ms=end_ms)
        if ids:
            log.warning("marked %d RUNNING run(s) under %s FAILED: %s", len(ids), parent_run_id, ", ".join(ids))
        return ids

    def delete_runs(self, run_ids: list[str]) -> None:
        """Soft-delete runs (MLflow keeps them restorable; searches no longer return them), and first the
        LoggedModels they made: a driver that died between creating a chunk's model and ending its run left a
        READY model whose source run a resume deletes here. Models first, so that a driver killed in between
        leaves runs that the next resume deletes again (with their models), never orphaned models."""
        for run_id in run_ids:
            for model in self.models_of(run_id):
                self.delete_model(model.model_id)
            self.client.delete_run(run_id)

    def models_of(self, run_id: str) -> list:
        """The (not deleted) LoggedModels whose source run is `run_id`."""
        experiment_id = self.experiment_id or self.get_run(run_id).info.experiment_id
        out, token = [], None
        while True:
            page = self.client.search_logged_models([experiment_id], filter_string=f"source_run_id = '{run_id}'",
                                                    max_results=100, page_token=token)
            out.extend(page)
            token = page.token
            if not token:
                return out

    def delete_model(self, model_id: str) -> None:
        """Mark a LoggedModel FAILED and delete it (soft: restorable in MLflow); a model already deleted (by an
        attempt whose answer got lost) is fine."""
        from mlflow.entities import LoggedModelStatus

        client = self.client

        def attempt():
            try:
                client._client.finalize_logged_model(model_id, LoggedModelStatus.FAILED)
                client._client.delete_logged_model(model_id)
            except Exception as exc:
                if classify(exc) != "fatal" or not _gone(client._client, model_id):
                    raise

        client.call("delete_logged_model", attempt)

    # ---------------------------------------------------------------- reading
    def runs(self, filter_string: str, experiment_ids: list[str] | None = None) -> list:
        ids = experiment_ids or ([self.experiment_id] if self.experiment_id else None)
        if ids is None:
            ids = [e.experiment_id for e in self.client.search_experiments()]
        out, token = [], None
        while True:
            page = self.client.search_runs(ids, filter_string=filter_string, max_results=1000, page_token=token)
            out.extend(page)
            token = page.token
            if not token:
                return out

    def plan_runs(self, plan_key: str) -> list:
        runs = self.runs(f"tags.`{RUN_TYPE}` = 'plan' and tags.`{PLAN_KEY}` = '{plan_key}'")
        return sorted(runs, key=lambda r: r.info.start_time or 0, reverse=True)

    def children(self, parent_run_id: str, run_type: str | None = None) -> list:
        query = f"tags.`{PARENT}` = '{parent_run_id}'"
        if run_type:
            query += f" and tags.`{RUN_TYPE}` = '{run_type}'"
        return self.runs(query)

    def finished_chunk_runs(self, plan_key: str) -> dict[str, Any]:
        """job key -> the FINISHED chunk run of any earlier attempt of this plan."""
        runs = self.runs(f"tags.`{RUN_TYPE}` = 'chunk' and tags.`{PLAN_KEY}` = '{plan_key}' "
                         "and attributes.status = 'FINISHED'")
        return {r.data.tags[JOB_KEY]: r for r in runs}

    def evaluation_of(self, chunk_run_id: str) -> list:
        return self.runs(f"tags.`{EVALUATES}` = '{chunk_run_id}'")

    def get_run(self, run_id: str):
        try:
            return self.client.get_run(run_id)
        except TrackingError as exc:
            if exc.__cause__ is not None and classify(exc.__cause__) == "fatal":
                raise TrackingError(f"run {run_id} not found in {self.uri}: {exc.__cause__}") from None
            raise

