"""The study's tables from the record (no model is run): time and storage per chunk, the ST-JT gap, the continual
metrics (BWT/FWT), sharpness, accuracy and cost by width for slimmable lines (orchestrator.report.widths), transfer
scores by chunk and their correlation with upstream accuracy (orchestrator.report.transfer); and the problems with the
record (runs missing or unfinished).

    tables = build_tables(study); problems = record_problems(study)

Keys follow the naming contract: chunk runs `train_seconds`, `wall_seconds`, `device_hours`, `data_kept_rows`,
`data_kept_bytes`, `model_state_bytes`, `stored_bytes` (their sum), `checkpoint_bytes` (orchestrator.train.accounting:
the data a line keeps, apart from its model state); plan runs `{line}.{name}.{avg_acc|bwt|fwt|forgetting}`
(+ `{name}_top5`),
`{line}.{name}.st_jt_gap` and `{line}.{name}.st_jt_gap_by_chunk` (step = chunk), and per `eval.downstream` set
`{line}.{set}.{name}.st_jt_gap[_by_chunk]` with their mean over the sets as set `downstream`; eval runs
`sharpness_eps{e}` (one column per epsilon logged or in a plan's `eval.sharpness.epsilons`) and `{set}.{name}_top1`.
A key the runs lack is a missing cell, never a zero.

A line run with several seeds (one plan run per seed, the same study: orchestrator.report.collect) gives each cell
as the mean over the seeds with n and a 95% t-interval (orchestrator.report.model.aggregate); the ST-JT gap pairs
each seed's line with the joint line of the same seed.
"""

from __future__ import annotations

import json
import re
from typing import Callable

from evaluators.continual import st_jt_gap
from orchestrator.report.collect import Entry, PlanRecord, Study
from orchestrator.report.model import Cell, Problem, ReportTable, Row
from orchestrator.report.seeds import joint_of, over_seeds, seed_note
from orchestrator.report.transfer import transfer_tables
from orchestrator.report.widths import width_tables
from orchestrator.tracking import tags as tr

RESOURCE_COLUMNS = ("train_seconds", "wall_seconds", "device_hours", "data_kept_rows", "data_kept_bytes",
                    "model_state_bytes", "stored_bytes", "checkpoint_bytes")
CONTINUAL_METRICS = ("avg_acc", "bwt", "fwt", "forgetting")
_SHARPNESS = re.compile(r"^sharpness_eps(\d+(?:\.\d+)?(?:e-?\d+)?)$")


def _line_index(entry: Entry) -> dict[str, str]:
    return {"method": entry.line.method, "paradigm": entry.line.paradigm, "stream": entry.stream_kind,
            "line": entry.line.id, "strategy": entry.line.label}


def _chunk_run_cell(entry: Entry, chunk: int, key: str) -> Cell:
    run = entry.plan.slot(entry.line.id, chunk).chunk_run
    if run is None:
        return Cell(source=key, missing="no chunk run")
    runs = (run.info.run_id,)
    if run.info.status != "FINISHED":
        return Cell(runs=runs, source=key, missing=f"chunk run {run.info.status}")
    metrics = run.data.metrics
    if key == "stored_bytes" and key in metrics and "data_kept_bytes" not in metrics:
        return Cell(runs=runs, source=key, missing="not logged (recorded before data_kept_bytes: its stored_bytes "
                    "is the checkpoint's)")
    if key == "stored_bytes" and key not in metrics and "model_state_bytes" in metrics:
        return Cell(metrics["data_kept_bytes"] + metrics["model_state_bytes"], runs,
                    "data_kept_bytes + model_state_bytes")
    return Cell.of(metrics.get(key), runs, key, "not logged")


def resources_table(study: Study) -> ReportTable:
    table = ReportTable("resources", "Time and storage per chunk (chunk runs): the data a line keeps (JT every chunk "
                        "so far, replay its buffer, ST none) apart from its model state (checkpoint less buffers; "
                        "MAS's Omega and theta* in it)",
                        ["method", "paradigm", "stream", "line", "strategy", "chunk"], list(RESOURCE_COLUMNS))
    for entry in study.entries:
        for chunk in range(entry.plan.num_chunks):
            index = {**_line_index(entry), "chunk": str(chunk)}
            table.rows.append(Row(index, over_seeds(entry, lambda e, c=chunk: {
                k: _chunk_run_cell(e, c, k) for k in RESOURCE_COLUMNS})))
    return seed_note(table)


