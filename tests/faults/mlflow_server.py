"""A real MLflow tracking server for fault tests: `python -m mlflow server` on 127.0.0.1 at a free port.

SQLite backend store and a local artifacts destination (served through the server, `--serve-artifacts`),
both under one folder, so the server can be stopped (SIGTERM, wait) and started again on the SAME port with
the SAME store, the way an operator restarts a crashed tracking server:

    from tests.faults.mlflow_server import MlflowServer
    with MlflowServer(tmp_path) as server:
        tracker = Tracker(server.uri, "exp")
        server.stop()          # clients now see "connection refused"
        server.start()         # same port, same store; returns once /health answers
        server.pause(); server.resume()   # SIGSTOP / SIGCONT: a hung server rather than a dead one
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


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class MlflowServer:
    """Starts on __enter__ (or start()), stops on __exit__ (or stop()); restartable on the same port and store."""

    def __init__(self, folder: str | Path, port: int | None = None, start_timeout: float = 90.0):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.start_timeout = start_timeout
        self.process: subprocess.Popen | None = None
        self.log_path = self.folder / "server.log"
        self.started_at: float | None = None  # when /health first answered after the latest start()

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def store_uri(self) -> str:
        return f"sqlite:///{self.folder / 'mlflow.db'}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def healthy(self, timeout: float = 1.0) -> bool:
        try:
            with urllib.request.urlopen(f"{self.uri}/health", timeout=timeout) as response:
                return response.status == 200
        except Exception:
            return False

    def start(self) -> "MlflowServer":
        if self.running:
            return self
        cmd = [
            sys.executable, "-m", "mlflow", "server",
            "--backend-store-uri", self.store_uri,
            "--artifacts-destination", str(self.folder / "artifacts"),
            "--serve-artifacts",
            "--host", "127.0.0.1", "--port", str(self.port),
            "--workers", "1",
        ]
        env = dict(os.environ)
        env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
        env["PYTHONUNBUFFERED"] = "1"
        log = open(self.log_path, "ab")
        # Own process group, so stop() ends the server and the workers it forks, and nothing else.
        self.process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                        cwd=self.folder, start_new_session=True)
        log.close()
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {self.process.returncode}:\n{self.log_tail()}")
            if self.healthy():
                self.started_at = time.monotonic()
                return self
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"mlflow server on {self.uri} not healthy after {self.start_timeout}s:\n{self.log_tail()}")

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM the server's process group and wait; SIGKILL if it does not go within `timeout`."""
        if self.process is None:
            return
        process, self.process = self.process, None
        if process.poll() is None:
            try:
                os.killpg(process.pid, signal.SIGCONT)  # in case it was paused
                os.killpg(process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                process.wait(10)
        # The port must really be free (and nothing answering) before the caller relies on the outage.
        deadline = time.monotonic() + 10
        while self.healthy(timeout=0.2) and time.monotonic() < deadline:
            time.sleep(0.1)

    def pause(self) -> None:
        """SIGSTOP the server's process group: connections are still accepted by the kernel, nothing answers
        (a hung server, as opposed to a dead one)."""
        if self.running:
            os.killpg(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        if self.running:
            os.killpg(self.process.pid, signal.SIGCONT)

    def restart(self) -> "MlflowServer":
        self.stop()
        return self.start()

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def __enter__(self) -> "MlflowServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
