"""One experiment's study record, read from MLflow: its plan runs (one per stream kind), each plan's lines, chunk
and evaluation runs, and the metrics and artifacts the report's tables read.

    study = collect(tracker, "streaming-imagenet")      # ReportError for an unknown experiment
    entry = study.entry("random_class", "simclr-joint")   # the line and the plan run it is reported from
    entry.plan.slot("simclr-joint", 2).chunk_run; entry.plan.metric("simclr-joint.knn.bwt")

What a plan should hold (its lines, chunk count, evaluation protocols) comes from the plan run itself: the
`streamssl.lines` / `streamssl.num_chunks` tags, else the spec's flattened params, so a line or chunk with no run
at all is still known to be missing. Each line of a stream kind is reported from the newest plan run holding it
(plans run apart, e.g. SSL and SL, are put side by side), and from the plan runs of the same study with other seeds:
plan runs tagged with the same `streamssl.study_key` (the plan key without the spec's `seed`, `--set seed=k`) are
one study, one plan run per seed (the newest: a re-run of a seed supersedes the older run), and the report's cells
aggregate over them. A plan run without the tag (recorded before it) is a study of its own, as before: the newest
plan run holding a line supersedes the older ones.

Transfer evaluation runs (`streamssl eval`, a spec's `eval.transfer`: eval runs tagged `streamssl.eval_task`, nested
under the chunk or segment run they evaluate) are `study.transfers`, one `TransferEval` per evaluated run, task, set
and options (the newest FINISHED of repeated evaluations); they are never a chunk's own evaluation (`Slot.eval_run`).
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evaluators.continual import AccuracyMatrix
from orchestrator.errors import ReportError
from orchestrator.report.transfer_runs import TransferEval, collect_transfers, is_transfer, newest_finished_first
from orchestrator.tracking import tags as tr
from orchestrator.tracking.tracker import Tracker

STREAM_ORDER = ("instance", "random_class", "distant_class", "domain", "online")
AID_LABELS = {"replay": "replay", "mas": "MAS", "cassle": "CaSSLe", "lump": "LUMP"}


@dataclass(frozen=True)
class LineInfo:
    id: str
    method: str
    strategy: str  # base+aid+...

    @property
    def base(self) -> str:
        return self.strategy.split("+")[0]

    @property
    def paradigm(self) -> str:
        return "SL" if self.method == "supervised" else "SSL"

    @property
    def label(self) -> str:
        """ST, ST+replay, ST+MAS, ST+MAS+ (replay and MAS together), JT, ..."""
        aids = self.strategy.split("+")[1:]
        tokens = [AID_LABELS.get(a, a) for a in aids if not ({"replay", "mas"} <= set(aids) and a in ("replay", "mas"))]
        if {"replay", "mas"} <= set(aids):
            tokens.insert(0, "MAS+")
        return "".join([{"sequential": "ST", "joint": "JT"}.get(self.base, self.base), *("+" + t for t in tokens)])

    def order(self) -> tuple:
        aids = set(self.strategy.split("+")[1:])
        rank = {frozenset(): 0, frozenset({"replay"}): 1, frozenset({"mas"}): 2, frozenset({"replay", "mas"}): 3}
        return (self.base == "joint", rank.get(frozenset(aids), 4), self.strategy)


def line_id(method: str, strategy: str) -> str:
    """The planner's line id (`orchestrator.plan.planner.Line.id`), without importing it (it loads torch)."""
    return "-".join([method, *strategy.split("+")])


def _line_from_id(line_id: str) -> LineInfo:
    """A line known only by its id (a chunk run without method/strategy tags): split at its base."""
    for base in ("-sequential", "-joint"):
        if base in line_id:
            method, rest = line_id.split(base, 1)
            return LineInfo(line_id, method, "+".join([base[1:], *[p for p in rest.split("-") if p]]))
    return LineInfo(line_id, line_id, "?")


@dataclass
class Slot:
    """One (line, chunk) of a plan: the chunk run reported (FINISHED if any, else the newest) and its evaluation."""

    chunk_run: Any | None = None
    eval_run: Any | None = None