def _plan_missing(plan: PlanRecord, line_id: str) -> str:
    """Why a plan-run metric of a line is absent, as far as the record tells."""
    gaps = plan.line_gaps(line_id)
    if gaps:
        return f"line lacks chunk(s) {', '.join(map(str, gaps))}"
    if plan.status != "FINISHED":
        return f"not logged, plan run {plan.status}"
    return "not logged"


def _max_chunks(study: Study) -> int:
    return max((e.plan.num_chunks for e in study.entries), default=0)


def gap_table(study: Study, name: str) -> ReportTable:
    T = _max_chunks(study)
    columns = [f"chunk {c}" for c in range(T)] + ["final"]
    table = ReportTable(f"st_jt_gap.{name}", f"ST-JT gap, {name} top-1 (JT minus ST average accuracy over the "
                        "tasks seen)", ["method", "paradigm", "stream", "line", "strategy"], columns)
    for entry in study.entries:
        line, plan = entry.line, entry.plan
        if line.base == "joint" or name not in plan.protocols:
            continue
        joint = study.entry(entry.stream_kind, f"{line.method}-joint")
        if joint is None:
            table.notes.append(f"{entry.stream_kind} {line.id}: no {line.method}-joint line to compare with")
            continue
        table.rows.append(Row(_line_index(entry), over_seeds(entry, lambda e: _paired(
            e, joint, T, lambda j: _gap_cells(e, j, name, T)))))
    return seed_note(table)


def _paired(part: Entry, joint: Entry, T: int, cells_of: Callable[[Entry], dict[str, Cell]]) -> dict[str, Cell]:
    """`cells_of` the joint entry of `part`'s seed, or every column missing when the joint line lacks that seed."""
    paired = joint_of(part, joint)
    if paired is not None:
        return cells_of(paired)
    why = f"no {joint.line.id} plan run with seed {part.plan.seed}"
    return {c: Cell(runs=(part.plan.run_id,), source=joint.line.id, missing=why)
            for c in [*(f"chunk {c}" for c in range(T)), "final"]}


def downstream_gap_table(study: Study, data_set: str, name: str) -> ReportTable:
    """The ST-JT gap on one `eval.downstream` set (or, for `downstream`, the mean over a plan's sets): JT's top-1
    minus the line's after each chunk; from the plan run's metrics, else from the two lines' eval runs."""
    T = _max_chunks(study)
    what = "mean over the downstream sets" if data_set == "downstream" else f"downstream set {data_set}"
    table = ReportTable(f"st_jt_gap.{data_set}.{name}", f"ST-JT gap, {name} top-1 on the {what} (JT minus ST)",
                        ["method", "paradigm", "stream", "line", "strategy"], [f"chunk {c}" for c in range(T)] + ["final"])
    for entry in study.entries:
        line, plan = entry.line, entry.plan
        sets = plan.downstream
        if line.base == "joint" or name not in plan.protocols or not sets or (
                data_set != "downstream" and data_set not in sets):
            continue
        joint = study.entry(entry.stream_kind, f"{line.method}-joint")
        if joint is None:
            table.notes.append(f"{entry.stream_kind} {line.id}: no {line.method}-joint line to compare with")
            continue
        members = sets if data_set == "downstream" else [data_set]
        table.rows.append(Row(_line_index(entry), over_seeds(entry, lambda e: _paired(
            e, joint, T, lambda j: _downstream_gap_cells(e, j, data_set, name, members, T)))))
    return seed_note(table)


def _downstream_gap_cells(entry: Entry, joint: Entry, data_set: str, name: str, members: list[str],
                          T: int) -> dict[str, Cell]:
    plan = entry.plan
    prefix = f"{entry.line.id}.{data_set}.{name}"
    by_chunk, final = plan.history(f"{prefix}.st_jt_gap_by_chunk"), plan.metric(f"{prefix}.st_jt_gap")
    keys = [f"{d}.{name}_top1" for d in members]
    cells = {}
    for c in range(T):
        if c >= plan.num_chunks:
            cells[f"chunk {c}"] = Cell(na=f"the plan has {plan.num_chunks} chunks")
        elif c in by_chunk:
            cells[f"chunk {c}"] = Cell.of(by_chunk[c], (plan.run_id,), f"{prefix}.st_jt_gap_by_chunk",
                                          "logged as NaN")
        else:
            cells[f"chunk {c}"] = _eval_run_gap(entry, joint, c, keys)
    if final is not None:
        cells["final"] = Cell.of(final, (plan.run_id,), f"{prefix}.st_jt_gap", "logged as NaN")
    else:
        cells["final"] = _eval_run_gap(entry, joint, plan.num_chunks - 1, keys)
    return cells


