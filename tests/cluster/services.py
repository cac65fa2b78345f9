"""The shared services of a cluster test, on loopback: PostgreSQL + `mlflow server` started with the same script
an operator uses (cluster/mlflow/start-local.sh), optionally with artifacts on an S3 endpoint.

    with PostgresMlflow(artifacts="s3://bucket/mlflow", s3_endpoint=s3.endpoint_url) as server:
        MlflowClient(server.uri)

PostgreSQL must be installed (Debian's package: /usr/lib/postgresql/*/bin); without it the test is skipped, unless
STREAMSSL_REQUIRE_POSTGRES=1 (what .ci/run sets), which makes it fail loudly.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
START_LOCAL = ROOT / "cluster" / "mlflow" / "start-local.sh"


def require_postgres() -> None:
    required = os.environ.get("STREAMSSL_REQUIRE_POSTGRES") == "1"
    missing = None
    if not glob.glob("/usr/lib/postgresql/*/bin/initdb"):
        missing = "PostgreSQL server binaries (/usr/lib/postgresql/*/bin/initdb; apt-get install postgresql)"
    elif importlib.util.find_spec("psycopg2") is None:
        missing = "psycopg2 (pip install psycopg2-binary)"
    if missing:
        if required:
            pytest.fail(f"STREAMSSL_REQUIRE_POSTGRES=1 but {missing} is missing")
        pytest.skip(f"{missing} not installed")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class PostgresMlflow:
    def __init__(self, artifacts: str | None = None, s3_endpoint: str | None = None):
        require_postgres()
        # As root PostgreSQL runs as `postgres`, which cannot enter pytest's 0700 temp folders.
        self.base = Path(tempfile.mkdtemp(prefix="streamssl-mlflow-"))
        self.base.chmod(0o755)
        self.state = self.base / "state"
        self.pg_port, self.port = free_port(), free_port()
        self.env = dict(os.environ, STREAMSSL_PG_PORT=str(self.pg_port), STREAMSSL_MLFLOW_PORT=str(self.port),
                        MLFLOW_BIN=str(Path(sys.executable).parent / "mlflow"))
        if artifacts:
            self.env["MLFLOW_ARTIFACTS_DESTINATION"] = artifacts
        if s3_endpoint:
            self.env["MLFLOW_S3_ENDPOINT_URL"] = s3_endpoint
        self.started = False
        self.start_output = ""  # what `start-local.sh start` printed (the tracking URI, how to stop it)

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def script(self, action: str) -> str:
        """Run `start-local.sh ACTION` on this server's state (start, stop, status); its output."""
        return self._script(action)

    def _script(self, action: str) -> str:
        done = subprocess.run([str(START_LOCAL), action, str(self.state)], env=self.env, capture_output=True,
                              text=True, timeout=300)
        if done.returncode != 0:
            raise RuntimeError(f"start-local.sh {action} failed:\n{done.stdout}\n{done.stderr}")
        return done.stdout

    def __enter__(self) -> "PostgresMlflow":
        try:
            self.start_output = self._script("start")
        except BaseException:
            self._script("stop")
            shutil.rmtree(self.base, ignore_errors=True)
            raise
        self.started = True
        return self

    def __exit__(self, *exc) -> None:
        try:
            self._script("stop")
        finally:
            shutil.rmtree(self.base, ignore_errors=True)
