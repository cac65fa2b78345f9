"""Micro-benchmark: what MLflow logging through ``orchestrator.tracking.tracker.Tracker`` costs per call, against a
SQLite store or a real ``mlflow server`` on 127.0.0.1 (`LocalMlflowServer`). Used by ``bench.overheads``.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench.common import median


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LocalMlflowServer:
    """`mlflow server` on 127.0.0.1 with its own SQLite store, in its own process group (stopped by that group id)."""

    def __init__(self, folder: Path, timeout: float = 120.0):
        self.folder, self.timeout = folder, timeout
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.start_s: float | None = None

    def __enter__(self) -> "LocalMlflowServer":
        cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{self.folder / 'mlflow.db'}",
               "--artifacts-destination", str(self.folder / "artifacts"), "--serve-artifacts",
               "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"]
        env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
        log = open(self.folder / "server.log", "ab")
        started = time.perf_counter()
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.folder,
                                     start_new_session=True)
        log.close()
        while time.perf_counter() - started < self.timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {self.proc.returncode}: "
                                   f"{(self.folder / 'server.log').read_text(errors='replace')[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=1):
                    self.start_s = time.perf_counter() - started
                    return self
            except OSError:
                time.sleep(0.3)
        self.__exit__()
        raise RuntimeError(f"mlflow server on {self.uri} did not answer within {self.timeout:.0f} s")

    def __exit__(self, *exc: Any) -> None:
        if self.proc is None:
            return
        proc, self.proc = self.proc, None
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)  # the group this server's Popen created, nothing else
            except ProcessLookupError:
                pass
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)


def logging_costs(uri: str, calls: int, chunks: int, steps_per_chunk: int, spec, artifact_root: str | None = None
                  ) -> dict[str, Any]:
    """Per-call cost of logging one step's metrics, and of the calls log_chunk makes for one chunk."""
    from orchestrator.spec.experiment import flatten
    from orchestrator.tracking import tags as tr
    from orchestrator.tracking.tracker import Tracker

    tracker = Tracker(uri, "bench-logging", artifact_root)
    run_id = tracker.create_run("per-step-logging", {tr.RUN_TYPE: "bench"})
    tracker.log_metrics(run_id, {"loss": 1.0}, step=0)  # warm: connection, tables
    per_call = []
    for i in range(calls):
        t = time.perf_counter()
        tracker.log_metrics(run_id, {"loss": 5.0 - i * 1e-3, "lr": 0.3, "samples_per_s": 1000.0 + i}, step=i + 1)
        per_call.append(time.perf_counter() - t)
    tracker.end_run(run_id)
    params = flatten(spec)
    per_chunk = []
    for k in range(chunks):
        t = time.perf_counter()
        now_ms = int(time.time() * 1000)
        chunk_run = tracker.create_run(f"bench/chunk-{k}", {tr.RUN_TYPE: "chunk", tr.CHUNK: str(k)}, start_ms=now_ms)
        tracker.log_params(chunk_run, {**params, "line.method": "simclr", "line.strategy": "sequential",
                                       "chunk": str(k)})
        tracker.log_metric_series(chunk_run, "train_loss", [5.0 - 0.01 * s for s in range(steps_per_chunk)],
                                  now_ms - 1000, now_ms)
        tracker.log_metrics(chunk_run, {"final_loss": 4.0, "steps": steps_per_chunk, "samples": 128 * steps_per_chunk,
                                        "train_seconds": 1.0, "samples_per_s": 100.0, "world_size": 2, "restarts": 0,
                                        "resumed_from_step": 0, "corrupt_rows_skipped_total": 0,
                                        "training_rows": 800})
        tracker.log_dataset(chunk_run, "file:///bench/data", "bench-chunks", f"digest-{k:032d}", "train")
        tracker.end_run(chunk_run, "FINISHED")
        per_chunk.append(time.perf_counter() - t)
    return {"uri": uri if not uri.startswith("sqlite") else "sqlite (local file)", "calls": calls,
            "per_call_s": per_call, "median_per_call_s": median(per_call),
            "log_chunk_equivalent_s": per_chunk, "median_log_chunk_s": median(per_chunk),
            "params_per_chunk_run": len(params) + 3, "steps_per_chunk": steps_per_chunk}
