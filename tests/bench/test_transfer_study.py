"""bench.transfer_study on a small MLflow store: per seed, each line's last-chunk transfer score against the
random-init baseline and SSL against SL, with the t-interval of the paired differences computed here by hand."""

from __future__ import annotations

import json
import math
import shutil

import pytest

from bench import transfer_study
from orchestrator.tracking import tags as tr
from orchestrator.tracking.tracker import Tracker

LINES = {"simclr-sequential": ("simclr", 0.40), "supervised-sequential": ("supervised", 0.35)}
NOISE = {"0": 0.01, "1": -0.02, "2": 0.005}
RANDOM_TOP1 = 0.30


def _run(tracker: Tracker, name: str, tags: dict, metrics: dict, params: dict | None = None) -> str:
    run = tracker.create_run(name, tags)
    tracker.log_params(run, params or {})
    tracker.log_metrics(run, metrics)
    tracker.end_run(run, "FINISHED")
    return run


@pytest.fixture(scope="module")
def store(migrated_mlflow_store, tmp_path_factory) -> str:
    db = tmp_path_factory.mktemp("transfer-study") / "mlflow.db"
    shutil.copyfile(migrated_mlflow_store, db)
    uri = f"sqlite:///{db}"
    tracker = Tracker(uri, "transfer", (db.parent / "artifacts").as_uri())
    lines = [{"id": line, "method": method, "strategy": "sequential"} for line, (method, _) in LINES.items()]
    for seed, noise in NOISE.items():
        plan = tracker.create_run(f"plan seed {seed}", {tr.RUN_TYPE: "plan", tr.PLAN_KEY: f"p{seed}",
                                                        tr.STREAM_KIND: "random_class", tr.LINES: json.dumps(lines),
                                                        tr.NUM_CHUNKS: "2"})
        tracker.log_params(plan, {"seed": seed, "stream.chunks": "2", "eval.every_chunk": '["knn"]'})
        for line, (_, top1) in LINES.items():
            for chunk in (0, 1):
                chunk_run = _run(tracker, f"{line}/chunk-{chunk}", {tr.RUN_TYPE: "chunk", tr.PARENT: plan,
                                                                    tr.LINE: line, tr.CHUNK: str(chunk)}, {})
                for init, value in (("checkpoint", top1 + noise + 0.1 * chunk), ("random", RANDOM_TOP1 + noise)):
                    if init == "random" and (line != "simclr-sequential" or chunk != 1):
                        continue  # the baseline once a seed, on one line's last checkpoint
                    _run(tracker, f"{line}/chunk-{chunk}/held.finetune", {
                        tr.RUN_TYPE: "eval", tr.PARENT: chunk_run, tr.EVALUATES: chunk_run, tr.EVAL_TASK: "finetune",
                        tr.EVAL_SET: "held", tr.EVAL_INIT: init, tr.TRANSFER_KEY: f"finetune-{init}", tr.LINE: line,
                        tr.CHUNK: str(chunk)}, {"held.finetune_10pct_top1": value, "held.fewshot_ci95": 0.01},
                        {"task": "finetune", "init": init, "data.name": "held"})
        tracker.end_run(plan, "FINISHED")
    return uri


def _by_hand(diffs: list[float]) -> tuple[float, float, float]:
    n, t975 = len(diffs), 4.302652729911275  # Student's t 0.975 quantile, 2 degrees of freedom
    mean = sum(diffs) / n
    half = t975 * math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1)) / math.sqrt(n)
    return mean, mean - half, mean + half


def test_pretrained_against_random_and_ssl_against_sl_paired_over_seeds(store) -> None:
    rows = {r["comparison"]: r for r in transfer_study.study(store, "transfer", chunk=None)}
    assert set(rows) == {"simclr-sequential - random init", "supervised-sequential - random init",
                         "simclr-sequential - supervised-sequential"}  # no `_ci95` rows
    ssl = rows["simclr-sequential - random init"]
    assert ssl["seeds"] == ["0", "1", "2"] and ssl["a"] == pytest.approx([0.51, 0.48, 0.505])
    assert ssl["diffs"] == pytest.approx([0.2, 0.2, 0.2]) and ssl["says"] == "above 0"  # no spread: a point
    versus = rows["simclr-sequential - supervised-sequential"]
    assert (versus["mean"], versus["lo"], versus["hi"]) == pytest.approx(_by_hand([0.05, 0.05, 0.05]))
    # Chunk 0 of the lines against the same baseline (it is chunk-free: it reads only the architecture).
    early = {r["comparison"]: r for r in transfer_study.study(store, "transfer", chunk=0)}
    assert early["supervised-sequential - random init"]["diffs"] == pytest.approx([0.05, 0.05, 0.05])


def test_an_interval_that_spans_zero_is_inconclusive() -> None:
    row = transfer_study._compare("a - b", {"0": 0.5, "1": 0.4, "2": 0.45}, {"0": 0.45, "1": 0.45, "2": 0.44})
    mean, lo, hi = _by_hand([0.05, -0.05, 0.01])
    assert (row["mean"], row["lo"], row["hi"]) == pytest.approx((mean, lo, hi)) and lo < 0 < hi
    assert row["says"] == "spans 0: inconclusive at this budget"
    assert transfer_study._compare("a - b", {"0": 0.5}, {"0": 0.4})["says"] == "n < 2: no interval"
    assert transfer_study._compare("a - b", {"0": 1.0, "1": 1.0}, {"0": 1.0, "1": 1.0})["says"] == "equal at every seed"
