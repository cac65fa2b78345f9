"""A small study record in a real MLflow SQLite store, written through the Tracker with the driver's tags, metric
keys and artifacts (the naming contract): two stream kinds, each with an SSL plan run (simclr: sequential,
sequential+replay, joint) and an SL plan run (supervised: sequential, joint), 3 chunks, knn and linear.

    store = build_study(tmp_path / "mlflow.db")                       # everything FINISHED
    store = build_study(path, unfinished=("random_class", "simclr-sequential-replay", 2),
                        absent=("distant_class", "supervised-joint", 1, "wall_seconds"))
    store = build_seeded_study(path)   # one study over seeds 0 and 1 (+ a superseded re-run), eval.sharpness [0.05]

The accuracies are hand-chosen by a formula (distinct per stream, line, protocol, top-k, chunk, task, seed); the
plan metrics are the continual metrics of those matrices, as the driver's summary computes them. The chunk runs'
storage metrics are `orchestrator.train.accounting.chunk_resources` of a chunk event, as the driver logs them: joint
lines keep ROWS_PER_CHUNK rows of every chunk so far at BYTES_PER_ROW, replay its buffer, sequential nothing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from evaluators.continual import AccuracyMatrix, continual_metrics, st_jt_gap
from orchestrator.spec.experiment import ResourcesSpec, Spec, flatten, identity_digest
from orchestrator.tracking import tags as tr
from orchestrator.tracking.tracker import Tracker
from orchestrator.train.accounting import chunk_resources

EXPERIMENT = "study"
STREAMS = ("random_class", "distant_class")
PLANS = {"ssl": ("simclr", ["sequential", "sequential+replay", "joint"]), "sl": ("supervised", ["sequential", "joint"])}
T = 3
PROTOCOLS = ("knn", "linear")
BASELINE = [0.1, 0.12, 0.08]
# This line logs its final gap but not the per-chunk one: the report takes that from the accuracy matrices.
NO_GAP_BY_CHUNK = ("distant_class", "supervised-sequential")
# This plan turns eval.baseline off, so its lines have no FWT (not applicable, not missing).
NO_BASELINE = ("distant_class", "sl")
# Downstream sets every plan evaluates (eval-run metrics `{set}.{name}_top1`, plan gaps per set and their mean).
DOWNSTREAM = ("heldout", "domain1")
# This line logs no downstream gaps on its plan run: the report takes them from the eval runs.
NO_DOWNSTREAM_GAPS = ("distant_class", "simclr-sequential-replay")
# This chunk run logs the data kept and the model state but not their sum: the report adds them.
NO_STORED_BYTES = ("random_class", "simclr-sequential-replay", 1)
ROWS_PER_CHUNK, BYTES_PER_ROW, REPLAY_ROWS_PER_CHUNK = 400, 2500.0, 16
# The seeded study (build_seeded_study): one stream, simclr ST and JT over 2 chunks, seeds 0 and 1 (an older run of
# seed 1 is superseded by its re-run), sharpness at eps 0.05 only; and a stream of plan runs recorded before the study
# tag (two seeds, no tag): the newest supersedes the older, as before the tag.
SEEDED_EXPERIMENT, SEEDED_STREAM, UNTAGGED_STREAM, SEEDS, SEEDED_EPSILONS = "seeded", "random_class", "instance", (0, 1), (0.05,)


def line_id(method: str, strategy: str) -> str:
    return "-".join([method, *strategy.split("+")])


def accuracy(stream: int, line: int, protocol: str, top5: bool, chunk: int, task: int) -> float:
    seen = task <= chunk
    value = (0.20 + 0.02 * line + 0.02 * stream + (0.20 if seen else 0.0)
             - ((0.01 + 0.004 * line) * (chunk - task) if seen else 0.0)
             + (0.01 if protocol == "linear" else 0.0) + (0.25 if top5 else 0.0) + 0.004 * chunk + 0.003 * task)
    return round(value, 4)


def downstream_accuracy(stream: int, line: int, protocol: str, data_set: int, chunk: int) -> float:
    return round(0.30 + 0.03 * line + 0.01 * stream + 0.05 * data_set + 0.02 * chunk
                 + (0.01 if protocol == "linear" else 0.0), 4)


@dataclass
class Store:
    uri: str
    plan_runs: dict[tuple[str, str], str] = field(default_factory=dict)  # (stream, "ssl"|"sl") -> plan run id
    chunk_runs: dict[tuple[str, str, int], str] = field(default_factory=dict)  # (stream, line, chunk) -> run id
    eval_runs: dict[tuple[str, str, int], str] = field(default_factory=dict)
    plan_of_line: dict[tuple[str, str], str] = field(default_factory=dict)  # (stream, line) -> plan run id
    # Every plan run in the order made, with its recipe (the seeded study has several per stream and line).
    made: list[dict] = field(default_factory=list)


@dataclass(frozen=True)
class Recipe:
    """One plan run of the store: its stream, plan ("ssl"|"sl"), spec seed, whether it carries the study tag, and an
    offset added to its accuracies (a superseded run's numbers differ from its re-run's)."""

    stream: str
    plan: str
    seed: int = 0
    study_tag: bool = False
    offset: float = 0.0


def build_seeded_study(db: Path) -> Store:
    """SEEDED_EXPERIMENT: simclr ST and JT on SEEDED_STREAM over T=2 chunks with seeds 0 and 1, after an older run
    of seed 1 (offset -0.1: superseded by the re-run), all tagged with their study key; and on UNTAGGED_STREAM two
    plan runs without the tag (seeds 0 then 1)."""
    recipes = [Recipe(SEEDED_STREAM, "ssl", 1, True, -0.1), Recipe(SEEDED_STREAM, "ssl", 0, True),
               Recipe(SEEDED_STREAM, "ssl", 1, True), Recipe(UNTAGGED_STREAM, "ssl", 0), Recipe(UNTAGGED_STREAM, "ssl", 1)]
    return build_study(db, experiment=SEEDED_EXPERIMENT, recipes=recipes, chunks=2,
                       plans={"ssl": ("simclr", ["sequential", "joint"])}, epsilons=SEEDED_EPSILONS, downstream=())


def build_study(db: Path, unfinished: tuple[str, str, int] | None = None,
                absent: tuple[str, str, int, str] | None = None, experiment: str = EXPERIMENT,
                recipes: list[Recipe] | None = None, chunks: int = T, plans: dict | None = None,
                epsilons: tuple[float, ...] | None = None, downstream: tuple[str, ...] = DOWNSTREAM) -> Store:
    """The study of the module docstring; `recipes` (default: each stream x plan once, seed 0, untagged), `chunks`,
    `plans`, `epsilons` (eval.sharpness.epsilons: logged as given; None: the spec leaves sharpness off and the eval
    runs log eps 0.1 and 0.3 anyway) and `downstream` make the smaller seeded study."""
    T, plans = chunks, plans or PLANS
    uri = f"sqlite:///{db}"
    tracker = Tracker(uri, experiment, (db.parent / "artifacts").as_uri())
    store = Store(uri)
    recipes = recipes or [Recipe(stream, plan_name) for stream in STREAMS for plan_name in plans]
    first_line: dict[tuple[str, str], int] = {}  # the accuracies of a line are the same formula on every seed
    for recipe in recipes:
        stream, plan_name = recipe.stream, recipe.plan
        s = STREAMS.index(stream) if stream in STREAMS else len(STREAMS)
        line_index = first_line.setdefault((stream, plan_name), sum(
            len(plans[p][1]) for st, p in first_line))
        method, strategies = plans[plan_name]
        baseline = (stream, plan_name) != NO_BASELINE
        eval_spec = {"baseline": baseline, "downstream": [{"name": d, "url": f"/data/{d}"} for d in downstream]}
        if epsilons is not None:
            eval_spec["sharpness"] = {"epsilons": list(epsilons)}
        spec = Spec.model_validate({"name": experiment, "seed": recipe.seed, "data": {"url": "/data/synthetic"},
                                    "stream": {"kind": stream, "chunks": T},
                                    "lines": {"method": [method], "strategy": strategies}, "eval": eval_spec})
        lines = [line_id(method, strategy) for strategy in strategies]
        plan_key = f"plan-{stream}-{plan_name}-{recipe.seed}"
        tags = {tr.RUN_TYPE: "plan", tr.PLAN_KEY: plan_key, tr.STREAM_KIND: stream, tr.TAG + "spec_name": experiment}
        if plan_name == "ssl":  # the SL plans are read like plan runs from before these tags: from their params
            tags[tr.LINES] = json.dumps(
                [{"id": line_id(method, st), "method": method, "strategy": st} for st in strategies])
            tags[tr.NUM_CHUNKS] = str(T)
        if recipe.study_tag:
            tags[tr.STUDY_KEY] = identity_digest(spec, with_seed=False)
        plan = tracker.create_run(experiment, tags)
        tracker.log_params(plan, flatten(spec))
        store.plan_runs[(stream, plan_name)] = plan
        store.made.append({"run": plan, "recipe": recipe, "chunk_runs": {}, "eval_runs": {}})
        matrices: dict[tuple[str, str], AccuracyMatrix] = {}
        plan_complete = True
        for strategy, line in zip(strategies, lines):
            store.plan_of_line[(stream, line)] = plan
            line_index += 1
            complete = True
            for name in PROTOCOLS:
                for top5 in (False, True):
                    key = name + ("_top5" if top5 else "")
                    matrix = AccuracyMatrix(T)
                    for chunk in range(T):
                        matrix.record_row(chunk, [round(accuracy(s, line_index, name, top5, chunk, t)
                                                        + 0.013 * recipe.seed + recipe.offset, 4)
                                                  for t in range(T)])
                    matrices[(line, key)] = matrix
            for chunk in range(T):
                failed = unfinished == (stream, line, chunk)
                complete = complete and not failed
                chunk_run = tracker.create_run(f"{line}/chunk-{chunk}", {
                    tr.RUN_TYPE: "chunk", tr.PARENT: plan, tr.PLAN_KEY: plan_key, tr.JOB_KEY: f"{plan_key}-{line}-{chunk}",
                    tr.LINE: line, tr.CHUNK: str(chunk), tr.CHECKPOINT: f"/ckpt/{plan_key}/{line}/{chunk}",
                    tr.TAG + "method": method, tr.TAG + "strategy": strategy})
                store.chunk_runs[(stream, line, chunk)] = chunk_run
                store.made[-1]["chunk_runs"][(line, chunk)] = chunk_run
                replay_rows = REPLAY_ROWS_PER_CHUNK * (chunk + 1) if "replay" in strategy else 0
                joint_rows = ROWS_PER_CHUNK * (chunk + 1) if strategy == "joint" else 0
                event = {"started": 0.0, "ended": 12.75 + line_index + 0.25 * chunk + 0.5 * recipe.seed,
                         "world_size": 2, "checkpoint_bytes": 1_000_000 + 1000 * line_index + chunk + 7 * recipe.seed,
                         "buffer_rows": replay_rows, "buffer_bytes": 3 * 16 * 16 * replay_rows,
                         "strategy_state_bytes": 0}
                metrics = {"final_loss": 1.0 - 0.1 * chunk, "steps": 10.0,
                           "train_seconds": 10.5 + line_index + 0.25 * chunk + 0.5 * recipe.seed,
                           **chunk_resources(event, ResourcesSpec(workers=2, cpus_per_worker=1),
                                             (joint_rows, joint_rows * BYTES_PER_ROW))}
                if NO_STORED_BYTES == (stream, line, chunk):
                    del metrics["stored_bytes"]
                if absent is not None and absent[:3] == (stream, line, chunk):
                    del metrics[absent[3]]
                tracker.log_metrics(chunk_run, metrics)
                if failed:  # the driver died in this chunk: the run stays unfinished, nothing evaluates it
                    tracker.end_run(chunk_run, "FAILED")
                    continue
                tracker.end_run(chunk_run, "FINISHED")
                eval_run = tracker.create_run(f"{line}/chunk-{chunk}/eval", {
                    tr.RUN_TYPE: "eval", tr.PARENT: plan, tr.PLAN_KEY: plan_key, tr.EVALUATES: chunk_run,
                    tr.JOB_KEY: f"{plan_key}-{line}-{chunk}", tr.LINE: line, tr.CHUNK: str(chunk)})
                store.eval_runs[(stream, line, chunk)] = eval_run
                store.made[-1]["eval_runs"][(line, chunk)] = eval_run
                em: dict[str, float] = {}
                for name in PROTOCOLS:
                    for top5 in (False, True):
                        suffix = "_top5" if top5 else ""
                        row = [matrices[(line, name + suffix)].get(chunk, t) for t in range(T)]
                        em[f"{name}_top{5 if top5 else 1}"] = sum(row) / T
                        em.update({f"{name}_task{t}{suffix}": v for t, v in enumerate(row)})
                em.update({f"{d}.{name}_top1": downstream_accuracy(s, line_index, name, i, chunk)
                           for name in PROTOCOLS for i, d in enumerate(downstream)})
                for eps in epsilons if epsilons is not None else (0.1, 0.3):
                    em[f"sharpness_eps{eps:g}"] = round(0.02 + eps * 0.1 + 0.01 * line_index + 0.001 * chunk
                                                       + 0.003 * recipe.seed + recipe.offset, 4)
                tracker.log_metrics(eval_run, em)
                tracker.end_run(eval_run, "FINISHED")
                tracker.log_metrics(chunk_run, {k: em[k] for k in ("knn_top1", "linear_top1")})
            if not complete:  # as the driver's summary: no metrics, no matrix for a line that lacks a chunk
                plan_complete = False
                continue
            for key in [n + suffix for n in PROTOCOLS for suffix in ("", "_top5")]:
                metrics = continual_metrics(matrices[(line, key)], baseline=BASELINE[:T] if baseline else None)
                tracker.log_metrics(plan, {f"{line}.{key}.{m}": v for m, v in metrics.items()})
                tracker.log_json(plan, f"accuracy_matrix.{line}.{key}.json", matrices[(line, key)].to_dict())
        for line in lines:
            joint = line_id(method, "joint")
            if line == joint or (unfinished is not None and (stream, line) == unfinished[:2]):
                continue
            if (stream, line) != NO_DOWNSTREAM_GAPS and downstream:
                _log_downstream_gaps(tracker, store, plan, stream, line, joint, T)
            for name in PROTOCOLS:
                gap = st_jt_gap(matrices[(line, name)], matrices[(joint, name)])
                tracker.log_metrics(plan, {f"{line}.{name}.st_jt_gap": gap.final})
                if (stream, line) != NO_GAP_BY_CHUNK:
                    for chunk, value in enumerate(gap.per_chunk):
                        tracker.log_metrics(plan, {f"{line}.{name}.st_jt_gap_by_chunk": value}, step=chunk)
        tracker.log_json(plan, "summary.json", {"lines": lines})
        tracker.end_run(plan, "FINISHED" if plan_complete else "FAILED")
    return store


def _log_downstream_gaps(tracker: Tracker, store: Store, plan: str, stream: str, line: str, joint: str,
                         T: int) -> None:
    """As the driver's summary: JT minus ST per chunk on each set, and the mean over the sets (`downstream`)."""
    client = tracker.client
    for name in PROTOCOLS:
        per_set = {d: [client.get_run(store.eval_runs[(stream, joint, c)]).data.metrics[f"{d}.{name}_top1"]
                       - client.get_run(store.eval_runs[(stream, line, c)]).data.metrics[f"{d}.{name}_top1"]
                       for c in range(T)] for d in DOWNSTREAM}
        mean = [sum(per_set[d][c] for d in DOWNSTREAM) / len(DOWNSTREAM) for c in range(T)]
        for key, values in [*per_set.items(), ("downstream", mean)]:
            tracker.log_metrics(plan, {f"{line}.{key}.{name}.st_jt_gap": values[-1]})
            for chunk, value in enumerate(values):
                tracker.log_metrics(plan, {f"{line}.{key}.{name}.st_jt_gap_by_chunk": value}, step=chunk)
