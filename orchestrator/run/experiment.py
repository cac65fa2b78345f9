"""The driver of a chunked plan (`streamssl run` on any stream kind but online): Ray Train per line group ->
evaluation per chunk -> MLflow lineage.

    summary = run_experiment(load_spec("examples/quickstart.yaml"))     # orchestrator.run.launch picks the driver

Chunk runs are logged as soon as a chunk's checkpoint is persisted, and each is evaluated by a Ray actor while
training goes on; at the end every line gets its accuracy matrix, continual metrics (average accuracy, BWT, FWT,
forgetting), plots, and the ST-JT gap per method.
"""

from __future__ import annotations

import json
from typing import Any

from orchestrator.evaluate.evaluation import headline
from orchestrator.plan.planner import Job
from orchestrator.run.base import Driver
from orchestrator.run.display import TrainingProgress
from orchestrator.run.epoch_evals import EpochCheckpoint
from orchestrator.run.models import log_checkpoint_model
from orchestrator.run.recovery import missing_records, persisted_unlogged_chunks, read_logged
from orchestrator.run.summary import ExperimentSummary, summarise
from orchestrator.run.transfer import after_chunk_transfers
from orchestrator.spec.experiment import flatten
from orchestrator.tracking import tags as tr
from orchestrator.train.accounting import chunk_resources, data_kept, device_kind
from orchestrator.train.checkpoints import CheckpointFs
from orchestrator.train.hooks import TrialStopped
from orchestrator.train.runner import LineTask, line_groups, loop_config, ray_run_name, train_group


class ChunkedDriver(Driver):
    """One Ray Train run per line group; a chunk run, its LoggedModel and an evaluation run per (line, chunk)."""

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

    def on_event(self, event: dict[str, Any]) -> None:
        if event["type"] == "chunk":
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
        else:
            super().on_event(event)

    def log_diverged(self, event: dict[str, Any]) -> None:
        """The chunk a line diverged in, as a FAILED chunk run holding the error: the line's later chunks are
        not trained (a retry from the same checkpoint diverges again), the other lines are."""
        job = self.jobs[event["job_key"]]
        message = f"stopped at chunk {job.chunk} (not retried): {event['message']}"
        self.diverged[job.line.id] = message
        run_id = self.tracker.create_run(job.name, {**self._chunk_tags(job), tr.TAG + "error": message[:5000]})
        self.tracker.end_run(run_id, "FAILED")

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
            after_chunk_transfers(self.tracker, self.spec, self.plan, self.chunk_runs, self.console)
            summarise(summary, self.plan, self.tracker, self.chunk_rows, self.results)
            summary.diverged = dict(self.diverged)
            summary.missing = self.missing_records()
        except TrialStopped:  # the sweep records the trial's runs as stopped early
            raise
        except BaseException:
            self.fail_open_runs()
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
