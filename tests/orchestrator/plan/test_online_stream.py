"""How the online reader cuts the tasks' batches into stream batches (no Ray: plain numpy batches)."""

from __future__ import annotations

import numpy as np
import pytest

from orchestrator.train.online_runner import _rank_rows, stream_batches


def _task(start: int, sizes: list[int]):
    out, n = [], start
    for size in sizes:
        out.append({"key": np.arange(n, n + size), "label": np.full(size, start)})
        n += size
    return iter(out)


def test_stream_batches_are_exact_across_task_boundaries_and_drop_the_short_tail() -> None:
    tasks = iter([_task(0, [5, 5, 3]), _task(100, [4, 4]), _task(200, [2])])  # 13 + 8 + 2 = 23 rows
    batches = list(stream_batches(tasks, 6))
    assert [len(b["key"]) for b in batches] == [6, 6, 6]  # 18 rows; the last 5 are not a whole batch
    keys = np.concatenate([b["key"] for b in batches])
    assert keys.tolist() == [*range(13), 100, 101, 102, 103, 104]  # the order, task after task
    assert batches[2]["label"].tolist() == [0, 100, 100, 100, 100, 100]  # a batch may span two tasks


def test_every_rank_keeps_its_own_interleaved_share_of_a_batch() -> None:
    batch = {"key": np.arange(8), "label": np.arange(8) * 10}
    shares = [_rank_rows(batch, r, 2) for r in range(2)]
    assert shares[0]["key"].tolist() == [0, 2, 4, 6] and shares[1]["key"].tolist() == [1, 3, 5, 7]
    assert sorted(np.concatenate([s["key"] for s in shares]).tolist()) == list(range(8))  # nothing lost or doubled


def test_memory_draws_and_rals_k_that_do_not_divide_by_the_workers_are_refused_naming_the_field() -> None:
    from orchestrator.spec.online import OnlineSpec, online_problems

    def problems(workers: int, **online) -> list[str]:
        return online_problems("online", OnlineSpec(batch_size=129, **online), ["sequential"], workers)

    # The defaults with RALS at 3 workers: 256 memory rows and k = 256 dealt 86/85/85 hung the first memory step.
    found = problems(3, rals=True)
    assert found == [
        "online.memory_batch (256, the default with rals) must be divisible by resources.workers (3): every worker "
        "takes the same share of it (the cross-worker gathers need equal shapes); use 255 or 258",
        "online.rals_k (256) must be divisible by resources.workers (3): every worker takes the same share of it "
        "(the cross-worker gathers need equal shapes); use 255 or 258"]
    assert problems(3, rals=True, memory_batch=255, rals_k=255) == []
    assert problems(3, memory_batch=10)[0].startswith("online.memory_batch (10) must be divisible")
    assert problems(3, memory_size=0, memory_batch=10) == []  # no memory: nothing drawn
    assert problems(3, rals_k=10) == [
        "online.memory_batch (128, the default without rals) must be divisible by resources.workers (3): every "
        "worker takes the same share of it (the cross-worker gathers need equal shapes); use 126 or 129"]
    assert problems(1, rals=True) == []


@pytest.mark.slow
def test_a_cycling_stream_starts_the_order_again_in_a_new_shuffle(synthetic_url: str, tmp_path, ray_local) -> None:
    import itertools

    from orchestrator.data.ingest import shard_refs
    from orchestrator.plan.planner import build_plan
    from orchestrator.spec.experiment import validate_spec
    from orchestrator.train.online_runner import _stream
    from tests.specs import tiny_spec

    spec = validate_spec(tiny_spec("cycle", synthetic_url, stream={"kind": "online", "chunks": 3},
                                   online={"batch_size": 100, "cycle": True, "max_batches": 30},
                                   storage={"workdir": str(tmp_path)}))
    plan = build_plan(spec)
    config = {"refs": shard_refs(plan.manifest, plan.data_url, "train"), "stream": plan.stream, "num_tasks": 3,
              "image_size": 16, "storage_options": {}, "corrupt_counter": None, "decode": "ray_data", "seed": 0,
              "batch_size": 100, "cycle": True}
    batches = list(itertools.islice(_stream(config), 30))  # 1200 rows: 12 batches a pass, 2.5 passes
    assert [len(b["index"]) for b in batches] == [100] * 30
    passes = [np.concatenate([b["index"] for b in batches[i:i + 12]]) for i in (0, 12)]
    assert sorted(passes[0].tolist()) == sorted(passes[1].tolist())  # every row once a pass
    assert len(set(passes[0].tolist())) == 1200
    assert passes[0].tolist() != passes[1].tolist()  # in another order
    tasks = np.concatenate([b["task"] for b in batches[:12]])
    assert (np.diff(tasks) >= 0).all() and set(tasks.tolist()) == {0, 1, 2}  # the tasks one after another


def test_cycle_fit_keys_the_plan_only_under_a_deadline(synthetic_url: str) -> None:
    """`online.cycle_fit` came after online plans were keyed: without a deadline it changes no step, so it must not
    change the plan key (and `--resume` of an older online plan); with `time_budget_s` it does change the LR."""
    from orchestrator.spec.experiment import Spec
    from orchestrator.spec.params import identity_digest
    from tests.specs import tiny_spec

    def digest(**online) -> str:
        spec = tiny_spec("cycle-fit", synthetic_url, stream={"kind": "online", "seed": 0},
                         online={"batch_size": 32, **online})
        return identity_digest(Spec.model_validate(spec))

    assert digest(cycle_fit="measured") == digest(cycle_fit="planned") == digest()
    assert digest(time_budget_s=5.0, cycle_fit="measured") != digest(time_budget_s=5.0, cycle_fit="planned")


def test_the_grace_period_of_a_polled_source_does_not_key_the_plan(synthetic_url: str, tmp_path) -> None:
    """`online.source.grace_s` came after polled plans were keyed and only decides which shards arrive (recorded in
    source_shards.json): a polled plan keeps its key, and `--resume`, whatever grace it is given."""
    from orchestrator.spec.experiment import Spec
    from orchestrator.spec.params import flatten, identity_digest
    from tests.specs import tiny_spec

    def spec(**source) -> Spec:
        return Spec.model_validate(tiny_spec("grace", synthetic_url, stream={"kind": "online", "seed": 0},
                                             online={"batch_size": 32, "source": {"poll": str(tmp_path), **source}}))

    assert identity_digest(spec(grace_s=5)) == identity_digest(spec(grace_s=120)) == identity_digest(spec())
    assert flatten(spec(grace_s=5))["online.source.grace_s"] == "5.0"  # still a param, for the compare view