@dataclass
class PlanRecord:
    tracker: Tracker
    run: Any
    lines: list[LineInfo]
    num_chunks: int
    protocols: list[str]
    baseline: bool
    slots: dict[tuple[str, int], Slot]
    segments: dict[str, list] = field(default_factory=dict)  # online plans: line -> its segment runs, in order
    transfers: list = field(default_factory=list)  # the TransferEvals of this plan's chunk and segment runs
    _history: dict[str, dict[int, float]] = field(default_factory=dict)
    _artifacts: dict[str, Any] = field(default_factory=dict)

    @property
    def run_id(self) -> str:
        return self.run.info.run_id

    @property
    def status(self) -> str:
        return self.run.info.status

    @property
    def stream_kind(self) -> str:
        return self.run.data.tags.get(tr.STREAM_KIND, "?")

    @property
    def study_key(self) -> str:
        """The study the plan run belongs to: its `study_key` tag, else (a record from before it) itself alone."""
        return self.run.data.tags.get(tr.STUDY_KEY) or f"run:{self.run_id}"

    @property
    def seed(self) -> str:
        """The spec's top-level `seed` (its flattened param), "?" when the run does not record it."""
        return self.run.data.params.get("seed", "?")

    @property
    def downstream(self) -> list[str]:
        """The names of the plan's `eval.downstream` sets (from its params), in spec order."""
        sets = _json_param(self.run.data.params, "eval.downstream")
        return [str(d["name"]) for d in sets if isinstance(d, dict) and "name" in d] if isinstance(sets, list) else []

    def slot(self, line: str, chunk: int) -> Slot:
        return self.slots.get((line, chunk), Slot())

    def line(self, line_id: str) -> LineInfo | None:
        return next((line for line in self.lines if line.id == line_id), None)

    def metric(self, key: str) -> float | None:
        return self.run.data.metrics.get(key)

    def history(self, key: str) -> dict[int, float]:
        """step -> value of a plan-run metric logged once per step (the newest point of a step wins)."""
        if key not in self._history:
            points = sorted(self.tracker.client.get_metric_history(self.run_id, key), key=lambda m: m.timestamp)
            self._history[key] = {int(m.step): float(m.value) for m in points}
        return self._history[key]

    def artifact_names(self) -> list[str]:
        if "__names__" not in self._artifacts:
            self._artifacts["__names__"] = sorted(a.path for a in self.tracker.client.list_artifacts(self.run_id)
                                                  if not a.is_dir)
        return self._artifacts["__names__"]

    def matrix(self, artifact: str) -> AccuracyMatrix | None:
        """The accuracy matrix logged as `artifact` (AccuracyMatrix.to_dict JSON), None when not logged."""
        if artifact not in self._artifacts:
            found = None
            if artifact in self.artifact_names():
                with tempfile.TemporaryDirectory() as folder:
                    path = self.tracker.client.download_artifacts(self.run_id, artifact, folder)
                    found = AccuracyMatrix.from_dict(json.loads(Path(path).read_text()))
            self._artifacts[artifact] = found
        return self._artifacts[artifact]

    def line_gaps(self, line_id: str) -> list[int]:
        """Chunks of the line without a FINISHED chunk run or (when the plan evaluates) a FINISHED eval run."""
        out = []
        for chunk in range(self.num_chunks):
            slot = self.slot(line_id, chunk)
            if not _finished(slot.chunk_run) or (self.protocols and not _finished(slot.eval_run)):
                out.append(chunk)
        return out

    def describe(self) -> dict[str, Any]:
        return {"run": self.run_id, "stream_kind": self.stream_kind, "status": self.status, "seed": self.seed,
                "lines": [line.id for line in self.lines], "chunks": self.num_chunks, "protocols": self.protocols}


def _finished(run: Any | None) -> bool:
    return run is not None and run.info.status == "FINISHED"


@dataclass(frozen=True)
class Entry:
    """A line of a stream kind, as reported: the line and the plan run its numbers come from (the newest), and the
    plan runs of its study, one per seed (by seed; empty means `plan` alone)."""

    stream_kind: str
    line: LineInfo
    plan: PlanRecord
    seeds: tuple[PlanRecord, ...] = ()

    def per_seed(self) -> list[Entry]:
        """One entry per seed of the study (a single-seed entry is itself)."""
        if len(self.seeds) <= 1:
            return [Entry(self.stream_kind, self.line, self.plan)]
        return [Entry(self.stream_kind, self.line, plan) for plan in self.seeds]


@dataclass
class Study:
    experiment: str
    experiment_id: str
    uri: str
    plans: list[PlanRecord]  # the plan runs at least one entry comes from
    entries: list[Entry]  # by stream kind, then method, then line (ST, ST+replay, ST+MAS, ST+MAS+, ..., JT)
    notes: list[str]
    # Every plan run of the experiment, superseded ones too: the findings compare variants of a line (RALS on and
    # off, two view recipes) that run as plans of the same line ids and so supersede each other in `entries`.
    records: list[PlanRecord] = field(default_factory=list)
    transfers: list[TransferEval] = field(default_factory=list)  # every plan run's, superseded plans' too

    def entry(self, stream_kind: str, line_id: str) -> Entry | None:
        return next((e for e in self.entries if e.stream_kind == stream_kind and e.line.id == line_id), None)

    @property
    def stream_kinds(self) -> list[str]:
        return list(dict.fromkeys(e.stream_kind for e in self.entries))


