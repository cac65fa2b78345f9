"""The embedded local Ray: its processes never consult another cluster's state API.

`ray start` leaves its address in `<tmp>/ray/ray_current_cluster`, and killing that cluster does not remove it. Ray
Train's placement-group cleaner asks the state API whether the controller lives; on a local Ray without a dashboard
the state client used to take that dead address and wait 40 s for its GCS: a fit that ended meanwhile lost 12 s, and
after it the cleaner's thread had died of the error."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from orchestrator.train.ray_init import NO_STATE_API_ADDRESS

REPO = Path(__file__).resolve().parents[3]

ASK_STATE_API_FROM_AN_ACTOR = """
import json, os, time
from orchestrator.train.ray_init import init_ray
init_ray(None, None)
import ray

@ray.remote(num_cpus=0)
class Probe:
    def ask(self):
        from ray.util.state import get_actor
        started = time.monotonic()
        try:
            get_actor(ray.get_runtime_context().get_actor_id(), timeout=10)
            outcome = "answered"
        except Exception as exc:
            outcome = type(exc).__name__
        return {"outcome": outcome, "seconds": time.monotonic() - started,
                "api_server": os.environ.get("RAY_API_SERVER_ADDRESS")}

print("RESULT", json.dumps(ray.get(Probe.remote().ask.remote())))
"""


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
def test_a_dead_clusters_address_file_does_not_stall_the_state_api_of_a_local_ray() -> None:
    # A short private TMPDIR: Ray puts its session (and unix sockets, 107 bytes at most) and the address file there.
    with tempfile.TemporaryDirectory(prefix="sst-", dir="/tmp") as tmp:
        address_file = Path(tmp) / "ray" / "ray_current_cluster"
        address_file.parent.mkdir()
        address_file.write_text(f"127.0.0.1:{_closed_port()}")
        env = {**os.environ, "TMPDIR": tmp, "PYTHONPATH": str(REPO)}
        env.pop("RAY_ADDRESS", None)
        env.pop("RAY_API_SERVER_ADDRESS", None)
        done = subprocess.run([sys.executable, "-c", ASK_STATE_API_FROM_AN_ACTOR], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))[7:])
    # No dashboard, so no state API: the query must fail at once (it took 40 s on the dead address).
    assert result["outcome"] == "ServerUnavailable", result
    assert result["seconds"] < 5, result
    assert result["api_server"] == NO_STATE_API_ADDRESS
