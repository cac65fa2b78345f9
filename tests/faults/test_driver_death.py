"""The driver (`streamssl run`, with the local Ray it started) SIGKILLed mid-experiment: `streamssl run --resume`
finishes the remaining jobs without redoing finished ones, continues the same plan run, and leaves nothing RUNNING."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from orchestrator import tracking as tr
from tests.specs import tiny_spec

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def chunk_runs(client: MlflowClient, name: str) -> list:
    exp = client.get_experiment_by_name(name)
    if exp is None:
        return []
    return client.search_runs([exp.experiment_id], f"tags.`{tr.RUN_TYPE}` = 'chunk'")


def test_resume_after_driver_kill(tmp_path: Path, synthetic_url: str) -> None:
    spec = tiny_spec("driver-death", synthetic_url, stream={"chunks": 3}, optim={"epochs_per_chunk": 4},
                     resources={"checkpoint_every_steps": 4}, storage={"workdir": str(tmp_path / "runs")})
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    command = [sys.executable, "-m", "cli.app", "run", str(path)]
    # Its own session, so the kill takes the driver and the local Ray it started, like a lost machine.
    driver = subprocess.Popen(command, cwd=ROOT, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 400
        while time.time() < deadline and not chunk_runs(client, "driver-death"):
            assert driver.poll() is None, "the driver ended before it could be killed"
            time.sleep(0.5)
        before = chunk_runs(client, "driver-death")
        assert before, "no chunk finished in time"
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait(timeout=30)
    killed_at = time.time()
    finished_before = {r.data.tags[tr.CHUNK]: r.info.run_id for r in before}
    assert len(finished_before) < 3

    resumed = subprocess.run([*command, "--resume"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    recovery_s = time.time() - killed_at

    after = chunk_runs(client, "driver-death")
    assert sorted(r.data.tags[tr.CHUNK] for r in after) == ["0", "1", "2"]  # each chunk once: no duplicates
    for chunk, run_id in finished_before.items():  # finished work was not redone
        assert {r.data.tags[tr.CHUNK]: r.info.run_id for r in after}[chunk] == run_id
    exp = client.get_experiment_by_name("driver-death")
    every = client.search_runs([exp.experiment_id])
    plans = [r for r in every if r.data.tags.get(tr.RUN_TYPE) == "plan"]
    assert len(plans) == 1 and plans[0].info.status == "FINISHED"  # the same plan run, continued
    assert not [r for r in every if r.info.status == "RUNNING"]
    assert all(r.info.status == "FINISHED" for r in after)
    print(f"resume finished the plan {recovery_s:.0f} s after the kill")
