"""The lineage schema: the tags that link runs, and the run kinds. Reading a record by them (`streamssl lineage`,
`status`) is `orchestrator.lineage`; the tags a plan run gets are `orchestrator.run.base.plan_tags`.

A plan run (`RUN_TYPE` = "plan") is the parent (`PARENT`) of one chunk run per (line, chunk) ("chunk"), each
tagged with its `JOB_KEY`, `LINE`, `CHUNK` and `CHECKPOINT` URI; an evaluation run ("eval") names the chunk run it
`EVALUATES` (a transfer evaluation run is an eval run too, nested under the chunk run and tagged `EVAL_TASK`).
Every run carries the `PLAN_KEY`; `CLIENT_TOKEN` makes run creation safe to retry.

An online plan's line is one chunk run over the whole stream (its online run); its segment runs ("segment", child
of the plan run, `SEGMENT` index, `ONLINE_RUN`) each hold a checkpoint (a LoggedModel) and that checkpoint's
evaluation metrics; the one the stream ended with is tagged `FINAL_SEGMENT`, and its evaluation is the line's.
"""

from __future__ import annotations

import platform
from importlib import metadata

TAG = "streamssl."
RUN_TYPE = TAG + "run_type"
PLAN_KEY = TAG + "plan_key"
JOB_KEY = TAG + "job_key"
LINE = TAG + "line"
CHUNK = TAG + "chunk"
CHECKPOINT = TAG + "checkpoint_uri"
MODEL_ID = TAG + "model_id"  # a chunk run's checkpoint as an MLflow LoggedModel
EVALUATES = TAG + "evaluates"
CLIENT_TOKEN = TAG + "client_token"
PARENT = "mlflow.parentRunId"
# On plan runs: what the plan holds, so `streamssl report` knows which runs should exist without the spec.
STREAM_KIND = TAG + "stream_kind"
LINES = TAG + "lines"  # JSON list of {"id", "method", "strategy"}
NUM_CHUNKS = TAG + "num_chunks"
# The plan's key without the spec's seed: plans that differ only in `seed` are one study (the report averages them).
STUDY_KEY = TAG + "study_key"
SEGMENT = TAG + "segment"
# On a transfer evaluation run (`streamssl eval`, a spec's `eval.transfer`; orchestrator.run.transfer writes them):
# its task and downstream set, and the hash of its options (a resume skips an evaluation logged with the same).
EVAL_TASK = TAG + "eval_task"
EVAL_SET = TAG + "eval_set"
EVAL_INIT = TAG + "eval_init"  # checkpoint, or random: the architecture freshly initialised (the from-scratch baseline)
TRANSFER_KEY = TAG + "transfer_key"
ONLINE_RUN = TAG + "online_run"
FINAL_SEGMENT = TAG + "final_segment"
# What a segment row shows of its run's metrics (accuracies, deadline misses, a polled source's skipped shards).
SEGMENT_METRICS = ("knn_top1", "linear_top1", "late_batches", "dropped_steps", "skipped_shards")


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("streamssl", "torch", "torchvision", "pillow", "ray", "mlflow", "pyarrow"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out
