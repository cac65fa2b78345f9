"""What Ray Data's processes unpickle with every chunk's dataset (the split coordinator actor, the read and decode
tasks) must not import torch: each is a fresh process, and torch with torchvision took ~6 s there on 2 cores, paid
once per chunk for the coordinator (a chunk's first batch took 9 s, now 4 s) and ~25 s on a driver's first chunk."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize("module", ["orchestrator.plan.streams", "orchestrator.data.ingest", "trainers.records"])
def test_what_the_data_processes_unpickle_imports_no_torch(module: str) -> None:
    probe = f"import sys, {module}; print(sorted(m for m in ('torch', 'torchvision', 'mlflow') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", f"{module} imports {done.stdout.strip()}"


def test_a_chunk_datasets_read_step_unpickles_without_torch(tmp_path: Path, synthetic_url: str) -> None:
    """The callable Ray Data ships to the read tasks (it holds the stream plan), loaded in a fresh process."""
    import cloudpickle

    from orchestrator.data.ingest import ReadChunkRows
    from orchestrator.plan.planner import build_plan
    from orchestrator.spec.experiment import validate_spec
    from tests.specs import tiny_spec

    plan = build_plan(validate_spec(tiny_spec("light-imports", synthetic_url)))
    pickled = tmp_path / "read_step.pkl"
    pickled.write_bytes(cloudpickle.dumps(ReadChunkRows(plan.stream, [0], {})))
    probe = (f"import pickle, sys; step = pickle.load(open({str(pickled)!r}, 'rb')); "
             "print(type(step).__name__, step.plan.num_chunks, sorted(m for m in ('torch', 'torchvision') "
             "if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["ReadChunkRows", str(plan.stream.num_chunks), "[]"], done.stdout
