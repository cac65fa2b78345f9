"""A driver killed while MLflow builds a new SQLite store (its schema migrations take seconds) must not leave a
half-migrated file that every later `streamssl run` refuses: the store appears whole or not at all."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from orchestrator.tracking.tracker import Tracker

ROOT = Path(__file__).resolve().parents[2]


def test_killed_store_creation_leaves_a_usable_workdir(tmp_path: Path) -> None:
    db = tmp_path / "runs" / "mlflow.db"
    creator = subprocess.Popen(
        [sys.executable, "-c", f"from orchestrator.tracking.tracker import Tracker; Tracker('sqlite:///{db}', 'exp')"],
        cwd=ROOT, start_new_session=True, stderr=subprocess.PIPE, text=True)
    # Kill it once the migrations have begun (MLflow logs "Creating initial MLflow database tables...").
    deadline = time.time() + 60
    line = ""
    while time.time() < deadline and "Creating initial" not in line:
        line = creator.stderr.readline()
        assert line or creator.poll() is None, "the store was created before it could be killed"
    time.sleep(0.5)
    os.killpg(creator.pid, signal.SIGKILL)
    creator.wait(timeout=30)
    assert not db.exists()  # nothing half-built under the real name

    tracker = Tracker(f"sqlite:///{db}", "exp")  # what the next `streamssl run` does
    run_id = tracker.create_run("after-the-kill", {"streamssl.run_type": "plan"})
    tracker.log_metrics(run_id, {"x": 1.0})
    tracker.end_run(run_id)
    assert tracker.get_run(run_id).data.metrics == {"x": 1.0}
    # Only the store and (while a killed creator's journal lingers) its stale build files; iterdir has no order.
    assert sorted(p.name for p in db.parent.iterdir()) == sorted(
        ["mlflow.db", *[p.name for p in db.parent.glob(".mlflow.db.init-*")]])
