"""A small study record with known effects over seeds 0, 1, 2, for the findings table (orchestrator.report.findings):
plan, chunk and eval runs written through the Tracker with the driver's tags and the metric keys the claims read.

    store = build_findings_store(tmp_path / "mlflow.db")
    store.value("random_class", "moco_v2-sequential", 1, "gap")   # what was logged, to compute the expected effect

- random_class: MoCo-v2 and SL (ST, JT), 2 chunks, seeds 0-2: SL's final gap 0.08 above SSL's (the gap claim
  holds), SSL's BWT 0.08 below SL's (the BWT claim is contradicted);
- distant_class: MoCo-v2 (ST, ST+replay, JT) over seeds 0-2, SL (ST, JT) over seeds 0 and 1 only (seed 2's SL plan
  run is missing): replay shrinks the gap by 0.05 (holds); the sharpness of SL and SSL differ by noise around 0
  (inconclusive), at base accuracies 0.01 apart (the guard passes);
- online: SimCLR SLCLRS with and without RALS (`online.rals`), seeds 0-2, RALS 0.004 better (non-inferior: holds);
  SimCLR offline (instance stream, 1 chunk) with half the online steps: online beats it, but the steps differ, so the
  claim is inconclusive;
- random_class MoCo-v2 ST and JT: a linear transfer to `held-out` after the last chunk, within 0.005 of each other
  (the transfer claim holds: equivalent within 0.02), beside a random-init baseline, a few-shot set and a FAILED
  evaluation the claim must not read; distant_class has no transfer evaluations (its row says to add one);
- no instance-stream streaming plans: those rows name their missing runs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from orchestrator.tracking import tags as tr
from orchestrator.tracking.tracker import Tracker

EXPERIMENT = "findings"
SEEDS = (0, 1, 2)
T = 2
NOISE = (0.004, -0.006, 0.011)  # per seed, added to one side of each comparison
OTHER_NOISE = (-0.003, 0.002, 0.0)
ONLINE_STEPS, OFFLINE_STEPS = 230.0, 115.0


@dataclass
class FindingsStore:
    uri: str
    values: dict[tuple[str, str, int, str], float] = field(default_factory=dict)  # (stream, line, seed, what)
    plans: dict[tuple[str, str, int], str] = field(default_factory=dict)  # (stream, variant, seed) -> plan run

    def value(self, stream: str, line: str, seed: int, what: str) -> float:
        return self.values[(stream, line, seed, what)]


def _plan(tracker: Tracker, store: FindingsStore, stream: str, variant: str, seed: int, method: str,
          strategies: list[str], chunks: int, params: dict[str, str], plan_metrics: dict[str, float]) -> str:
    lines = [{"id": "-".join([method, *s.split("+")]), "method": method, "strategy": s} for s in strategies]
    plan = tracker.create_run(f"plan {stream} {variant} seed {seed}", {
        tr.RUN_TYPE: "plan", tr.PLAN_KEY: f"plan-{stream}-{variant}-{seed}", tr.STREAM_KIND: stream,
        tr.LINES: json.dumps(lines), tr.NUM_CHUNKS: str(chunks)})
    tracker.log_params(plan, {"seed": str(seed), "stream.chunks": str(chunks), "eval.every_chunk": '["linear"]',
                              **params})
    tracker.log_metrics(plan, plan_metrics)
    store.plans[(stream, variant, seed)] = plan
    return plan


def _chunk(tracker: Tracker, plan: str, line: str, chunk: int, metrics: dict[str, float],
           evaluation: dict[str, float] | None) -> str:
    tags = {tr.RUN_TYPE: "chunk", tr.PARENT: plan, tr.LINE: line, tr.CHUNK: str(chunk)}
    run = tracker.create_run(f"{line}/chunk-{chunk}", tags)
    tracker.log_metrics(run, metrics)
    tracker.end_run(run, "FINISHED")
    if evaluation is not None:
        ev = tracker.create_run(f"{line}/chunk-{chunk}/eval", {tr.RUN_TYPE: "eval", tr.PARENT: plan, tr.LINE: line,
                                                              tr.CHUNK: str(chunk), tr.EVALUATES: run})
        tracker.log_metrics(ev, evaluation)
        tracker.end_run(ev, "FINISHED")
    return run


def _transfer(tracker: Tracker, chunk_run: str, line: str, chunk: int, data_set: str, task: str, init: str,
              scores: dict[str, float], status: str = "FINISHED") -> None:
    """A transfer evaluation of a chunk run's checkpoint, tagged and named as orchestrator.run.transfer logs it."""
    run = tracker.create_run(f"{line}/chunk-{chunk}/{data_set}.{task}", {
        tr.RUN_TYPE: "eval", tr.PARENT: chunk_run, tr.EVALUATES: chunk_run, tr.EVAL_TASK: task, tr.EVAL_SET: data_set,
        tr.EVAL_INIT: init, tr.TRANSFER_KEY: f"{data_set}-{task}-{init}", tr.LINE: line, tr.CHUNK: str(chunk)})
    tracker.log_params(run, {"task": task, "init": init, "data.name": data_set, "seed": "0"})
    tracker.log_metrics(run, {f"{data_set}.{k}": v for k, v in scores.items()})
    tracker.end_run(run, status)


