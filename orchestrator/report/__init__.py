"""`streamssl report EXPERIMENT`: the study's tables and plots, built from MLflow alone (nothing is recomputed
but arithmetic on logged numbers: sums of bytes, the ST-JT gap from logged accuracy matrices when its metric is
absent).

    report, paths = make_report(Tracker(uri), "quickstart", Path("report"), "markdown")
    report.complete          # False when a run is missing or unfinished or a cell lacks its number

- :mod:`~orchestrator.report.collect`: the experiment's plan runs (one per stream kind), chunk and eval runs, and
  (:mod:`~orchestrator.report.transfer_runs`) the transfer evaluation runs;
- :mod:`~orchestrator.report.tables`: time/storage per chunk, ST-JT gap, BWT/FWT, sharpness; what is missing;
- :mod:`~orchestrator.report.seeds`: a study run over several seeds: each cell's mean, n and 95% t-interval;
- :mod:`~orchestrator.report.widths`: accuracy and cost against width for slimmable lines (US3L), table and PNG;
- :mod:`~orchestrator.report.transfer`: transfer evaluations (`streamssl eval`, `eval.transfer`): each score by
  line and chunk, its correlation with the chunk's upstream accuracy (Pearson r, Fisher-z 95% interval,
  Spearman rho), and a PNG per set and score;
- :mod:`~orchestrator.report.figures`: accuracy-matrix heatmaps and accuracy-vs-chunk curves (logged to the plan runs);
- :mod:`~orchestrator.report.findings` / :mod:`~orchestrator.report.claims`: the studies' claims, each checked
  against the runs (effect, 95% interval over seeds, verdict): the findings table; what a claim compares is a
  :mod:`~orchestrator.report.measures` measure;
- :mod:`~orchestrator.report.writers`: markdown, CSV and JSON.
"""

from __future__ import annotations

from pathlib import Path

from orchestrator.errors import ReportError
from orchestrator.report.claims import CLAIMS
from orchestrator.report.collect import collect
from orchestrator.report.figures import draw_figures
from orchestrator.report.findings import Finding, findings
from orchestrator.report.model import Cell, ReportTable, Row, StudyReport
from orchestrator.report.tables import build_tables, record_problems
from orchestrator.report.writers import FORMATS, write, write_findings
from orchestrator.tracking.tracker import Tracker


def open_store(uri: str) -> Tracker:
    """The tracking store to report from; a SQLite file that does not exist is an error (not a new empty store)."""
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
        raise ReportError(f"no MLflow store at {uri}: the file does not exist (give --tracking-uri, e.g. "
                          "sqlite:///<storage.workdir>/mlflow.db)")
    return Tracker(uri)


def build_report(tracker: Tracker, experiment: str) -> tuple[StudyReport, object]:
    """The report's tables and the record they come from (ReportError for an unknown experiment)."""
    study = collect(tracker, experiment)
    report = StudyReport(study.experiment, study.experiment_id, study.uri, [p.describe() for p in study.plans],
                         build_tables(study), record_problems(study), list(study.notes), findings=findings(study, CLAIMS))
    return report, study


def make_findings(tracker: Tracker, experiment: str, out: Path, fmt: str = "markdown") -> tuple[list, list[Path]]:
    """Only the findings table (`streamssl report --findings`): the claims checked against the runs, written as
    `fmt` into `out` (no other table, no figures)."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {list(FORMATS)}, got {fmt!r}")
    rows = findings(collect(tracker, experiment), CLAIMS)
    return rows, write_findings(rows, Path(out), fmt)


def make_report(tracker: Tracker, experiment: str, out: Path, fmt: str = "markdown") -> tuple[StudyReport, list[Path]]:
    """Build the report, draw its figures into `out` (and log them to the plan runs), write it as `fmt`."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {list(FORMATS)}, got {fmt!r}")
    report, study = build_report(tracker, experiment)
    out = Path(out)
    report.figures = draw_figures(tracker, study, out)
    paths = write(report, out, fmt)
    return report, paths + list(dict.fromkeys(out / f["path"] for f in report.figures))


__all__ = ["FORMATS", "Cell", "Finding", "ReportTable", "Row", "StudyReport", "build_report", "make_findings",
           "make_report", "open_store"]
