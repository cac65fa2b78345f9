"""A two-node Ray cluster on one host, started the way an operator does: `ray start --head`, then
`ray start --address` for a second node with its own resources. The dashboard (Jobs API) binds 127.0.0.1.

    with LocalRayCluster(tmp_path, cpus_per_node=3) as cluster:
        cluster.dashboard_url   # http://127.0.0.1:<port>, for `streamssl submit --address`
        cluster.gcs_address     # 127.0.0.1:<port>, for ray.init(address=...)
        cluster.client_address  # ray://127.0.0.1:<port>, for `streamssl run --address`

Stopping kills only this cluster's processes (found by its GCS port in their command lines, and their children): `ray stop` would
also take down any other Ray on the machine, such as the in-process one other tests use.
"""

from __future__ import annotations

import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
from ray._common.utils import get_ray_address_file

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LocalRayCluster:
    def __init__(self, folder: Path, cpus_per_node: int = 3, nodes: int = 2, env: dict[str, str] | None = None):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.cpus_per_node = cpus_per_node
        self.nodes = nodes
        self.gcs_port = free_port()
        self.dashboard_port = free_port()
        self.client_port = free_port()
        # The job's `python` must be this interpreter (the one with streamssl's dependencies).
        # Token authentication, as Ray >= 2.59 has by default: one token shared by both nodes and every client
        # (`client_env` is what a client process such as `streamssl submit` needs beside the address).
        self.token_path = self.folder / "auth_token"
        self.token_path.write_text(secrets.token_hex(32))
        self.client_env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(self.token_path)}
        self.env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
                    "RAY_USAGE_STATS_ENABLED": "0", **self.client_env, **(env or {})}
        self.env.pop("RAY_ADDRESS", None)
        self.env.pop("RAY_AUTH_TOKEN", None)

    @property
    def gcs_address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def client_address(self) -> str:
        return f"ray://127.0.0.1:{self.client_port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def _ray(self, *args: str) -> None:
        log = self.folder / "ray-start.log"
        with open(log, "a") as out:
            done = subprocess.run([str(BIN / "ray"), *args], env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                  timeout=180)
        if done.returncode != 0:
            raise RuntimeError(f"ray {' '.join(args)} failed:\n{log.read_text()[-3000:]}")

    def start(self) -> "LocalRayCluster":
        self._ray("start", "--head", f"--port={self.gcs_port}", "--node-ip-address=127.0.0.1",
                  f"--num-cpus={self.cpus_per_node}", "--num-gpus=0", '--resources={"node_head": 1}',
                  f"--ray-client-server-port={self.client_port}", "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
                  # Each node's agent on a port of its own: the default (52365) is taken by any other Ray on this
                  # host, and then job submission finds "no available agent".
                  f"--dashboard-agent-listen-port={free_port()}", "--disable-usage-stats")
        for index in range(1, self.nodes):
            self._ray("start", f"--address={self.gcs_address}", "--node-ip-address=127.0.0.1",
                      f"--num-cpus={self.cpus_per_node}", "--num-gpus=0",
                      f'--resources={{"node_{index}": 1}}', f"--dashboard-agent-listen-port={free_port()}",
                      "--disable-usage-stats")
        self._wait_for_jobs_api()
        return self

    def _wait_for_jobs_api(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                request = urllib.request.Request(f"{self.dashboard_url}/api/version",
                                                 headers={"Authorization": f"Bearer {self.token_path.read_text()}"})
                with urllib.request.urlopen(request, timeout=2) as response:
                    if response.status == 200:
                        return
            except Exception:
                time.sleep(0.5)
        raise RuntimeError(f"the Jobs API on {self.dashboard_url} did not answer within {timeout} s")

    def processes(self) -> list[psutil.Process]:
        """This cluster's processes: any whose command line names its GCS port (at whatever address Ray bound:
        on a host with several interfaces the raylets get `--gcs-address=<host ip>:<port>`, not 127.0.0.1), and
        their children (agents)."""
        port = re.compile(rf"(?<![\d]){self.gcs_port}(?![\d])")
        marks = re.compile(rf"(:{port.pattern}|--gcs_server_port={port.pattern}|--port={port.pattern})")
        found: dict[int, psutil.Process] = {}
        for proc in psutil.process_iter(["pid", "cmdline"]):
            cmdline = " ".join(proc.info.get("cmdline") or [])
            if proc.pid != os.getpid() and marks.search(cmdline):
                found[proc.pid] = proc
                try:
                    found.update({child.pid: child for child in proc.children(recursive=True)})
                except psutil.NoSuchProcess:
                    pass
        found.pop(os.getpid(), None)
        return list(found.values())

    def stop(self) -> None:
        procs = self.processes()
        for proc in procs:
            try:
                proc.send_signal(signal.SIGTERM)
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(procs, timeout=15)
        for proc in alive:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=10)
        # `ray start` wrote this cluster's address to Ray's "current cluster" file, and killing it does not remove
        # it: clients that look for "the Ray on this machine" (the state API of every later local Ray's trainers)
        # would wait 40 s for this dead GCS. Removed only while it still names this cluster.
        current = Path(get_ray_address_file(None))  # where `ray start` wrote it: RAY_TMPDIR, TMPDIR or /tmp
        try:
            if current.read_text().strip().endswith(f":{self.gcs_port}"):
                current.unlink()
        except OSError:
            pass

    def __enter__(self) -> "LocalRayCluster":
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()
