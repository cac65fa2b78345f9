"""One way to reach files on local disk and object storage: fsspec URLs in, (filesystem, path) out.

Every data and checkpoint path in streamssl is a URL: ``file:///data/x``, ``s3://bucket/x``, ``gs://...``,
``memory://x`` (tests) or a plain local path. Options that a filesystem needs (an S3 endpoint, keys) travel as
fsspec ``storage_options``, e.g. for MinIO or moto::

    from orchestrator import storage
    opts = {"client_kwargs": {"endpoint_url": "http://127.0.0.1:9000"}, "key": "...", "secret": "..."}
    fs, path = storage.resolve("s3://bucket/shards", opts)
    storage.write_bytes_atomic(storage.join("s3://bucket/shards", "a.bin"), b"...", opts)
    pa_fs, path = storage.pyarrow_filesystem("s3://bucket/shards", opts)   # what Ray Data reads with

Credentials never appear in messages: errors name the URL with any ``user:password@`` part removed, and
storage options are never formatted into text.

Object storage goes away now and then (a restarted MinIO, a throttled or failing S3 endpoint). Reads
(:func:`fetch`, :func:`read_bytes`, and through them every shard and manifest read) and the object-store write in
:func:`write_bytes_atomic` retry transient errors — connection refused or reset, timeouts, HTTP 5xx and
throttling — with exponential backoff and full jitter under a :class:`~orchestrator.retry.RetryPolicy` (the
loop in :mod:`orchestrator.retry`; by default about a minute in all; ``STREAMSSL_STORAGE_RETRY_SECONDS=N`` sets the
total, ``0`` turns retries off). A missing object is not
transient: it fails at once. When the policy runs out, :class:`StorageUnavailableError` (a DataError) names the
URL and says that ``streamssl run --resume`` continues once storage is back. Each retry logs a warning on the
``orchestrator.storage`` logger and is counted in :func:`retry_stats`.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import tempfile
import threading
from typing import Any, Callable, Mapping, TypeVar

import fsspec
import pyarrow.fs as pafs
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

from orchestrator import retry
from orchestrator.errors import DataError
from orchestrator.retry import RetryPolicy

logger = logging.getLogger(__name__)
T = TypeVar("T")
RETRY_ENV = "STREAMSSL_STORAGE_RETRY_SECONDS"

_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.\-]*)://")
# "s3://user:secret@bucket/x" → "s3://bucket/x": fsspec accepts credentials inside URLs.
_USERINFO = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.\-]*://)[^/@]*@")
_USERINFO_PART = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.\-]*://)([^/@]*)@")


def redact(url: str) -> str:
    """The URL as it may be shown to a user: without any ``user:password@`` part."""
    return _USERINFO.sub(r"\1", str(url))


def scrub(text: str, url: str) -> str:
    """`text` (an error message from a library that saw `url`) without the URL's ``user:password@`` part."""
    match = _USERINFO_PART.match(str(url))
    if not match:
        return text
    userinfo = match.group(2)
    return text.replace(userinfo + "@", "").replace(userinfo, "***")


def is_local(url: str) -> bool:
    """True for plain paths and ``file://`` URLs."""
    match = _SCHEME.match(str(url))
    return match is None or match.group(1).lower() in ("file", "local")


