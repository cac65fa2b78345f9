"""The report's PNGs: a heatmap of every accuracy matrix a plan run logged, accuracy-vs-chunk curves per
stream kind and protocol, accuracy-vs-width curves of slimmable lines (orchestrator.report.widths), and transfer
scores by chunk (orchestrator.report.transfer); written under `<out>/figures/<stream kind>/` and logged to the plan
run under `report/`.

    figures = draw_figures(tracker, study, out)   # [{"path", "artifact", "run", "what"}, ...]
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from evaluators.report import plot_accuracy_matrix, plot_metric_curves
from orchestrator.report.collect import Study
from orchestrator.report.transfer import transfer_figures
from orchestrator.report.widths import width_figures
from orchestrator.tracking.tracker import Tracker

ARTIFACT_FOLDER = "report"


def _curve(study: Study, stream_kind: str, line_id: str, name: str) -> list[float]:
    """`{name}_top1` of each chunk's FINISHED evaluation run (NaN where there is none: a gap in the curve)."""
    entry = study.entry(stream_kind, line_id)
    if stream_kind == "online":  # one point per segment (its checkpoint's evaluation), over stream time
        return [run.data.metrics.get(f"{name}_top1", math.nan) if run.info.status == "FINISHED" else math.nan
                for run in entry.plan.segments.get(line_id, [])]
    values = []
    for chunk in range(entry.plan.num_chunks):
        run = entry.plan.slot(line_id, chunk).eval_run
        ok = run is not None and run.info.status == "FINISHED"
        values.append(run.data.metrics.get(f"{name}_top1", math.nan) if ok else math.nan)
    return values


def draw_figures(tracker: Tracker, study: Study, out: Path) -> list[dict[str, Any]]:
    figures: list[dict[str, Any]] = []

    def publish(path: Path, run_id: str, what: str) -> None:
        tracker.log_file(run_id, path, ARTIFACT_FOLDER)
        figures.append({"path": path.relative_to(out).as_posix(), "artifact": f"{ARTIFACT_FOLDER}/{path.name}",
                        "run": run_id, "what": what})

    for stream_kind in study.stream_kinds:
        folder = out / "figures" / stream_kind
        entries = [e for e in study.entries if e.stream_kind == stream_kind]
        for entry in entries:
            for name in entry.plan.protocols:  # top-1; the top-5 matrices are in the plan run's artifacts
                artifact = f"accuracy_matrix.{entry.line.id}.{name}.json"
                if artifact not in entry.plan.artifact_names():
                    continue
                png = plot_accuracy_matrix(entry.plan.matrix(artifact), folder / f"{artifact[:-5]}.png",
                                           title=f"{entry.line.id} ({stream_kind}) - {name} accuracy")
                publish(png, entry.plan.run_id, f"accuracy matrix, {entry.line.id}, {name} ({artifact})")
        names = list(dict.fromkeys(n for e in entries for n in e.plan.protocols))
        for name in names:
            series = {e.line.id: _curve(study, stream_kind, e.line.id, name) for e in entries if name in e.plan.protocols}
            unit = "segment" if stream_kind == "online" else "chunk"
            png = plot_metric_curves(series, folder / f"accuracy_by_{unit}.{name}.png",
                                     title=f"{name} top-1 after each {unit} ({stream_kind})", ylabel=f"{name} top-1")
            # One figure, logged to every plan run whose lines it draws.
            for run_id in dict.fromkeys(e.plan.run_id for e in entries if name in e.plan.protocols):
                publish(png, run_id, f"{name} top-1 by {unit}, stream {stream_kind} ({unit} runs' {name}_top1)"
                        if unit == "segment" else f"{name} top-1 by chunk, stream {stream_kind} (eval runs' {name}_top1)")
    for png, run_ids, what in [*width_figures(study, out / "figures"), *transfer_figures(study, out / "figures")]:
        for run_id in run_ids:
            publish(png, run_id, what)
    return figures
