"""What a study report is made of: cells that name their source runs, rows, tables, and the report itself.

A cell holds a number, or says why it has none: `missing` (the record lacks it: the report is partial) or `na`
(it does not apply, e.g. FWT when the spec turned the baseline off, or a chunk past a shorter plan's last).
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

    @classmethod
    def of(cls, value: Any, runs: tuple[str, ...], source: str, missing: str) -> Cell:
        """`value` when it is a finite number, else a cell missing for `missing`."""
        if value is None or not math.isfinite(float(value)):
            return cls(runs=runs, source=source, missing=missing)
        return cls(float(value), runs, source)

    @property
    def present(self) -> bool:
        return self.value is not None

    def text(self, exact: bool = False) -> str:
        """The value (full precision when `exact`), `missing: <why>`, or `n/a`."""
        if self.value is not None:
            return format_number(self.value, exact)
        if self.missing is not None:
            return f"missing: {self.missing}"
        return "n/a"

    def to_dict(self) -> dict[str, Any]:
        return {"value": self.value, "runs": list(self.runs), "source": self.source, "missing": self.missing,
                "na": self.na}


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
                "missing_cells": self.missing_cells(), "notes": self.notes, "figures": self.figures}