def _eval_run_gap(entry: Entry, joint: Entry, chunk: int, keys: list[str]) -> Cell:
    """JT's mean of `keys` minus the line's, read from the two chunk-`chunk` eval runs."""
    runs, means = [], []
    for side in (joint, entry):
        slot = side.plan.slot(side.line.id, chunk)
        run = slot.eval_run
        source = f"{' + '.join(keys)} of {side.line.id} chunk {chunk}"
        if run is None or run.info.status != "FINISHED":
            if slot.chunk_run is None or slot.chunk_run.info.status != "FINISHED":
                state = "no chunk run" if slot.chunk_run is None else f"chunk run {slot.chunk_run.info.status}"
            else:
                state = "no eval run" if run is None else f"eval run {run.info.status}"
            return Cell(runs=tuple(runs), source=source, missing=f"{side.line.id} chunk {chunk}: {state}")
        runs.append(run.info.run_id)
        values = [run.data.metrics.get(k) for k in keys]
        if any(v is None for v in values):
            return Cell(runs=tuple(runs), source=source, missing=f"{side.line.id} chunk {chunk}: not logged")
        means.append(sum(values) / len(values))
    return Cell.of(means[0] - means[1], tuple(runs), f"eval runs: JT minus ST of {' + '.join(keys)}",
                   "not a finite number")


def _gap_cells(entry: Entry, joint: Entry, name: str, T: int) -> dict[str, Cell]:
    line, plan = entry.line, entry.plan
    by_chunk_key, final_key = f"{line.id}.{name}.st_jt_gap_by_chunk", f"{line.id}.{name}.st_jt_gap"
    by_chunk = plan.history(by_chunk_key)
    final = plan.metric(final_key)
    if final is None and line.strategy == "sequential" and plan.metric(f"{line.method}.{name}.st_jt_gap") is not None:
        final_key = f"{line.method}.{name}.st_jt_gap"  # the key the plain sequential line had first
        final = plan.metric(final_key)
    st_name, jt_name = f"accuracy_matrix.{line.id}.{name}.json", f"accuracy_matrix.{joint.line.id}.{name}.json"
    fallback_runs = tuple(dict.fromkeys([plan.run_id, joint.plan.run_id]))
    fallback_source = f"{jt_name} - {st_name}"
    fallback = None
    if final is None or any(c not in by_chunk for c in range(plan.num_chunks)):
        st, jt = plan.matrix(st_name), joint.plan.matrix(jt_name)
        if st is not None and jt is not None and st.num_tasks == jt.num_tasks:
            fallback = st_jt_gap(st, jt)
    why = _plan_missing(plan, line.id)
    if joint.plan.line_gaps(joint.line.id) and why == "not logged":
        why = f"{joint.line.id} lacks chunk(s) {', '.join(map(str, joint.plan.line_gaps(joint.line.id)))}"

    def cell(value, key, from_matrix):
        if value is not None:
            return Cell.of(value, (plan.run_id,), key, "logged as NaN")
        if from_matrix is not None:
            return Cell.of(from_matrix, fallback_runs, fallback_source, "unknown (accuracy-matrix entries unknown)")
        return Cell(runs=(plan.run_id,), source=f"{key} or {fallback_source}", missing=why)

    cells = {}
    for c in range(T):
        if c >= plan.num_chunks:
            cells[f"chunk {c}"] = Cell(na=f"the plan has {plan.num_chunks} chunks")
        else:
            cells[f"chunk {c}"] = cell(by_chunk.get(c), by_chunk_key, fallback.per_chunk[c] if fallback else None)
    cells["final"] = cell(final, final_key, fallback.final if fallback else None)
    return cells


def continual_table(study: Study, name: str) -> ReportTable:
    columns = [*CONTINUAL_METRICS, *(f"{m}_top5" for m in CONTINUAL_METRICS)]
    table = ReportTable(f"continual.{name}", f"Continual metrics, {name} (top-1, and top-5 as *_top5)",
                        ["method", "paradigm", "stream", "line", "strategy"], columns)
    for entry in study.entries:
        if name not in entry.plan.protocols:
            continue
        table.rows.append(Row(_line_index(entry), over_seeds(entry, lambda e: _continual_cells(e, name, columns))))
    return seed_note(table)


def _continual_cells(entry: Entry, name: str, columns: list[str]) -> dict[str, Cell]:
    plan, line = entry.plan, entry.line
    cells = {}
    for column in columns:
        metric, top5 = column.removesuffix("_top5"), column.endswith("_top5")
        key = f"{line.id}.{name}{'_top5' if top5 else ''}.{metric}"
        if metric == "fwt" and not plan.baseline:
            cells[column] = Cell(runs=(plan.run_id,), source=key, na="eval.baseline is off")
        else:
            cells[column] = Cell.of(plan.metric(key), (plan.run_id,), key, _plan_missing(plan, line.id))
    return cells


