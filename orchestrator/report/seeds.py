"""Cells over the seeds of a study: each seed's plan run gives its cells, `aggregate` makes one of them (the mean,
n and a 95% Student-t interval; orchestrator.report.model), and the ST-JT gap pairs a seed's line with the joint
line of the same seed.

    cells = over_seeds(entry, lambda e: {"avg_acc": Cell.of(e.plan.metric(key), (e.plan.run_id,), key, "not logged")})
"""

from __future__ import annotations

from typing import Callable

from orchestrator.report.collect import Entry
from orchestrator.report.model import Cell, ReportTable, aggregate

SEEDS_NOTE = ("cells over several seeds: the mean, with n and a 95% Student-t interval over the seeds "
              "(mean -/+ t(0.975, n-1) s / sqrt(n))")


def over_seeds(entry: Entry, cells_of: Callable[[Entry], dict[str, Cell]]) -> dict[str, Cell]:
    """`cells_of` of each seed's plan run of the entry, aggregated (a single plan run's cells as they are)."""
    parts = entry.per_seed()
    per = [cells_of(part) for part in parts]
    if len(per) == 1:
        return per[0]
    return {column: aggregate([cells[column] for cells in per], [p.plan.seed for p in parts]) for column in per[0]}


def joint_of(part: Entry, joint: Entry) -> Entry | None:
    """The joint line's entry to compare one seed's line with: its plan run of the same seed (the joint line's only
    plan run when it has one)."""
    if not joint.seeds:
        return Entry(joint.stream_kind, joint.line, joint.plan)
    return next((j for j in joint.per_seed() if j.plan.seed == part.plan.seed), None)


def seed_note(table: ReportTable) -> ReportTable:
    if table.over_seeds:
        table.notes.append(SEEDS_NOTE)
    return table
