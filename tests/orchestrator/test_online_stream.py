"""How the online reader cuts the tasks' batches into stream batches (no Ray: plain numpy batches)."""

from __future__ import annotations

import numpy as np

from orchestrator.online_runner import _rank_rows, stream_batches


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
