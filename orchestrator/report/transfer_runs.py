"""Transfer evaluation runs as the report reads them (`streamssl eval`, a spec's `eval.transfer`; written by
orchestrator.run.transfer): which eval runs are transfers, and one `TransferEval` per evaluated run, task, set and
options, the newest FINISHED of its attempts. `newest_finished_first` is the rule every record of the report keeps
one run of several attempts by.

    transfers = collect_transfers(transfer_runs, chunk_and_segment_runs_by_id, plan_run_seeds)
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from orchestrator.tracking import tags as tr


def newest_finished_first(runs: list) -> list:
    """Attempts of one run, the FINISHED first, newest first among equals: the one a record keeps is [0]."""
    return sorted(runs, key=lambda r: (r.info.status == "FINISHED", r.info.start_time or 0), reverse=True)


@dataclass(frozen=True)
class TransferEval:
    """One transfer evaluation of a chunk (or online segment) run's checkpoint, as orchestrator.run.transfer logs it:
    the task on a downstream set with some options, its scores without the `<set>.` prefix (`linear_top1`,
    `fewshot_5way5shot_mean`, `fewshot_5way5shot_ci95`), and where the evaluated run sits in the study."""

    run: Any  # the transfer evaluation run
    evaluates: str  # the chunk or segment run whose checkpoint was evaluated
    plan_run: str | None  # that run's plan run (None: the evaluated run is not a chunk or segment run here)
    plan_seed: str  # the plan run's spec seed (the study's seed), "?" when unknown
    line: str
    chunk: int | None  # chunk index of a chunk run, None for a segment run
    segment: int | None  # segment index of an online segment run
    task: str  # finetune, linear, fewshot, reconstruction, ...
    data_set: str
    options: str  # what makes two evaluations alike: the hash of their params but `seed` (`transfer_options`)
    params: dict[str, str]  # transfer_params: task, data.name, seed (the evaluation's own), the task's options
    scores: dict[str, float]

    @property
    def run_id(self) -> str:
        return self.run.info.run_id

    @property
    def status(self) -> str:
        return self.run.info.status

    @property
    def transfer_seed(self) -> str:
        """The evaluation's own seed (label subset, episodes, heads), not the study's."""
        return self.params.get("seed", "?")


def is_transfer(run: Any) -> bool:
    """Whether an eval run is a transfer evaluation (it names its task) rather than a chunk's own evaluation."""
    return tr.EVAL_TASK in run.data.tags


def _index_tag(run: Any, key: str) -> int | None:
    try:
        return int(run.data.tags[key])
    except (KeyError, ValueError):
        return None


# Params that say where or with which draw an evaluation ran, not what it measured: `seed` follows the plan's seed
# in a study (`--set seed=k` on run and eval), and the tables pool seeds as every other table does.
NOT_OPTIONS = ("seed",)


def transfer_options(params: dict[str, str]) -> str:
    """What makes two transfer evaluations the same measurement: a hash of their params without `NOT_OPTIONS`."""
    kept = {k: v for k, v in params.items() if k not in NOT_OPTIONS}
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:16]


def collect_transfers(transfer_runs: list, evaluated: dict[str, Any], seeds: dict[str, str]) -> list[TransferEval]:
    """One TransferEval per evaluated run, task, set and options (`transfer_options`: evaluations of one checkpoint
    that differ only in their own seed are one, the newest): the FINISHED evaluation, the newest of several
    (else the newest, so its cells say it did not finish). `evaluated`: chunk and segment runs by id; `seeds`: plan
    run -> its seed."""
    groups: dict[tuple[str, str, str, str], list] = {}
    for run in transfer_runs:
        tags = run.data.tags
        options = transfer_options(run.data.params)
        key = (tags.get(tr.EVALUATES, ""), tags[tr.EVAL_TASK], tags.get(tr.EVAL_SET, "?"), options)
        groups.setdefault(key, []).append(run)
    out = []
    for (evaluates, task, data_set, options), runs in groups.items():
        run = newest_finished_first(runs)[0]
        source = evaluated.get(evaluates)
        plan_run = source.data.tags.get(tr.PARENT) if source is not None else None
        prefix = f"{data_set}."
        scores = {k[len(prefix):]: float(v) for k, v in run.data.metrics.items() if k.startswith(prefix)}
        segment = _index_tag(run, tr.SEGMENT)  # a segment run's copied tags hold chunk 0 too
        chunk = _index_tag(run, tr.CHUNK) if segment is None else None
        out.append(TransferEval(run, evaluates, plan_run, seeds.get(plan_run, "?"), run.data.tags.get(tr.LINE, "?"),
                                chunk, segment, task, data_set, options, dict(run.data.params), scores))
    return sorted(out, key=lambda t: (t.data_set, t.task, t.line, t.chunk if t.chunk is not None else -1,
                                      t.segment if t.segment is not None else -1, t.run.info.start_time or 0))


__all__ = ["NOT_OPTIONS", "TransferEval", "collect_transfers", "is_transfer", "newest_finished_first",
           "transfer_options"]