def _sharpness_keys(run) -> list[str]:
    return [k for k in run.data.metrics if _SHARPNESS.match(k)] if run is not None else []


def _specified_sharpness(plan: PlanRecord) -> set[str]:
    """The sharpness keys a plan's `eval.sharpness.epsilons` asks for (none when the plan turned sharpness off)."""
    try:
        epsilons = json.loads(plan.run.data.params["eval.sharpness.epsilons"])
        return {f"sharpness_eps{float(e):g}" for e in epsilons}
    except (KeyError, ValueError, TypeError):
        return set()


def _sharpness_cell(entry: Entry, chunk: int, key: str, asked: set[str]) -> Cell:
    slot = entry.plan.slot(entry.line.id, chunk)
    if asked and key not in asked and key not in _sharpness_keys(slot.eval_run):
        return Cell(runs=(entry.plan.run_id,), source=key, na="not in the plan's eval.sharpness.epsilons")
    if slot.chunk_run is None:
        return Cell(source=key, missing="no chunk run")
    if slot.eval_run is None:
        return Cell(runs=(slot.chunk_run.info.run_id,), source=key, missing="no eval run")
    if slot.eval_run.info.status != "FINISHED":
        return Cell(runs=(slot.eval_run.info.run_id,), source=key, missing=f"eval run {slot.eval_run.info.status}")
    return Cell.of(slot.eval_run.data.metrics.get(key), (slot.eval_run.info.run_id,), key, "not logged")


def sharpness_table(study: Study) -> ReportTable:
    """Per line and chunk, from the eval runs; one column per epsilon logged or asked for by a plan's
    `eval.sharpness.epsilons`; only the chunks (of plans) where sharpness was asked for or measured."""
    evaluated: dict[str, set[int]] = {}  # plan run -> chunks with sharpness asked for or measured on some line
    asked: dict[str, set[str]] = {}  # plan run -> the keys its spec asks for
    keys: set[str] = set()
    for entry in study.entries:
        for part in entry.per_seed():
            plan = part.plan
            asked[plan.run_id] = _specified_sharpness(plan)
            keys |= asked[plan.run_id]
            for chunk in range(plan.num_chunks):
                found = _sharpness_keys(plan.slot(part.line.id, chunk).eval_run)
                keys.update(found)
                if found or asked[plan.run_id]:
                    evaluated.setdefault(plan.run_id, set()).add(chunk)
    columns = sorted(keys, key=lambda k: float(_SHARPNESS.match(k).group(1)))
    table = ReportTable("sharpness", "Sharpness: relative accuracy drop under the worst weight perturbation "
                        "||z|| <= eps ||theta|| (eval runs)", ["method", "paradigm", "stream", "line", "strategy",
                                                              "chunk"], columns)
    for plan in study.plans:
        if plan.run_id not in evaluated:
            table.notes.append(f"stream {plan.stream_kind} (plan run {plan.run_id}): sharpness was not evaluated "
                               "(eval.sharpness is off and no eval run logs sharpness_eps*)")
    for entry in study.entries:
        chunks = sorted(set().union(*(evaluated.get(p.plan.run_id, set()) for p in entry.per_seed())))
        for chunk in chunks:
            table.rows.append(Row({**_line_index(entry), "chunk": str(chunk)}, over_seeds(entry, lambda e, c=chunk: {
                key: _sharpness_cell(e, c, key, asked.get(e.plan.run_id, set())) for key in columns})))
    return seed_note(table)


SEGMENT_COLUMNS = ("stream_batches", "segment_batches", "late_batches", "dropped_steps", "skipped_shards",
                   "wall_seconds", "data_kept_bytes", "model_state_bytes", "stored_bytes")


