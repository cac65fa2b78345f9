"""The driver (`streamssl run`, with the local Ray it started) SIGKILLed mid-experiment, then `streamssl run --resume`:
every chunk ends up with exactly one chunk run and one evaluation run, finished work is not redone, the same plan
run is continued and ends FINISHED with every line's continual metrics, and nothing is left RUNNING.

Two runs, four deaths: one run killed three times at different moments (after its first finished chunk run, after a
chunk logged by the resumed driver, after an evaluation run of the resumed driver: evaluations in flight), resumed
after each; and one killed while it is blocked on a hung tracking server with training ahead of it (chunks persisted,
never logged). Issue 23 folded the single kill-and-resume test into the repeated one: its kill is the first of the
three, and its checks (finished chunk runs are not redone; in-chunk checkpoints) are made after every kill there."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest
import yaml
from mlflow.tracking import MlflowClient

from orchestrator.tracking import tags as tr
from tests.faults.mlflow_server import MlflowServer
from tests.specs import tiny_spec

pytestmark = pytest.mark.slow
EPOCHS_HUNG = 1
ROOT = Path(__file__).resolve().parents[2]


def runs_of(client: MlflowClient, name: str, run_type: str) -> list:
    exp = client.get_experiment_by_name(name)
    if exp is None:
        return []
    return client.search_runs([exp.experiment_id], f"tags.`{tr.RUN_TYPE}` = '{run_type}'")


def wait_for(what: str, condition: Callable[[], bool], driver: subprocess.Popen, timeout: float = 400) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        assert driver.poll() is None, f"the driver ended before {what}"
        time.sleep(0.2)
    pytest.fail(f"timed out waiting for {what}")


def start_driver(command: list[str], log: Path) -> subprocess.Popen:
    # Its own session, so the kill takes the driver and the local Ray it started, like a lost machine.
    return subprocess.Popen(command, cwd=ROOT, start_new_session=True, stdout=open(log, "a"), stderr=subprocess.STDOUT)


def kill(driver: subprocess.Popen) -> None:
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait(timeout=30)


def resume(command: list[str]) -> subprocess.CompletedProcess:
    done = subprocess.run([*command, "--resume"], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "incomplete" not in done.stdout
    return done


def assert_complete_record(client: MlflowClient, name: str, lines: list[str], chunks: int) -> dict[str, str]:
    """Exactly one FINISHED chunk run and one FINISHED evaluation run per (line, chunk); the plan run FINISHED once,
    with every line's continual metrics. Returns {"line/chunk": chunk run id}."""
    chunk_runs = runs_of(client, name, "chunk")
    keys = sorted((r.data.tags[tr.LINE], int(r.data.tags[tr.CHUNK])) for r in chunk_runs)
    assert keys == sorted((line, c) for line in lines for c in range(chunks))  # each once: none lost, none twice
    assert all(r.info.status == "FINISHED" for r in chunk_runs)
    evals = runs_of(client, name, "eval")
    evaluated = sorted(r.data.tags[tr.EVALUATES] for r in evals)
    assert evaluated == sorted(r.info.run_id for r in chunk_runs)  # one evaluation run per chunk run
    assert all(r.info.status == "FINISHED" and "knn_top1" in r.data.metrics for r in evals)
    plans = runs_of(client, name, "plan")
    assert len(plans) == 1 and plans[0].info.status == "FINISHED"  # the same plan run, continued
    for line in lines:
        for metric in ("avg_acc", "bwt", "forgetting"):
            assert f"{line}.knn.{metric}" in plans[0].data.metrics, (line, metric, sorted(plans[0].data.metrics))
    exp = client.get_experiment_by_name(name)
    assert not [r for r in client.search_runs([exp.experiment_id]) if r.info.status == "RUNNING"]
    return {f"{r.data.tags[tr.LINE]}/{r.data.tags[tr.CHUNK]}": r.info.run_id for r in chunk_runs}


def write_spec(tmp_path: Path, name: str, **sections) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(tiny_spec(name, storage={"workdir": str(tmp_path / "runs")}, **sections)))
    return path


