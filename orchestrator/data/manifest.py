"""A data set's manifest.json: what it holds (classes, groups, domains, splits, every shard with its row count,
byte size and sha256), read and validated.

A data set is one folder at any fsspec URL holding ``{split}-{index:05d}.parquet`` shards and a
``manifest.json`` that lists every shard. The manifest is written last (by
:func:`orchestrator.data.shards.write_shards`): a folder without one holds no data set.

    from orchestrator.data.manifest import load_manifest
    manifest = load_manifest("file:///tmp/inette")        # the folder or its manifest.json
    manifest.shard_entries("train")                        # ShardEntry(path, split, rows, bytes, sha256), ...
"""

from __future__ import annotations

import hashlib
import json
import os
from importlib import metadata
from typing import Any, Iterable, Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from orchestrator import storage
from orchestrator.errors import DataError

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"


def streamssl_version() -> str:
    try:
        return metadata.version("streamssl")
    except metadata.PackageNotFoundError:
        return "unknown"


class FrozenRecord(BaseModel):
    """A manifest record: unknown fields refused, immutable once read."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class ClassEntry(FrozenRecord):
    id: int = Field(ge=0, description="Label value in the shards; ids are 0..n-1 in list order.")
    name: str = Field(min_length=1, description="Class name (the ImageFolder folder name, or the synthetic class).")
    wnid: str | None = Field(default=None, description="WordNet id when the folder name is one (n01440764).")
    group: int = Field(ge=-1, description="Coarse group id; -1 when the data set has no groups.")


class GroupEntry(FrozenRecord):
    id: int = Field(ge=0, description="Group value in the shards' `group` column.")
    name: str = Field(min_length=1, description="Coarse group name (shape family, WordNet-style parent).")


class DomainEntry(FrozenRecord):
    id: int = Field(ge=0, description="Domain value in the shards' `domain` column.")
    name: str = Field(min_length=1, description="Domain (style) name.")


class SplitEntry(FrozenRecord):
    rows: int = Field(ge=0, description="Rows in this split, summed over its shards.")
    shards: tuple[str, ...] = Field(description="Shard paths of this split, relative to the manifest's folder.")


class ShardEntry(FrozenRecord):
    path: str = Field(description="Shard file, relative to the manifest's folder.")
    split: str = Field(description="Split every row of this shard belongs to.")
    rows: int = Field(ge=0, description="Row count.")
    bytes: int = Field(ge=0, description="File size in bytes.")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="sha256 of the file's bytes.")


class SkippedFile(FrozenRecord):
    file: str = Field(description="Source file, relative to the source folder.")
    reason: str = Field(description="Why it was left out (decoder message).")


class Skipped(FrozenRecord):
    count: int = Field(default=0, ge=0, description="Source files left out as unreadable.")
    files: tuple[SkippedFile, ...] = Field(default=(), description="Each left-out file with its reason.")


def compute_digest(shards: Iterable[ShardEntry]) -> str:
    """sha256 over the sorted (path, sha256) pairs: identifies a data set's content, not when it was made."""
    h = hashlib.sha256()
    for path, sha in sorted((s.path, s.sha256) for s in shards):
        h.update(f"{path}\t{sha}\n".encode())
    return h.hexdigest()


