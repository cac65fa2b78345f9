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
"""

from __future__ import annotations

import os
import re
import tempfile
from typing import Any, Mapping

import fsspec
import pyarrow.fs as pafs
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

from orchestrator.errors import DataError

_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.\-]*)://")
# "s3://user:secret@bucket/x" → "s3://bucket/x": fsspec accepts credentials inside URLs.
_USERINFO = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.\-]*://)[^/@]*@")


def redact(url: str) -> str:
    """The URL as it may be shown to a user: without any ``user:password@`` part."""
    return _USERINFO.sub(r"\1", str(url))


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
    """The whole object at `url`. A missing object raises DataError naming the URL."""
    fs, path = resolve(url, storage_options)
    try:
        return fs.cat_file(path)
    except FileNotFoundError:
        raise DataError(f"{redact(url)} does not exist") from None
    except IsADirectoryError:
        raise DataError(f"{redact(url)} is a folder, not a file") from None
    except OSError as exc:  # permission denied, endpoint unreachable...: botocore messages hold no secrets
        raise DataError(f"cannot read {redact(url)}: {type(exc).__name__}: {exc}") from None


def write_bytes_atomic(url: str, data: bytes, storage_options: Mapping[str, Any] | None = None) -> None:
    """Write `data` to `url` so that readers see either the old object or the whole new one.

    Local files: a temporary file in the same folder, fsynced, then ``os.replace`` (atomic on POSIX).
    Object stores (S3, GCS, memory): a single PUT is already atomic.
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
    fs.pipe_file(path, bytes(data))


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
