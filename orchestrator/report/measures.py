"""The measures a claim compares (orchestrator.report.findings): how one line of one plan run gives a number, or
the Reading that says why it cannot (the run or metric that is missing).

    measure = final_gap("linear")                  # the final ST-JT gap, linear top-1
    reading = measure.read(plan_record, line)      # Reading(value, runs read, missing)

Plan-run metrics (`plan_metric`), the final ST-JT gap (`final_gap`), the final accuracy (`final_accuracy`), a metric
of the last chunk's evaluation (`last_eval_metric`), a chunk-run metric summed over the chunks (`chunk_total`,
`STEPS`) and a transfer score of the last chunk's checkpoint (`last_chunk_transfer`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

from orchestrator.report.collect import LineInfo, PlanRecord, line_id


@dataclass(frozen=True)
class Reading:
    value: float | None
    runs: tuple[str, ...] = ()
    missing: str | None = None


@dataclass(frozen=True)
class Measure:
    """What is compared: its name in the table and how one line of one plan run gives it."""

    what: str
    read: Callable[[PlanRecord, LineInfo], Reading]


def _finished(run: Any) -> bool:
    return run is not None and run.info.status == "FINISHED"


def _last_chunk_run(plan: PlanRecord, line: LineInfo, kind: str) -> tuple[Any, Reading | None]:
    """(the line's last chunk `kind` run, "chunk" or "eval", when FINISHED; else None and the Reading saying why)."""
    last = plan.num_chunks - 1
    slot = plan.slot(line.id, last)
    run = slot.chunk_run if kind == "chunk" else slot.eval_run
    if _finished(run):
        return run, None
    state = f"no {kind} run" if run is None else f"{kind} run {run.info.status}"
    return None, Reading(None, (plan.run_id,), f"{line.id} chunk {last} of plan run {plan.run_id}: {state}")


def plan_metric(template: str, what: str) -> Measure:
    """A plan-run metric, `template` formatted with the line id (`{line}.linear.bwt`)."""

    def read(plan: PlanRecord, line: LineInfo) -> Reading:
        key = template.format(line=line.id)
        value = plan.metric(key)
        if value is None or not math.isfinite(value):
            return Reading(None, (plan.run_id,), f"{key} not logged on plan run {plan.run_id} ({plan.status})")
        return Reading(float(value), (plan.run_id,))

    return Measure(what, read)


def final_gap(name: str) -> Measure:
    """The final ST-JT gap (JT minus the line's average accuracy), from `{line}.{name}.st_jt_gap`, else from the
    two accuracy matrices when the plan holds the joint line too (as the report's gap table)."""

    def read(plan: PlanRecord, line: LineInfo) -> Reading:
        from evaluators.continual import st_jt_gap

        key = f"{line.id}.{name}.st_jt_gap"
        value = plan.metric(key)
        if value is not None and math.isfinite(value):
            return Reading(float(value), (plan.run_id,))
        joint = line_id(line.method, "joint")
        st, jt = plan.matrix(f"accuracy_matrix.{line.id}.{name}.json"), plan.matrix(f"accuracy_matrix.{joint}.{name}.json")
        if st is not None and jt is not None and st.num_tasks == jt.num_tasks:
            gap = st_jt_gap(st, jt).final
            if gap is not None and math.isfinite(gap):
                return Reading(float(gap), (plan.run_id,))
        return Reading(None, (plan.run_id,), f"{key} not logged on plan run {plan.run_id} ({plan.status}) and no "
                                             f"accuracy matrices of {line.id} and {joint} there")

    return Measure(f"final ST-JT gap, {name} top-1", read)


def final_accuracy(name: str) -> Measure:
    """The line's accuracy at the end of its stream: an online line's `{line}.{name}_top1` on its plan run (else its
    final segment run's `{name}_top1`); a chunked line's last chunk evaluation `{name}_top1`."""

    def read(plan: PlanRecord, line: LineInfo) -> Reading:
        if plan.stream_kind == "online":
            value = plan.metric(f"{line.id}.{name}_top1")
            if value is not None:
                return Reading(float(value), (plan.run_id,))
            from orchestrator.tracking import tags as tr

            final = [r for r in plan.segments.get(line.id, []) if r.data.tags.get(tr.FINAL_SEGMENT) == "true"]
            if final and _finished(final[-1]) and f"{name}_top1" in final[-1].data.metrics:
                return Reading(float(final[-1].data.metrics[f"{name}_top1"]), (final[-1].info.run_id,))
            return Reading(None, (plan.run_id,), f"{line.id}.{name}_top1 not logged on online plan run "
                                                 f"{plan.run_id} ({plan.status}) and no finished final segment run")
        run, missing = _last_chunk_run(plan, line, "eval")
        if missing is not None:
            return missing
        value = run.data.metrics.get(f"{name}_top1")
        if value is None:
            return Reading(None, (run.info.run_id,), f"{name}_top1 not logged on eval run {run.info.run_id}")
        return Reading(float(value), (run.info.run_id,))

    return Measure(f"final {name} top-1", read)


def last_eval_metric(key: str, what: str) -> Measure:
    """`key` of the line's last chunk evaluation run (sharpness_eps0.1, ...)."""

    def read(plan: PlanRecord, line: LineInfo) -> Reading:
        run, missing = _last_chunk_run(plan, line, "eval")
        if missing is not None:
            return missing
        if key not in run.data.metrics:
            return Reading(None, (run.info.run_id,), f"{key} not logged on eval run {run.info.run_id}")
        return Reading(float(run.data.metrics[key]), (run.info.run_id,))

    return Measure(what, read)


def chunk_total(key: str, what: str, last_only: bool = False) -> Measure:
    """The sum of `key` over the line's chunk runs (or, `last_only`, the last chunk run's `key`); an online line's
    one run (its chunk 0) counts as its only chunk."""

    def read(plan: PlanRecord, line: LineInfo) -> Reading:
        chunks = [plan.num_chunks - 1] if last_only else range(plan.num_chunks)
        total, runs = 0.0, []
        for chunk in chunks:
            run = plan.slot(line.id, chunk).chunk_run
            if not _finished(run):
                state = "no chunk run" if run is None else f"chunk run {run.info.status}"
                return Reading(None, (plan.run_id, *runs), f"{line.id} chunk {chunk} of plan run {plan.run_id}: {state}")
            runs.append(run.info.run_id)
            value = run.data.metrics.get(key)
            if key == "steps" and "online_steps" in run.data.metrics:
                # An online run's total is online_steps; its `steps` is a per-batch metric (the last batch's count).
                value = run.data.metrics["online_steps"]
            if value is None:
                return Reading(None, tuple(runs), f"{key} not logged on chunk run {run.info.run_id}")
            total += float(value)
        return Reading(total, tuple(runs))

    return Measure(what, read)


STEPS = chunk_total("steps", "optimizer steps")


def last_chunk_transfer(score: str, what: str) -> Measure:
    """`score` (e.g. `linear_top1`) of a transfer evaluation of the line's last chunk checkpoint (`eval.transfer`,
    `streamssl eval`): the FINISHED one on the downstream set first by name, of the trained weights (not an
    `init=random` baseline)."""

    def read(plan: PlanRecord, line: LineInfo) -> Reading:
        run, missing = _last_chunk_run(plan, line, "chunk")
        if missing is not None:
            return missing
        last = plan.num_chunks - 1
        done = sorted((t for t in plan.transfers if t.evaluates == run.info.run_id and t.status == "FINISHED"
                       and t.params.get("init", "checkpoint") == "checkpoint" and score in t.scores),
                      key=lambda t: t.data_set)
        if not done:
            return Reading(None, (run.info.run_id,), f"no transfer evaluation with {score} of {line.id} chunk {last} "
                                                     f"(chunk run {run.info.run_id}): add an eval.transfer entry")
        return Reading(float(done[0].scores[score]), (done[0].run_id,))

    return Measure(what, read)


__all__ = ["Measure", "Reading", "STEPS", "chunk_total", "final_accuracy", "final_gap", "last_chunk_transfer",
           "last_eval_metric", "plan_metric"]