def resolve(url: str | os.PathLike, storage_options: Mapping[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for `url` and the path inside it (absolute for local paths).

    Raises DataError when the URL's protocol is unknown or its implementation (s3fs, gcsfs) is not installed.
    """
    url = os.fspath(url)
    if not _SCHEME.match(url):
        # Plain local path: no URL parsing, so names containing "::" or "?" stay intact.
        return LocalFileSystem(), os.path.abspath(os.path.expanduser(url))
    try:
        fs, path = url_to_fs(url, **dict(storage_options or {}))
    except (ImportError, ValueError) as exc:
        # ImportError: e.g. gcsfs missing; ValueError: protocol not known. Neither message holds credentials.
        raise DataError(f"cannot open {redact(url)}: {type(exc).__name__}: {exc}") from None
    return fs, path


# ---------------------------------------------------------------------------------------------- retries


class StorageUnavailableError(DataError):
    """Object storage stayed unreachable (transient errors) for longer than the retry policy allows."""


def retry_policy() -> RetryPolicy:
    """The storage retry policy: the defaults of :class:`RetryPolicy` (about a minute), with the deadline from
    ``STREAMSSL_STORAGE_RETRY_SECONDS`` when set (0: no retries).

    With s3fs's defaults a single call to a refused endpoint already takes several seconds (botocore retries it
    inside), so a read gives up at about deadline + one call. Tests shorten it; Ray workers inherit it when the
    variable is in the job's runtime_env.
    """
    value = os.environ.get(RETRY_ENV, "").strip()
    if not value:
        return RetryPolicy()
    try:
        seconds = float(value)
    except ValueError:
        raise DataError(f"{RETRY_ENV}={value!r} is not a number of seconds") from None
    if seconds < 0:
        raise DataError(f"{RETRY_ENV}={value!r} must be >= 0 seconds")
    if seconds == 0:
        return RetryPolicy(attempts=1, deadline=0.0)
    return RetryPolicy(initial_delay=min(0.5, seconds / 8), max_delay=min(8.0, max(seconds / 4, 0.1)), deadline=seconds)


_stats_lock = threading.Lock()
_stats = {"retries": 0, "recovered": 0, "gave_up": 0}


def retry_stats() -> dict[str, int]:
    """Counts in this process since it started (or since :func:`reset_retry_stats`): `retries` (failed attempts
    that were retried), `recovered` (calls that succeeded after at least one retry), `gave_up` (calls that ran out
    of the policy). Ray tasks count in their own worker processes."""
    with _stats_lock:
        return dict(_stats)


def reset_retry_stats() -> None:
    with _stats_lock:
        for name in _stats:
            _stats[name] = 0


def _count(name: str) -> None:
    with _stats_lock:
        _stats[name] += 1


# Errors whose names say "the endpoint did not answer properly this time", from the libraries behind fsspec:
# botocore (EndpointConnectionError, ConnectionClosedError, ReadTimeoutError, ConnectTimeoutError, ProxyConnectionError
# are ConnectionError/HTTPClientError subclasses), aiohttp (ClientConnectorError, ServerDisconnectedError,
# ClientPayloadError, ServerTimeoutError), fsspec (FSTimeoutError), requests/urllib3 (gcsfs, http).
_TRANSIENT_NAMES = frozenset({
    "EndpointConnectionError", "ConnectionClosedError", "ReadTimeoutError", "ConnectTimeoutError",
    "ProxyConnectionError", "HTTPClientError", "ResponseStreamingError", "IncompleteReadError",
    "ClientConnectionError", "ClientConnectorError", "ClientOSError", "ServerDisconnectedError",
    "ServerTimeoutError", "ServerConnectionError", "ClientPayloadError", "ClientConnectionResetError",
    "FSTimeoutError", "IncompleteRead", "RemoteDisconnected", "ProtocolError", "ChunkedEncodingError",
    "ReadTimeout", "ConnectTimeout", "NewConnectionError", "MaxRetryError", "TransportError",
})
_TRANSIENT_ERRNOS = frozenset(
    getattr(errno, name) for name in ("ECONNREFUSED", "ECONNRESET", "ECONNABORTED", "ETIMEDOUT", "EHOSTUNREACH",
                                      "ENETUNREACH", "ENETDOWN", "EPIPE", "EAGAIN", "EREMOTEIO")
    if hasattr(errno, name)
)
# S3 error codes for throttling and server-side failures (s3fs turns some into OSError(EIO) with this cause).
_TRANSIENT_CODES = frozenset({"InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout", "Throttling",
                              "ThrottlingException", "RequestTimeTooSkewed", "503", "500", "502", "504"})


def _http_status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)  # botocore ClientError
    if isinstance(response, Mapping):
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if isinstance(status, int):
            return status
    for attr in ("status", "status_code", "code"):  # aiohttp ClientResponseError, requests, gcsfs HttpError
        value = getattr(exc, attr, None)
        if isinstance(value, int) and 100 <= value <= 599:
            return value
    return None


def _error_code(exc: BaseException) -> str | None:
    response = getattr(exc, "response", None)
    if isinstance(response, Mapping):
        code = response.get("Error", {}).get("Code")
        return str(code) if code is not None else None
    return None


def is_transient(exc: BaseException) -> bool:
    """True when `exc` (or an exception it was raised from) means "try again later", not "this is wrong".

    Missing objects, folders, permissions and bad requests are never transient; connection refused/reset,
    timeouts, HTTP 5xx and throttling are.
    """
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        err = todo.pop()
        if err is None or id(err) in seen:
            continue
        seen.add(id(err))
        if isinstance(err, (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError, DataError)):
            return False
        if isinstance(err, (ConnectionError, TimeoutError)):  # builtins: refused, reset, aborted, broken pipe
            return True
        if isinstance(err, OSError) and err.errno in _TRANSIENT_ERRNOS:
            return True
        if any(cls.__name__ in _TRANSIENT_NAMES for cls in type(err).__mro__):
            return True
        status = _http_status(err)
        if status is not None and (status >= 500 or status in (408, 429)):
            return True
        if _error_code(err) in _TRANSIENT_CODES:
            return True
        todo.extend((err.__cause__, err.__context__))
    return False


def _describe(exc: BaseException, url: str = "") -> str:
    text = scrub(str(exc).strip() or repr(exc), url)
    return f"{type(exc).__name__}: {text[:300]}"


def call_with_retry(
    fn: Callable[[], T],
    url: str,
    *,
    what: str = "read",
    policy: RetryPolicy | None = None,
    on_retry: Callable[[], None] | None = None,
) -> T:
    """`fn()`, retried under `policy` (default :func:`retry_policy`) while it raises transient errors.

    Anything not transient (a missing object, a permission error, a DataError) propagates at once, unchanged.
    When the policy runs out: StorageUnavailableError naming the redacted `url`. `on_retry` runs before each
    retry (e.g. to drop a filesystem's cached listings).
    """
    policy = policy or retry_policy()

    def give_up(exc: Exception, failures: int, elapsed: float) -> Exception:
        _count("gave_up")
        logger.error("storage: giving up on %s %s after %d attempts in %.1f s: %s",
                     what, redact(url), failures, elapsed, _describe(exc, url))
        return StorageUnavailableError(
            f"storage unreachable: cannot {what} {redact(url)} ({failures} attempts in {elapsed:.0f} s, "
            f"last error {_describe(exc, url)}); once the storage endpoint is back, `streamssl run --resume` "
            f"continues where this stopped (retry time: {RETRY_ENV}, now {policy.deadline:g} s)"
        )

    def retrying(exc: Exception, failures: int, wait: float) -> None:
        _count("retries")
        logger.warning("storage: %s %s failed (%s); retry %d in %.2f s", what, redact(url), _describe(exc, url),
                       failures, wait)
        if on_retry is not None:
            try:
                on_retry()
            except Exception:  # noqa: BLE001 - a cache drop that fails must not hide the real error
                pass

    def recovered(failures: int, seconds: float) -> None:
        _count("recovered")
        logger.warning("storage: %s %s succeeded after %d retries (%.1f s)", what, redact(url), failures, seconds)

    return retry.call(fn, policy, classify=lambda exc: retry.RETRY if is_transient(exc) else retry.FATAL,
                      give_up=give_up, on_retry=retrying, on_recovered=recovered)


def fetch(url: str, storage_options: Mapping[str, Any] | None = None, *, policy: RetryPolicy | None = None) -> bytes:
    """The whole object at `url`, retrying transient errors (see :func:`retry_policy`).

    Raises FileNotFoundError / IsADirectoryError / other non-transient errors unchanged, so each caller words
    them (a shard, a manifest); StorageUnavailableError when storage stays unreachable. Local files are read once.
    """
    fs, path = resolve(url, storage_options)
    if isinstance(fs, LocalFileSystem):
        return fs.cat_file(path)
    return call_with_retry(lambda: fs.cat_file(path), url, what="read", policy=policy,
                           on_retry=lambda: fs.invalidate_cache(path))


def join(url: str | os.PathLike, *parts: str) -> str:
    """`url` with `parts` appended as path components (``join("s3://b/x/", "a", "b.json")`` → ``s3://b/x/a/b.json``)."""
    url = os.fspath(url)
    if not _SCHEME.match(url):
        return os.path.join(url, *parts)
    out = url.rstrip("/")
    for part in parts:
        part = part.strip("/")
        if part:
            out = f"{out}/{part}"
    return out


def read_bytes(url: str, storage_options: Mapping[str, Any] | None = None) -> bytes:
    """The whole object at `url`, transient errors retried. A missing object raises DataError naming the URL."""
    try:
        return fetch(url, storage_options)
    except DataError:  # StorageUnavailableError: already names the URL
        raise
    except FileNotFoundError:
        raise DataError(f"{redact(url)} does not exist") from None
    except IsADirectoryError:
        raise DataError(f"{redact(url)} is a folder, not a file") from None
    except Exception as exc:  # permission denied, bad credentials...: botocore messages hold no secrets
        raise DataError(f"cannot read {redact(url)}: {type(exc).__name__}: {scrub(str(exc), url)}") from None


def write_bytes_atomic(url: str, data: bytes, storage_options: Mapping[str, Any] | None = None) -> None:
    """Write `data` to `url` so that readers see either the old object or the whole new one.

    Local files: a temporary file in the same folder, fsynced, then ``os.replace`` (atomic on POSIX).
    Object stores (S3, GCS, memory): a single PUT is already atomic, and repeating it is harmless, so transient
    errors are retried like reads (StorageUnavailableError when the policy runs out).
    """
    fs, path = resolve(url, storage_options)
    if isinstance(fs, LocalFileSystem):
        folder = os.path.dirname(path)
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.basename(path), dir=folder)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        return
    payload = bytes(data)
    call_with_retry(lambda: fs.pipe_file(path, payload), url, what="write", on_retry=lambda: fs.invalidate_cache(path))


def exists(url: str, storage_options: Mapping[str, Any] | None = None) -> bool:
    """True when a file or folder exists at `url`."""
    fs, path = resolve(url, storage_options)
    return bool(fs.exists(path))


def remove(url: str, storage_options: Mapping[str, Any] | None = None) -> None:
    """Delete one file; a missing file is not an error."""
    fs, path = resolve(url, storage_options)
    try:
        fs.rm_file(path)
    except FileNotFoundError:
        pass


def remove_tree(url: str, storage_options: Mapping[str, Any] | None = None) -> None:
    """Delete a folder and everything below it; a missing folder is not an error."""
    fs, path = resolve(url, storage_options)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def pyarrow_filesystem(url: str, storage_options: Mapping[str, Any] | None = None) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem and path for `url`, for readers that take pyarrow filesystems (Ray Data, pyarrow.dataset).

    Local paths get pyarrow's native LocalFileSystem; everything else wraps the fsspec filesystem, so the
    same storage options (endpoint, keys) apply. The result pickles (Ray ships it to read tasks); note that a
    ``memory://`` filesystem lives in one process, so it cannot feed Ray workers in other processes.
    """
    fs, path = resolve(url, storage_options)
    if isinstance(fs, LocalFileSystem):
        return pafs.LocalFileSystem(), path
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path
