"""`streamssl report EXPERIMENT`: the study's tables and plots from MLflow alone, written to a folder and printed."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Optional

import typer

from cli.common import console, err_console, exits_cleanly
from cli.options import TrackingUri, resolve_tracking_uri


class ReportFormat(str, Enum):
    markdown = "markdown"
    csv = "csv"
    json = "json"


@exits_cleanly
def report(
    experiment: str = typer.Argument(..., help="MLflow experiment: the spec's `name` (or its tracking.experiment)."),
    fmt: ReportFormat = typer.Option(ReportFormat.markdown, "--format", help="report.md, one CSV per table, or report.json."),
    out: Optional[Path] = typer.Option(None, "--out", help="Folder to write into (default ./report-EXPERIMENT)."),
    tracking_uri: Optional[str] = TrackingUri,
    findings_only: bool = typer.Option(False, "--findings", help="Only the findings table: each claim of the studies "
                                       "with its effect, 95% interval over seeds and verdict (findings.md/.csv/.json)."),
) -> None:
    """Time/storage per chunk, ST-JT gap, BWT/FWT, sharpness, transfer scores by chunk (and their correlation with
    upstream accuracy), plots and the findings of every plan run of EXPERIMENT.

    Plan runs that differ only in `seed` (`--set seed=k`) are one study: each cell is their mean with n and a 95%
    t-interval. Exits 1 (after writing) when a run is missing or unfinished or a cell lacks its number; the report
    lists them. With --findings, only the findings table; exits 1 when a claim's runs are missing.
    """
    from rich.markup import escape

    from evaluators.report import results_table
    from orchestrator.report import make_report, open_store

    tracker = open_store(resolve_tracking_uri(tracking_uri))
    folder = out or Path(f"report-{experiment}")
    if findings_only:
        return _findings(tracker, experiment, folder, fmt.value)
    built, paths = make_report(tracker, experiment, folder, fmt.value)
    _print_findings(built.findings)
    for table in built.tables:
        for note in table.notes:
            console.print(f"[dim]{escape(f'{table.name}: {note}')}[/]", highlight=False)
        if not table.rows:
            continue
        # One table per stream kind, rows named "simclr ST+replay", missing cells short (their reasons follow);
        # a table whose rows are not lines (a transfer correlation's set and score) shows its own index.
        extra = [c for c in table.index_columns if c not in ("method", "paradigm", "stream", "line", "strategy")]
        by_line = "line" in table.index_columns
        keys = ["line", *extra] if by_line else extra  # (chunk; an online segment's segment, batches and final)
        for stream in dict.fromkeys(row.index["stream"] for row in table.rows):
            rows = [{**({"line": f"{row.index['method']} {row.index['strategy']}"} if by_line else {}),
                     **{c: row.index.get(c) for c in extra},
                     **{c: "missing" if cell.missing else cell.text() for c, cell in row.cells.items()},
                     "sources": " ".join(r[:8] for r in row.runs)}
                    for row in table.rows if row.index["stream"] == stream]
            console.print(results_table(rows, [*keys, *table.value_columns, "sources"],
                                        title=f"{table.title} — stream {stream}"))
    for note in built.notes:
        console.print(f"[dim]{escape(note)}[/]", highlight=False)
    console.print(f"wrote {len(paths)} file(s) to {folder}: " + ", ".join(p.name for p in paths[:6])
                  + (", ..." if len(paths) > 6 else ""), highlight=False)
    if not built.complete:
        for problem in built.problems:
            err_console.print(f"[yellow]missing run:[/] {escape(problem.text)}", highlight=False, soft_wrap=True)
        cells = built.missing_cells()
        for cell in cells:
            row = ", ".join(f"{k} {v}" for k, v in cell["row"].items())
            err_console.print("[yellow]missing cell:[/] " + escape(f"{cell['table']} [{row}] {cell['column']}: "
                                                                    f"{cell['reason']}"),
                              highlight=False, soft_wrap=True)
        err_console.print(f"[bold red]the report is incomplete[/]: {len(built.problems)} problem(s) with runs, "
                          f"{len(cells)} missing cell(s); written anyway, with those cells marked", highlight=False)
        raise typer.Exit(code=1)


def _print_findings(rows: list) -> None:
    from evaluators.report import results_table

    if not rows:
        return
    table = [{"claim": f.claim.id, "n": str(len(f.seeds)), "effect (95% CI)": _effect_text(f), "verdict": f.verdict,
              "why": f.reason} for f in rows]
    console.print(results_table(table, ["claim", "n", "effect (95% CI)", "verdict", "why"], title="Findings"))


def _effect_text(finding) -> str:
    e = finding.effect
    if e.values and e.n > 1:
        return f"{e.text().split(' (')[0]} ({e.lo:.4g}..{e.hi:.4g})"
    return e.text()


def _findings(tracker, experiment: str, folder: Path, fmt: str) -> None:
    from rich.markup import escape

    from orchestrator.report import make_findings

    rows, paths = make_findings(tracker, experiment, folder, fmt)
    _print_findings(rows)
    console.print(f"wrote {', '.join(str(p) for p in paths)}", highlight=False)
    lacking = [f for f in rows if f.missing]
    for finding in lacking:
        err_console.print(f"[yellow]missing runs[/] for {escape(finding.claim.id)}: {escape('; '.join(finding.missing))}",
                          highlight=False, soft_wrap=True)
    if lacking:
        raise typer.Exit(code=1)
