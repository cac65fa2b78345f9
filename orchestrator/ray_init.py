"""Ray for the driver: the given cluster, or a fresh local Ray of our own (the embedded default)."""

from __future__ import annotations

import logging
import os
import time

from orchestrator.spec import Spec

log = logging.getLogger("streamssl")
# streamssl is written against Ray Train V2 (the default from Ray 2.51 on, ray-project/ray#57857): `checkpoint_dir_name`
# in ray.train.report, datasets sharded by the V2 DatasetManager, V2's failure handling. V1 would fail or misbehave.
TRAIN_V2_ENV = "RAY_TRAIN_V2_ENABLED"


def enable_train_v2() -> None:
    """Set RAY_TRAIN_V2_ENABLED=1 in this process before `ray.train` is imported (Ray reads it at import and passes
    it on to its Train controller and workers, and from a Tune trial to its trainer)."""
    value = os.environ.get(TRAIN_V2_ENV)
    if value is not None and value.strip().lower() not in ("1", "true"):
        log.warning("%s=%s ignored: streamssl needs Ray Train V2", TRAIN_V2_ENV, value)
    os.environ[TRAIN_V2_ENV] = "1"


def init_ray(address: str | None, spec: Spec, dashboard: bool = False) -> None:
    """`dashboard`: start the local Ray's dashboard too: Ray's state API runs there, and Ray Train's placement-group
    cleaner needs it to free the workers of a trainer whose caller was killed (a sweep trial ASHA stopped)."""
    import ray

    enable_train_v2()
    if ray.is_initialized():
        return
    if address:
        # Ray Client's proxy forks a server per connection, and that child can die of a gRPC poller race at fork
        # (ray-project/ray#63202: "Starting Ray client server failed"): a fresh connection usually works.
        for attempt in range(3):
            try:
                ray.init(address=address, log_to_driver=False)
                return
            except ConnectionAbortedError as exc:
                if not address.startswith("ray://") or "client server failed" not in str(exc) or attempt == 2:
                    raise
                ray.shutdown()
                time.sleep(2.0 * (attempt + 1))
    # Declare more logical CPUs than cores: training workers hold fractional CPUs and Ray Data's read/decode tasks
    # and the evaluation actor need slots beside them, or the pipeline stalls on a 2-core machine.
    num_cpus = spec.resources.num_cpus or max(4, os.cpu_count() or 1)
    # address="local": always a fresh Ray of our own, never whatever cluster happens to run on this machine
    # (plain ray.init() would join it, and $RAY_ADDRESS would redirect it).
    env = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0", TRAIN_V2_ENV: "1"}
    options: dict = {}
    if dashboard:
        # Tell every worker where this Ray's state API is: by default it looks for "the latest Ray on this machine",
        # which is another one whenever several run side by side (tests, other users), and Ray Train's
        # placement-group cleaner then never frees a killed trainer's workers.
        port = _free_port()
        options = {"dashboard_host": "127.0.0.1", "dashboard_port": port}
        env["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=dashboard, log_to_driver=False,
             runtime_env={"env_vars": env}, **options)


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
