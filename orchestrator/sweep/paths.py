"""A sweep's spec with every local path made absolute against the user's working directory, in the driver.

Ray Tune runs each trial in a working directory of its own (under Ray's session folder), so a trial that rebuilt
its spec from the YAML as written would look for `data.url: data/synth` there and write its plan, chunk and
evaluation runs to an SQLite store of its own. The sweep driver resolves the spec once, before any trial starts,
and hands the trials the resolved spec and the directory (`resolve_paths(raw, base)`; a trial's sampled values are
resolved against the same directory).

Resolved: data.url, storage.workdir (also when left at its default, which the default tracking store, artifacts
and checkpoints follow), storage.checkpoints, tracking.uri (a relative SQLite file or a plain path),
eval.downstream[].url and online.source.poll. URLs with a scheme (s3://, http://, a tracking server) are kept.
"""

from __future__ import annotations

import copy
import os
import re
from typing import Any

from orchestrator.spec.experiment import StorageSpec

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
# The default of storage.workdir, resolved even when the spec omits it.
_DEFAULT_WORKDIR = StorageSpec.model_fields["workdir"].default


def _local(value: Any, base: str) -> Any:
    """A plain relative (or ~) path as an absolute one under `base`; URLs and non-strings unchanged."""
    if not isinstance(value, str) or not value or _SCHEME.match(value):
        return value
    if value.startswith("file:"):  # file:relative (file:// URLs are absolute already)
        return "file:" + os.path.join(base, os.path.expanduser(value[len("file:"):]))
    return os.path.normpath(os.path.join(base, os.path.expanduser(value)))


def resolve_tracking_uri(uri: Any, base: str) -> Any:
    """`sqlite:///rel.db` and plain paths resolved against `base`; servers and absolute URIs kept."""
    if not isinstance(uri, str) or not uri:
        return uri
    for prefix in ("sqlite:///",):
        if uri.startswith(prefix):
            rest = uri[len(prefix):]
            if rest.startswith("/") or rest.startswith(":memory:") or not rest:
                return uri
            return prefix + os.path.normpath(os.path.join(base, os.path.expanduser(rest)))
    if ":" in uri.split("/", 1)[0] and not uri.startswith("file:"):  # databricks, http(s), postgresql://...
        return uri
    return _local(uri, base)


def _section(raw: dict[str, Any], key: str) -> dict[str, Any] | None:
    value = raw.get(key)
    return value if isinstance(value, dict) else None


def resolve_paths(raw: dict[str, Any], base: str | os.PathLike | None = None) -> dict[str, Any]:
    """A copy of the raw spec (sweep section and all) whose local paths are absolute under `base` (default: the
    current working directory). Values of the wrong type are left for validation to report."""
    base = os.path.abspath(os.fspath(base) if base is not None else os.getcwd())
    out = copy.deepcopy(raw)
    data = _section(out, "data")
    if data is not None and "url" in data:
        data["url"] = _local(data["url"], base)
    storage = out.setdefault("storage", {}) if isinstance(out.get("storage", {}), dict) else None
    if storage is not None:
        storage["workdir"] = _local(storage.get("workdir", _DEFAULT_WORKDIR), base)
        if storage.get("checkpoints") is not None:
            storage["checkpoints"] = _local(storage["checkpoints"], base)
    tracking = _section(out, "tracking")
    if tracking is not None and tracking.get("uri") is not None:
        tracking["uri"] = resolve_tracking_uri(tracking["uri"], base)
    evaluation = _section(out, "eval")
    if evaluation is not None and isinstance(evaluation.get("downstream"), list):
        for entry in evaluation["downstream"]:
            if isinstance(entry, dict) and "url" in entry:
                entry["url"] = _local(entry["url"], base)
    if evaluation is not None and isinstance(evaluation.get("transfer"), list):
        for entry in evaluation["transfer"]:
            data = _section(entry, "data") if isinstance(entry, dict) else None
            if data is not None and "url" in data:
                data["url"] = _local(data["url"], base)
    online = _section(out, "online")
    source = _section(online, "source") if online is not None else None
    if source is not None and "poll" in source:
        source["poll"] = _local(source["poll"], base)
    return out


# Searched fields whose values are paths (a sweep over data sets): resolved like the spec's own.
PATH_FIELDS = ("data.url", "storage.workdir", "storage.checkpoints", "online.source.poll")


def resolve_values(values: dict[str, Any], base: str | os.PathLike) -> dict[str, Any]:
    """Sampled values with the path-valued ones resolved against `base` (`tracking` cannot be swept)."""
    base = os.path.abspath(os.fspath(base))
    out = {}
    for path, value in values.items():
        if path in PATH_FIELDS:
            value = _local(value, base)
        elif path == "eval.downstream" and isinstance(value, list):
            value = resolve_paths({"eval": {"downstream": value}}, base)["eval"]["downstream"]
        out[path] = value
    return out


__all__ = ["PATH_FIELDS", "resolve_paths", "resolve_tracking_uri", "resolve_values"]
