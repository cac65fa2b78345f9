"""Ray for the driver: the given cluster, or a fresh local Ray of our own (the embedded default)."""

from __future__ import annotations

import logging
import os
import time

from orchestrator.spec.experiment import Spec

log = logging.getLogger("streamssl")
# streamssl is written against Ray Train V2 (the default from Ray 2.51 on, ray-project/ray#57857): `checkpoint_dir_name`
# in ray.train.report, datasets sharded by the V2 DatasetManager, V2's failure handling. V1 would fail or misbehave.
TRAIN_V2_ENV = "RAY_TRAIN_V2_ENABLED"
# Ray Train V2's controller polls its workers every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s by default), and a worker's
# `ray.train.report` waits until that poll has taken its previous result (a queue of one): each in-chunk checkpoint
# held training for up to 2 s (1.4 s measured on average), and every chunk's end waited for a poll too. Half a second
# unless the user set it; Ray reads it in the driver and passes it on to the controller.
TRAIN_POLL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
TRAIN_POLL_S = "0.5"


def enable_train_v2() -> None:
    """Set RAY_TRAIN_V2_ENABLED=1 in this process before `ray.train` is imported (Ray reads it at import and passes
    it on to its Train controller and workers, and from a Tune trial to its trainer); and the controller's poll
    interval to TRAIN_POLL_S unless it is set."""
    value = os.environ.get(TRAIN_V2_ENV)
    if value is not None and value.strip().lower() not in ("1", "true"):
        log.warning("%s=%s ignored: streamssl needs Ray Train V2", TRAIN_V2_ENV, value)
    os.environ[TRAIN_V2_ENV] = "1"
    os.environ.setdefault(TRAIN_POLL_ENV, TRAIN_POLL_S)


# The raylet warns "N PYTHON worker processes have been started ... Nx the maximum expected startup concurrency" each
# time the node's worker processes pass another multiple of min(CPU cores, num_cpus), from 4x on. A run holds about
# ten actors (Train controller and workers, dataset manager and split coordinator, evaluator, event queue, tallies)
# beside its fractional-CPU read/decode tasks, so on a small machine it passes that mark by design.
POOL_WARNING = "worker processes have been started on node"
POOL_NOTE = ("streamssl: Ray warns when a node has started more than 4x min(CPU cores, num_cpus) Python worker "
             "processes. A run's actors (Ray Train controller and workers, data coordinator, evaluator, queue) and its "
             "fractional-CPU read/decode tasks pass that on a small machine by design: not a fault, nothing to do. "
             "Ray's further warnings of this kind are not shown.")


def explain_worker_pool_warnings() -> bool:
    """Show Ray's worker-pool-size warning once, as POOL_NOTE, in this driver; returns whether it could.

    Ray's driver prints raylet errors from a listener thread through `ray._private.worker.print_to_stdstream` (also
    with log_to_driver=False); that function is wrapped. A Ray without it shows its warnings unchanged."""
    try:
        from ray._private import worker
    except ImportError:  # pragma: no cover - Ray moved it
        return False
    original = getattr(worker, "print_to_stdstream", None)
    if original is None:
        return False
    if getattr(original, "streamssl_pool_note", False):
        return True
    said = False

    def print_to_stdstream(data, *args, **kwargs):
        nonlocal said
        lines = data.get("lines") or []
        if data.get("pid") == "raylet" and any(POOL_WARNING in line for line in lines):
            kept = [line for line in lines if POOL_WARNING not in line]
            if not said:
                said = True
                kept.append(POOL_NOTE)
            if not kept:
                return None
            data = {**data, "lines": kept}
        return original(data, *args, **kwargs)

    print_to_stdstream.streamssl_pool_note = True
    print_to_stdstream.__wrapped__ = original
    worker.print_to_stdstream = print_to_stdstream
    return True


def init_ray(address: str | None, spec: Spec | None, dashboard: bool = False) -> None:
    """`spec` None (a command without one, `streamssl eval`): a local Ray gets the default CPU count.
    `dashboard`: start the local Ray's dashboard too: Ray's state API runs there, and Ray Train's placement-group
    cleaner needs it to free the workers of a trainer whose caller was killed (a sweep trial ASHA stopped)."""
    import ray

    enable_train_v2()
    explain_worker_pool_warnings()
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
    num_cpus = (spec.resources.num_cpus if spec is not None else None) or max(4, os.cpu_count() or 1)
    # address="local": always a fresh Ray of our own, never whatever cluster happens to run on this machine
    # (plain ray.init() would join it, and $RAY_ADDRESS would redirect it).
    options: dict = {}
    state_api = None
    if dashboard:
        port = _free_port()
        options = {"dashboard_host": "127.0.0.1", "dashboard_port": port}
        state_api = f"http://127.0.0.1:{port}"
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=dashboard, log_to_driver=False,
             runtime_env={"env_vars": local_ray_env(state_api)}, **options)


# Every process of a local Ray is told where that Ray's state API is (RAY_API_SERVER_ADDRESS): Ray Train's
# placement-group cleaner asks it once a second whether the controller lives. Left to itself the state client looks
# for "the Ray on this machine": another one whenever several run side by side (tests, other users), and then the
# cleaner never frees a killed trainer's workers; or the address `ray start` last wrote to
# /tmp/ray/ray_current_cluster, a dead cluster whose GCS it waits 40 s for. A fit that ends during that wait loses
# 12 s to the controller's stop of the cleaner (measured: 12.0 s of a 37 s one-worker fit); after it, the cleaner's
# thread has died of the error and guards nothing. Without a dashboard there is no state API: port 0 is one nothing
# listens on, so the query fails at once, as on a machine with no such file, and the loop carries on as Ray means.
NO_STATE_API_ADDRESS = "http://127.0.0.1:0"


def local_ray_env(state_api_address: str | None = None) -> dict[str, str]:
    """`runtime_env` variables for every process of a local Ray we start; `state_api_address`: its dashboard's URL,
    None when it runs without one. Workers print plainly (no Ray Train print patch) and run Train V2."""
    return {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0", TRAIN_V2_ENV: "1",
            "RAY_API_SERVER_ADDRESS": state_api_address or NO_STATE_API_ADDRESS}


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
