"""The end of a plan: per-chunk rows, each line's accuracy matrices and continual metrics, the ST-JT gaps.

    summarise(summary, plan, tracker, chunk_rows, results)   # fills `summary`, logs metrics + plots to the plan run

What it logs to the plan run (the names `streamssl report` and the MLflow compare view read):

* per line and protocol, for top-1 (`{name}`, e.g. `knn`) and top-5 (`{name}_top5`): the metrics
  `{line}.{name}.{avg_acc|bwt|fwt|forgetting}` and `{line}.{name}_top5.{...}`, the matrix as
  `accuracy_matrix.{line}.{name}[_top5].json` and its heatmap under `plots/`; FWT is measured against the
  random initialisation's per-task accuracy of the same kind (top-1 or top-5), when the baseline was evaluated;
* per non-joint line whose method also has a plain joint line (`{method}-joint`), the ST-JT gap in top-1:
  `{line}.{name}.st_jt_gap` (final) and `{line}.{name}.st_jt_gap_by_chunk` at `step=chunk`; the plain
  sequential line's final gap also as `{method}.{name}.st_jt_gap` (the name earlier plans logged);
* `summary.json`: rows, lines, gaps (by line id), gaps_by_chunk, unknown, notes, baseline.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from evaluators.continual import AccuracyMatrix, continual_metrics, st_jt_gap
from evaluators.registry import TOP_K
from evaluators.report import plot_accuracy_matrix, plot_metric_curves
from orchestrator.plan.planner import ExperimentPlan, Line
from orchestrator.tracking.tracker import Tracker

EVAL_COLUMNS = ("knn_top1", "knn_top5", "linear_top1", "linear_top5")
# (suffix of the metric name and of the result's `{name}_task_acc` key, words): top-1 keeps the protocol's bare
# name (`knn`), as plans always logged it; top-5 is `knn_top5`.
ACCURACIES = (("", "top-1"), ("_top5", "top-5"))


@dataclass
class ExperimentSummary:
    parent_run_id: str | None
    plan_key: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    lines: dict[str, dict[str, Any]] = field(default_factory=dict)  # line id -> `knn` / `knn_top5` -> metrics
    gaps: dict[str, dict[str, float]] = field(default_factory=dict)  # line id -> protocol -> final ST-JT gap
    gaps_by_chunk: dict[str, dict[str, list[float | None]]] = field(default_factory=dict)  # None: unknown
    baseline: dict[str, Any] = field(default_factory=dict)
    skipped_jobs: int = 0
    restarts: int = 0
    recovered_jobs: int = 0  # chunks found persisted on storage but not in MLflow, logged by this run
    missing: list[str] = field(default_factory=list)  # what the record lacks (empty when complete)
    unknown: list[str] = field(default_factory=list)  # accuracies that cannot be measured (a task without queries)
    notes: list[str] = field(default_factory=list)  # numbers that are what they are by construction
    diverged: dict[str, str] = field(default_factory=dict)  # line id -> why its training stopped (not retried)


def joint_reference(line: Line, lines: list[Line]) -> Line | None:
    """The line `line`'s ST-JT gap is measured against: its method's plain joint line, for a line that is not
    itself joint (base `joint`, aids or not); None when there is no gap to measure."""
    if line.strategy.split("+")[0] == "joint":
        return None
    return next((other for other in lines if other.method == line.method and other.strategy == "joint"), None)


def summarise(summary: ExperimentSummary, plan: ExperimentPlan, tracker: Tracker,
              chunk_rows: dict[str, dict[str, Any]], results: dict[str, dict[str, Any]]) -> None:
    """Fill `summary` (per-chunk rows, continual metrics per line, ST-JT gaps) and log them with the accuracy
    matrices, plots and summary.json to the plan run."""
    spec, parent = plan.spec, summary.parent_run_id
    for job in plan.jobs:
        row = dict(chunk_rows.get(job.key, {"line": job.line.id, "chunk": job.chunk}))
        row.update({k: results.get(job.key, {}).get(k) for k in EVAL_COLUMNS})
        summary.rows.append(row)
    if spec.eval.every_chunk and plan.manifest.num_classes <= TOP_K:
        summary.notes.append(f"the data set has {plan.manifest.num_classes} classes (<= {TOP_K}): every class is "
                             f"ranked, so top-{TOP_K} accuracy is 1.0 by construction")
    with tempfile.TemporaryDirectory() as folder:
        matrices = _line_metrics(summary, plan, tracker, results, Path(folder))
        _gaps(summary, plan, tracker, matrices)
        _downstream_gaps(summary, plan, tracker, results)
        if "knn" in spec.eval.every_chunk:  # the cheap proxy: one accuracy-vs-chunk plot per accuracy
            for key, words in (("knn_top1", "top-1"), ("knn_top5", "top-5")):
                curves = {line.id: [_number(results.get(j.key, {}).get(key)) for j in plan.jobs_of(line)]
                          for line in plan.lines}
                png = plot_metric_curves(curves, Path(folder) / f"{key}_by_chunk.png",
                                         title=f"kNN {words} after each chunk", ylabel=f"kNN {words}")
                tracker.log_file(parent, png, "plots")
        tracker.log_json(parent, "summary.json",
                         {"rows": summary.rows, "lines": summary.lines, "gaps": summary.gaps,
                          "gaps_by_chunk": summary.gaps_by_chunk, "unknown": summary.unknown, "notes": summary.notes,
                          "baseline": {k: v for k, v in summary.baseline.items()}})


def _line_metrics(summary: ExperimentSummary, plan: ExperimentPlan, tracker: Tracker,
                  results: dict[str, dict[str, Any]], folder: Path) -> dict[tuple[str, str], AccuracyMatrix]:
    """Each line's top-1 and top-5 matrix per protocol; metrics, matrix json and heatmap for the complete ones.
    Returns the matrices keyed by (line id, `knn` | `knn_top5` ...)."""
    spec, parent, T = plan.spec, summary.parent_run_id, plan.stream.num_chunks
    matrices: dict[tuple[str, str], AccuracyMatrix] = {}
    for line in plan.lines:
        for name in spec.eval.every_chunk:
            for suffix, words in ACCURACIES:
                metric = f"{name}{suffix}"
                matrix = AccuracyMatrix(T)
                unrecorded = []  # evaluated chunks without this accuracy (runs logged before top-5 existed)
                for job in plan.jobs_of(line):
                    if job.key not in results:
                        continue  # said by missing_records
                    row = results[job.key].get(f"{name}_task_acc{suffix}")
                    if row is None:
                        unrecorded.append(job.chunk)
                    else:
                        matrix.record_row(job.chunk, row)
                matrices[(line.id, metric)] = matrix
                tasks = sorted({task for _, task in matrix.unknown_entries()})
                if tasks and not suffix:  # the same tasks lack queries for top-5: say it once
                    summary.unknown.append(
                        f"{line.id}: {name} accuracy on task(s) {', '.join(map(str, tasks))} is unknown (no "
                        f"query rows in {spec.data.eval_split!r}); metrics that need it are unknown too")
                if unrecorded:
                    summary.unknown.append(
                        f"{line.id}: {metric} was not recorded by the evaluation of chunk(s) "
                        f"{', '.join(map(str, unrecorded))} (logged before {words} existed), so its {words} "
                        "continual metrics are not computed")
                if matrix.completed_rows < T:
                    continue
                baseline = summary.baseline.get(f"{name}_task_acc{suffix}")
                metrics = continual_metrics(matrix, baseline=baseline)
                summary.lines.setdefault(line.id, {})[metric] = metrics
                tracker.log_metrics(parent, {f"{line.id}.{metric}.{k}": v for k, v in metrics.items()
                                             if v is not None and np.isfinite(v)})
                tracker.log_json(parent, f"accuracy_matrix.{line.id}.{metric}.json", matrix.to_dict())
                png = plot_accuracy_matrix(matrix, folder / f"accuracy_matrix.{line.id}.{metric}.png",
                                           title=f"{line.id} — {name} {words} accuracy")
                tracker.log_file(parent, png, "plots")
    return matrices


def _gaps(summary: ExperimentSummary, plan: ExperimentPlan, tracker: Tracker,
          matrices: dict[tuple[str, str], AccuracyMatrix]) -> None:
    """The top-1 ST-JT gap of every non-joint line against its method's joint line, final and per chunk."""
    parent, T = summary.parent_run_id, plan.stream.num_chunks
    for line in plan.lines:
        joint = joint_reference(line, plan.lines)
        if joint is None:
            continue
        for name in plan.spec.eval.every_chunk:
            st, jt = matrices.get((line.id, name)), matrices.get((joint.id, name))
            if st is None or jt is None or st.completed_rows < T or jt.completed_rows < T:
                continue  # said by missing_records
            gap = st_jt_gap(st, jt)
            summary.gaps.setdefault(line.id, {})[name] = gap.final
            summary.gaps_by_chunk.setdefault(line.id, {})[name] = [v if math.isfinite(v) else None
                                                                   for v in gap.per_chunk]
            if math.isfinite(gap.final):
                final = {f"{line.id}.{name}.st_jt_gap": gap.final}
                if line.strategy == "sequential":
                    final[f"{line.method}.{name}.st_jt_gap"] = gap.final
                tracker.log_metrics(parent, final)
            for chunk, value in enumerate(gap.per_chunk):
                if math.isfinite(value):
                    tracker.log_metrics(parent, {f"{line.id}.{name}.st_jt_gap_by_chunk": value}, step=chunk)


