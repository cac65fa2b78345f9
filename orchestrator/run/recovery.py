"""What a resumed driver takes up from an earlier attempt of the same plan: MLflow's record and the checkpoints.

    logged = read_logged(tracker, plan, eval_names)          # finished chunk runs, their evaluations, leftovers
    events = persisted_unlogged_chunks(plan, spec, parent_run_id, logged.chunk_runs)

Three things an interrupted driver can leave behind, each of which must end with one chunk run and one evaluation
run per chunk: a chunk run whose evaluation never finished (re-evaluate it); runs it had begun but not ended
(superseded, so deleted); and chunks whose checkpoint reached storage while the driver was blocked on MLflow
(training runs ahead of a driver retrying through a tracking outage) but whose run was never created: their
chunk event is stored beside the checkpoint, so they are logged from it without retraining.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from orchestrator import storage
from orchestrator.evaluate.evaluation import headline, task_accuracies
from orchestrator.plan.planner import ExperimentPlan, Job
from orchestrator.run.summary import joint_reference
from orchestrator.spec.experiment import Spec
from orchestrator.tracking import tags as tr
from orchestrator.tracking.tracker import Tracker
from orchestrator.train.checkpoints import CHUNK_EVENT_FILE, checkpoint_order
from orchestrator.train.runner import line_groups, ray_run_name
from trainers.engine.checkpoint import verify_state


@dataclass
class LoggedRecord:
    chunk_runs: dict[str, str] = field(default_factory=dict)  # job key -> FINISHED chunk run id
    chunk_rows: dict[str, dict[str, Any]] = field(default_factory=dict)  # job key -> summary table row
    results: dict[str, dict[str, Any]] = field(default_factory=dict)  # job key -> evaluation result
    unevaluated: list[Job] = field(default_factory=list)  # finished chunks without a FINISHED evaluation run
    partial: list[str] = field(default_factory=list)  # unfinished (or duplicate) chunk and eval runs: superseded
    # chunk run id -> (its FINISHED eval run, headline metrics) where the driver died before linking the two
    unlinked: dict[str, tuple[str, dict[str, float]]] = field(default_factory=dict)


def read_logged(tracker: Tracker, plan: ExperimentPlan, eval_names: list[str]) -> LoggedRecord:
    """The record earlier attempts of `plan` left in MLflow (call after their RUNNING runs were marked FAILED)."""
    jobs = {j.key: j for j in plan.jobs}
    of_plan = f"tags.`{tr.PLAN_KEY}` = '{plan.key}'"
    evals: dict[str, list] = {}
    for run in tracker.runs(f"tags.`{tr.RUN_TYPE}` = 'eval' and {of_plan}"):
        evals.setdefault(run.data.tags.get(tr.EVALUATES, ""), []).append(run)
    record = LoggedRecord()
    record.partial = [r.info.run_id for r in tracker.runs(f"tags.`{tr.RUN_TYPE}` = 'chunk' and {of_plan}")
                      if r.info.status != "FINISHED"]
    for key, run in tracker.finished_chunk_runs(plan.key).items():
        if key not in jobs:
            continue
        job = jobs[key]
        record.chunk_runs[key] = run.info.run_id
        m = run.data.metrics
        record.chunk_rows[key] = {"line": job.line.id, "chunk": job.chunk, "loss": m.get("final_loss"),
                                  "train_s": m.get("train_seconds"), "samples/s": m.get("samples_per_s")}
        runs = evals.get(run.info.run_id, [])
        done = [e for e in runs if e.info.status == "FINISHED"]
        record.partial += [e.info.run_id for e in runs if e.info.status != "FINISHED"] + [e.info.run_id for e in done[1:]]
        if not done:
            record.unevaluated.append(job)
            continue
        em = done[0].data.metrics
        result: dict[str, Any] = headline(em, eval_names)
        if run.data.tags.get(tr.TAG + "eval_run") != done[0].info.run_id:
            record.unlinked[run.info.run_id] = (done[0].info.run_id, dict(result))
        result.update(task_accuracies(em, eval_names, plan.stream.num_chunks))
        record.results[key] = result
    return record


def persisted_unlogged_chunks(plan: ExperimentPlan, spec: Spec, parent_run_id: str,
                              logged: dict[str, str]) -> list[dict[str, Any]]:
    """Chunk events of every complete chunk-end checkpoint on storage whose job has no chunk run in `logged`,
    in training order. A checkpoint cut short (no event, or a state that does not verify) is left out: its
    chunk is retrained."""
    import pyarrow.fs as pafs
    import ray.train

    jobs = {j.key for j in plan.jobs}
    events = []
    for group_index, lines in enumerate(line_groups(plan)):
        line_ids = [line.id for line in lines]
        run_url = f"{spec.checkpoint_url.rstrip('/')}/{ray_run_name(plan, parent_run_id, group_index)}"
        fs, run_path = storage.pyarrow_filesystem(run_url, spec.storage.storage_options)
        ends = []
        for info in fs.get_file_info(pafs.FileSelector(run_path, allow_not_found=True)):
            order = checkpoint_order(info.base_name, line_ids) if info.type == pafs.FileType.Directory else None
            if order is not None and order[2] == 1:  # a chunk's end checkpoint, not an in-chunk one
                ends.append((order, info.path))
        for _, path in sorted(ends):
            try:
                with fs.open_input_stream(f"{path}/{CHUNK_EVENT_FILE}") as f:
                    event = json.loads(f.read())
            except (OSError, ValueError):
                continue
            if event.get("job_key") not in jobs or event["job_key"] in logged:
                continue
            try:
                with ray.train.Checkpoint(path, filesystem=fs).as_directory() as folder:
                    verify_state(folder)
            except Exception:  # noqa: BLE001 - a partial upload of any kind
                continue
            events.append(event)
    return events


def missing_records(plan: ExperimentPlan, chunk_runs: dict[str, str], results: dict[str, Any],
                    evaluations: list[str], skip_lines: Iterable[str] = ()) -> list[str]:
    """Per line: the chunks without a chunk run or without an evaluation, and what that leaves uncomputed.

    `skip_lines` are line ids left out (lines that diverged: `--resume` would not complete them).
    """
    missing, skip = [], set(skip_lines)
    for line in plan.lines:
        if line.id in skip:
            continue
        jobs = plan.jobs_of(line)
        unlogged = [j.chunk for j in jobs if j.key not in chunk_runs]
        unevaluated = [j.chunk for j in jobs if j.key in chunk_runs and j.key not in results] if evaluations else []
        parts = []
        if unlogged:
            parts.append(f"no chunk run for chunk(s) {', '.join(map(str, unlogged))}")
        if unevaluated:
            parts.append(f"no evaluation of chunk(s) {', '.join(map(str, unevaluated))}")
        if parts:
            # A line's own gap, or (for a joint line) the gaps of the lines measured against it.
            pairs = [(other, joint_reference(other, plan.lines)) for other in plan.lines]
            has_gap = any(joint is not None and line in (other, joint) for other, joint in pairs)
            lost = "its accuracy matrix (top-1 and top-5) and continual metrics (avg_acc, BWT, FWT, forgetting"
            lost += ", ST-JT gap)" if has_gap else ")"
            missing.append(f"{line.id}: {'; '.join(parts)}, so {lost} are not computed")
    return missing