def find_experiment(tracker: Tracker, name: str) -> str:
    client = tracker.client
    found = client.get_experiment_by_name(name)
    if found is not None and found.lifecycle_stage == "active":
        return found.experiment_id
    known = sorted(e.name for e in client.search_experiments())
    state = " (it was deleted)" if found is not None else ""
    raise ReportError(f"no MLflow experiment named {name!r} in {tracker.uri}{state}; the experiment is the spec's "
                      f"`name` (or tracking.experiment). Experiments there: {', '.join(known) or 'none'}")


def _json_param(params: dict[str, str], key: str) -> Any:
    try:
        return json.loads(params[key])
    except (KeyError, ValueError):
        return None


def _expected_lines(run: Any, chunk_runs: list) -> list[LineInfo]:
    tags, params = run.data.tags, run.data.params
    lines: dict[str, LineInfo] = {}
    listed = None
    try:
        listed = json.loads(tags[tr.LINES])
    except (KeyError, ValueError):
        pass
    if isinstance(listed, list):
        for entry in listed:
            if isinstance(entry, dict) and {"id", "method", "strategy"} <= set(entry):
                lines[entry["id"]] = LineInfo(entry["id"], entry["method"], entry["strategy"])
    else:  # plan runs from before the tag: the cross-product of the spec's lines, as the planner makes it
        methods, strategies = _json_param(params, "lines.method"), _json_param(params, "lines.strategy")
        if isinstance(methods, list) and isinstance(strategies, list):
            for method in map(str, methods):
                for strategy in map(str, strategies):
                    lines[line_id(method, strategy)] = LineInfo(line_id(method, strategy), method, strategy)
    for chunk_run in chunk_runs:  # a line logged but not planned (an edited record) is reported too
        logged, t = chunk_run.data.tags.get(tr.LINE), chunk_run.data.tags
        if logged and logged not in lines:
            method, strategy = t.get(tr.TAG + "method"), t.get(tr.TAG + "strategy")
            lines[logged] = LineInfo(logged, method, strategy) if method and strategy else _line_from_id(logged)
    methods_order = list(dict.fromkeys(line.method for line in lines.values()))
    return sorted(lines.values(), key=lambda line: (methods_order.index(line.method), line.order()))


def _num_chunks(run: Any, chunk_runs: list) -> int:
    for value in (run.data.tags.get(tr.NUM_CHUNKS), run.data.params.get("stream.chunks")):
        try:
            return int(value)
        except (TypeError, ValueError):
            continue
    chunks = [int(r.data.tags.get(tr.CHUNK, -1)) for r in chunk_runs]
    return max(chunks, default=-1) + 1


def _protocols(run: Any, eval_runs: list) -> list[str]:
    names = _json_param(run.data.params, "eval.every_chunk")
    if isinstance(names, list):
        return [str(n) for n in names]
    seen = {k[: -len("_task0")] for e in eval_runs for k in e.data.metrics if k.endswith("_task0")}
    return sorted(seen)


def _segments(segment_runs: list) -> dict[str, list]:
    """line -> its segment runs by segment index (a segment logged twice: the FINISHED, else the newest)."""
    by_key: dict[tuple[str, int], list] = {}
    for run in segment_runs:
        try:
            key = (run.data.tags[tr.LINE], int(run.data.tags[tr.TAG + "segment"]))
        except (KeyError, ValueError):
            continue
        by_key.setdefault(key, []).append(run)
    out: dict[str, list] = {}
    for (line, _), runs in sorted(by_key.items()):
        out.setdefault(line, []).append(newest_finished_first(runs)[0])
    return out


def _plan_record(tracker: Tracker, run: Any, chunk_runs: list, eval_runs: list,
                 segment_runs: list | None = None) -> PlanRecord:
    by_slot: dict[tuple[str, int], list] = {}
    for chunk_run in chunk_runs:
        try:
            key = (chunk_run.data.tags[tr.LINE], int(chunk_run.data.tags[tr.CHUNK]))
        except (KeyError, ValueError):
            continue
        by_slot.setdefault(key, []).append(chunk_run)
    evals: dict[str, list] = {}
    for eval_run in eval_runs:
        evals.setdefault(eval_run.data.tags.get(tr.EVALUATES, ""), []).append(eval_run)
    slots = {}
    for key, runs in by_slot.items():
        chosen = newest_finished_first(runs)[0]
        evaluated = newest_finished_first(evals.get(chosen.info.run_id, []))
        slots[key] = Slot(chosen, evaluated[0] if evaluated else None)
    # An online plan's line is one job over the whole stream (chunk 0); its T tasks are not chunk runs.
    online = run.data.tags.get(tr.STREAM_KIND) == "online"
    return PlanRecord(tracker, run, _expected_lines(run, chunk_runs), 1 if online else _num_chunks(run, chunk_runs),
                      _protocols(run, eval_runs), run.data.params.get("eval.baseline", "True") != "False", slots,
                      _segments(segment_runs or []))


