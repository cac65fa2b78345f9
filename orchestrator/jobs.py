"""Ray Jobs API: submit a spec to a running cluster, follow its status and logs.

    job_id = submit_spec(spec, "http://HEAD:8265")        # uploads the code + the resolved spec, returns the id
    info = job_info("http://HEAD:8265", job_id)           # status, message, times
    for text in job_logs("http://HEAD:8265", job_id, follow=True): print(text, end="")

What is uploaded (the job's runtime_env working_dir) is a staging folder with streamssl's own packages and the
spec as validated here, with every --set applied, so what runs on the cluster is exactly what was checked locally.
The job runs `python -m cli.app run spec.yaml --address auto` on the head node; its workers need every URL in the
spec (data, checkpoints, tracking) to be reachable from every node: nothing is shared through a local disk.
"""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import yaml

import orchestrator
from orchestrator.errors import ClusterError
from orchestrator.spec.experiment import Spec

PACKAGES = ("orchestrator", "trainers", "evaluators", "cli")
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
ADDRESS_ENV = "RAY_ADDRESS"
AGENT_WAIT_S = 60.0  # how long a fresh cluster may take to accept jobs


def dashboard_address(address: str | None) -> str:
    """The Jobs API address: --address, else $RAY_ADDRESS; `HEAD:8265` gets http://."""
    address = address or os.environ.get(ADDRESS_ENV)
    if not address:
        raise ClusterError("no cluster address: pass --address http://HEAD:8265 or set RAY_ADDRESS")
    if address.startswith("ray://") or address == "auto":
        raise ClusterError(
            f"{address}: job submission talks to the dashboard's Jobs API (http://HEAD:8265), not the Ray client port"
        )
    return address if "://" in address else f"http://{address}"


def _client(address: str):
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except Exception as exc:  # ConnectionError, or a non-Ray server answering
        raise ClusterError(f"cannot reach the Ray Jobs API at {address}: {exc}") from exc


def cluster_warnings(spec: Spec) -> list[str]:
    """What in the spec only works when every node shares the driver's disk, in words for the user."""
    def local(url: str) -> bool:
        return "://" not in url or url.startswith("file://")

    found = []
    if local(spec.data.url):
        found.append(f"data.url={spec.data.url} is a local path: every node must see the same files there")
    if spec.storage.checkpoints is None:
        found.append("storage.checkpoints is unset: checkpoints would go under storage.workdir on each node's own "
                     "disk; set an s3:// (or shared) URL")
    elif local(spec.storage.checkpoints):
        found.append(f"storage.checkpoints={spec.storage.checkpoints} is a local path: every node must share it")
    if spec.tracking.uri is None:
        found.append("tracking.uri is unset: runs would go to a SQLite file in the job's temporary working folder "
                     "on the head node; point it at an MLflow server")
    return found


def stage(spec: Spec, folder: Path) -> Path:
    """Write the runtime working dir: streamssl's packages (Python sources only) and `spec.yaml`."""
    root = Path(orchestrator.__file__).resolve().parent.parent
    for package in PACKAGES:
        shutil.copytree(root / package, folder / package,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.pyo"))
    # Unredacted: the cluster needs the real storage options. They travel inside the cluster (GCS), never to MLflow.
    data = spec.model_dump(mode="json", by_alias=True)
    (folder / "spec.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    return folder


def new_job_id(spec: Spec) -> str:
    name = re.sub(r"[^a-zA-Z0-9_-]", "-", spec.name)[:40]
    return f"streamssl-{name}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


def submit_spec(
    spec: Spec,
    address: str | None,
    *,
    job_id: str | None = None,
    env_names: list[str] | None = None,
    pip: list[str] | None = None,
    resume: bool = False,
    metadata: dict[str, str] | None = None,
) -> str:
    """Submit `spec` as a Ray job; returns the job (submission) id."""
    address = dashboard_address(address)
    env_vars = {"PYTHONUNBUFFERED": "1"}
    for name in env_names or []:
        if name not in os.environ:
            raise ClusterError(f"--env {name}: not set in this environment")
        env_vars[name] = os.environ[name]
    client = _client(address)
    job_id = job_id or new_job_id(spec)
    entrypoint = "python -m cli.app run spec.yaml --address auto" + (" --resume" if resume else "")
    with tempfile.TemporaryDirectory(prefix="streamssl-job-") as folder:
        runtime_env: dict[str, Any] = {"working_dir": str(stage(spec, Path(folder))), "env_vars": env_vars}
        if pip:
            runtime_env["pip"] = list(pip)
        deadline = time.monotonic() + AGENT_WAIT_S
        while True:
            try:
                return client.submit_job(
                    entrypoint=entrypoint, submission_id=job_id, runtime_env=runtime_env,
                    metadata={"streamssl.spec": spec.name, **(metadata or {})},
                )
            except Exception as exc:
                # A cluster that has just started answers before its job agents are up: that passes.
                if "No available agent" in str(exc) and time.monotonic() < deadline:
                    time.sleep(1.0)
                    continue
                raise ClusterError(f"the Jobs API at {address} refused job {job_id}: {exc}") from exc


@dataclass(frozen=True)
class JobInfo:
    job_id: str
    status: str
    message: str
    entrypoint: str
    start_time: float | None  # seconds since the epoch
    end_time: float | None

    @property
    def finished(self) -> bool:
        return self.status in TERMINAL


def job_info(address: str | None, job_id: str) -> JobInfo:
    address = dashboard_address(address)
    client = _client(address)
    try:
        details = client.get_job_info(job_id)
    except Exception as exc:
        raise ClusterError(f"job {job_id} at {address}: {exc}") from exc
    ms = lambda v: v / 1000 if v else None  # noqa: E731 - the Jobs API reports milliseconds
    return JobInfo(job_id, str(getattr(details.status, "value", details.status)), details.message or "",
                   details.entrypoint, ms(details.start_time), ms(details.end_time))


def job_logs(address: str | None, job_id: str, follow: bool = False) -> Iterator[str]:
    """The job's driver output; with `follow`, streamed until the job ends."""
    address = dashboard_address(address)
    client = _client(address)
    try:
        if not follow:
            yield client.get_job_logs(job_id)
            return
        agen = client.tail_job_logs(job_id)
        loop = asyncio.new_event_loop()
        try:
            while True:
                try:
                    yield loop.run_until_complete(agen.__anext__())
                except StopAsyncIteration:
                    return
        finally:
            loop.run_until_complete(agen.aclose())
            loop.close()
    except ClusterError:
        raise
    except Exception as exc:
        raise ClusterError(f"logs of job {job_id} at {address}: {exc}") from exc


def wait_for_job(address: str | None, job_id: str, timeout: float | None = None, poll: float = 1.0) -> JobInfo:
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        info = job_info(address, job_id)
        if info.finished:
            return info
        if deadline is not None and time.monotonic() > deadline:
            raise ClusterError(f"job {job_id} still {info.status} after {timeout:.0f} s")
        time.sleep(poll)
