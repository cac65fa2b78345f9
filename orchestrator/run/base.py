"""What the chunked and the online driver share: the plan run, the services a run needs on Ray (the evaluation
actor, the corrupt-row tally), logging an evaluation and linking it to what it scored, and the record's tags.

    class ChunkedDriver(Driver): ...      # orchestrator.run.experiment
    class OnlineDriver(Driver): ...       # orchestrator.run.online

Only the driver process talks to MLflow.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console

from orchestrator.data.ingest import start_corrupt_row_counter
from orchestrator.errors import TrainingError
from orchestrator.evaluate.evaluation import EvalActor, headline, protocol, task_metrics
from orchestrator.plan.planner import ExperimentPlan, Job
from orchestrator.run.display import TrainingProgress
from orchestrator.run.epoch_evals import EpochCheckpoint, log_by_epoch, log_epoch_eval
from orchestrator.run.models import log_scored_metrics
from orchestrator.spec.experiment import Spec, flatten
from orchestrator.spec.params import identity_digest
from orchestrator.tracking import tags as tr
from orchestrator.tracking.tracker import Tracker
from orchestrator.train.hooks import DriverHooks
from orchestrator.train.ray_init import init_ray


def artifact_root(spec: Spec) -> str | None:
    """Where a run's artifacts go: beside the SQLite file of the embedded default, else the tracking server's."""
    if spec.tracking.uri is None:  # embedded default: artifacts next to the SQLite file
        return (spec.workdir / "artifacts").as_uri()
    return None


def study_key(plan: ExperimentPlan) -> str:
    """The plan key's recipe (identity, data, stream) with the identity taken without the top-level `seed`."""
    parts = (identity_digest(plan.spec, with_seed=False), plan.data_digest, plan.stream.digest)
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:16]


def plan_tags(plan: ExperimentPlan) -> dict[str, str]:
    """The tags of a plan run: what it is, its key, the data and stream it trained on, its lines, the versions."""
    tags = {
        tr.RUN_TYPE: "plan",
        tr.PLAN_KEY: plan.key,
        tr.TAG + "data_url": plan.data_url,
        tr.TAG + "data_digest": plan.data_digest,
        tr.TAG + "stream_digest": plan.stream.digest,
        tr.STREAM_KIND: plan.stream.kind,
        tr.TAG + "spec_name": plan.spec.name,
        tr.LINES: json.dumps([{"id": line.id, "method": line.method, "strategy": line.strategy} for line in plan.lines]),
        tr.NUM_CHUNKS: str(plan.stream.num_chunks),
        tr.STUDY_KEY: study_key(plan),
    }
    tags.update({tr.TAG + f"version.{k}": v for k, v in tr.versions().items()})
    return tags


