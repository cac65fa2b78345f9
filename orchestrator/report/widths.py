"""Accuracy against width for slimmable lines (US3L, US-Net): a table per protocol and a PNG, from the eval run of
each line's last chunk (`{name}_top1_w{width}`, `params_w{width}`, `macs_w{width}`: orchestrator.evaluate.evaluation).

    tables = width_tables(study)                     # [] when no line logs per-width metrics
    pngs = width_figures(study, out / "figures")     # [(path, plan run ids, what)]

A line whose last eval run logs no per-width metric is not a slimmable line and has no row; a slimmable line whose
last chunk has no finished eval run has a row of missing cells. Several seeds: each cell's mean with n and a 95%
t-interval (as every other table).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from orchestrator.report.collect import Entry, Study
from orchestrator.report.model import Cell, ReportTable, Row
from orchestrator.report.seeds import over_seeds, seed_note

_WIDTH = re.compile(r"^(?P<metric>.+)_w(?P<width>[01]\.\d+)$")
COST_METRICS = ("params", "macs")


def _last_eval(entry: Entry):
    return entry.plan.slot(entry.line.id, entry.plan.num_chunks - 1).eval_run


def _widths(entry: Entry, metric: str) -> list[str]:
    """The width texts ('1.0', '0.5') of `{metric}_w*` in the last chunk's eval run of any seed of `entry`."""
    found = set()
    for part in entry.per_seed():
        run = _last_eval(part)
        for key in run.data.metrics if run is not None else ():
            match = _WIDTH.match(key)
            if match and match["metric"] == metric:
                found.add(match["width"])
    return sorted(found, key=float, reverse=True)


def _cell(entry: Entry, key: str) -> Cell:
    run = _last_eval(entry)
    if run is None:
        return Cell(source=key, missing=f"no eval run of chunk {entry.plan.num_chunks - 1}")
    if run.info.status != "FINISHED":
        return Cell(runs=(run.info.run_id,), source=key, missing=f"eval run {run.info.status}")
    return Cell.of(run.data.metrics.get(key), (run.info.run_id,), key, "not logged")


def _index(entry: Entry) -> dict[str, str]:
    return {"method": entry.line.method, "stream": entry.stream_kind, "line": entry.line.id,
            "strategy": entry.line.label}


def _table(study: Study, metric: str, name: str, title: str) -> ReportTable | None:
    rows = [(entry, _widths(entry, metric)) for entry in study.entries]
    rows = [(entry, widths) for entry, widths in rows if widths]
    if not rows:
        return None
    widths = sorted({w for _, ws in rows for w in ws}, key=float, reverse=True)
    table = ReportTable(name, title, ["method", "stream", "line", "strategy"], [f"w{w}" for w in widths])
    for entry, _ in rows:
        table.rows.append(Row(_index(entry), over_seeds(entry, lambda e: {
            f"w{w}": _cell(e, f"{metric}_w{w}") for w in widths})))
    return seed_note(table)


def width_tables(study: Study) -> list[ReportTable]:
    """`accuracy_by_width.{name}` per protocol, then `cost_by_width.{params|macs}`; none without slimmable lines."""
    names = list(dict.fromkeys(n for plan in study.plans for n in plan.protocols))
    tables = [_table(study, f"{name}_top1", f"accuracy_by_width.{name}",
                     f"{name} top-1 against width after the last chunk (eval run; BN recalibrated per width)")
              for name in names]
    tables += [_table(study, metric, f"cost_by_width.{metric}",
                      f"{metric} of one image at each width (eval run of the last chunk)") for metric in COST_METRICS]
    return [t for t in tables if t is not None]


def width_figures(study: Study, folder: Path) -> list[tuple[Path, list[str], str]]:
    """One PNG per protocol and stream kind: top-1 against width, a curve per slimmable line (seeds: their mean)."""
    from evaluators.report import plot_metric_curves

    out = []
    for table in width_tables(study):
        if not table.name.startswith("accuracy_by_width."):
            continue
        name = table.name.split(".", 1)[1]
        widths = [float(c[1:]) for c in table.value_columns]
        for kind in dict.fromkeys(row.index["stream"] for row in table.rows):
            rows = [row for row in table.rows if row.index["stream"] == kind]
            series = {row.index["line"]: [row.cells[c].value if row.cells[c].present else math.nan
                                          for c in table.value_columns] for row in rows}
            png = plot_metric_curves(series, folder / kind / f"accuracy_by_width.{name}.png", x=widths,
                                     title=f"{name} top-1 against width after the last chunk ({kind})",
                                     ylabel=f"{name} top-1", xlabel="width multiplier", integer_x=False)
            plans = list(dict.fromkeys(study.entry(kind, row.index["line"]).plan.run_id for row in rows))
            out.append((png, plans, f"{name} top-1 by width, stream {kind} (last chunk's eval runs' "
                                    f"{name}_top1_w*)"))
    return out


__all__ = ["width_figures", "width_tables"]
