"""The retrying MLflow client: every call rides out a tracking-server outage, and writes land exactly once.

    client = RetryingClient("http://127.0.0.1:5000")      # probes <uri>/health first: TrackingError in seconds
    client.log_batch(run_id, metrics=[...])                # retried through an outage, never stored twice
    client.call("set_terminated", lambda: client._client.set_terminated(run_id))   # any call, same loop

----------------------------------
* Start-up: for an ``http(s)://`` URI, ``RetryingClient(uri)`` (and so ``Tracker(uri)``) probes ``<uri>/health``
  (urllib, short timeouts, at most ``STREAMSSL_TRACKING_CONNECT_SECONDS``, default 5 s) before anything else and
  raises ``TrackingError`` naming the URI — seconds, not MLflow's minutes of built-in retries. SQLite and file
  stores are not probed.
* During a run: every call through the client (``Tracker.client``, a wrapper around the one MlflowClient; the
  Tracker's own methods use it too, as may callers that reach for ``tracker.client.update_run``...) runs in a retry
  loop with exponential backoff (0.5 s doubling to 5 s) that rides out an outage of up to
  ``STREAMSSL_TRACKING_RETRY_SECONDS`` (default 300 s), measured from the first failed attempt of the outage.
  MLflow's own HTTP retries are switched off for these calls (``MLFLOW_HTTP_REQUEST_MAX_RETRIES=0`` while a call
  runs) so that this loop (:mod:`orchestrator.retry`) alone decides how long to wait; a per-attempt timeout
  (``MLFLOW_HTTP_REQUEST_TIMEOUT`` if set, else ``STREAMSSL_TRACKING_REQUEST_TIMEOUT``, default 30 s) keeps a hung
  server from holding one attempt for MLflow's default 120 s. One warning is logged when an outage starts and
  one when the server answers again. A call that still fails at the deadline raises ``TrackingError`` naming the
  URI; later calls in the same outage try once and fail fast instead of waiting the whole deadline again.
  Errors the server returns for a bad request (4xx) are not retried. Calls are synchronous: when a method
  returns, what it logged is stored (nothing is buffered).
* Exactly once: a failed attempt may still have landed (the response was lost, or the request timed out while
  the server went on). So a retry never blindly re-sends what is not idempotent:
  - ``log_batch``: before re-sending, the run's metric history for the batch's keys is read back and the points
    already stored (same key, step, timestamp, value) are dropped; params (same value) and tags (overwrite) are
    idempotent in MLflow. SQL stores would also drop an exact duplicate point, file stores would not; this check
    does not depend on the backend. Metric points are built (with their timestamps) once, before the first
    attempt, so a re-sent point is identical to the one that may have landed.
  - ``create_run``: every run gets a unique ``streamssl.client_token`` tag; a retry first searches for a run with
    that token and returns it instead of creating a second run.
  - ``create_logged_model``: the same, with the token as a tag of the model (searched with
    ``search_logged_models``).
  - ``log_outputs`` (a run's output models, which MLflow refuses to store twice): a retry first reads the run's
    outputs back and re-sends only the missing ones.
  - ``set_terminated``, ``update_run``, ``set_tag``, ``log_inputs`` (datasets and inputs are de-duplicated by
    MLflow), ``finalize_logged_model`` and ``log_artifact`` (same path overwritten) are idempotent and simply
    re-sent.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

from orchestrator import retry
from orchestrator.errors import TrackingError
from orchestrator.retry import RetryPolicy
from orchestrator.tracking.tags import CLIENT_TOKEN

RETRY_ENV = "STREAMSSL_TRACKING_RETRY_SECONDS"
CONNECT_ENV = "STREAMSSL_TRACKING_CONNECT_SECONDS"
REQUEST_TIMEOUT_ENV = "STREAMSSL_TRACKING_REQUEST_TIMEOUT"
DEFAULT_RETRY_SECONDS = 300.0
DEFAULT_CONNECT_SECONDS = 5.0
DEFAULT_REQUEST_TIMEOUT = 30
SERVER_ERROR_ATTEMPTS = 3  # a 500 the server answers with (not an outage) is retried this many times at most
# 0.5 s doubling to 5 s, +-20 %, at least 50 ms apart; the deadline is the call's retry_seconds.
_POLICY = RetryPolicy(attempts=None, initial_delay=0.5, max_delay=5.0, deadline=DEFAULT_RETRY_SECONDS,
                      jitter=(0.8, 1.2), min_delay=0.05)

log = logging.getLogger("streamssl.tracking")
_ENV_LOCK = threading.RLock()
_TRANSIENT_STATUS = {408, 429, 502, 503, 504}


def _env_float(name: str, default: float) -> float:
    value = os.environ.get(name)
    if value is None or value.strip() == "":
        return default
    try:
        return float(value)
    except ValueError:
        raise TrackingError(f"{name}={value!r} is not a number of seconds") from None


def _is_http(uri: str) -> bool:
    return uri.split(":", 1)[0].lower() in ("http", "https")


@contextlib.contextmanager
def _mlflow_http_env(timeout: int):
    """MLflow reads its HTTP retry settings per request: no built-in retries (ours decide), a bounded timeout."""
    # MLflow prints "View run ... at <url>" on every end_run against a server, fetching the run to do so.
    settings = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": str(timeout),
                "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}
    with _ENV_LOCK:
        saved = {k: os.environ.get(k) for k in settings}
        os.environ.update(settings)
        try:
            yield
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


def classify(exc: BaseException) -> str:
    """'outage' (server unreachable / overloaded: retry until the deadline), 'server' (it answered 5xx: retry a
    few times) or 'fatal' (it answered that the request is wrong, or a local error: do not retry)."""
    try:
        import requests
    except ImportError:  # pragma: no cover - mlflow depends on requests
        requests = None
    if requests is not None:
        if isinstance(exc, requests.exceptions.HTTPError) and exc.response is not None:
            status = exc.response.status_code
            return "outage" if status in _TRANSIENT_STATUS else "server" if status >= 500 else "fatal"
        if isinstance(exc, (requests.exceptions.ConnectionError, requests.exceptions.Timeout)):
            return "outage"
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return "outage"
    from mlflow.exceptions import MlflowException, RestException

    if isinstance(exc, MlflowException):
        text = str(exc)
        if not isinstance(exc, RestException) and text.startswith("API request to") and (
            "failed with exception" in text or "failed with timeout exception" in text
        ):
            return "outage"  # mlflow.utils.rest_utils wraps connection errors and timeouts like this
        status = exc.get_http_status_code()
        if status in _TRANSIENT_STATUS:
            return "outage"
        return "server" if status >= 500 else "fatal"
    return "fatal"


def _point(metric) -> tuple:
    value = float(metric.value)
    if math.isnan(value):
        value = "nan"
    elif math.isinf(value):  # SQL stores keep +-inf as +-max float
        value = math.copysign(sys.float_info.max, value)
    return metric.key, int(metric.step), int(metric.timestamp), value


class RetryingClient:
    """The MlflowClient, with every public method run through one retry loop (see the module docstring).

    `create_run`, `create_logged_model`, `log_outputs` and `log_batch` are made safe to re-send; everything else
    MLflow offers is passed through as is (reads and idempotent writes). `retry_seconds` (default: env
    STREAMSSL_TRACKING_RETRY_SECONDS, else 300) is how long an outage is ridden out; `connect_seconds` (env
    STREAMSSL_TRACKING_CONNECT_SECONDS, else 5) bounds the start-up check. `outages` lists the length in seconds of
    every outage ridden out (for reports and tests), `retries` counts the attempts that were retried.
    """

    def __init__(self, uri: str, *, retry_seconds: float | None = None, connect_seconds: float | None = None):
        from mlflow.tracking import MlflowClient

        self.uri = uri
        self.retry_seconds = _env_float(RETRY_ENV, DEFAULT_RETRY_SECONDS) if retry_seconds is None else retry_seconds
        self.connect_seconds = (_env_float(CONNECT_ENV, DEFAULT_CONNECT_SECONDS)
                                if connect_seconds is None else connect_seconds)
        self.request_timeout = max(1, int(_env_float("MLFLOW_HTTP_REQUEST_TIMEOUT",
                                                     _env_float(REQUEST_TIMEOUT_ENV, DEFAULT_REQUEST_TIMEOUT))))
        self.outages: list[float] = []
        self.retries = 0
        self._outage = retry.Outage()  # shared by every call: later calls in one outage fail fast
        self._outage_warned = False
        if uri.startswith("sqlite:///"):
            _create_sqlite_store(Path(uri[len("sqlite:///") :]))
        if _is_http(uri):
            self._probe()
        self._client = MlflowClient(tracking_uri=uri)
        try:
            self.call("search_experiments", lambda: self._client.search_experiments(max_results=1), self.connect_seconds)
        except TrackingError as exc:
            raise TrackingError(f"MLflow tracking store {uri} cannot be reached: {exc.__cause__ or exc}") from None

    def __getattr__(self, name: str):
        attr = getattr(self._client, name)
        if name.startswith("_") or not callable(attr):
            return attr

        @functools.wraps(attr)
        def call(*args, **kwargs):
            return self.call(name, functools.partial(attr, *args, **kwargs))

        return call

    def _create_once(self, name: str, tags: dict[str, Any] | None, find, create, retry_seconds: float | None):
        """`create(tags)` retried without making a second entity: `tags` get a unique client-token tag, and a retry
        first asks `find(token)` for what an earlier attempt may have created before its answer got lost."""
        tags = dict(tags or {})
        token = tags.setdefault(CLIENT_TOKEN, uuid.uuid4().hex)
        attempts = 0

        def attempt():
            nonlocal attempts
            attempts += 1
            if attempts > 1:
                found = find(f"tags.`{CLIENT_TOKEN}` = '{token}'")
                if found:
                    log.info("%s: made before the failure, not made again", name)
                    return found[0]
            return create(tags)

        return self.call(name, attempt, retry_seconds)

    def create_run(self, experiment_id: str, start_time: int | None = None, tags: dict[str, Any] | None = None,
                   run_name: str | None = None, *, retry_seconds: float | None = None):
        from mlflow.entities import ViewType

        return self._create_once(
            "create_run", tags,
            lambda flt: self._client.search_runs([experiment_id], filter_string=flt, run_view_type=ViewType.ALL,
                                                 max_results=2),
            lambda t: self._client.create_run(experiment_id, start_time=start_time, tags=t, run_name=run_name),
            retry_seconds)

    def create_logged_model(self, experiment_id: str, name: str | None = None, source_run_id: str | None = None,
                            tags: dict[str, str] | None = None, params: dict[str, str] | None = None,
                            model_type: str | None = None, *, retry_seconds: float | None = None):
        """Like `create_run`: a retry never makes a second model."""
        return self._create_once(
            "create_logged_model", tags,
            lambda flt: self._client.search_logged_models([experiment_id], filter_string=flt, max_results=2),
            lambda t: self._client.create_logged_model(experiment_id, name=name, source_run_id=source_run_id,
                                                       tags=t, params=params, model_type=model_type),
            retry_seconds)

    def log_outputs(self, run_id: str, models: list, *, retry_seconds: float | None = None):
        """A run's output models; a retry leaves out those an earlier attempt stored (MLflow refuses a duplicate)."""
        pending = list(models)
        attempts = 0

        def attempt():
            nonlocal attempts, pending
            attempts += 1
            if attempts > 1:
                outputs = self._client.get_run(run_id).outputs
                stored = {(m.model_id, m.step) for m in (outputs.model_outputs if outputs else [])}
                pending = [m for m in pending if (m.model_id, m.step) not in stored]
            if pending:
                self._client.log_outputs(run_id, pending)

        return self.call("log_outputs", attempt, retry_seconds)

    def log_batch(self, run_id: str, metrics=(), params=(), tags=(), synchronous: bool | None = None, *,
                  retry_seconds: float | None = None):
        pending = list(metrics)
        attempts = 0

        def attempt():
            nonlocal attempts, pending
            attempts += 1
            if attempts > 1 and pending:  # drop the points an earlier attempt may have stored already
                pending = self._missing_metrics(run_id, pending)
            if not (pending or params or tags):
                return None
            return self._client.log_batch(run_id, metrics=pending, params=list(params), tags=list(tags),
                                          synchronous=synchronous)

        return self.call("log_batch", attempt, retry_seconds)

    def __repr__(self) -> str:
        return f"<retrying {self._client!r}>"

    def _probe(self) -> None:
        """Fail in seconds, naming the URI, when nothing answers at an HTTP tracking URI."""
        url = self.uri.rstrip("/") + "/health"
        deadline = time.monotonic() + self.connect_seconds
        reason: Any = None
        while True:
            remaining = deadline - time.monotonic()
            try:
                with urllib.request.urlopen(url, timeout=max(0.5, min(3.0, remaining))):
                    return
            except urllib.error.HTTPError:
                return  # something answers (auth proxy, path prefix without /health): the client will tell more
            except (urllib.error.URLError, OSError, ValueError) as exc:
                reason = getattr(exc, "reason", exc)
            if time.monotonic() + 0.5 >= deadline:
                break
            time.sleep(0.5)
        raise TrackingError(
            f"MLflow tracking server {self.uri} cannot be reached: {reason} (GET {url} for "
            f"{self.connect_seconds:g}s). Start the server, or set tracking.uri / --tracking-uri to one that runs."
        )

    def call(self, op: str, fn: Callable[[], Any], retry_seconds: float | None = None) -> Any:
        """Run `fn` (one MLflow call), retrying with backoff through an outage of up to `retry_seconds`."""
        budget = self.retry_seconds if retry_seconds is None else retry_seconds
        server_errors = 0

        def attempt() -> Any:
            with _mlflow_http_env(self.request_timeout):
                return fn()

        def verdict(exc: Exception) -> retry.Verdict:
            nonlocal server_errors
            kind = classify(exc)
            if kind == "fatal":
                return retry.FATAL
            if not self._outage_warned:
                self._outage_warned = True
                log.warning("MLflow tracking store %s is not answering (%s: %s); retrying %s with backoff for "
                            "up to %.0fs (%s). Training goes on meanwhile.",
                            self.uri, type(exc).__name__, _short(exc), op, budget, RETRY_ENV)
            if kind == "server":
                server_errors += 1
                if server_errors >= SERVER_ERROR_ATTEMPTS:
                    return retry.GIVE_UP
            return retry.RETRY

        def refused(exc: Exception) -> Exception:
            self._answered(op)
            return exc if isinstance(exc, TrackingError) else TrackingError(
                f"MLflow tracking store {self.uri} refused {op}: {exc}")

        def give_up(exc: Exception, failures: int, elapsed: float) -> Exception:
            return TrackingError(f"MLflow tracking store {self.uri} unreachable for {elapsed:.0f}s (limit {budget:g}s, "
                                 f"set {RETRY_ENV} to wait longer); {op} failed: {_short(exc)}")

        def retrying(exc: Exception, failures: int, wait: float) -> None:
            self.retries += 1

        result = retry.call(attempt, replace(_POLICY, deadline=max(0.0, budget)), classify=verdict, give_up=give_up,
                            fatal=refused, on_retry=retrying, outage=self._outage)
        self._answered(op)
        return result

    def _answered(self, op: str) -> None:
        took = self._outage.end()
        if took is not None:
            self.outages.append(took)
            log.warning("MLflow tracking store %s answers again after %.1fs; %s went through.", self.uri, took, op)
        self._outage_warned = False

    def _missing_metrics(self, run_id: str, metrics: list) -> list:
        """The points of `metrics` that the run does not hold yet (read back from the store)."""
        stored: set[tuple] = set()
        for key in {m.key for m in metrics}:
            stored.update(_point(m) for m in self._client.get_metric_history(run_id, key))
        missing = [m for m in metrics if _point(m) not in stored]
        if len(missing) < len(metrics):
            log.info("%d of %d metric points for run %s were stored before the failure; not re-sent",
                     len(metrics) - len(missing), len(metrics), run_id)
        return missing


def _create_sqlite_store(path: Path) -> None:
    """Create a new SQLite tracking store whole or not at all.

    MLflow builds its schema with a few dozen migrations (seconds on a small machine); a driver killed meanwhile
    would leave a half-migrated file that every later run refuses ("table ... already exists"). So the schema is
    built in a private file beside it, which then replaces the path in one rename.
    """
    if path.exists():
        return
    from mlflow.tracking import MlflowClient

    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.init-*"):  # left by a driver killed while creating the store
        with contextlib.suppress(OSError):
            if time.time() - stale.stat().st_mtime > 600:
                stale.unlink()
    building = path.parent / f".{path.name}.init-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        MlflowClient(tracking_uri=f"sqlite:///{building}").search_experiments(max_results=1)
        if not path.exists():  # another driver may have won the race: keep its store
            os.replace(building, path)
    finally:
        with contextlib.suppress(OSError):
            building.unlink()


def _short(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