class Manifest(FrozenRecord):
    """What ``manifest.json`` holds (schema_version 1). Load it with :func:`load_manifest`."""

    schema_version: int = Field(description="Manifest format version; this streamssl reads 1.")
    name: str = Field(description="Data set name (source folder name or 'synthetic').")
    created_by: str = Field(description="'streamssl <version>' that wrote it.")
    created_at: str = Field(description="ISO 8601 time of writing (UTC).")
    source: dict[str, Any] = Field(description="How it was made: {'kind': 'synthetic'|'imagefolder', ...params}.")
    image_size: int | None = Field(ge=1, description="Side the images were stored at; null when kept at source size.")
    classes: tuple[ClassEntry, ...] = Field(min_length=1, description="Classes, id = position.")
    groups: tuple[GroupEntry, ...] = Field(description="Coarse groups, id = position; empty when unknown.")
    domains: tuple[DomainEntry, ...] = Field(min_length=1, description="Domains, id = position.")
    splits: dict[str, SplitEntry] = Field(description="Rows and shard paths per split.")
    shards: tuple[ShardEntry, ...] = Field(description="Every shard with rows, bytes and sha256.")
    skipped: Skipped = Field(default_factory=Skipped, description="Source files left out as unreadable.")
    digest: str = Field(pattern=r"^[0-9a-f]{64}$", description="compute_digest(shards).")

    @model_validator(mode="after")
    def _consistent(self) -> "Manifest":
        if self.schema_version != SCHEMA_VERSION:
            raise ValueError(f"schema_version {self.schema_version} is not {SCHEMA_VERSION}")
        for kind, entries in (("classes", self.classes), ("groups", self.groups), ("domains", self.domains)):
            ids = [e.id for e in entries]
            if ids != list(range(len(entries))):
                raise ValueError(f"{kind} ids must be 0..{len(entries) - 1} in order, found {ids}")
        for c in self.classes:
            if c.group >= len(self.groups) or (self.groups and c.group < 0):
                raise ValueError(f"class {c.name!r} has group {c.group}, but there are {len(self.groups)} groups")
        paths = [s.path for s in self.shards]
        if len(set(paths)) != len(paths):
            raise ValueError("a shard path is listed twice")
        for split, entry in self.splits.items():
            listed = [s for s in self.shards if s.split == split]
            if tuple(s.path for s in listed) != entry.shards:
                raise ValueError(f"splits.{split}.shards does not match the shards of split {split!r}")
            if sum(s.rows for s in listed) != entry.rows:
                raise ValueError(f"splits.{split}.rows is {entry.rows}, its shards hold {sum(s.rows for s in listed)}")
        unknown = {s.split for s in self.shards} - set(self.splits)
        if unknown:
            raise ValueError(f"shards name splits {sorted(unknown)} that `splits` does not list")
        if self.skipped.count < len(self.skipped.files):
            raise ValueError("skipped.count is smaller than the number of skipped files listed")
        if compute_digest(self.shards) != self.digest:
            raise ValueError("digest does not match the shards' (path, sha256) pairs")
        return self

    def shard_entries(self, split: str) -> tuple[ShardEntry, ...]:
        """The shards of `split`, in order; DataError naming the splits there are when `split` is not one."""
        if split not in self.splits:
            raise DataError(f"data set {self.name!r} has no split {split!r}; it has {sorted(self.splits)}")
        return tuple(s for s in self.shards if s.split == split)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), indent=2) + "\n"


def dataset_root(url: str) -> str:
    """The data set folder for `url`, which may name the folder or its manifest.json."""
    url = os.fspath(url)
    stripped = url.rstrip("/")
    if stripped.endswith("/" + MANIFEST_NAME) or stripped == MANIFEST_NAME:
        return stripped[: -len(MANIFEST_NAME)].rstrip("/") or "."
    return url


def load_manifest(url: str, storage_options: Mapping[str, Any] | None = None) -> Manifest:
    """Read and validate the manifest of the data set at `url` (the folder or its manifest.json)."""
    murl = storage.join(dataset_root(url), MANIFEST_NAME)
    shown = storage.redact(murl)
    try:
        raw = storage.fetch(murl, storage_options)  # transient errors retried; gives up with a DataError
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(f"no data set at {storage.redact(dataset_root(url))}: {shown} does not exist "
                        "(prepare one with `streamssl data prepare` or `streamssl data synth`)") from None
    except Exception as exc:  # permission denied, bad credentials...: botocore messages hold no secrets
        raise DataError(f"cannot read manifest {shown}: {type(exc).__name__}: {storage.scrub(str(exc), murl)}") from None
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"manifest {shown} is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise DataError(f"manifest {shown} must hold a JSON object, found {type(doc).__name__}")
    version = doc.get("schema_version")
    if version != SCHEMA_VERSION:
        raise DataError(
            f"manifest {shown} has schema_version {version!r}, but this streamssl ({streamssl_version()}) reads "
            f"schema_version {SCHEMA_VERSION}: re-create the data set with this version, or use the streamssl "
            "that wrote it"
        )
    try:
        return Manifest.model_validate(doc)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '(manifest)'}: {e['msg']}" for e in exc.errors()
        )
        raise DataError(f"manifest {shown} is invalid: {problems}") from None
