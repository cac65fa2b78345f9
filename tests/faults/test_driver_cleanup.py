"""A driver that raises frees what it started on Ray. The caller may keep the exception (pytest does, a sweep keeps
a failed trial's), and with it the driver's actor handles: the evaluation actor and its CPU slot must not outlive
the run, or the next run on the same Ray waits for that CPU forever (CI once hung on exactly this)."""

from __future__ import annotations

import io
import time
from pathlib import Path

import pytest
from rich.console import Console

from orchestrator.run.launch import run_experiment
from orchestrator.spec.experiment import validate_spec
from orchestrator.train.hooks import DriverHooks
from tests.specs import tiny_spec


class SummaryFailed(RuntimeError):
    pass


def _free_cpus(ray, wait_s: float) -> float:
    """The CPUs free once released actors have gone (their release is asynchronous), after at most `wait_s`."""
    deadline = time.time() + wait_s
    while True:
        free = ray.available_resources().get("CPU", 0.0)
        if free >= ray.cluster_resources()["CPU"] or time.time() > deadline:
            return free
        time.sleep(0.5)


@pytest.mark.slow
def test_a_run_that_raises_after_training_leaves_no_actor_holding_cpus(tmp_path: Path, synthetic_url: str,
                                                                       ray_local) -> None:
    def fail_at_the_end(index: int, metrics: dict[str, float], final: bool) -> None:
        if final:  # all training is done; the driver fails while it logs the last evaluation
            raise SummaryFailed(f"summary of chunk {index} failed")

    spec = validate_spec(tiny_spec("cleanup", str(synthetic_url), storage={"workdir": str(tmp_path / "runs")},
                                   optim={"epochs_per_chunk": 1}))
    with pytest.raises(SummaryFailed) as kept:  # `kept` holds the traceback, and through it the driver
        run_experiment(spec, console=Console(file=io.StringIO(), width=120),
                       hooks=DriverHooks(on_score=fail_at_the_end))
    assert "chunk 1" in str(kept.value)
    total = ray_local.cluster_resources()["CPU"]
    assert _free_cpus(ray_local, wait_s=30) == total