def test_chunks_persisted_while_tracking_hung_are_logged_after_resume(tmp_path: Path, synthetic_url: str) -> None:
    """The window of issue 8 item 1, made deterministic: the tracking server hangs (SIGSTOP) before chunk 0's run is
    logged, training runs ahead (chunk 0's end checkpoint and a chunk-1 checkpoint on storage), the driver dies."""
    with MlflowServer(tmp_path / "mlflow") as server:
        # 2 chunks of 1 epoch (18 steps, a checkpoint every 3): chunk 0 persisted and chunk 1 checkpointed while the
        # server hangs is the whole window; the server is paused at chunk 0's first checkpoint, 15 steps before its
        # end (a third chunk, and a second and third epoch, only trained longer; issue 23).
        path = write_spec(tmp_path, "driver-death-hung", data_url=synthetic_url, stream={"chunks": 2},
                          optim={"epochs_per_chunk": EPOCHS_HUNG}, resources={"checkpoint_every_steps": 3})
        client = MlflowClient(server.uri)
        command = [sys.executable, "-m", "cli.app", "run", str(path), "--tracking-uri", server.uri]
        checkpoints = tmp_path / "runs" / "checkpoints"
        driver = start_driver(command, tmp_path / "driver.log")
        try:
            wait_for("training inside chunk 0", lambda: any(checkpoints.glob("*/simclr-sequential.chunk-000.step-*")),
                     driver)
            server.pause()
            wait_for("chunk 0 persisted and chunk 1 checkpointed while the driver is blocked",
                     lambda: any(checkpoints.glob("*/simclr-sequential.chunk-000/chunk_event.json"))
                     and any(checkpoints.glob("*/simclr-sequential.chunk-001*")), driver)
        finally:
            kill(driver)
            server.resume()
        assert not runs_of(client, "driver-death-hung", "chunk"), "chunk 0 was logged: the window was missed"

        done = resume(command)
        assert "recovered simclr-sequential/chunk-0: persisted, but not logged" in done.stdout
        after = assert_complete_record(client, "driver-death-hung", ["simclr-sequential"], 2)
        chunk0 = client.get_run(after["simclr-sequential/0"])
        assert chunk0.data.metrics["steps"] == EPOCHS_HUNG * (chunk0.data.metrics["training_rows"] // 32)


def test_repeated_kills_leave_every_chunk_logged_and_evaluated_once(tmp_path: Path, synthetic_url: str,
                                                                     fresh_mlflow_store) -> None:
    """Kill at three different moments, resuming after each: as soon as a chunk run appears (its evaluation in
    flight), as soon as the resumed driver logs a chunk of its own, and once an evaluation run has appeared."""
    lines = ["simclr-sequential", "simclr-joint"]
    # 2 chunks of 1 epoch (18 steps; joint's chunk 1, both chunks, 37), checkpointed every 4 steps inside them: the
    # resumes need finished and unfinished chunks and in-chunk checkpoints, not long chunks. The lines train one after
    # the other (sequential's chunks 0 and 1, then joint's), so the first two kills land on sequential's chunk 0 and
    # chunk 1, the third on the evaluation collected at the third driver's first chunk event (sequential's chunk 1
    # said again as its worker group starts, else joint's chunk 0 or 1), and the last resume still has joint's work
    # left; a third chunk only trained and evaluated longer (issue 23). The linear probe's 30 epochs keep evaluations
    # in flight long enough for a kill to catch one.
    path = write_spec(tmp_path, "driver-death-repeated", data_url=synthetic_url, stream={"chunks": 2},
                      lines={"method": ["simclr"], "strategy": ["sequential", "joint"]},
                      optim={"epochs_per_chunk": 1}, eval={"linear": {"epochs": 30}, "baseline": True},
                      resources={"checkpoint_every_steps": 4})
    client = MlflowClient(fresh_mlflow_store(tmp_path / "runs" / "mlflow.db"))  # the session's migrated empty store
    command = [sys.executable, "-m", "cli.app", "run", str(path)]
    name = "driver-death-repeated"

    def chunk_count() -> int:
        return len([r for r in runs_of(client, name, "chunk") if r.info.status == "FINISHED"])

    moments = [
        ("the first chunk run", lambda seen: chunk_count() > seen),
        ("a chunk logged by the resumed driver", lambda seen: chunk_count() > seen),
        ("an evaluation run of the resumed driver",
         lambda seen: len(runs_of(client, name, "eval")) > seen_evals[0]),
    ]
    seen_evals = [0]
    unevaluated_at_kill = []
    finished_before: dict[str, str] = {}  # "line/chunk" -> the chunk run a killed driver had finished
    for what, condition in moments:
        seen, seen_evals[0] = chunk_count(), len(runs_of(client, name, "eval"))
        args = command if what == "the first chunk run" else [*command, "--resume"]
        driver = start_driver(args, tmp_path / "driver.log")
        try:
            wait_for(what, lambda: condition(seen), driver, timeout=600)
        finally:
            kill(driver)
        finished = [r for r in runs_of(client, name, "chunk") if r.info.status == "FINISHED"]
        for r in finished:  # a resume keeps what an earlier driver finished (checked below against the end record)
            key = f"{r.data.tags[tr.LINE]}/{r.data.tags[tr.CHUNK]}"
            assert finished_before.setdefault(key, r.info.run_id) == r.info.run_id, (what, key)
        logged = {r.info.run_id for r in finished}
        evaluated = {r.data.tags[tr.EVALUATES] for r in runs_of(client, name, "eval") if r.info.status == "FINISHED"}
        unevaluated_at_kill.append(len(logged - evaluated))
    # At least one kill caught a finished chunk with its evaluation in flight (the case that used to be lost).
    assert max(unevaluated_at_kill) >= 1, unevaluated_at_kill

    killed_at = time.time()
    resume(command)
    print(f"the last resume finished the plan {time.time() - killed_at:.0f} s after the third kill")
    after = assert_complete_record(client, name, lines, 2)
    for key, run_id in finished_before.items():  # finished work was not redone
        assert after[key] == run_id, key
    plan = runs_of(client, name, "plan")[0]
    assert "simclr.knn.st_jt_gap" in plan.data.metrics and "simclr-sequential.knn.fwt" in plan.data.metrics
