"""What a study report is made of: cells that name their source runs, rows, tables, and the report itself.

A cell holds a number, or says why it has none: `missing` (the record lacks it: the report is partial) or `na`
(it does not apply, e.g. FWT when the spec turned the baseline off, or a chunk past a shorter plan's last).

A cell of a study run with several seeds aggregates them (`aggregate`): its value is the mean over the n seeds, with
a 95% Student-t interval, mean -/+ t(0.975, n-1) s / sqrt(n) (s the sample standard deviation over the seeds);
`values` holds each seed's number. A seed without its number makes the cell missing, naming that seed.

A single run's number may come with the half-width it was logged with (`half_width`: a few-shot mean's `_ci95` over
episodes), shown as `mean ± half-width`; over seeds the seeds' t-interval takes its place.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Cell:
    value: float | None = None
    runs: tuple[str, ...] = ()  # the MLflow runs the value comes from (or should have come from)
    source: str = ""  # what was read in them: a metric key, artifact names
    missing: str | None = None  # why the record has no value here
    na: str | None = None  # why the cell does not apply
    values: tuple[float, ...] = ()  # over seeds: each seed's number (value is their mean)
    lo: float | None = None  # over seeds: the 95% t-interval of the mean
    hi: float | None = None
    half_width: float | None = None  # logged beside the value: a few-shot mean's 95% interval over its episodes
    shown: str | None = None  # the text of a cell that does not apply, when a few words say why ("n < 4")

    @classmethod
    def of(cls, value: Any, runs: tuple[str, ...], source: str, missing: str) -> Cell:
        """`value` when it is a finite number, else a cell missing for `missing`."""
        if value is None or not math.isfinite(float(value)):
            return cls(runs=runs, source=source, missing=missing)
        return cls(float(value), runs, source)

    @property
    def present(self) -> bool:
        return self.value is not None

    @property
    def n(self) -> int:
        """How many seeds the value is the mean of (1 for a single run's number, 0 without a number)."""
        return len(self.values) if self.values else int(self.value is not None)

    def text(self, exact: bool = False) -> str:
        """The value (full precision when `exact`), `missing: <why>`, or `n/a` (or the cell's `shown` text); over
        seeds, the mean with n and the 95% interval (`0.41 (n=3, 95% CI 0.38..0.44)`); with a logged half-width,
        `0.62 ± 0.013`."""
        if self.value is not None:
            if self.n > 1:
                return (f"{format_number(self.value, exact)} (n={self.n}, 95% CI {format_number(self.lo, exact)}.."
                        f"{format_number(self.hi, exact)})")
            if self.half_width is not None:
                return f"{format_number(self.value, exact)} ± {format_number(self.half_width, exact)}"
            return format_number(self.value, exact)
        if self.missing is not None:
            return f"missing: {self.missing}"
        return self.shown or "n/a"

    def to_dict(self) -> dict[str, Any]:
        return {"value": self.value, "n": self.n, "mean": self.value, "lo": self.lo, "hi": self.hi,
                "values": list(self.values), "runs": list(self.runs), "source": self.source, "missing": self.missing,
                "na": self.na, **({"half_width": self.half_width} if self.half_width is not None else {})}


def t_quantile_975(df: int) -> float:
    """Student's t 0.975 quantile with `df` degrees of freedom (the half-width factor of a 95% interval): the
    closed-form two-sided CDF for integer df, inverted by bisection (no scipy at run time)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")

    def inside(t: float) -> float:  # P(|T| < t)
        theta = math.atan(t / math.sqrt(df))
        c2, total, term = math.cos(theta) ** 2, 1.0, 1.0
        if df % 2:
            if df == 1:
                return 2 * theta / math.pi
            for k in range(1, (df - 1) // 2):
                term *= 2 * k / (2 * k + 1) * c2
                total += term
            return 2 / math.pi * (theta + math.sin(theta) * math.cos(theta) * total)
        for k in range(1, df // 2):
            term *= (2 * k - 1) / (2 * k) * c2
            total += term
        return math.sin(theta) * total

    lo, hi = 0.0, 16.0
    while inside(hi) < 0.95:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if inside(mid) < 0.95 else (lo, mid)
    return (lo + hi) / 2


def aggregate(cells: list[Cell], seeds: list[str]) -> Cell:
    """One cell over seeds (`cells[i]` from the plan run of seed `seeds[i]`): the mean and its 95% t-interval when
    every seed has its number; missing when one lacks it (naming the seed); n/a when it applies to none."""
    runs = tuple(dict.fromkeys(r for c in cells for r in c.runs))
    source = " | ".join(dict.fromkeys(c.source for c in cells if c.source))
    if len(cells) == 1:
        return cells[0]
    missing = [f"seed {seed}: {c.missing}" for c, seed in zip(cells, seeds) if c.missing is not None]
    if missing:
        return Cell(runs=runs, source=source, missing="; ".join(missing))
    if any(c.value is None for c in cells):
        why = next(c.na for c in cells if c.value is None)
        return Cell(runs=runs, source=source, na=why)
    values = tuple(float(c.value) for c in cells)
    n, mean = len(values), sum(values) / len(values)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = t_quantile_975(n - 1) * sd / math.sqrt(n)
    return Cell(mean, runs, source, values=values, lo=mean - half, hi=mean + half)


def format_number(value: float, exact: bool = False) -> str:
    if float(value).is_integer() and abs(value) < 1e15:
        return str(int(value))
    if exact:
        return repr(float(value))
    if abs(value) >= 0.1:
        return f"{value:.4f}".rstrip("0").rstrip(".")
    return f"{value:.4g}"  # 4 significant digits: device-hours, small gaps


@dataclass
class Row:
    index: dict[str, str]  # the identifying columns: stream, line, chunk...
    cells: dict[str, Cell]

    @property
    def runs(self) -> list[str]:
        """Every run the row's cells name, in first-seen order."""
        out: list[str] = []
        for cell in self.cells.values():
            out += [r for r in cell.runs if r not in out]
        return out

    def label(self) -> str:
        return ", ".join(f"{k} {v}" for k, v in self.index.items())


@dataclass
class ReportTable:
    name: str  # file stem: resources, st_jt_gap.knn, continual.knn, sharpness
    title: str
    index_columns: list[str]
    value_columns: list[str]
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def over_seeds(self) -> bool:
        """Whether some cell is a mean over several seeds (then the CSV carries n, lo and hi per column)."""
        return any(cell.n > 1 for row in self.rows for cell in row.cells.values())

    def missing_cells(self) -> list[dict[str, Any]]:
        return [{"table": self.name, "row": row.index, "column": column, "reason": cell.missing,
                 "runs": list(cell.runs)}
                for row in self.rows for column, cell in row.cells.items() if cell.missing is not None]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "title": self.title, "index_columns": self.index_columns,
                "value_columns": self.value_columns, "notes": self.notes,
                "rows": [{"index": row.index, "runs": row.runs,
                          "cells": {c: cell.to_dict() for c, cell in row.cells.items()}} for row in self.rows]}


