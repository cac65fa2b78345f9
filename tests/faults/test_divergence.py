"""A loss that turns NaN inside a Ray Train worker ends the run at once, naming the method, the step and the LR:
Ray Train does not restart the group (the same checkpoint would diverge again), and the newest checkpoint on
storage holds finite weights."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from rich.console import Console

from orchestrator.errors import TrainingError
from orchestrator.experiment import run_experiment
from orchestrator.spec import validate_spec
from tests.specs import tiny_spec
from trainers.checkpoint import load_state
from orchestrator.runner import checkpoint_order

pytestmark = pytest.mark.slow


def test_a_diverging_chunk_stops_the_run_without_a_restart(tmp_path: Path, synthetic_url: str, ray_local) -> None:
    spec = validate_spec(tiny_spec(
        "diverge", synthetic_url,
        optim={"name": "sgd", "lr": 1e12, "schedule": "constant", "warmup_epochs": 0, "epochs_per_chunk": 4},
        resources={"checkpoint_every_steps": 1, "max_failures": 3},
        storage={"workdir": str(tmp_path / "runs")},
    ))
    log = io.StringIO()
    with pytest.raises(TrainingError, match=r"not retried\): simclr: the loss became (nan|inf) at step \d+ of "
                                            r"chunk 0 \(lr 1e\+12\)"):
        run_experiment(spec, console=Console(file=log, width=200))
    output = log.getvalue()
    assert "worker group restarted" not in output, output[-3000:]
    assert "diverged in chunk 0" in output
    folders = [p for p in (tmp_path / "runs" / "checkpoints").glob("*/*")
               if checkpoint_order(p.name, ["simclr-sequential"])]
    assert folders, "no checkpoint before the bad step"  # the finiteness check runs before every save
    newest = max(folders, key=lambda p: checkpoint_order(p.name, ["simclr-sequential"]))
    state = load_state(newest)
    assert all(torch.isfinite(v).all() for v in state["method"].values() if v.is_floating_point())
