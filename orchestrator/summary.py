"""The end of a plan: per-chunk rows, each line's accuracy matrix and continual metrics, the ST-JT gaps.

    summarise(summary, plan, tracker, chunk_rows, results)   # fills `summary`, logs metrics + plots to the plan run
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from evaluators.continual import AccuracyMatrix, continual_metrics, st_jt_gap
from evaluators.report import plot_accuracy_matrix, plot_metric_curves
from orchestrator.planner import ExperimentPlan
from orchestrator.tracking.tracker import Tracker

EVAL_COLUMNS = ("knn_top1", "linear_top1")


@dataclass
class ExperimentSummary:
    parent_run_id: str | None
    plan_key: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    lines: dict[str, dict[str, Any]] = field(default_factory=dict)
    gaps: dict[str, dict[str, float]] = field(default_factory=dict)
    baseline: dict[str, Any] = field(default_factory=dict)
    skipped_jobs: int = 0
    restarts: int = 0
    recovered_jobs: int = 0  # chunks found persisted on storage but not in MLflow, logged by this run
    missing: list[str] = field(default_factory=list)  # what the record lacks (empty when complete)
    unknown: list[str] = field(default_factory=list)  # accuracies that cannot be measured (a task without queries)


def summarise(summary: ExperimentSummary, plan: ExperimentPlan, tracker: Tracker,
              chunk_rows: dict[str, dict[str, Any]], results: dict[str, dict[str, Any]]) -> None:
    """Fill `summary` (per-chunk rows, continual metrics per line, ST-JT gaps) and log them with the accuracy
    matrices, plots and summary.json to the plan run."""
    spec, parent, T = plan.spec, summary.parent_run_id, plan.stream.num_chunks
    for job in plan.jobs:
        row = dict(chunk_rows.get(job.key, {"line": job.line.id, "chunk": job.chunk}))
        row.update({k: results.get(job.key, {}).get(k) for k in EVAL_COLUMNS})
        summary.rows.append(row)
    with tempfile.TemporaryDirectory() as folder:
        matrices: dict[tuple[str, str], AccuracyMatrix] = {}
        for line in plan.lines:
            for name in spec.eval.every_chunk:
                matrix = AccuracyMatrix(T)
                for job in plan.jobs_of(line):
                    if job.key in results:
                        matrix.record_row(job.chunk, results[job.key][f"{name}_task_acc"])
                matrices[(line.id, name)] = matrix
                tasks = sorted({task for _, task in matrix.unknown_entries()})
                if tasks:
                    summary.unknown.append(
                        f"{line.id}: {name} accuracy on task(s) {', '.join(map(str, tasks))} is unknown (no "
                        f"query rows in {spec.data.eval_split!r}); metrics that need it are unknown too")
                if matrix.completed_rows < T:
                    continue  # said by missing_records
                baseline = summary.baseline.get(f"{name}_task_acc")
                metrics = continual_metrics(matrix, baseline=baseline)
                summary.lines.setdefault(line.id, {})[name] = metrics
                tracker.log_metrics(parent, {f"{line.id}.{name}.{k}": v for k, v in metrics.items()
                                             if v is not None and np.isfinite(v)})
                tracker.log_json(parent, f"accuracy_matrix.{line.id}.{name}.json", matrix.to_dict())
                png = plot_accuracy_matrix(matrix, Path(folder) / f"accuracy_matrix.{line.id}.{name}.png",
                                           title=f"{line.id} — {name} accuracy")
                tracker.log_file(parent, png, "plots")
        for method in spec.lines.method:
            for name in spec.eval.every_chunk:
                st, jt = matrices.get((f"{method}-sequential", name)), matrices.get((f"{method}-joint", name))
                if st is None or jt is None or st.completed_rows < T or jt.completed_rows < T:
                    continue
                gap = st_jt_gap(st, jt)
                summary.gaps.setdefault(method, {})[name] = gap.final
                if np.isfinite(gap.final):
                    tracker.log_metrics(parent, {f"{method}.{name}.st_jt_gap": gap.final})
        curves = {line.id: [results.get(j.key, {}).get("knn_top1", float("nan"))
                            for j in plan.jobs_of(line)] for line in plan.lines}
        if "knn" in spec.eval.every_chunk:
            png = plot_metric_curves(curves, Path(folder) / "knn_top1_by_chunk.png",
                                     title="kNN top-1 after each chunk", ylabel="kNN top-1")
            tracker.log_file(parent, png, "plots")
        tracker.log_json(parent, "summary.json",
                         {"rows": summary.rows, "lines": summary.lines, "gaps": summary.gaps,
                          "unknown": summary.unknown,
                          "baseline": {k: v for k, v in summary.baseline.items()}})