@dataclass
class Problem:
    """A run the record lacks or that did not finish, with the runs concerned."""

    text: str
    runs: tuple[str, ...] = ()


@dataclass
class StudyReport:
    experiment: str
    experiment_id: str
    tracking_uri: str
    plans: list[dict[str, Any]]  # one per plan run reported: run id, stream kind, status, lines, chunks
    tables: list[ReportTable]
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    figures: list[dict[str, Any]] = field(default_factory=list)  # path (in --out), artifact, run id, what
    # The studies' claims checked against the runs (orchestrator.report.findings.Finding); a claim whose runs are
    # missing is a row saying so, and does not make the report incomplete (an experiment runs one study).
    findings: list[Any] = field(default_factory=list)

    def missing_cells(self) -> list[dict[str, Any]]:
        return [cell for table in self.tables for cell in table.missing_cells()]

    @property
    def complete(self) -> bool:
        return not self.problems and not self.missing_cells()

    def table(self, name: str) -> ReportTable:
        for table in self.tables:
            if table.name == name:
                return table
        raise KeyError(f"no table {name!r}; tables: {[t.name for t in self.tables]}")

    def to_dict(self) -> dict[str, Any]:
        return {"experiment": self.experiment, "experiment_id": self.experiment_id,
                "tracking_uri": self.tracking_uri, "complete": self.complete, "plans": self.plans,
                "tables": [t.to_dict() for t in self.tables],
                "problems": [{"text": p.text, "runs": list(p.runs)} for p in self.problems],
                "missing_cells": self.missing_cells(), "notes": self.notes, "figures": self.figures,
                "findings": [f.to_dict() for f in self.findings]}
