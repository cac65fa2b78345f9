"""The driver of an online plan (`stream.kind: online`): one long training run per line whose losses, LR and
deadline counts stream into MLflow batch by batch, and a segment run per X-batch window with its checkpoint and
evaluation.

    summary = OnlineDriver(plan, tracker, console, address).run(resume=False)

Lineage: plan run -> the line's online run (run type `chunk`, the line's only job: the whole stream; metrics at
step = stream batches seen) -> segment runs (`segment`: its batches, checkpoint, kNN/linear of that checkpoint)
-> the last segment's evaluation is also the line's eval run. The online run carries every segment's accuracy
as `{name}_top1_by_batch` against stream batches, so MLflow draws accuracy over stream time; the plan run gets
the curves and the RALS selection-ratio curve as PNGs.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from evaluators.report import plot_metric_curves
from orchestrator import storage
from orchestrator.evaluate.evaluation import headline
from orchestrator.plan.planner import Job
from orchestrator.run.base import Driver
from orchestrator.run.display import TrainingProgress
from orchestrator.run.models import log_checkpoint_model, log_scored_metrics
from orchestrator.run.summary import ExperimentSummary
from orchestrator.spec.params import flatten
from orchestrator.tracking import tags as tr
from orchestrator.train.checkpoints import CheckpointFs
from orchestrator.train.hooks import TrialStopped
from orchestrator.train.online_runner import total_batches, train_online
from orchestrator.train.runner import LineTask, loop_config, ray_run_name

SEGMENT = "segment"
# Per-batch values logged on the online run (step = stream batches seen).
BATCH_METRICS = ("loss", "lr", "steps", "dropped_steps", "seconds", "step_seconds", "rals_seconds", "memory_rows")
COUNTERS = ("late_batches", "online_steps", "rals_new_fraction_last", "rals_new_fraction_mean100")
SOURCE_COUNTS = ("arrived_shards", "skipped_shards", "tail_rows")  # a polled source's, on segment and online runs
FINAL = tr.TAG + "final_segment"  # on the segment the stream ended with: its evaluation is the line's


@dataclass(frozen=True)
class Segment:
    """A segment's checkpoint waiting for its evaluation."""

    job: Job
    index: int
    batches: int  # stream batches learned when it ended
    run_id: str
    final: bool

    @property
    def name(self) -> str:  # (what the driver's evaluation errors name)
        return segment_name(self.job, self.index)



def segment_name(job: Job, index: int) -> str:
    return f"{job.line.id}/segment-{index:03d}"


