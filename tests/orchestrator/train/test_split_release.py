"""Each chunk's Ray Data split coordinator is released when the chunk ends (a long stream must not keep one
~0.5 GB actor per chunk alive), and Ray's worker-pool-size warning is explained once instead of repeated."""

from __future__ import annotations

import io
import threading
import time
from pathlib import Path

import pytest
from rich.console import Console

from orchestrator.run.launch import run_experiment
from orchestrator.spec.experiment import validate_spec
from tests.specs import tiny_spec

RAYLET_WARNING = ("WARNING: {n} PYTHON worker processes have been started on node: abc with address: 127.0.0.1, which "
                  "is {k}x the maximum expected startup concurrency (2). This could be a result of using a large "
                  "number of actors, tasks blocked in ray.get() calls, or tasks with fractional CPU requests")


def _alive_coordinators() -> int:
    from ray._private import state

    return sum(a["ActorClassName"] == "SplitCoordinator" for a in state.actors(actor_state_name="ALIVE").values())


@pytest.mark.slow
def test_split_coordinators_stay_bounded_over_many_chunks(tmp_path: Path, synthetic_url: str, ray_local,
                                                         fresh_mlflow_store) -> None:
    spec = validate_spec(tiny_spec(
        "split-release", synthetic_url, stream={"chunks": 3}, optim={"epochs_per_chunk": 1, "batch_size": 64},
        eval={"every_chunk": [], "baseline": False}, resources={"workers": 1},
        storage={"workdir": str(tmp_path / "runs")}, tracking={"uri": fresh_mlflow_store(tmp_path / "mlflow.db")}))
    counts: list[int] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            counts.append(_alive_coordinators())
            time.sleep(0.25)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        summary = run_experiment(spec, console=Console(file=io.StringIO(), width=200))
    finally:
        done.set()
        sampler.join()
    assert not summary.missing
    assert max(counts) >= 1, "no split coordinator was ever seen: the sampler measured nothing"
    # 3 chunks: a coordinator kept per chunk would show 2 alive in chunk 1 and 3 in chunk 2 (each chunk start is a
    # worker-group start, the test's cost; more chunks prove nothing more).
    assert max(counts) <= 1, f"up to {max(counts)} split coordinators alive at once over 3 chunks (one a chunk leaks)"


def test_worker_pool_warning_is_explained_once(capsys) -> None:
    from ray._private import worker

    from orchestrator.train.ray_init import POOL_NOTE, explain_worker_pool_warnings

    saved = worker.print_to_stdstream
    worker.print_to_stdstream = getattr(saved, "__wrapped__", saved)  # as a fresh driver has it (no run said it yet)
    try:
        assert explain_worker_pool_warnings()
        for n, k in ((8, 4), (10, 5), (12, 6)):  # what the driver's error listener thread passes on
            worker.print_to_stdstream({"lines": [RAYLET_WARNING.format(n=n, k=k)], "pid": "raylet", "is_err": False},
                                      ignore_prefix=False)
        worker.print_to_stdstream({"lines": ["something else"], "pid": "raylet", "is_err": False}, ignore_prefix=False)
    finally:
        worker.print_to_stdstream = saved
    out = capsys.readouterr().out
    assert "PYTHON worker processes have been started" not in out, out
    assert out.count(POOL_NOTE) == 1, out
    assert "something else" in out
