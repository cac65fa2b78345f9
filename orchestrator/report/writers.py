"""Writing a study report: `report.md` (every table, figures, what is missing), one CSV per table (+ `missing.csv`,
`plans.csv`), or `report.json` (each cell with its value, runs, source key and why it is missing).

    paths = write(report, Path("out"), "markdown")

Markdown rounds to 4 decimals (small values in 3 significant digits); CSV and JSON keep the logged float exactly.
Each table row names the runs its numbers come from (`sources`); a missing cell reads `missing: <why>`.

The findings (orchestrator.report.findings) are a section of report.md, `findings` in report.json and
findings.csv; `write_findings` writes them alone (findings.md / .csv / .json: `streamssl report --findings`).

A cell over several seeds (orchestrator.report.model.aggregate) reads `mean (n=N, 95% CI lo..hi)` in markdown (a
Student-t interval over the seeds); in CSV the column holds the mean and `{column}.n`, `{column}.lo`,
`{column}.hi` follow it (in tables with such a cell); in JSON each cell has `n`, `mean`, `lo`, `hi` and `values`.
A value logged with its half-width (a few-shot mean's ci95) reads `mean ± half-width` in markdown; in CSV
`{column}.half_width` follows the column (in tables with such a cell); in JSON the cell has `half_width`.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from orchestrator.report.findings import INTERVAL, MAX_SEEDS
from orchestrator.report.model import ReportTable, StudyReport, format_number

FORMATS = ("markdown", "csv", "json")
FINDINGS_COLUMNS = ["claim", "study", "finding", "test; measure", "n", "effect (95% CI)", "verdict", "why",
                    "seeds to decide", "paper", "missing runs", "sources"]


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(map(_md_escape, header)) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(map(_md_escape, row)) + " |" for row in rows]
    return out


def _table_rows(table: ReportTable, exact: bool) -> list[list[str]]:
    return [[row.index.get(c, "") for c in table.index_columns]
            + [row.cells[c].text(exact) if c in row.cells else "n/a" for c in table.value_columns]
            + [" ".join(row.runs)] for row in table.rows]


def _has_half_widths(table: ReportTable) -> bool:
    return any(cell.half_width is not None for row in table.rows for cell in row.cells.values())


def _csv_value_columns(table: ReportTable) -> list[str]:
    extra = [*(("n", "lo", "hi") if table.over_seeds else ()), *(("half_width",) if _has_half_widths(table) else ())]
    return [name for c in table.value_columns for name in (c, *(f"{c}.{e}" for e in extra))]


def _csv_rows(table: ReportTable) -> list[list[str]]:
    """As `_table_rows`, exact; over seeds, each value column is the mean and is followed by its n, lo and hi; with
    logged half-widths, each is followed by its half-width."""
    seeds, half = table.over_seeds, _has_half_widths(table)
    if not seeds and not half:
        return _table_rows(table, True)
    out = []
    for row in table.rows:
        values = []
        for c in table.value_columns:
            cell = row.cells.get(c)
            if cell is None:
                values += ["n/a"] + [""] * (3 * seeds + half)
                continue
            values.append(repr(float(cell.value)) if cell.value is not None else cell.text(True))
            if seeds:
                values += [str(cell.n), *(repr(float(b)) if b is not None else "" for b in (cell.lo, cell.hi))]
            if half:
                values.append(repr(float(cell.half_width)) if cell.half_width is not None else "")
        out.append([row.index.get(c, "") for c in table.index_columns] + values + [" ".join(row.runs)])
    return out


def _summary_line(report: StudyReport) -> str:
    missing, problems = len(report.missing_cells()), len(report.problems)
    if report.complete:
        return "**Complete**: every cell has its number, and every run the plans need is FINISHED."
    return (f"**Incomplete**: {missing} cell(s) missing and {problems} problem(s) with runs, listed under "
            "\"Missing\" below; do not read these tables as whole.")


def write_markdown(report: StudyReport, out: Path) -> list[Path]:
    lines = [f"# Study report: {report.experiment}", "",
             f"MLflow `{report.tracking_uri}`, experiment {report.experiment_id}. Built from the logged runs alone; "
             "each row's `sources` are the runs its numbers come from.", "", _summary_line(report), "",
             "## Plan runs", ""]
    lines += _md_table(["stream", "plan run", "status", "seed", "chunks", "protocols", "lines"],
                       [[p["stream_kind"], p["run"], p["status"], p["seed"], str(p["chunks"]),
                         ", ".join(p["protocols"]),
                         ", ".join(p["lines"])] for p in report.plans])
    for table in report.tables:
        lines += ["", f"## {table.title}", "", f"`{table.name}`", ""]
        lines += [f"- {note}" for note in table.notes] + ([""] if table.notes else [])
        if table.rows:
            lines += _md_table([*table.index_columns, *table.value_columns, "sources"], _table_rows(table, False))
        else:
            lines.append("(no rows)")
    if report.findings:
        lines += ["", *findings_markdown(report.findings)]
    if report.figures:
        lines += ["", "## Figures", ""]
        for path in dict.fromkeys(f["path"] for f in report.figures):
            figure = next(f for f in report.figures if f["path"] == path)
            runs = ", ".join(f["run"] for f in report.figures if f["path"] == path)
            lines += [f"![{figure['what']}]({path})", f"{figure['what']} — logged to {runs} as `{figure['artifact']}`", ""]
    if not report.complete:
        lines += ["", "## Missing", ""]
        if report.problems:
            lines += ["Runs:", ""] + [f"- {p.text}" for p in report.problems] + [""]
        cells = report.missing_cells()
        if cells:
            lines += ["Cells:", ""]
            lines += _md_table(["table", "row", "column", "reason", "source", "runs"],
                               [[c["table"], ", ".join(f"{k} {v}" for k, v in c["row"].items()), c["column"],
                                 c["reason"], _source(report, c), " ".join(c["runs"])] for c in cells])
    if report.notes:
        lines += ["", "## Notes", ""] + [f"- {note}" for note in report.notes]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return [path]


def _finding_cells(finding, exact: bool) -> list[str]:
    """One findings row: the claim, its effect in words, n, the mean effect and its interval, the verdict and why,
    the seeds an inconclusive interval would need, the paper's figure, what is missing, and the runs read."""
    c, effect = finding.claim, finding.effect
    if effect.values and effect.n > 1:
        measured = (f"{format_number(effect.value, exact)} (95% CI {format_number(effect.lo, exact)}.."
                    f"{format_number(effect.hi, exact)})")
    elif effect.value is not None:
        measured = f"{format_number(effect.value, exact)} (no interval)"
    else:
        measured = "n/a" if effect.na else "none"
    what = f"{c.direction}; {c.measure.what}" if c.measure else c.direction
    n = str(len(finding.seeds)) + (f" (seeds {', '.join(finding.seeds)})" if finding.seeds else "")
    needed = finding.seeds_needed
    decide = "" if needed is None else (f"> {MAX_SEEDS}" if needed > MAX_SEEDS else str(needed))
    return [c.id, c.study, c.text, what, n, measured, finding.verdict, finding.reason, decide, c.paper,
            "; ".join(finding.missing), " ".join(finding.runs if exact else (r[:8] for r in finding.runs))]