def build_findings_store(db: Path) -> FindingsStore:
    tracker = Tracker(f"sqlite:///{db}", EXPERIMENT, (db.parent / "artifacts").as_uri())
    store = FindingsStore(f"sqlite:///{db}")
    chunked = {"online": "None"}  # a chunked plan has no online section
    # (stream, method, strategies, seeds, final gap of ST (by line), BWT of ST, sharpness eps 0.1 / 0.3, linear top-1)
    for seed in SEEDS:
        e, o = NOISE[seed], OTHER_NOISE[seed]
        streaming = [
            ("random_class", "ssl", "moco_v2", ["sequential", "joint"],
             {"moco_v2-sequential": (0.02 + o, -0.10 + e)}),
            ("random_class", "sl", "supervised", ["sequential", "joint"],
             {"supervised-sequential": (0.10 + e, -0.02 + o)}),
            ("distant_class", "ssl", "moco_v2", ["sequential", "sequential+replay", "joint"],
             {"moco_v2-sequential": (0.12 + e, -0.05), "moco_v2-sequential-replay": (0.07 + o, -0.03)}),
        ]
        if seed < 2:  # SL on distant_class: seeds 0 and 1 only
            streaming.append(("distant_class", "sl", "supervised", ["sequential", "joint"],
                              {"supervised-sequential": (0.20, -0.08)}))
        for stream, variant, method, strategies, st in streaming:
            metrics = {}
            for line, (gap, bwt) in st.items():
                metrics.update({f"{line}.linear.st_jt_gap": gap, f"{line}.linear.bwt": bwt})
                store.values.update({(stream, line, seed, "gap"): gap, (stream, line, seed, "bwt"): bwt})
            plan = _plan(tracker, store, stream, variant, seed, method, strategies, T, chunked, metrics)
            for strategy in strategies:
                line = "-".join([method, *strategy.split("+")])
                for chunk in range(T):
                    joint = strategy == "joint"
                    seconds = 10.0 * (chunk + 1 if joint else 1) + seed
                    resources = {"train_seconds": seconds, "stored_bytes": 1000.0 * (chunk + 1 if joint else 0) + 500,
                                 "steps": 10.0 * (chunk + 1 if joint else 1)}
                    evaluation = None
                    if stream == "distant_class":
                        sharp = 0.30 + (e if method == "supervised" else o) + (0.01 if method == "supervised" else 0)
                        top1 = 0.40 + (0.01 if method == "supervised" else 0.0)
                        evaluation = {"linear_top1": top1, "sharpness_eps0.1": sharp, "sharpness_eps0.3": 2 * sharp}
                        store.values.update({(stream, line, seed, "sharpness_eps0.1"): sharp,
                                             (stream, line, seed, "linear_top1"): top1})
                    chunk_run = _chunk(tracker, plan, line, chunk, resources, evaluation)
                    if stream == "random_class" and method == "moco_v2" and chunk == T - 1:
                        # The transfer claim reads `held-out`'s linear top-1 of the trained weights: not the
                        # random-init baseline, not a set without that score, not an evaluation that failed.
                        top1 = 0.50 + (e if strategy == "sequential" else o) / 4
                        store.values[(stream, line, seed, "transfer")] = top1
                        _transfer(tracker, chunk_run, line, chunk, "held-out", "linear", "checkpoint",
                                  {"linear_top1": top1, "linear_top5": 0.9})
                        _transfer(tracker, chunk_run, line, chunk, "held-out", "linear", "random", {"linear_top1": 0.1})
                        _transfer(tracker, chunk_run, line, chunk, "a-textures", "fewshot", "checkpoint",
                                  {"fewshot_5way5shot_mean": 0.7, "fewshot_5way5shot_ci95": 0.01})
                        _transfer(tracker, chunk_run, line, chunk, "b-broken", "linear", "checkpoint",
                                  {"linear_top1": 0.99}, status="FAILED")
        # Online: SimCLR with and without RALS (SLCLRS, 10 steps a batch); one online run per line.
        for rals, top1 in (("True", 0.334 + e), ("False", 0.330 + o)):
            params = {"online.rals": rals, "online.schedule": "local_cycle", "online.steps_per_batch": "10"}
            plan = _plan(tracker, store, "online", f"rals-{rals}", seed, "simclr", ["sequential"], 5, params,
                         {"simclr-sequential.linear_top1": top1})
            store.values[("online", f"rals-{rals}", seed, "linear_top1")] = top1
            # As the online driver logs them: `steps` per stream batch (its last value: one batch's 10), the total
            # as online_steps.
            _chunk(tracker, plan, "simclr-sequential", 0, {"online_steps": ONLINE_STEPS, "steps": 10.0}, None)
        # Offline SimCLR: one chunk of the instance stream, half the online steps.
        offline = 0.300 + o
        plan = _plan(tracker, store, "instance", "offline", seed, "simclr", ["sequential"], 1, chunked, {})
        _chunk(tracker, plan, "simclr-sequential", 0, {"steps": OFFLINE_STEPS}, {"linear_top1": offline})
        store.values[("instance", "offline", seed, "linear_top1")] = offline
    return store