def segments_table(study: Study, names: list[str]) -> ReportTable:
    """Online plans: every segment of every line (segment run -> checkpoint -> its evaluation's top-1)."""
    columns = [*SEGMENT_COLUMNS[:2], *(f"{n}_top1" for n in names), *SEGMENT_COLUMNS[2:]]
    table = ReportTable("segments", "Online segments: stream batches, accuracy of each segment's checkpoint, "
                        "deadline misses and skipped shards (segment runs)",
                        ["method", "paradigm", "stream", "line", "strategy", "seed", "segment", "batches", "final"],
                        columns)
    for entry in (part for e in study.entries for part in e.per_seed()):  # every seed's segments, one row each
        if entry.stream_kind != "online":
            continue
        segments = entry.plan.segments.get(entry.line.id, [])
        if not segments:
            table.notes.append(f"line {entry.line.id} (plan run {entry.plan.run_id}): no segment run logged")
        for run in segments:
            tags, metrics, runs = run.data.tags, run.data.metrics, (run.info.run_id,)
            index = {**_line_index(entry), "seed": entry.plan.seed, "segment": tags.get(tr.TAG + "segment", "?"),
                     "batches": tags.get(tr.TAG + "stream_batches", "?"),
                     "final": "yes" if tags.get(tr.TAG + "final_segment") == "true" else ""}
            cells = {}
            for key in columns:
                if key == "skipped_shards" and key not in metrics:
                    cells[key] = Cell(runs=runs, source=key, na="not a polled source")
                elif key.endswith("_top1") and run.info.status != "FINISHED":
                    cells[key] = Cell(runs=runs, source=key, missing=f"segment run {run.info.status}")
                else:
                    cells[key] = Cell.of(metrics.get(key), runs, key, "not logged")
            table.rows.append(Row(index, cells))
    return table


def _chunked(study: Study) -> Study:
    """The study without its online lines: the chunk tables (time per chunk, ST-JT gap, BWT/FWT) do not apply."""
    entries = [e for e in study.entries if e.stream_kind != "online"]
    plans = [p for p in study.plans if p.stream_kind != "online"]
    return Study(study.experiment, study.experiment_id, study.uri, plans, entries, study.notes)


def build_tables(study: Study) -> list[ReportTable]:
    names = list(dict.fromkeys(n for plan in study.plans for n in plan.protocols))
    online = any(e.stream_kind == "online" for e in study.entries)
    transfers = transfer_tables(study)  # the chunked lines' (they need the study's transfer evaluations)
    online_study, study = study, _chunked(study)
    # Every downstream set of any plan, then their mean where some plan has more than one.
    sets = list(dict.fromkeys(d for plan in study.plans for d in plan.downstream))
    if any(len(plan.downstream) > 1 for plan in study.plans):
        sets.append("downstream")
    downstream = [downstream_gap_table(study, d, n) for d in sets for n in names]
    return [resources_table(study), *(gap_table(study, n) for n in names), *downstream,
            *(continual_table(study, n) for n in names), sharpness_table(study), *width_tables(study), *transfers,
            *([segments_table(online_study, names)] if online else [])]


def record_problems(study: Study) -> list[Problem]:
    """The runs the record lacks or that did not finish, for the lines reported."""
    problems = []
    for plan in study.plans:
        if plan.status != "FINISHED":
            why = plan.run.data.tags.get(tr.TAG + "incomplete")
            problems.append(Problem(f"plan run {plan.run_id} (stream {plan.stream_kind}) is {plan.status}"
                                    + (f": {why}" if why else ""), (plan.run_id,)))
    for entry in (part for e in study.entries for part in e.per_seed()):  # every seed's plan run
        plan, line = entry.plan, entry.line
        finished, parts, runs = 0, [], []
        for chunk in range(plan.num_chunks):
            slot = plan.slot(line.id, chunk)
            if slot.chunk_run is None:
                parts.append(f"chunk {chunk}: no chunk run")
                continue
            runs.append(slot.chunk_run.info.run_id)
            if slot.chunk_run.info.status != "FINISHED":
                parts.append(f"chunk {chunk}: chunk run {slot.chunk_run.info.run_id} is {slot.chunk_run.info.status}")
                continue
            finished += 1
            if plan.protocols and slot.eval_run is None:
                parts.append(f"chunk {chunk}: chunk run {slot.chunk_run.info.run_id} has no evaluation run")
            elif plan.protocols and slot.eval_run.info.status != "FINISHED":
                runs.append(slot.eval_run.info.run_id)
                parts.append(f"chunk {chunk}: evaluation run {slot.eval_run.info.run_id} is "
                             f"{slot.eval_run.info.status}")
        for run in plan.segments.get(line.id, []) if entry.stream_kind == "online" else []:
            if run.info.status != "FINISHED":
                runs.append(run.info.run_id)
                parts.append(f"segment {run.data.tags.get(tr.TAG + 'segment')}: segment run {run.info.run_id} is "
                             f"{run.info.status}")
        if parts:
            problems.append(Problem(f"stream {entry.stream_kind}, line {line.id} (plan run {plan.run_id}): "
                                    f"{finished} of {plan.num_chunks} chunk runs FINISHED; " + "; ".join(parts),
                                    tuple(runs)))
    return problems