class OnlineDriver(Driver):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.online_runs: dict[str, str] = {}  # job key -> the line's online run
        self.segment_runs: dict[tuple[str, int], str] = {}  # (job key, segment) -> run id
        self.ended: set[str] = set()  # job keys whose stream has ended
        self._batches_logged: dict[str, int] = {}  # job key -> stream batches learned so far
        self.curves: dict[str, dict[str, list[tuple[int, float]]]] = {}  # line -> series -> (batches, value)
        self.total = total_batches(self.plan)  # None: a polled source, until it ends
        self.segment_results: dict[str, dict[str, Any]] = {}  # segment run -> its evaluation
        self.final_segments: dict[str, int] = {}  # job key -> the segment the stream ended with
        self.sources: dict[str, dict[str, Any]] = {}  # job key -> the polled source's latest record
        self.step_profiles: dict[str, list[float]] = {}  # line -> RALS's new-batch share per local step index

    # ---------------------------------------------------------------- events
    def on_event(self, event: dict[str, Any]) -> None:
        kind = event["type"]
        if kind == "online_start":
            self._open_online_run(event)
        elif kind == "online_batch":
            self._log_batch(event)
        elif kind == "segment":
            self._log_segment(event)
            self.collect(block=False)
        elif kind == "source":
            self._log_source(event)
        elif kind == "online_warning":
            self.console.print(f"[yellow]{event['line']}[/]: {event['message']}")
            self.tracker.set_tags(self.online_runs[event["job_key"]], {tr.TAG + "warning": event["message"][:5000]})
        elif kind == "online_end":
            if event["job_key"] in self.ended:  # said again after a restart
                return
            self.ended.add(event["job_key"])
            run_id = self.online_runs[event["job_key"]]
            self.tracker.log_metrics(run_id, {k: event[k] for k in (*COUNTERS, *SOURCE_COUNTS, "dropped_steps",
                                                                    "stream_batches")
                                              if k in event and event[k] == event[k]}, step=event["stream_batches"])
            self.tracker.set_tags(run_id, {tr.TAG + "stream_ended_by": event.get("ended_by", "stream")})
            self._log_selection_profile(run_id, event)
            self._write_source(event["job_key"])
            self.tracker.end_run(run_id, "FINISHED")
            self.chunk_runs[event["job_key"]] = run_id
        elif kind == "diverged":  # the line's online run holds the error; the other lines go on
            message = f"stopped at stream batch {self._batches_logged.get(event['job_key'], 0)} (not retried): " \
                      f"{event['message']}"
            self.console.print(f"[red]{event['line']} diverged[/]: {event['message']}; the plan's other lines go on")
            self.diverged[event["line"]] = message
            run_id = self.online_runs[event["job_key"]]
            self.tracker.set_tags(run_id, {tr.TAG + "error": message[:5000]})
            self.tracker.end_run(run_id, "FAILED")
        else:
            super().on_event(event)

    def _log_selection_profile(self, run_id: str, event: dict[str, Any]) -> None:
        """RALS's mean new-batch share per step index within a stream batch (the paper's Fig. 3b), as a metric
        history over that index (`rals_new_fraction_by_local_step`) and, in `_summarise`, one plot for all lines."""
        profile = [v for v in event.get("rals_new_fraction_by_step") or [] if v == v]
        if not profile:
            return
        now = int(event["time"] * 1000)
        self.tracker.log_metric_series(run_id, "rals_new_fraction_by_local_step", profile, now, now)
        self.step_profiles[event["line"]] = profile

    def _open_online_run(self, event: dict[str, Any]) -> None:
        job = self.jobs[event["job_key"]]
        if job.key in self.online_runs:  # the worker group restarted: the same run goes on
            self.tracker.log_metrics(self.online_runs[job.key], {"resumed_at_batch": event["batch"]},
                                     step=event["batch"])
            return
        tags = {**self._chunk_tags(job), tr.TAG + "online": "true", tr.TAG + "data_digest": self.plan.data_digest,
                tr.TAG + "stream_digest": self.plan.stream.digest}
        run_id = self.tracker.create_run(f"{job.line.id}/online", tags, start_ms=int(event["time"] * 1000))
        params = flatten(self.spec)
        params.update({"line.method": job.line.method, "line.strategy": job.line.strategy})
        self.tracker.log_params(run_id, params)
        self.tracker.log_metrics(run_id, {"world_size": event["world_size"],
                                          **({} if self.total is None else {"planned_stream_batches": self.total})})
        if self.spec.online.source is not None:
            self.tracker.set_tags(run_id, {tr.TAG + "source": storage.redact(self.spec.online.source.poll)})
        self.online_runs[job.key] = run_id
        if self.progress is not None:
            self.progress.add_line(job.line.id, {0: 0}, self.total, event["batch"])

    def _log_batch(self, event: dict[str, Any]) -> None:
        run_id = self.online_runs[event["job_key"]]
        step = event["stream_batch"] + 1
        if step <= self._batches_logged.get(event["job_key"], 0):
            return  # said again after a restart (or learned again from an older checkpoint): logged once
        self._batches_logged[event["job_key"]] = step
        metrics = {k: event[k] for k in BATCH_METRICS}
        metrics["late"] = float(event["late"])
        metrics.update({k: event[k] for k in COUNTERS if event[k] == event[k]})  # NaN: no RALS yet
        if event["new_fraction"] == event["new_fraction"]:
            metrics["rals_new_fraction"] = event["new_fraction"]
            self.curves.setdefault(event["line"], {}).setdefault("rals_new_fraction", []).append(
                (step, event["new_fraction"]))
        self.tracker.log_metrics(run_id, metrics, step=step, timestamp_ms=int(event["time"] * 1000))
        if self.progress is not None:
            self.progress.step({"line": event["line"], "chunk": 0, "step": step, "loss": event["loss"],
                                "samples_per_s": self.spec.online.batch_size * event["steps"]
                                / max(event["seconds"], 1e-9)})

    def _log_segment(self, event: dict[str, Any]) -> None:
        job = self.jobs[event["job_key"]]
        key = (job.key, event["segment"])
        final = bool(event.get("final"))
        if key in self.segment_runs:  # said again: the stream ended just after it, so it is the final one now
            if final:
                self._make_final(job, event["segment"])
            return
        tags = {tr.RUN_TYPE: SEGMENT, tr.PARENT: self.parent, tr.PLAN_KEY: self.plan.key, tr.JOB_KEY: job.key,
                tr.LINE: job.line.id, tr.CHUNK: "0", tr.CHECKPOINT: event["checkpoint_uri"],
                tr.TAG + "segment": str(event["segment"]), tr.TAG + "online_run": self.online_runs[job.key],
                tr.TAG + "stream_batches": f"{event['first_batch']}-{event['batches']}",
                **({FINAL: "true"} if final else {})}
        run_id = self.tracker.create_run(segment_name(job, event["segment"]), tags,
                                         start_ms=int(event["started"] * 1000))
        metrics = {"stream_batches": event["batches"], "segment_batches": event["batches"] - event["first_batch"],
                   "wall_seconds": event["ended"] - event["started"], "late_batches": event["late_batches"],
                   "dropped_steps": event["dropped_steps"], **{k: event[k] for k in SOURCE_COUNTS if k in event}}
        if "checkpoint_bytes" in event:  # (a segment said again from its checkpoint's event log has no sizes)
            metrics.update({k: event[k] for k in ("checkpoint_bytes", "buffer_bytes", "memory_file_bytes",
                                                  "state_bytes") if k in event})
            # The memory is data kept, and inside the checkpoint: not added on top of it (orchestrator.train.accounting).
            # It is stored encoded (memory_file_bytes) beside the model's state.pt; older runners kept it decoded
            # inside state.pt (buffer_bytes).
            kept = event.get("memory_file_bytes", event["buffer_bytes"])
            metrics.update({"data_kept_bytes": kept,
                            "model_state_bytes": event.get("state_bytes", event["checkpoint_bytes"] - kept),
                            "stored_bytes": event["checkpoint_bytes"]})
            if "memory_rows" in event:
                metrics["data_kept_rows"] = event["memory_rows"]
        self.tracker.log_metrics(run_id, metrics)
        # The segment's checkpoint as a LoggedModel, made at the stream batch it ends at (a chunk's at its chunk).
        log_checkpoint_model(self.tracker, self.plan, run_id, segment_name(job, event["segment"]), event["batches"],
                             job, event["checkpoint_uri"], {tr.TAG + "segment": str(event["segment"])},
                             {"stream_batches": str(event["batches"])})
        self.segment_runs[key] = run_id
        if final:
            self.final_segments[job.key] = event["segment"]
        self._evaluate_segment(Segment(job, event["segment"], event["batches"], run_id, final), event["checkpoint_uri"])

    def _make_final(self, job: Job, index: int) -> None:
        """The stream ended with segment `index`, logged before that was known: it becomes the line's evaluation."""
        if self.final_segments.get(job.key) == index:
            return
        self.final_segments[job.key] = index
        run_id = self.segment_runs[(job.key, index)]
        self.tracker.set_tags(run_id, {FINAL: "true"})
        for future, item in self.pending.items():
            if isinstance(item, Segment) and item.run_id == run_id:  # still being evaluated: final when it lands
                self.pending[future] = replace(item, final=True)
                return
        result = self.segment_results.get(run_id)
        if result is None and self.spec.eval.every_chunk:  # evaluated by an earlier driver: its logged numbers
            result = dict(self.tracker.get_run(run_id).data.metrics)
        if result is not None:
            self.chunk_runs.setdefault(job.key, self.online_runs[job.key])
            self.log_eval(job, result)

    def _log_source(self, event: dict[str, Any]) -> None:
        """A polled source's arrivals and skips: counts over stream batches, the skipped names as a tag."""
        before = self.sources.get(event["job_key"], {"arrived": [], "skipped": []})
        self.sources[event["job_key"]] = event
        run_id = self.online_runs[event["job_key"]]
        known = {name for name, _ in before["skipped"]}
        for name, reason in event["skipped"]:
            if name not in known:
                self.console.print(f"[yellow]{event['line']}: skipped shard {name}[/]: {reason}", highlight=False)
        self.tracker.log_metrics(run_id, {"arrived_shards": len(event["arrived"]),
                                          "skipped_shards": len(event["skipped"])}, step=event["batch"])
        if event["skipped"]:
            names = json.dumps([name for name, _ in event["skipped"]])
            self.tracker.set_tags(run_id, {tr.TAG + "skipped_shards": names[:5000]})

    def _write_source(self, job_key: str) -> None:
        """The source's record as an artifact of the online run: every shard in the order learned, every skip."""
        event = self.sources.get(job_key)
        if event is not None:
            self.tracker.log_json(self.online_runs[job_key], "source_shards.json", {
                "source": storage.redact(self.spec.online.source.poll),
                "arrived": [{"name": n, "rows": r} for n, r in zip(event["arrived"], event["rows"])],
                "skipped": [{"name": n, "reason": r} for n, r in event["skipped"]]})

    def _evaluate_segment(self, segment: Segment, checkpoint_uri: str) -> None:
        if self.spec.eval.every_chunk:
            future = self.evaluator.evaluate.remote(loop_config(self.spec, segment.job.line, False), checkpoint_uri,
                                                    CheckpointFs(self.spec.storage.storage_options))
            self.pending[future] = segment
        else:
            self.tracker.end_run(segment.run_id, "FINISHED")

    def log_result(self, item: Job | Segment, result: dict[str, Any]) -> None:
        if not isinstance(item, Segment):
            return super().log_result(item, result)
        metrics = {k: v for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        log_scored_metrics(self.tracker, self.spec, self.plan, item.run_id, item.run_id, metrics, result)
        self.segment_results[item.run_id] = result
        self.tracker.log_json(item.run_id, "eval_result.json", json.loads(json.dumps(result, default=str)))
        self.tracker.end_run(item.run_id, "FINISHED")
        online_run = self.online_runs[item.job.key]
        by_batch = {f"{name}_top1_by_batch": result[f"{name}_top1"] for name in self.spec.eval.every_chunk
                    if f"{name}_top1" in result}
        self.tracker.log_metrics(online_run, by_batch, step=item.batches)
        for key, value in by_batch.items():
            self.curves.setdefault(item.job.line.id, {}).setdefault(key, []).append((item.batches, value))
        self.hooks.scored(item.job.line.id, item.index, headline(result, self.spec.eval.every_chunk),
                          [line.id for line in self.plan.lines if line.id not in self.diverged], final=item.final)
        if item.final:  # the stream's end: the line's own evaluation, as a chunk end's
            self.chunk_runs.setdefault(item.job.key, online_run)
            self.log_eval(item.job, result)

    # ---------------------------------------------------------------- the whole run
    def run(self, resume: bool) -> ExperimentSummary:
        self.parent = self.open_parent(resume)
        summary = ExperimentSummary(self.parent, self.plan.key)
        try:
            unevaluated = self.restore_online() if resume else []
            self.start_services()
            for segment, checkpoint_uri in unevaluated:
                self._evaluate_segment(segment, checkpoint_uri)
            with TrainingProgress(self.console) as progress:
                self.progress = progress
                tasks = [LineTask(line, loop_config(self.spec, line, self.use_gpu, self.plan), self.plan.jobs_of(line))
                         for line in self.plan.lines]
                result = train_online(self.plan, tasks, ray_run_name(self.plan, self.parent, 0), self.on_event,
                                      corrupt_counter=self.corrupt_counter)
            self.progress = None
            summary.restarts = result.restarts
            self.tracker.log_metrics(self.parent, {"worker_group_starts": result.restarts + 1,
                                                   "worker_group_start_seconds": result.start_s})
            self.collect(block=True)
            self._summarise(summary)
        except TrialStopped:  # the sweep records the trial's runs as stopped early
            raise
        except BaseException:
            self.fail_open_runs()
            raise
        summary.diverged = dict(self.diverged)
        if summary.diverged:  # as a chunked plan: one JSON tag naming each line that stopped, and the run FAILED
            self.tracker.set_tags(self.parent, {tr.TAG + "diverged": json.dumps(summary.diverged)[:5000]})
        self.tracker.end_run(self.parent, "FAILED" if summary.diverged else "FINISHED")
        return summary

    def restore_online(self) -> list[tuple[Segment, str]]:
        """Take up what an earlier driver of this plan logged: its online runs go on (reopened), its segments are
        not logged again, and a finished line is not trained again. The Ray Train run of the same name restores
        the newest checkpoint, so the stream continues at the next batch with the memory as checkpointed. Returns
        the segments logged without their evaluation, with their checkpoints."""
        for run in self.tracker.children(self.parent, "chunk"):
            key = run.data.tags.get(tr.JOB_KEY)
            if key not in self.jobs:
                continue
            self.online_runs[key] = run.info.run_id
            logged = self.tracker.client.get_metric_history(run.info.run_id, "loss")
            self._batches_logged[key] = max((int(m.step) for m in logged), default=0)
            if run.info.status == "FINISHED":
                self.ended.add(key)
                self.chunk_runs[key] = run.info.run_id
            else:  # open_parent marked it FAILED: the same run continues
                self.tracker.update_run(run.info.run_id, status="RUNNING")
        unevaluated = []
        for run in self.tracker.children(self.parent, SEGMENT):
            key = run.data.tags.get(tr.JOB_KEY)
            if key not in self.jobs:
                continue
            segment = int(run.data.tags.get(tr.TAG + "segment", -1))
            self.segment_runs[(key, segment)] = run.info.run_id
            if run.data.tags.get(FINAL) == "true":
                self.final_segments[key] = segment
            if run.info.status == "FINISHED":
                self._keep_curve_points(run)
            else:  # logged, but its evaluation died with the driver: evaluated again once the actor is up
                self.tracker.update_run(run.info.run_id, status="RUNNING")
                batches = int(run.data.metrics.get("stream_batches", 0))
                final = run.data.tags.get(FINAL) == "true"
                unevaluated.append((Segment(self.jobs[key], segment, batches, run.info.run_id, final),
                                    run.data.tags[tr.CHECKPOINT]))
        for run in self.tracker.children(self.parent, "eval"):
            key = run.data.tags.get(tr.JOB_KEY)
            if key in self.jobs and run.info.status == "FINISHED":
                self.results[key] = {k: v for k, v in run.data.metrics.items()}
        return unevaluated

    def _keep_curve_points(self, segment_run) -> None:
        line, batches = segment_run.data.tags[tr.LINE], int(segment_run.data.metrics.get("stream_batches", 0))
        for name in self.spec.eval.every_chunk:
            if f"{name}_top1" in segment_run.data.metrics:
                self.curves.setdefault(line, {}).setdefault(f"{name}_top1_by_batch", []).append(
                    (batches, segment_run.data.metrics[f"{name}_top1"]))

    def _summarise(self, summary: ExperimentSummary) -> None:
        """Final accuracies per line on the plan run, and the curves over stream time as PNGs."""
        for job in self.plan.jobs:
            result = self.results.get(job.key, {})
            row = {"line": job.line.id, "chunk": 0, **{k: result.get(k) for k in ("knn_top1", "linear_top1")}}
            summary.rows.append(row)
            final = {f"{job.line.id}.{k}": v for k, v in row.items() if k.endswith("_top1") and v is not None}
            self.tracker.log_metrics(self.parent, final)
        with tempfile.TemporaryDirectory() as folder:
            for series in sorted({s for curves in self.curves.values() for s in curves}):
                # One point per logged batch; gaps where a line lacks one.
                steps = sorted({b for curves in self.curves.values() for b, _ in curves.get(series, [])})
                if not steps:
                    continue
                lines = {line: [dict(curves.get(series, [])).get(b) for b in steps]
                         for line, curves in self.curves.items()}
                png = plot_metric_curves(lines, Path(folder) / f"{series}.png", title=f"{series} over the stream",
                                         ylabel=series, xlabel="stream batches seen", x=steps)
                self.tracker.log_file(self.parent, png, "plots")
            if self.step_profiles:
                steps = max(len(p) for p in self.step_profiles.values())
                png = plot_metric_curves(self.step_profiles, Path(folder) / "rals_new_fraction_by_local_step.png",
                                         title="RALS: share of trained rows from the new batch, per step",
                                         ylabel="new-batch fraction (mean over batches)",
                                         xlabel="step within a stream batch", x=list(range(steps)))
                self.tracker.log_file(self.parent, png, "plots")
