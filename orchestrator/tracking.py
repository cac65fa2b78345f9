"""MLflow lineage: plan run -> chunk runs -> evaluation runs, linked by tags both ways.

Experiment = spec name. One parent run per plan (`streamssl.run_type=plan`), a child run per (line, chunk)
(`chunk`), and an evaluation run per evaluated chunk run (`eval`, tagged `streamssl.evaluates=<chunk run id>`).
Tags carry the lineage (data digest, stream-plan digest, job key, checkpoint URI, evaluation protocol, versions),
so `streamssl lineage RUN_ID` can walk it either way. Only the driver talks to MLflow, through one MlflowClient.
"""

from __future__ import annotations

import json
import platform
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable

from orchestrator.errors import TrackingError

TAG = "streamssl."
RUN_TYPE = TAG + "run_type"
PLAN_KEY = TAG + "plan_key"
JOB_KEY = TAG + "job_key"
LINE = TAG + "line"
CHUNK = TAG + "chunk"
CHECKPOINT = TAG + "checkpoint_uri"
EVALUATES = TAG + "evaluates"
PARENT = "mlflow.parentRunId"


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("streamssl", "torch", "torchvision", "pillow", "ray", "mlflow", "pyarrow"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def _chunks(items: list, size: int) -> Iterable[list]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


class Tracker:
    """Writes and reads the lineage of one experiment through an MlflowClient."""

    def __init__(self, uri: str, experiment: str | None = None, artifact_root: str | None = None):
        from mlflow.tracking import MlflowClient

        self.uri = uri
        if uri.startswith("sqlite:///"):
            Path(uri[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
        self.client = MlflowClient(tracking_uri=uri)
        try:
            self.client.search_experiments(max_results=1)
        except Exception as exc:
            raise TrackingError(f"MLflow tracking store {uri} cannot be reached: {exc}") from None
        self.experiment_id = None
        if experiment is not None:
            found = self.client.get_experiment_by_name(experiment)
            if found is None:
                self.experiment_id = self.client.create_experiment(experiment, artifact_location=artifact_root)
            else:
                self.experiment_id = found.experiment_id

    # ---------------------------------------------------------------- writing
    def log_params(self, run_id: str, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v[:6000]) for k, v in params.items()]
        for batch in _chunks(items, 100):
            self.client.log_batch(run_id, params=batch)

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int = 0, timestamp_ms: int | None = None) -> None:
        from mlflow.entities import Metric
        import time

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
        from mlflow.data.http_dataset_source import HTTPDatasetSource
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.entities import DatasetInput, InputTag

        dataset = MetaDataset(HTTPDatasetSource(url), name=name, digest=digest[:36])
        self.client.log_inputs(
            run_id, datasets=[DatasetInput(dataset._to_mlflow_entity(), [InputTag("mlflow.data.context", context)])]
        )

    def create_run(self, run_name: str, tags: dict[str, str], start_ms: int | None = None) -> str:
        run = self.client.create_run(self.experiment_id, run_name=run_name, tags=tags, start_time=start_ms)
        return run.info.run_id

    def end_run(self, run_id: str, status: str = "FINISHED", end_ms: int | None = None) -> None:
        self.client.set_terminated(run_id, status=status, end_time=end_ms)

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_tag(run_id, key, value)

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
        except Exception as exc:
            raise TrackingError(f"run {run_id} not found in {self.uri}: {exc}") from None