def findings_markdown(findings: list) -> list[str]:
    """The findings section of report.md (or the whole of findings.md)."""
    lines = ["## Findings", "", "Each claim of the studies the runs belong to. The effect is signed so that positive "
             f"is what the paper claims; its interval is a 95% {INTERVAL}. Verdicts: holds, contradicted, or "
             "inconclusive at this budget (the interval spans the claim's threshold, n < 2, or a condition of the "
             "claim fails). Seeds to decide: for an interval that spans the threshold, the fewest seeds whose "
             "interval would clear it were the measured per-seed mean and spread the true ones (about even odds "
             "at that n; a rough power estimate).", ""]
    return lines + _md_table(FINDINGS_COLUMNS, [_finding_cells(f, False) for f in findings])


def write_findings(findings: list, out: Path, fmt: str) -> list[Path]:
    """Only the findings table: findings.md, findings.csv (exact numbers, each seed's effect) or findings.json."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {list(FORMATS)}, got {fmt!r}")
    out.mkdir(parents=True, exist_ok=True)
    if fmt == "json":
        path = out / "findings.json"
        path.write_text(json.dumps([f.to_dict() for f in findings], indent=2))
    elif fmt == "csv":
        path = out / "findings.csv"
        with path.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow([*FINDINGS_COLUMNS[:5], "effect", "lo", "hi", "per seed", *FINDINGS_COLUMNS[6:]])
            for finding in findings:
                row, e = _finding_cells(finding, True), finding.effect
                bounds = ["" if v is None else repr(float(v)) for v in (e.value, e.lo, e.hi)]
                writer.writerow([*row[:5], *bounds, " ".join(map(repr, e.values)), *row[6:]])
    else:
        path = out / "findings.md"
        path.write_text("\n".join(findings_markdown(findings)) + "\n")
    return [path]


def _source(report: StudyReport, missing: dict) -> str:
    table = report.table(missing["table"])
    row = next(r for r in table.rows if r.index == missing["row"])
    return row.cells[missing["column"]].source


def write_csv(report: StudyReport, out: Path) -> list[Path]:
    paths = []
    for table in report.tables:
        path = out / f"{table.name}.csv"
        with path.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow([*table.index_columns, *_csv_value_columns(table), "sources"])
            writer.writerows(_csv_rows(table))
        paths.append(path)
    if report.findings:
        paths += write_findings(report.findings, out, "csv")
    path = out / "missing.csv"
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["kind", "table", "row", "column", "reason", "source", "runs"])
        for problem in report.problems:
            writer.writerow(["run", "", "", "", problem.text, "", " ".join(problem.runs)])
        for c in report.missing_cells():
            writer.writerow(["cell", c["table"], "; ".join(f"{k}={v}" for k, v in c["row"].items()), c["column"],
                             c["reason"], _source(report, c), " ".join(c["runs"])])
    paths.append(path)
    path = out / "plans.csv"
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["stream", "plan_run", "status", "seed", "chunks", "protocols", "lines"])
        for p in report.plans:
            writer.writerow([p["stream_kind"], p["run"], p["status"], p["seed"], p["chunks"], " ".join(p["protocols"]),
                             " ".join(p["lines"])])
    paths.append(path)
    return paths


def write_json(report: StudyReport, out: Path) -> list[Path]:
    path = out / "report.json"
    path.write_text(json.dumps(report.to_dict(), indent=2))
    return [path]


def write(report: StudyReport, out: Path, fmt: str) -> list[Path]:
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {list(FORMATS)}, got {fmt!r}")
    out.mkdir(parents=True, exist_ok=True)
    return {"markdown": write_markdown, "csv": write_csv, "json": write_json}[fmt](report, out)
