"""The driver of `streamssl run`: plan -> Ray Train per line group -> evaluation per chunk -> MLflow lineage.

    summary = run_experiment(load_spec("examples/quickstart.yaml"))

Only this process talks to MLflow. Chunk runs are logged as soon as a chunk's checkpoint is persisted, and each
is evaluated by a Ray actor while training goes on; at the end every line gets its accuracy matrix, continual
metrics (average accuracy, BWT, FWT, forgetting), plots, and the ST-JT gap per method.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console

from orchestrator.train.accounting import chunk_resources, data_kept, device_kind
from orchestrator.data.materialise import materialise
from orchestrator.display import TrainingProgress, dry_run, print_summary
from orchestrator.epoch_evals import EpochCheckpoint, log_by_epoch, log_epoch_eval
from orchestrator.errors import IncompleteRecordError, TrainingError
from orchestrator.evaluate.evaluation import EvalActor, headline, protocol, task_metrics
from orchestrator.train.hooks import DriverHooks, TrialStopped
from orchestrator.data.ingest import start_corrupt_row_counter
from orchestrator.plan.planner import ExperimentPlan, Job, build_plan
from orchestrator.train.ray_init import init_ray
from orchestrator.recovery import missing_records, persisted_unlogged_chunks, read_logged
from orchestrator.train.checkpoints import CheckpointFs
from orchestrator.train.runner import LineTask, line_groups, loop_config, ray_run_name, train_group
from orchestrator.spec.experiment import Spec, flatten
from orchestrator.summary import ExperimentSummary, summarise
from orchestrator.tracking import lineage as tr
from orchestrator.tracking.models import log_checkpoint_model, log_scored_metrics
from orchestrator.tracking.tracker import Tracker


def _artifact_root(spec: Spec) -> str | None:
    if spec.tracking.uri is None:  # embedded default: artifacts next to the SQLite file
        return (spec.workdir / "artifacts").as_uri()
    return None


class _Driver:
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

    # ---------------------------------------------------------------- parent run
    def open_parent(self, resume: bool) -> str:
        previous = self.tracker.plan_runs(self.plan.key) if resume else []
        if previous:
            run_id = previous[0].info.run_id
            self.tracker.update_run(run_id, status="RUNNING")
            # A dead driver leaves its runs RUNNING; they will never finish, so say so.
            self.tracker.fail_running(run_id)
            self.console.print(f"resuming plan run [bold]{run_id}[/]")
            return run_id
        run_id = self.tracker.create_run(self.spec.name, {**tr.plan_tags(self.plan), **self.hooks.parent_tags})
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

    # ---------------------------------------------------------------- chunk + eval runs
    def log_chunk(self, event: dict[str, Any], recovered: bool = False) -> None:
        job = self.jobs[event["job_key"]]
        if job.key in self.chunk_runs:  # already logged (a replayed event after a restart)
            return
        report = event["report"]
        started_ms, ended_ms = int(event["started"] * 1000), int(event["ended"] * 1000)
        tags = {
            **self._chunk_tags(job),
            tr.CHECKPOINT: event["checkpoint_uri"],
            tr.TAG + "training_chunks": json.dumps(list(job.training_chunks)),
            tr.TAG + "data_digest": self.plan.data_digest,
            tr.TAG + "stream_digest": self.plan.stream.digest,
            tr.TAG + "worker_nodes": json.dumps(self.worker_nodes),
            tr.TAG + "device_kind": device_kind(self.spec.resources),
        }
        run_id = self.tracker.create_run(job.name, tags, start_ms=started_ms)
        params = flatten(self.spec)
        params.update({"line.method": job.line.method, "line.strategy": job.line.strategy, "chunk": str(job.chunk)})
        self.tracker.log_params(run_id, params)
        self.tracker.log_metric_series(run_id, "train_loss", report["losses"], started_ms, ended_ms)
        world = event.get("world_size", 1)
        samples_per_s = report["samples"] * world / max(report["seconds"], 1e-9)  # rank 0 saw 1/world of them
        self.tracker.log_metrics(run_id, {
            "final_loss": report["final_loss"], "steps": report["steps"], "samples": report["samples"] * world,
            "train_seconds": report["seconds"], "samples_per_s": samples_per_s, "world_size": world,
            "num_nodes": len(set(self.worker_nodes)) or 1, "overlap_fallbacks": report.get("overlap_fallbacks", 0),
            "restarts": self.restarts_in_chunk, "resumed_from_step": report.get("first_step", 0),
            # Undecodable rows skipped by the training reader so far (cumulative over the plan's readers).
            "corrupt_rows_skipped_total": self._corrupt_rows(),
            # Where a chunk's wall time goes besides compute (rank 0's view).
            "first_batch_seconds": report.get("first_batch_s", 0.0), "data_wait_seconds": report.get("data_wait_s", 0.0),
            "checkpoint_in_chunk_seconds": report.get("checkpoint_s", 0.0),
            "checkpoint_save_seconds": event.get("checkpoint_save_s", 0.0),
            "checkpoint_report_seconds": event.get("checkpoint_report_s", 0.0),
            "training_rows": sum(self.plan.stream.chunks[c].rows for c in job.training_chunks),
            **chunk_resources(event, self.spec.resources, data_kept(self.plan, job)),
        })
        self.tracker.log_dataset(run_id, self.plan.data_url, f"{self.plan.stream.kind}-chunks-{'-'.join(map(str, job.training_chunks))}",
                                 f"{self.plan.stream.digest}:{job.training_chunks}", "train")
        log_checkpoint_model(self.tracker, self.plan, run_id, job.name, job.chunk, job, event["checkpoint_uri"],
                             {tr.CHUNK: str(job.chunk)}, {"chunk": str(job.chunk)})
        self.tracker.end_run(run_id, "FINISHED", end_ms=ended_ms)
        if not recovered and not self.first_step_logged and report.get("first_step", 0) == 0:
            # The first chunk this driver trained: when did its first step start, counted from the driver's start?
            self.first_step_logged = True
            self.tracker.log_metrics(self.parent, {
                "time_to_first_step_seconds": event["started"] + report.get("first_batch_s", 0.0) - self.started})
        self.chunk_runs[job.key] = run_id
        self.restarts_in_chunk = 0
        self.chunk_rows[job.key] = {"line": job.line.id, "chunk": job.chunk, "loss": report["final_loss"],
                                    "train_s": report["seconds"], "samples/s": samples_per_s}
        self.evaluate(job, event["checkpoint_uri"])

    def evaluate(self, job: Job, checkpoint_uri: str) -> None:
        """Evaluate a logged chunk's checkpoint in the evaluation actor (collected by `collect`)."""
        if self.spec.eval.every_chunk:
            future = self.evaluator.evaluate.remote(loop_config(self.spec, job.line, False), checkpoint_uri,
                                                    CheckpointFs(self.spec.storage.storage_options),
                                                    self._previous_checkpoint(job))
            self.pending[future] = job

    def _previous_checkpoint(self, job: Job) -> str | None:
        """The checkpoint of the line's previous chunk, where the interpolation study starts (when it is on)."""
        if self.spec.eval.interpolation is None or job.chunk == 0:
            return None
        previous = self.plan.jobs_of(job.line)[job.chunk - 1]
        run_id = self.chunk_runs.get(previous.key)
        return None if run_id is None else self.tracker.get_run(run_id).data.tags.get(tr.CHECKPOINT)

    def _corrupt_rows(self) -> int:
        import ray

        return int(ray.get(self.corrupt_counter.totals.remote())["rows"])

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

    # ---------------------------------------------------------------- events from training
    def on_event(self, event: dict[str, Any]) -> None:
        if event["type"] == "start":
            self.starts += 1
            self.worker_nodes = list(event.get("nodes") or [])
            if self.starts > 1:  # Ray Train restarted the worker group after a failure
                self.restarts_in_chunk += 1
                self.console.print(f"[yellow]worker group restarted[/] from {event.get('restored_from') or 'scratch'}")
        if event["type"] == "step" and self.progress is not None:
            self.progress.step(event)
        elif event["type"] == "chunk":
            if self.progress is not None:
                self.progress.chunk_done(event)
            self.log_chunk(event)
            self.collect(block=False)
        elif event["type"] == "epoch_checkpoint":
            point = EpochCheckpoint(self.jobs[event["job_key"]], event["epoch"], event["step"], event["checkpoint_uri"])
            future = self.evaluator.evaluate.remote(loop_config(self.spec, point.job.line, False), point.checkpoint_uri,
                                                    CheckpointFs(self.spec.storage.storage_options))
            self.pending[future] = point
            self.collect(block=False)
        elif event["type"] == "diverged":
            self.console.print(f"[red]{event['line']} diverged in chunk {event['chunk']}[/]: {event['message']}; "
                               "the plan's other lines go on")
            self.log_diverged(event)

    def log_diverged(self, event: dict[str, Any]) -> None:
        """The chunk a line diverged in, as a FAILED chunk run holding the error: the line's later chunks are
        not trained (a retry from the same checkpoint diverges again), the other lines are."""
        job = self.jobs[event["job_key"]]
        message = f"stopped at chunk {job.chunk} (not retried): {event['message']}"
        self.diverged[job.line.id] = message
        run_id = self.tracker.create_run(job.name, {**self._chunk_tags(job), tr.TAG + "error": message[:5000]})
        self.tracker.end_run(run_id, "FAILED")

    def _chunk_tags(self, job: Job) -> dict[str, str]:
        """The tags every chunk run carries, finished or failed: where it sits in the plan and what trained it."""
        return {tr.RUN_TYPE: "chunk", tr.PARENT: self.parent, tr.PLAN_KEY: self.plan.key, tr.JOB_KEY: job.key,
                tr.LINE: job.line.id, tr.CHUNK: str(job.chunk), tr.TAG + "method": job.line.method,
                tr.TAG + "strategy": job.line.strategy}

    # ---------------------------------------------------------------- the whole run
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

    def run(self, resume: bool) -> ExperimentSummary:
        import ray

        self.parent = self.open_parent(resume)
        summary = ExperimentSummary(self.parent, self.plan.key)
        unevaluated = self.restore_logged() if resume else []
        try:
            self.start_services()
            if resume:
                summary.recovered_jobs = self.recover_persisted_chunks()
                for job in unevaluated:  # finished chunks whose evaluation died with the previous driver
                    self.evaluate(job, self.tracker.get_run(self.chunk_runs[job.key]).data.tags[tr.CHECKPOINT])
            summary.skipped_jobs = len(self.chunk_runs)
            baseline = None
            if self.spec.eval.baseline and self.spec.eval.every_chunk:
                # Evaluated while the worker group starts, not before it: the driver only needs it at the end.
                baseline = self.evaluator.evaluate.remote(loop_config(self.spec, self.plan.lines[0], False), None)
            summary.restarts = self._train_all()
            if baseline is not None:
                summary.baseline = ray.get(baseline)
                # The whole result stays in summary.baseline: FWT reads its per-task top-1 and top-5.
                self.tracker.log_metrics(self.parent, {f"baseline_{k}": v for k, v in
                                                       headline(summary.baseline, self.spec.eval.every_chunk).items()})
            self.collect(block=True)
            summarise(summary, self.plan, self.tracker, self.chunk_rows, self.results)
            summary.diverged = dict(self.diverged)
            summary.missing = self.missing_records()
        except TrialStopped:  # the sweep records the trial's runs as stopped early
            raise
        except BaseException:
            # Short retry: a Ctrl-C during a tracking outage must not hold the driver for the full deadline.
            try:
                self.tracker.fail_running(self.parent, include_parent=True)
            except Exception:
                pass  # the next --resume marks them
            raise
        if summary.diverged:  # one JSON tag, so the plan run's tag keys stay the same whatever the lines are called
            self.tracker.set_tags(self.parent, {tr.TAG + "diverged": json.dumps(summary.diverged)[:5000]})
        if summary.missing:  # `--resume` is what completes the record
            self.tracker.set_tags(self.parent, {tr.TAG + "incomplete": "; ".join(summary.missing)[:5000]})
        if summary.missing or summary.diverged:
            self.tracker.end_run(self.parent, "FAILED")
        else:
            self.tracker.end_run(self.parent, "FINISHED")
        return summary

    # ---------------------------------------------------------------- resume
    def restore_logged(self) -> list[Job]:
        """Take up what earlier attempts of this plan logged; returns the finished chunks that lack an evaluation.

        Runs an earlier driver began but did not end (marked FAILED by `open_parent`) are superseded by the ones
        this run logs, so they are deleted (MLflow keeps deleted runs restorable).
        """
        record = read_logged(self.tracker, self.plan, list(self.spec.eval.every_chunk))
        self.chunk_runs.update(record.chunk_runs)
        self.chunk_rows.update(record.chunk_rows)
        self.results.update(record.results)
        for chunk_run, (eval_run, headline) in record.unlinked.items():
            self.link_eval(chunk_run, eval_run, headline)
        if record.partial:
            self.tracker.delete_runs(record.partial)
            self.console.print(f"removed {len(record.partial)} run(s) an interrupted driver left unfinished")
        return record.unevaluated

    def recover_persisted_chunks(self) -> int:
        """Log (and evaluate) every chunk whose end checkpoint is on storage but has no chunk run in MLflow."""
        events = persisted_unlogged_chunks(self.plan, self.spec, self.parent, self.chunk_runs)
        for event in events:
            self.console.print(f"recovered {self.jobs[event['job_key']].name}: persisted, but not logged before "
                               "the previous driver stopped")
            self.log_chunk(event, recovered=True)
        return len(events)

    def missing_records(self) -> list[str]:
        """What the plan's record lacks, one line per line of the plan (empty when every run is there)."""
        return missing_records(self.plan, self.chunk_runs, self.results, list(self.spec.eval.every_chunk),
                               skip_lines=self.diverged)

    def _train_all(self) -> int:
        restarts = 0
        with TrainingProgress(self.console) as progress:
            self.progress = progress
            for group_index, lines in enumerate(line_groups(self.plan)):
                tasks = []
                for line in lines:
                    todo = [j for j in self.plan.jobs_of(line) if j.key not in self.chunk_runs]
                    done = [j for j in self.plan.jobs_of(line) if j.key in self.chunk_runs]
                    resume_uri = None
                    if done:
                        last = max(done, key=lambda j: j.chunk)
                        resume_uri = self.tracker.get_run(self.chunk_runs[last.key]).data.tags[tr.CHECKPOINT]
                    tasks.append(LineTask(line, loop_config(self.spec, line, self.use_gpu, self.plan), todo, resume_uri))
                    offsets, total = {}, 0
                    for job in self.plan.jobs_of(line):
                        offsets[job.chunk] = total
                        rows = sum(self.plan.stream.chunks[c].rows for c in job.training_chunks)
                        total += self.spec.optim.epochs_per_chunk * (rows // self.spec.optim.batch_size)
                    progress.add_line(line.id, offsets, total, offsets[todo[0].chunk] if todo else total)
                if not any(t.jobs for t in tasks):
                    continue
                self.starts = 0
                result = train_group(self.plan, tasks, ray_run_name(self.plan, self.parent, group_index), self.on_event,
                                     corrupt_counter=self.corrupt_counter)
                restarts += result.restarts
                self.tracker.log_metrics(self.parent, {"worker_group_start_seconds": result.start_s,
                                                       "worker_group_stop_seconds": result.stop_s}, step=group_index)
        self.progress = None
        return restarts


def run_experiment(
    spec: Spec,
    resume: bool = False,
    dry: bool = False,
    address: str | None = None,
    console: Console | None = None,
    hooks: DriverHooks | None = None,
) -> ExperimentSummary:
    """`hooks` (a sweep trial's): tags of the plan run, a prefix of every run name, the per-chunk scores."""
    console = console or Console()
    started = time.time()
    if not dry:  # the run's data step; planning below only reads, and a dry run writes nothing
        materialise(spec)
    plan = build_plan(spec)
    tracker = Tracker(spec.tracking_uri, spec.experiment_name, _artifact_root(spec))
    tracker.name_prefix = hooks.run_prefix if hooks else ""
    if dry:
        dry_run(plan, console, tracker)
        return ExperimentSummary(None, plan.key)
    if spec.stream.kind == "online":  # one long job per line group, segments instead of chunks
        from orchestrator.online_driver import OnlineDriver

        driver: _Driver = OnlineDriver(plan, tracker, console, address, hooks)
    else:
        driver = _Driver(plan, tracker, console, address, hooks)
    try:
        summary = driver.run(resume)
    finally:
        driver.stop_services()
    print_summary(summary, console, spec)
    if summary.diverged:
        finished = len(plan.lines) - len(summary.diverged)
        raise TrainingError("; ".join(f"training of {line} {message}" for line, message in summary.diverged.items())
                            + f" — the other {finished} line(s) of plan run {summary.parent_run_id} ran to the end")
    if summary.missing:
        raise IncompleteRecordError(
            f"plan run {summary.parent_run_id} is incomplete ({len(summary.missing)} line(s) lack runs, listed "
            "above); `streamssl run SPEC --resume` trains, logs and evaluates what is missing")
    console.print(f"done in {time.time() - started:.0f} s — parent run {summary.parent_run_id}; "
                  f"`streamssl ui` shows it; `streamssl lineage {summary.parent_run_id}` walks it")
    return summary