def collect(tracker: Tracker, experiment: str) -> Study:
    """Every plan run of `experiment` with its chunk and evaluation runs (ReportError when there is none)."""
    experiment_id = find_experiment(tracker, experiment)

    def of_type(run_type: str) -> list:
        return tracker.runs(f"tags.`{tr.RUN_TYPE}` = '{run_type}'", [experiment_id])

    plan_runs, chunk_runs, eval_runs = of_type("plan"), of_type("chunk"), of_type("eval")
    segment_runs = of_type("segment")
    # A transfer evaluation is an eval run nested under the chunk run it evaluates, not the plan run: read apart, so
    # it is never taken for a chunk's own evaluation (the upstream accuracy) whatever its parent.
    transfer_runs = [r for r in eval_runs if is_transfer(r)]
    eval_runs = [r for r in eval_runs if not is_transfer(r)]
    if not plan_runs:
        raise ReportError(f"experiment {experiment!r} in {tracker.uri} holds no streamssl plan run "
                          f"({tr.RUN_TYPE}=plan): nothing to report; `streamssl run SPEC` makes one")
    children: dict[str, dict[str, list]] = {}
    for run in chunk_runs + eval_runs + segment_runs:
        kind = run.data.tags[tr.RUN_TYPE]
        children.setdefault(run.data.tags.get(tr.PARENT, ""), {}).setdefault(kind, []).append(run)
    records = {r.info.run_id: _plan_record(tracker, r, children.get(r.info.run_id, {}).get("chunk", []),
                                           children.get(r.info.run_id, {}).get("eval", []),
                                           children.get(r.info.run_id, {}).get("segment", [])) for r in plan_runs}
    by_kind: dict[str, list[PlanRecord]] = {}
    for record in records.values():
        by_kind.setdefault(record.stream_kind, []).append(record)
    order = {kind: i for i, kind in enumerate(STREAM_ORDER)}
    entries, notes, used = [], [], {}
    for kind in sorted(by_kind, key=lambda k: (order.get(k, len(order)), k)):
        # Each line from the newest plan run of this stream kind that holds it, with the plan runs of the same study
        # (study_key) that have other seeds: a re-run of a seed, or a plan of another study, supersedes an older
        # run, and lines run as separate plans (SSL and SL apart) are put side by side.
        taken: dict[str, tuple[LineInfo, str, dict[str, PlanRecord]]] = {}  # line -> (line, study, seed -> plan)
        for record in sorted(by_kind[kind], key=lambda r: r.run.info.start_time or 0, reverse=True):
            stale = []
            for line in record.lines:
                if line.id not in taken:
                    taken[line.id] = (line, record.study_key, {record.seed: record})
                elif taken[line.id][1] == record.study_key and record.seed not in taken[line.id][2]:
                    taken[line.id][2][record.seed] = record
                else:
                    stale.append(line.id)
                    continue
                used[record.run_id] = record
            if stale:
                notes.append(f"stream {kind}: plan run {record.run_id} is superseded by newer plan run(s) for "
                             f"line(s) {', '.join(stale)}")
        chosen = {}
        for line_id_, (line, _, by_seed) in taken.items():
            plans = [by_seed[s] for s in sorted(by_seed, key=_seed_order)]
            newest = max(plans, key=lambda r: r.run.info.start_time or 0)
            chosen[line_id_] = Entry(kind, line, newest, tuple(plans) if len(plans) > 1 else ())
        # SSL methods first (in the order the plans list them), the supervised baseline last.
        oldest_first = sorted(chosen.values(), key=lambda e: e.plan.run.info.start_time or 0)
        methods = list(dict.fromkeys(e.line.method for e in oldest_first))
        entries += sorted(chosen.values(), key=lambda e: (e.line.paradigm == "SL", methods.index(e.line.method),
                                                          e.line.order()))
    transfers = collect_transfers(transfer_runs, {r.info.run_id: r for r in chunk_runs + segment_runs},
                           {r.run_id: r.seed for r in records.values()})
    for transfer in transfers:
        if transfer.plan_run in records:
            records[transfer.plan_run].transfers.append(transfer)
    stray = [t.run_id for t in transfers if t.plan_run not in records]
    if stray:
        notes.append(f"transfer evaluation run(s) {', '.join(stray)} evaluate a run that is not a chunk or segment "
                     "run of this experiment's plan runs: not reported")
    return Study(experiment, experiment_id, tracker.uri, list(used.values()), entries, notes, list(records.values()),
                 transfers)


def _seed_order(seed: str) -> tuple:
    try:
        return (0, int(seed), seed)
    except ValueError:
        return (1, 0, seed)