class Driver:
    """A plan's driver: subclasses train (`run`) and turn the worker group's events into runs (`on_event`)."""

    def __init__(self, plan: ExperimentPlan, tracker: Tracker, console: Console, address: str | None,
                 hooks: DriverHooks | None = None):
        self.plan, self.tracker, self.console, self.address = plan, tracker, console, address
        self.hooks = hooks or DriverHooks()
        self.spec = plan.spec
        self.use_gpu = self.spec.resources.gpus_per_worker > 0
        self.protocol = protocol(self.spec.eval.model_dump(), self.spec.data.model_dump())
        self.chunk_runs: dict[str, str] = {}  # job key -> chunk run id
        self.chunk_rows: dict[str, dict[str, Any]] = {}  # job key -> table row
        self.results: dict[str, dict[str, Any]] = {}  # job key -> evaluation result
        self.pending: dict[Any, Job | EpochCheckpoint] = {}  # eval future -> job (or mid-chunk checkpoint)
        self.jobs = {j.key: j for j in plan.jobs}
        self.progress: TrainingProgress | None = None
        self.starts = 0  # worker-group starts seen in the current group (restarts = starts - 1)
        self.worker_nodes: list[str] = []  # Ray node id of each rank in the current worker group
        self.started = time.time()  # driver start (after imports), for time_to_first_step_seconds
        self.first_step_logged = False
        self.restarts_in_chunk = 0
        self.diverged: dict[str, str] = {}  # line id -> why it stopped

    def open_parent(self, resume: bool) -> str:
        previous = self.tracker.plan_runs(self.plan.key) if resume else []
        if previous:
            run_id = previous[0].info.run_id
            self.tracker.update_run(run_id, status="RUNNING")
            # A dead driver leaves its runs RUNNING; they will never finish, so say so.
            self.tracker.fail_running(run_id)
            self.console.print(f"resuming plan run [bold]{run_id}[/]")
            return run_id
        run_id = self.tracker.create_run(self.spec.name, {**plan_tags(self.plan), **self.hooks.parent_tags})
        self.tracker.log_params(run_id, flatten(self.spec))
        self.tracker.log_json(run_id, "stream_plan.json", self.plan.stream.to_dict())
        self.tracker.log_json(run_id, "manifest.json", self.plan.manifest.model_dump(mode="json"))
        self.tracker.log_json(run_id, "eval_protocol.json", self.protocol)
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "spec.yaml"
            path.write_text(yaml.safe_dump(self.spec.to_dict(), sort_keys=False))
            self.tracker.log_file(run_id, path)
            assignment = Path(folder) / "stream_assignment.parquet"
            import pyarrow.parquet as pq

            pq.write_table(self.plan.stream.assignment_table(), assignment)
            self.tracker.log_file(run_id, assignment)
        self.tracker.log_dataset(run_id, self.plan.data_url, f"{self.spec.name}-data", self.plan.data_digest, "train")
        return run_id

    def log_eval(self, job: Job, result: dict[str, Any]) -> None:
        chunk_run = self.chunk_runs[job.key]
        tags = {
            tr.RUN_TYPE: "eval",
            tr.PARENT: self.parent,
            tr.PLAN_KEY: self.plan.key,
            tr.EVALUATES: chunk_run,
            tr.JOB_KEY: job.key,
            tr.LINE: job.line.id,
            tr.CHUNK: str(job.chunk),
            tr.TAG + "eval_protocol": json.dumps(self.protocol, sort_keys=True),
            tr.TAG + "eval_split": self.spec.data.eval_split,
        }
        run_id = self.tracker.create_run(f"{job.name}/eval", tags)
        metrics = {k: v for k, v in result.items() if isinstance(v, (int, float))}
        metrics.update(task_metrics(result, self.spec.eval.every_chunk))
        log_scored_metrics(self.tracker, self.spec, self.plan, run_id, chunk_run, metrics, result)
        self.tracker.log_json(run_id, "eval_result.json", result)
        self.tracker.end_run(run_id, "FINISHED")
        self.link_eval(chunk_run, run_id, headline(result, self.spec.eval.every_chunk))
        self.results[job.key] = result
        self.hooks.scored(job.line.id, job.chunk, headline(result, self.spec.eval.every_chunk),
                          [line.id for line in self.plan.lines if line.id not in self.diverged],
                          final=job.chunk == self.plan.stream.num_chunks - 1)

    def link_eval(self, chunk_run: str, eval_run: str, headline: dict[str, float]) -> None:
        """The chunk run also carries its headline numbers (`{name}_top1`, `{name}_top5`), so the compare view
        lines chunks up directly."""
        self.tracker.log_metrics(chunk_run, headline)
        self.tracker.set_tags(chunk_run, {tr.TAG + "eval_run": eval_run})

    def collect(self, block: bool) -> None:
        import ray

        while self.pending:
            ready, _ = ray.wait(list(self.pending), num_returns=1, timeout=None if block else 0)
            if not ready:
                return
            job = self.pending.pop(ready[0])
            try:
                result = ray.get(ready[0])
            except Exception as exc:
                raise TrainingError(f"evaluation of {job.name} failed: {exc}") from exc
            self.log_result(job, result)

    def log_result(self, item: Job | EpochCheckpoint, result: dict[str, Any]) -> None:
        """Record one finished evaluation: a chunk end's, or a mid-chunk checkpoint's (eval.every_epochs)."""
        if isinstance(item, EpochCheckpoint):
            log_epoch_eval(self.tracker, self.parent, self.plan, item, result)
            return
        self.log_eval(item, result)
        if self.spec.eval.every_epochs:  # the chunk end closes the chunk's accuracy-against-epochs curve
            log_by_epoch(self.tracker, self.parent, self.plan, item, self.spec.optim.epochs_per_chunk, result)

    def on_event(self, event: dict[str, Any]) -> None:
        """What every driver does with the worker group's events: count (re)starts, move the progress bars."""
        if event["type"] == "start":
            self.starts += 1
            self.worker_nodes = list(event.get("nodes") or [])
            if self.starts > 1:  # Ray Train restarted the worker group after a failure
                self.restarts_in_chunk += 1
                self.console.print(f"[yellow]worker group restarted[/] from {event.get('restored_from') or 'scratch'}")
        elif event["type"] == "step" and self.progress is not None:
            self.progress.step(event)

    def _chunk_tags(self, job: Job) -> dict[str, str]:
        """The tags every chunk run carries, finished or failed: where it sits in the plan and what trained it."""
        return {tr.RUN_TYPE: "chunk", tr.PARENT: self.parent, tr.PLAN_KEY: self.plan.key, tr.JOB_KEY: job.key,
                tr.LINE: job.line.id, tr.CHUNK: str(job.chunk), tr.TAG + "method": job.line.method,
                tr.TAG + "strategy": job.line.strategy}

    def fail_open_runs(self) -> None:
        """After a raise: mark the plan run and its open runs FAILED, best effort (a Ctrl-C during a tracking outage
        must not hold the driver for the full retry deadline; the next --resume marks what this misses)."""
        try:
            self.tracker.fail_running(self.parent, include_parent=True)
        except Exception:
            pass

    def start_services(self) -> None:
        """Ray, the corrupt-row tally the readers report to, and the evaluation actor."""
        import ray

        init_ray(self.address, self.spec)
        self.corrupt_counter = start_corrupt_row_counter()
        self.evaluator = ray.remote(num_cpus=1)(EvalActor).remote(
            self.plan.stream, self.plan.manifest, self.spec.data.model_dump(), self.spec.eval.model_dump(),
            self.spec.data.storage_options, self.spec.seed, self.plan.downstream)

    def stop_services(self) -> None:
        """Kill the evaluator and the tally now, also after a raise: a kept traceback (a failed sweep trial, pytest)
        keeps their handles, and the evaluator's CPU would stay held from the next run on the same Ray."""
        import ray

        for actor in (getattr(self, "evaluator", None), getattr(self, "corrupt_counter", None)):
            if actor is not None and ray.is_initialized():
                try:
                    ray.kill(actor)
                except Exception:  # gone already; never masks the run's own error
                    pass
        self.evaluator = self.corrupt_counter = None