def _downstream_gaps(summary: ExperimentSummary, plan: ExperimentPlan, tracker: Tracker,
                     results: dict[str, dict[str, Any]]) -> None:
    """The ST-JT gap on every `eval.downstream` set, per chunk: JT's top-1 minus this line's, after each chunk
    (`{line}.{set}.{name}.st_jt_gap_by_chunk`), and its mean over the sets (`{line}.downstream.{name}...`);
    the final values in `summary.gaps[line]` under `{set}.{name}` and `downstream.{name}`."""
    names = [d.name for d in plan.downstream]
    if not names:
        return
    parent = summary.parent_run_id
    for line in plan.lines:
        joint = joint_reference(line, plan.lines)
        if joint is None:
            continue
        pairs = list(zip(plan.jobs_of(line), plan.jobs_of(joint)))
        if any(st.key not in results or jt.key not in results for st, jt in pairs):
            continue  # said by missing_records
        for name in plan.spec.eval.every_chunk:
            per_set = {d: [results[jt.key][f"{d}.{name}_top1"] - results[st.key][f"{d}.{name}_top1"]
                           for st, jt in pairs] for d in names}
            mean = [float(np.mean([per_set[d][c] for d in names])) for c in range(len(pairs))]
            for key, values in [*per_set.items(), ("downstream", mean)]:
                summary.gaps.setdefault(line.id, {})[f"{key}.{name}"] = values[-1]
                summary.gaps_by_chunk.setdefault(line.id, {})[f"{key}.{name}"] = values
                tracker.log_metrics(parent, {f"{line.id}.{key}.{name}.st_jt_gap": values[-1]})
                for chunk, value in enumerate(values):
                    tracker.log_metrics(parent, {f"{line.id}.{key}.{name}.st_jt_gap_by_chunk": value}, step=chunk)


def _number(value: Any) -> float:
    return float("nan") if value is None else float(value)
