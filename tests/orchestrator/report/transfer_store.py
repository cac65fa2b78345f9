"""A small study record with transfer evaluations of known scores, for the report's transfer tables
(orchestrator.report.transfer): plan, chunk, eval and transfer eval runs written through the Tracker with the tags
the driver and `streamssl eval` (orchestrator.run.transfer._log) write, into a copy of the session's migrated store.

    store = build_transfer_store(migrated_mlflow_store, tmp_path / "mlflow.db")
    store.upstream[("simclr-joint", 2)], store.transfers[("linear", "simclr-joint", 2)]

EXPERIMENT: one random_class plan run, simclr ST and JT over T=3 chunks, a complete record (every table's number
logged), linear top-1 per chunk on the chunks' own eval runs (the upstream accuracy), and on the downstream set `synth`:

- linear on every chunk of both lines (6 points); ST chunk 1 was evaluated three times: an older FINISHED run
  (superseded), the newest FINISHED one (reported) and a FAILED one started last (ignored);
- fewshot 5-way 5-shot on chunks 0 and 2 of both lines (4 points), each mean with its ci95;
- reconstruction on ST chunk 2 and JT chunks 1 and 2 (3 points: no Fisher interval).

The ST line's scores are logged on its chunk runs' LoggedModels (as `streamssl eval` does), the JT line's as plain
run metrics (a record from before LoggedModels); every transfer run also logs unprefixed metrics (row counts).

SEEDED_EXPERIMENT: simclr ST over 2 chunks, seeds 0 and 1 (one study), linear on chunk 1 of both seeds, and seed 0's
chunk 1 also probed with other options (`linear.epochs=100`).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from orchestrator.report.tables import RESOURCE_COLUMNS
from orchestrator.tracking import tags as tr
from orchestrator.tracking.tracker import Tracker

EXPERIMENT, SEEDED_EXPERIMENT = "transfer", "transfer-seeds"
STREAM, METHOD, SET, T = "random_class", "simclr", "synth", 3
ST, JT = "simclr-sequential", "simclr-joint"
UPSTREAM = {ST: (0.40, 0.46, 0.43), JT: (0.41, 0.50, 0.58)}  # linear_top1 of each chunk's own eval run
LINEAR = {ST: (0.30, 0.35, 0.31), JT: (0.33, 0.37, 0.45)}  # synth.linear_top1 (ST chunk 1: the reported run's)
SUPERSEDED, FAILED = 0.99, 0.01  # ST chunk 1's other linear evaluations: older FINISHED, newest FAILED
FEWSHOT = {(ST, 0): (0.52, 0.011), (ST, 2): (0.55, 0.012), (JT, 0): (0.53, 0.010), (JT, 2): (0.61, 0.013)}
RECONSTRUCTION = {(ST, 2): 0.081, (JT, 1): 0.074, (JT, 2): 0.069}
SEEDED_UPSTREAM = {0: (0.40, 0.45), 1: (0.42, 0.49)}
SEEDED_LINEAR = {0: 0.30, 1: 0.34}  # chunk 1's synth.linear_top1 per seed
OTHER_OPTIONS = 0.36  # seed 0 chunk 1, linear.epochs=100


@dataclass
class TransferStore:
    uri: str
    plan: str = ""
    chunk_runs: dict[tuple[str, int], str] = field(default_factory=dict)  # (line, chunk) -> run id
    eval_runs: dict[tuple[str, int], str] = field(default_factory=dict)  # the chunks' own evaluations
    transfers: dict[tuple[str, str, int], str] = field(default_factory=dict)  # (task, line, chunk) -> reported run
    ignored: list[str] = field(default_factory=list)  # the superseded and the FAILED duplicates
    seeded_plans: dict[int, str] = field(default_factory=dict)
    seeded_chunk_runs: dict[tuple[int, int], str] = field(default_factory=dict)  # (seed, chunk) -> run id
    seeded_transfers: dict[tuple[int, str], str] = field(default_factory=dict)  # (seed, "20"|"100") -> run id


class _Clock:
    """Run start times 1 s apart, so "newest" is what the store says."""

    def __init__(self) -> None:
        self.ms = 1_700_000_000_000

    def __call__(self) -> int:
        self.ms += 1000
        return self.ms


def _params(task: str, options: dict[str, str]) -> dict[str, str]:
    return {"task": task, "data.url": f"/data/{SET}", "data.name": SET, "data.train_split": "train",
            "data.eval_split": "val", "seed": "0", "image_size": "16", "norm_rescale": "off", **options}


def _transfer(tracker: Tracker, clock: _Clock, chunk_run: str, line: str, chunk: int, task: str,
              scores: dict[str, float], model_id: str | None, status: str = "FINISHED",
              options: dict[str, str] | None = None) -> str:
    """A transfer evaluation run as orchestrator.run.transfer._log writes it (its params, metrics and scores in one
    batch: the scores are the Metric entities `Tracker.log_model_metrics` logs, or plain ones without a model)."""
    from mlflow.entities import Metric, Param

    params = _params(task, options or {})
    key = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]
    run = tracker.create_run(f"{line}/chunk-{chunk}/{SET}.{task}", {
        tr.RUN_TYPE: "eval", tr.PARENT: chunk_run, tr.EVALUATES: chunk_run, tr.EVAL_TASK: task, tr.EVAL_SET: SET,
        tr.TRANSFER_KEY: key, tr.LINE: line, tr.CHUNK: str(chunk), tr.TAG + "device": "cpu"}, start_ms=clock())
    ts = clock()
    on_model = {"model_id": model_id, "dataset_name": SET, "dataset_digest": "0" * 36} if model_id else {}
    metrics = [Metric(k, v, ts, 0) for k, v in {"train_rows": 120.0, "val_rows": 360.0}.items()]
    metrics += [Metric(f"{SET}.{k}", v, ts, 0, **on_model) for k, v in scores.items()]
    tracker.client.log_batch(run, metrics=metrics, params=[Param(k, v) for k, v in params.items()])
    tracker.end_run(run, status)
    return run


def _plan(tracker: Tracker, clock: _Clock, seed: int, strategies: list[str], chunks: int,
          extra_tags: dict[str, str]) -> str:
    lines = [{"id": "-".join([METHOD, s]), "method": METHOD, "strategy": s} for s in strategies]
    plan = tracker.create_run(f"plan seed {seed}", {
        tr.RUN_TYPE: "plan", tr.PLAN_KEY: f"plan-{seed}", tr.STREAM_KIND: STREAM, tr.LINES: json.dumps(lines),
        tr.NUM_CHUNKS: str(chunks), **extra_tags}, start_ms=clock())
    tracker.log_params(plan, {"seed": str(seed), "stream.chunks": str(chunks), "eval.every_chunk": '["linear"]',
                              "eval.baseline": "True"})
    return plan


def _chunk(tracker: Tracker, clock: _Clock, plan: str, line: str, chunk: int, upstream: float,
           with_model: bool) -> tuple[str, str, str | None]:
    """A FINISHED chunk run (with its resources and, if `with_model`, its checkpoint as a LoggedModel) and its own
    FINISHED evaluation; returns (chunk run, eval run, model id)."""
    run = tracker.create_run(f"{line}/chunk-{chunk}", {
        tr.RUN_TYPE: "chunk", tr.PARENT: plan, tr.LINE: line, tr.CHUNK: str(chunk),
        tr.TAG + "method": METHOD, tr.TAG + "strategy": line.split("-", 1)[1]}, start_ms=clock())
    tracker.log_metrics(run, {**{k: 100.0 + i + chunk for i, k in enumerate(RESOURCE_COLUMNS)},
                              "linear_top1": upstream})  # the headline the driver copies from its evaluation
    model_id = tracker.log_checkpoint_model(run, f"{line}-chunk-{chunk}", chunk, {}, {}) if with_model else None
    tracker.end_run(run, "FINISHED")
    ev = tracker.create_run(f"{line}/chunk-{chunk}/eval", {
        tr.RUN_TYPE: "eval", tr.PARENT: plan, tr.EVALUATES: run, tr.LINE: line, tr.CHUNK: str(chunk)},
        start_ms=clock())
    tracker.log_metrics(ev, {"linear_top1": upstream, "linear_top5": upstream + 0.3})
    tracker.end_run(ev, "FINISHED")
    return run, ev, model_id


def build_transfer_store(template: Path, db: Path) -> TransferStore:
    """EXPERIMENT and SEEDED_EXPERIMENT of the module docstring, in a copy of `template` (a migrated empty store)."""
    db.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(template, db)
    uri, artifacts = f"sqlite:///{db}", (db.parent / "artifacts").as_uri()
    store, clock = TransferStore(uri), _Clock()
    tracker = Tracker(uri, EXPERIMENT, artifacts)
    plan = store.plan = _plan(tracker, clock, 0, ["sequential", "joint"], T, {})
    models = {}
    for line in (ST, JT):
        for chunk in range(T):
            run, ev, models[(line, chunk)] = _chunk(tracker, clock, plan, line, chunk, UPSTREAM[line][chunk],
                                                    with_model=line == ST)
            store.chunk_runs[(line, chunk)], store.eval_runs[(line, chunk)] = run, ev
    # Everything the existing tables read on the plan run, so the record is complete.
    metrics = {f"{line}.linear{top}.{m}": 0.1 for line in (ST, JT) for top in ("", "_top5")
               for m in ("avg_acc", "bwt", "fwt", "forgetting")}
    tracker.log_metrics(plan, {**metrics, f"{ST}.linear.st_jt_gap": 0.05})
    for chunk in range(T):
        tracker.log_metrics(plan, {f"{ST}.linear.st_jt_gap_by_chunk": 0.01 * chunk}, step=chunk)
    tracker.end_run(plan, "FINISHED")

    def transfer(task, line, chunk, scores, status="FINISHED"):
        return _transfer(tracker, clock, store.chunk_runs[(line, chunk)], line, chunk, task, scores,
                         models[(line, chunk)], status, {f"{task}.epochs": "20"} if task == "linear" else {})

    for line in (ST, JT):
        for chunk in range(T):
            if (line, chunk) == (ST, 1):
                store.ignored.append(transfer("linear", line, chunk, {"linear_top1": SUPERSEDED}))
            store.transfers[("linear", line, chunk)] = transfer("linear", line, chunk,
                                                                {"linear_top1": LINEAR[line][chunk]})
            if (line, chunk) == (ST, 1):
                store.ignored.append(transfer("linear", line, chunk, {"linear_top1": FAILED}, "FAILED"))
    for (line, chunk), (mean, ci95) in FEWSHOT.items():
        store.transfers[("fewshot", line, chunk)] = transfer("fewshot", line, chunk, {
            "fewshot_5way5shot_mean": mean, "fewshot_5way5shot_ci95": ci95})
    for (line, chunk), mse in RECONSTRUCTION.items():
        store.transfers[("reconstruction", line, chunk)] = transfer("reconstruction", line, chunk,
                                                                    {"reconstruction_mse": mse})

    seeded = Tracker(uri, SEEDED_EXPERIMENT, artifacts)
    for seed in (0, 1):
        plan = store.seeded_plans[seed] = _plan(seeded, clock, seed, ["sequential"], 2,
                                                {tr.STUDY_KEY: "study-transfer-seeds"})
        for chunk in range(2):
            run, _, _ = _chunk(seeded, clock, plan, ST, chunk, SEEDED_UPSTREAM[seed][chunk], with_model=False)
            store.seeded_chunk_runs[(seed, chunk)] = run
        seeded.end_run(plan, "FINISHED")
        chunk_run = store.seeded_chunk_runs[(seed, 1)]
        # Each evaluation's own seed is its plan's (`--set seed=k` on run and eval): still one measurement, pooled.
        store.seeded_transfers[(seed, "20")] = _transfer(seeded, clock, chunk_run, ST, 1, "linear", {
            "linear_top1": SEEDED_LINEAR[seed]}, None, options={"linear.epochs": "20", "seed": str(seed)})
        if seed == 0:
            store.seeded_transfers[(seed, "100")] = _transfer(seeded, clock, chunk_run, ST, 1, "linear", {
                "linear_top1": OTHER_OPTIONS}, None, options={"linear.epochs": "100"})
    return store
