"""Parquet image shards and their manifest: write, prepare from an ImageFolder tree, read and verify.

A data set is one folder at any fsspec URL holding ``{split}-{index:05d}.parquet`` shards and a
``manifest.json`` that lists every shard with its row count, byte size and sha256. The manifest is written
last: a folder without one holds no data set, and a failed write removes what it wrote. Readers check each
shard against the manifest and fail naming the shard.

    streamssl data prepare ../shared/datasets/imagenette file:///tmp/imagenette-shards --groups groups.json
    streamssl data verify file:///tmp/imagenette-shards

    from orchestrator import shards
    manifest = shards.prepare_imagefolder("../shared/datasets/imagenette", "file:///tmp/inette")
    index = shards.read_index("file:///tmp/inette", "train")          # key, label, group, domain
    table = shards.read_shard("file:///tmp/inette/train-00000.parquet", manifest.shards[0].sha256)

Shard columns (``SHARD_SCHEMA``): key (string, unique across splits), image (encoded bytes: JPEG kept as
it came), label, group (-1 when the data set has no groups), domain (int64), height, width (int32).
Images may be grayscale or CMYK JPEGs: decode with ``Image.open(...).convert("RGB")``.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import datetime as dt
import hashlib
import io
import json
import os
import re
from dataclasses import dataclass
from importlib import metadata
from typing import Any, Iterable, Iterator, Literal, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image, ImageFile
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from orchestrator import storage
from orchestrator.errors import DataError

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"

SHARD_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("image", pa.binary()),
        ("label", pa.int64()),
        ("group", pa.int64()),
        ("domain", pa.int64()),
        ("height", pa.int32()),
        ("width", pa.int32()),
    ]
)
INDEX_COLUMNS = ("key", "label", "group", "domain")

# Image bytes do not compress; the small columns do, and dictionary-encoding the image column wastes time.
_SMALL_COLUMNS = [n for n in SHARD_SCHEMA.names if n != "image"]
_PARQUET_OPTIONS = dict(
    compression={**{n: "zstd" for n in _SMALL_COLUMNS}, "image": "none"},
    use_dictionary=["label", "group", "domain", "height", "width"],
    write_statistics=_SMALL_COLUMNS,
)
_SHARD_NAME = re.compile(r"^(?P<split>[A-Za-z0-9_]+)-(?P<index>\d{5})\.parquet$")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")
_WNID = re.compile(r"^n\d{8}$")


def _version() -> str:
    try:
        return metadata.version("streamssl")
    except metadata.PackageNotFoundError:
        return "unknown"


# ---------------------------------------------------------------------------------------------- manifest


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ClassEntry(_Frozen):
    id: int = Field(ge=0, description="Label value in the shards; ids are 0..n-1 in list order.")
    name: str = Field(min_length=1, description="Class name (the ImageFolder folder name, or the synthetic class).")
    wnid: str | None = Field(default=None, description="WordNet id when the folder name is one (n01440764).")
    group: int = Field(ge=-1, description="Coarse group id; -1 when the data set has no groups.")


class GroupEntry(_Frozen):
    id: int = Field(ge=0, description="Group value in the shards' `group` column.")
    name: str = Field(min_length=1, description="Coarse group name (shape family, WordNet-style parent).")


class DomainEntry(_Frozen):
    id: int = Field(ge=0, description="Domain value in the shards' `domain` column.")
    name: str = Field(min_length=1, description="Domain (style) name.")


class SplitEntry(_Frozen):
    rows: int = Field(ge=0, description="Rows in this split, summed over its shards.")
    shards: tuple[str, ...] = Field(description="Shard paths of this split, relative to the manifest's folder.")


class ShardEntry(_Frozen):
    path: str = Field(description="Shard file, relative to the manifest's folder.")
    split: str = Field(description="Split every row of this shard belongs to.")
    rows: int = Field(ge=0, description="Row count.")
    bytes: int = Field(ge=0, description="File size in bytes.")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="sha256 of the file's bytes.")


class SkippedFile(_Frozen):
    file: str = Field(description="Source file, relative to the source folder.")
    reason: str = Field(description="Why it was left out (decoder message).")


class Skipped(_Frozen):
    count: int = Field(default=0, ge=0, description="Source files left out as unreadable.")
    files: tuple[SkippedFile, ...] = Field(default=(), description="Each left-out file with its reason.")


def compute_digest(shards: Iterable[ShardEntry]) -> str:
    """sha256 over the sorted (path, sha256) pairs: identifies a data set's content, not when it was made."""
    h = hashlib.sha256()
    for path, sha in sorted((s.path, s.sha256) for s in shards):
        h.update(f"{path}\t{sha}\n".encode())
    return h.hexdigest()


class Manifest(_Frozen):
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


def shard_urls(url: str, manifest: Manifest, split: str) -> list[str]:
    """Full URLs of the shards of `split` (what ``ray.data.read_parquet`` takes with ``pyarrow_filesystem``)."""
    root = dataset_root(url)
    return [storage.join(root, s.path) for s in manifest.shard_entries(split)]


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
            f"manifest {shown} has schema_version {version!r}, but this streamssl ({_version()}) reads "
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


# ---------------------------------------------------------------------------------------------- reading


def _check_schema(table_schema: pa.Schema, columns: Sequence[str], shown: str) -> None:
    for name in columns:
        expected = SHARD_SCHEMA.field(name).type
        idx = table_schema.get_field_index(name)
        if idx < 0:
            raise DataError(f"shard {shown}: column {name!r} is missing (has {table_schema.names})")
        found = table_schema.field(idx).type
        if found != expected:
            raise DataError(f"shard {shown}: column {name!r} has type {found}, expected {expected}")


def _parse_shard(data: bytes, shown: str, columns: Sequence[str] | None) -> pa.Table:
    wanted = list(columns) if columns is not None else list(SHARD_SCHEMA.names)
    unknown = [c for c in wanted if c not in SHARD_SCHEMA.names]
    if unknown:
        raise ValueError(f"unknown shard columns {unknown}; columns are {SHARD_SCHEMA.names}")
    try:
        pf = pq.ParquetFile(pa.BufferReader(data))
        _check_schema(pf.schema_arrow, wanted, shown)
        return pf.read(columns=wanted)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"shard {shown}: not a readable Parquet file (truncated or corrupt?): {exc}") from None


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_shard(
    url: str,
    expected_sha256: str | None = None,
    columns: Sequence[str] | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> pa.Table:
    """One shard as a pyarrow Table, its bytes read once and checked against `expected_sha256`.

    Raises DataError naming the shard when it is missing, its sha256 differs from the manifest's, or it is not
    readable Parquet with the shard schema; transient storage errors are retried (``storage.RetryPolicy``) and,
    when storage stays unreachable, end in ``storage.StorageUnavailableError`` naming the shard's URL.
    """
    shown = storage.redact(url)
    try:
        data = storage.fetch(url, storage_options)  # transient errors retried; gives up with a DataError
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(f"shard {shown}: missing (the manifest lists it)") from None
    except Exception as exc:  # permission denied, bad credentials...: botocore messages hold no secrets
        raise DataError(f"shard {shown}: cannot read: {type(exc).__name__}: {storage.scrub(str(exc), url)}") from None
    if expected_sha256 is not None:
        found = _sha256(data)
        if found != expected_sha256:
            raise DataError(f"shard {shown}: sha256 mismatch (manifest {expected_sha256}, found {found})")
    return _parse_shard(data, shown, columns)


def _read_split(
    url: str, manifest: Manifest, split: str, columns: Sequence[str], storage_options: Mapping[str, Any] | None
) -> pa.Table:
    root = dataset_root(url)
    entries = manifest.shard_entries(split)

    def one(entry: ShardEntry) -> pa.Table:
        shard_url = storage.join(root, entry.path)
        table = read_shard(shard_url, entry.sha256, columns, storage_options)
        if table.num_rows != entry.rows:
            raise DataError(
                f"shard {storage.redact(shard_url)}: {table.num_rows} rows, the manifest says {entry.rows}"
            )
        return table

    # Threads: shard reads are I/O (object-store latency) and sha256/Parquet decoding release the GIL.
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(8, max(1, len(entries)))) as pool:
        tables = list(pool.map(one, entries))
    if not tables:
        schema = pa.schema([SHARD_SCHEMA.field(c) for c in columns])
        return schema.empty_table()
    return pa.concat_tables(tables)


def read_index(url: str, split: str, storage_options: Mapping[str, Any] | None = None) -> pa.Table:
    """key, label, group, domain of every row of `split`, in shard order, each shard verified by sha256."""
    manifest = load_manifest(url, storage_options)
    return _read_split(url, manifest, split, INDEX_COLUMNS, storage_options)


def read_split(
    url: str, split: str, columns: Sequence[str] | None = None, storage_options: Mapping[str, Any] | None = None
) -> pa.Table:
    """Every row of `split` (all columns unless `columns`), each shard verified. For small data sets and tests."""
    manifest = load_manifest(url, storage_options)
    return _read_split(url, manifest, split, tuple(columns or SHARD_SCHEMA.names), storage_options)


# ---------------------------------------------------------------------------------------------- verify


@dataclass(frozen=True)
class ShardCheck:
    """What verify found for one shard; `problems` is empty when the shard is sound."""

    path: str
    split: str
    present: bool
    bytes: int | None
    sha256: str | None
    rows: int | None
    schema_ok: bool | None
    problems: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass(frozen=True)
class VerifyReport:
    """Result of :func:`verify`: the manifest, one check per shard, and data-set-wide problems."""

    url: str
    manifest: Manifest
    deep: bool
    shards: tuple[ShardCheck, ...]
    problems: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.problems and all(s.ok for s in self.shards)

    @property
    def failures(self) -> tuple[ShardCheck, ...]:
        return tuple(s for s in self.shards if not s.ok)

    def message(self) -> str:
        """Every problem, one per line, each naming its shard."""
        lines = [f"shard {storage.redact(storage.join(self.url, s.path))}: {p}" for s in self.failures for p in s.problems]
        return "\n".join([*lines, *self.problems])


def _check_rows(table: pa.Table, manifest: Manifest) -> list[str]:
    problems = []
    labels = table.column("label").to_numpy()
    groups = table.column("group").to_numpy()
    domains = table.column("domain").to_numpy()
    if len(labels) and (labels.min() < 0 or labels.max() >= manifest.num_classes):
        problems.append(f"labels outside 0..{manifest.num_classes - 1}")
    elif len(labels):
        class_group = np.array([c.group for c in manifest.classes], dtype=np.int64)
        bad = np.flatnonzero(class_group[labels] != groups)
        if len(bad):
            problems.append(f"row {int(bad[0])}: group {int(groups[bad[0]])} is not the group of label {int(labels[bad[0]])}")
    if len(domains) and (domains.min() < 0 or domains.max() >= len(manifest.domains)):
        problems.append(f"domains outside 0..{len(manifest.domains) - 1}")
    return problems


def verify(
    url: str,
    storage_options: Mapping[str, Any] | None = None,
    deep: bool = True,
    raise_on_error: bool = False,
) -> VerifyReport:
    """Check every shard of the data set at `url` against its manifest.

    Quick (deep=False): each shard is present with the recorded byte size. Deep: also its sha256, that it is
    Parquet with the shard schema and the recorded row count, labels/groups/domains within the manifest, and
    keys unique across the data set. With `raise_on_error`, a DataError lists every failing shard.
    """
    manifest = load_manifest(url, storage_options)
    root = dataset_root(url)
    fs, _ = storage.resolve(root, storage_options)

    def check(entry: ShardEntry) -> tuple[ShardCheck, pa.Array | None]:
        shard_url = storage.join(root, entry.path)
        _, path = storage.resolve(shard_url, storage_options)
        problems: list[str] = []
        try:
            if deep:
                data = storage.fetch(shard_url, storage_options)
                size = len(data)
            else:
                data, size = None, int(storage.call_with_retry(lambda: fs.info(path), shard_url)["size"])
        except FileNotFoundError:
            return ShardCheck(entry.path, entry.split, False, None, None, None, None, ("missing",)), None
        except storage.StorageUnavailableError as exc:
            return ShardCheck(entry.path, entry.split, False, None, None, None, None, (str(exc),)), None
        except Exception as exc:  # noqa: BLE001 - permission denied, bad credentials: reported per shard
            return ShardCheck(entry.path, entry.split, False, None, None, None, None,
                              (f"cannot read: {type(exc).__name__}: {exc}",)), None
        if size != entry.bytes:
            problems.append(f"{size} bytes, the manifest says {entry.bytes}")
        if data is None:
            return ShardCheck(entry.path, entry.split, True, size, None, None, None, tuple(problems)), None
        sha = _sha256(data)
        if sha != entry.sha256:
            problems.append(f"sha256 mismatch (manifest {entry.sha256}, found {sha})")
        keys, rows, schema_ok = None, None, False
        try:
            pf = pq.ParquetFile(pa.BufferReader(data))
            _check_schema(pf.schema_arrow, SHARD_SCHEMA.names, storage.redact(shard_url))
            table = pf.read(columns=list(INDEX_COLUMNS))
            schema_ok, rows = True, table.num_rows
            if rows != entry.rows:
                problems.append(f"{rows} rows, the manifest says {entry.rows}")
            problems.extend(_check_rows(table, manifest))
            keys = table.column("key")
        except DataError as exc:  # schema: the message already names the shard
            schema_ok = False
            problems.append(str(exc).removeprefix(f"shard {storage.redact(shard_url)}: "))
        except (pa.ArrowException, OSError) as exc:
            problems.append(f"not a readable Parquet file (truncated or corrupt?): {exc}")
        return ShardCheck(entry.path, entry.split, True, size, sha, rows, schema_ok, tuple(problems)), keys

    with concurrent.futures.ThreadPoolExecutor(max_workers=min(8, max(1, len(manifest.shards)))) as pool:
        results = list(pool.map(check, manifest.shards))
    checks = tuple(r[0] for r in results)
    problems: list[str] = []
    key_arrays = [r[1] for r in results if r[1] is not None]
    if deep and key_arrays:
        keys = pa.chunked_array(key_arrays)
        counts = pc.value_counts(keys)
        dup = counts.filter(pc.greater(counts.field("counts"), 1))
        if len(dup):
            problems.append(f"{len(dup)} keys appear more than once, e.g. {dup[0]['values'].as_py()!r}")
    report = VerifyReport(url=root, manifest=manifest, deep=deep, shards=checks, problems=tuple(problems))
    if raise_on_error and not report.ok:
        raise DataError(
            f"data set {storage.redact(root)} failed verification "
            f"({len(report.failures)} of {len(checks)} shards):\n{report.message()}"
        )
    return report


# ---------------------------------------------------------------------------------------------- writing


def _as_shard_table(table: pa.Table) -> pa.Table:
    missing = [n for n in SHARD_SCHEMA.names if n not in table.column_names]
    if missing:
        raise ValueError(f"rows lack columns {missing}")
    return table.select(SHARD_SCHEMA.names).cast(SHARD_SCHEMA)


def _encode_parquet(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, row_group_size=max(1, min(table.num_rows, 1024)), **_PARQUET_OPTIONS)
    return sink.getvalue().to_pybytes()


def write_shards(
    dst_url: str,
    batches: Iterable[tuple[str, pa.Table]],
    *,
    name: str,
    source: Mapping[str, Any],
    image_size: int | None,
    classes: Sequence[ClassEntry | Mapping[str, Any]],
    groups: Sequence[GroupEntry | Mapping[str, Any]],
    domains: Sequence[DomainEntry | Mapping[str, Any]],
    skipped: Iterable[SkippedFile | Mapping[str, Any]] = (),
    shard_rows: int = 2000,
    overwrite: bool = False,
    storage_options: Mapping[str, Any] | None = None,
) -> Manifest:
    """Cut `(split, rows)` batches into Parquet shards at `dst_url` and commit them with manifest.json.

    `batches` streams tables with the SHARD_SCHEMA columns; each split is cut into shards of `shard_rows`
    rows (the last one shorter), so memory holds at most one shard per split. `skipped` may be a list that
    the batch generator appends to while it runs: it is read after the last batch.

    The manifest is written last (the commit point). Any failure, including an error raised by the batch
    generator, removes the shards written so far. A destination that already holds a manifest is refused
    unless `overwrite`, which first removes the old manifest and its shards.
    """
    if shard_rows < 1:
        raise ValueError(f"shard_rows must be >= 1, got {shard_rows}")
    shown = storage.redact(dst_url)
    manifest_url = storage.join(dst_url, MANIFEST_NAME)
    if storage.exists(manifest_url, storage_options):
        if not overwrite:
            raise DataError(f"{shown} already holds a data set ({MANIFEST_NAME}); pass --overwrite to replace it")
        _remove_dataset(dst_url, storage_options)

    class_group = np.array([_field(c, "group") for c in classes], dtype=np.int64)
    num_domains = len(domains)
    buffers: dict[str, list[pa.Table]] = {}
    buffered: dict[str, int] = {}
    counters: dict[str, int] = {}
    written: list[ShardEntry] = []
    seen_keys: set[str] = set()

    def flush(split: str, upto: int) -> None:
        table = pa.concat_tables(buffers[split]).combine_chunks()
        head, rest = table.slice(0, upto), table.slice(upto)
        buffers[split], buffered[split] = ([rest] if rest.num_rows else []), rest.num_rows
        path = f"{split}-{counters[split]:05d}.parquet"
        counters[split] += 1
        data = _encode_parquet(head)
        storage.write_bytes_atomic(storage.join(dst_url, path), data, storage_options)
        written.append(ShardEntry(path=path, split=split, rows=head.num_rows, bytes=len(data), sha256=_sha256(data)))

    try:
        for split, table in batches:
            if not re.fullmatch(r"[A-Za-z0-9_]+", split):
                raise ValueError(f"split names are letters, digits and _; got {split!r}")
            table = _as_shard_table(table)
            if table.num_rows == 0:
                continue
            _check_batch(table, class_group, num_domains, seen_keys, split)
            buffers.setdefault(split, []).append(table)
            buffered[split] = buffered.get(split, 0) + table.num_rows
            counters.setdefault(split, 0)
            while buffered[split] >= shard_rows:
                flush(split, shard_rows)
        for split in list(buffers):
            if buffered[split]:
                flush(split, buffered[split])
        if not written:
            raise DataError(f"no rows to write to {shown}")
        order = list(counters)
        entries = tuple(sorted(written, key=lambda s: (order.index(s.split), s.path)))
        splits = {
            split: SplitEntry(
                rows=sum(s.rows for s in entries if s.split == split),
                shards=tuple(s.path for s in entries if s.split == split),
            )
            for split in order
        }
        skipped_files = tuple(s if isinstance(s, SkippedFile) else SkippedFile(**s) for s in skipped)
        manifest = Manifest(
            schema_version=SCHEMA_VERSION,
            name=name,
            created_by=f"streamssl {_version()}",
            created_at=dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat(),
            source=dict(source),
            image_size=image_size,
            classes=tuple(c if isinstance(c, ClassEntry) else ClassEntry(**c) for c in classes),
            groups=tuple(g if isinstance(g, GroupEntry) else GroupEntry(**g) for g in groups),
            domains=tuple(d if isinstance(d, DomainEntry) else DomainEntry(**d) for d in domains),
            splits=splits,
            shards=entries,
            skipped=Skipped(count=len(skipped_files), files=skipped_files),
            digest=compute_digest(entries),
        )
        storage.write_bytes_atomic(manifest_url, manifest.to_json().encode(), storage_options)
    except BaseException:
        for entry in written:
            try:
                storage.remove(storage.join(dst_url, entry.path), storage_options)
            except Exception:  # cleanup is best effort; the original error is what the user needs
                pass
        raise
    return manifest


def _field(obj: Any, name: str) -> Any:
    return obj[name] if isinstance(obj, Mapping) else getattr(obj, name)


def _check_batch(table: pa.Table, class_group: np.ndarray, num_domains: int, seen: set[str], split: str) -> None:
    labels = table.column("label").to_numpy()
    if labels.min() < 0 or labels.max() >= len(class_group):
        raise ValueError(f"split {split}: labels outside 0..{len(class_group) - 1}")
    if np.any(class_group[labels] != table.column("group").to_numpy()):
        raise ValueError(f"split {split}: a row's group is not its class's group")
    domains = table.column("domain").to_numpy()
    if domains.min() < 0 or domains.max() >= num_domains:
        raise ValueError(f"split {split}: domains outside 0..{num_domains - 1}")
    for key in table.column("key").to_pylist():
        if key in seen:
            raise ValueError(f"key {key!r} appears twice")
        seen.add(key)


def _remove_dataset(dst_url: str, storage_options: Mapping[str, Any] | None) -> None:
    """Uncommit first (manifest), then delete the old shards it listed and any stray shard-named files."""
    manifest_url = storage.join(dst_url, MANIFEST_NAME)
    storage.remove(manifest_url, storage_options)
    fs, path = storage.resolve(dst_url, storage_options)
    for entry in fs.ls(path, detail=False):
        if _SHARD_NAME.match(os.path.basename(entry.rstrip("/"))):
            fs.rm_file(entry)


# ---------------------------------------------------------------------------------------------- prepare


@dataclass(frozen=True)
class _Source:
    split: str
    label: int
    class_name: str
    rel: str  # path relative to the class folder
    path: str  # absolute path on disk
    shown: str  # path relative to the source folder, for messages and the manifest


def _image_files(folder: str) -> list[str]:
    """Image files below `folder` (recursive, sorted), relative to it; hidden files and folders ignored."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for fn in filenames:
            if not fn.startswith(".") and fn.lower().endswith(IMAGE_EXTENSIONS):
                found.append(os.path.relpath(os.path.join(dirpath, fn), folder))
    return sorted(found)


def _class_folders(folder: str) -> list[str]:
    return sorted(d for d in os.listdir(folder) if not d.startswith(".") and os.path.isdir(os.path.join(folder, d)))


def _hash_fraction(text: str) -> float:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") / 2.0**64


def _scan(src: str, val_fraction: float, max_per_class: int | None) -> tuple[list[str], list[_Source], dict[str, Any]]:
    """Class names and every candidate image with its split and label, in a deterministic order."""
    split_root = {s: os.path.join(src, s) for s in ("train", "val")}
    from_folders = all(os.path.isdir(p) for p in split_root.values())
    if from_folders:
        classes = _class_folders(split_root["train"])
        extra = sorted(set(_class_folders(split_root["val"])) - set(classes))
        if extra:
            raise DataError(f"{split_root['val']}: class folders {extra} have no counterpart in {split_root['train']}")
        roots = [("train", split_root["train"]), ("val", split_root["val"])]
        layout = {"layout": "train/val folders", "val_fraction": None}
    else:
        classes = _class_folders(src)
        roots = [(None, src)]
        layout = {"layout": "class folders", "val_fraction": val_fraction}
    if not classes:
        raise DataError(f"no images found under {src}: expected class folders (ImageNet layout: CLASS/IMAGE.JPEG, "
                        "optionally inside train/ and val/)")
    label_of = {c: i for i, c in enumerate(classes)}
    items: list[_Source] = []
    for split, root in roots:
        for cls in _class_folders(root):
            folder = os.path.join(root, cls)
            files = _image_files(folder)
            if not files:
                raise DataError(f"class folder {folder} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
            per_split: dict[str, int] = {}
            for rel in files:
                s = split or ("val" if _hash_fraction(f"{cls}/{rel}") < val_fraction else "train")
                if max_per_class is not None and per_split.get(s, 0) >= max_per_class:
                    continue
                per_split[s] = per_split.get(s, 0) + 1
                path = os.path.join(folder, rel)
                items.append(_Source(s, label_of[cls], cls, rel, path, os.path.relpath(path, src)))
    # Rows go into shards in a fixed pseudo-random order, not class by class: a reader streaming a few shards at a
    # time (Ray Data blocks, a local shuffle buffer) then sees every class in every batch.
    items.sort(key=lambda item: _hash_fraction("order/" + item.shown))
    return classes, items, layout


def _read_groups(groups_file: str, classes: Sequence[str]) -> tuple[list[int], list[str]]:
    """Group id per class and group names from a JSON object {class_folder: group_name}."""
    try:
        with open(groups_file, encoding="utf-8") as fh:
            doc = json.load(fh)
    except FileNotFoundError:
        raise DataError(f"groups file {groups_file} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"groups file {groups_file} is not readable JSON: {exc}") from None
    if not isinstance(doc, dict) or not all(isinstance(k, str) and isinstance(v, str) and v for k, v in doc.items()):
        raise DataError(f"groups file {groups_file} must be a JSON object {{class_folder: group_name}} of strings")
    unknown = sorted(set(doc) - set(classes))
    if unknown:
        raise DataError(f"groups file {groups_file} names classes that are not folders of the source: {unknown}")
    missing = [c for c in classes if c not in doc]
    if missing:
        raise DataError(f"groups file {groups_file} gives no group for classes {missing}")
    names: list[str] = []
    for cls in classes:  # group ids in order of first appearance over the sorted classes
        if doc[cls] not in names:
            names.append(doc[cls])
    return [names.index(doc[c]) for c in classes], names


_KEEP_PNG_MODES = {"1", "L", "LA", "P", "RGB", "RGBA"}


def _load_image(path: str) -> tuple[bytes, int, int] | str:
    """(encoded bytes, height, width) after one full decode, or the reason the file is unusable.

    JPEG bytes are kept as they are (grayscale and CMYK included: readers convert to RGB); PNG too; other
    formats are re-encoded as PNG so every reader needs only JPEG and PNG decoders.
    """
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        return f"unreadable: {exc.strerror or exc}"
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()  # full decode: a truncated file raises here (LOAD_TRUNCATED_IMAGES is False)
            width, height = img.size
            if img.format == "JPEG" or (img.format == "PNG" and img.mode in _KEEP_PNG_MODES):
                return data, height, width
            out = io.BytesIO()
            img.convert("RGBA" if "A" in img.getbands() else "RGB").save(out, format="PNG")
            return out.getvalue(), height, width
    # Decoders raise many types for bad input (OSError, SyntaxError, ValueError, struct.error, ...);
    # every one of them means "this file is not a usable image", which is what on_corrupt decides about.
    except Exception as exc:  # noqa: BLE001
        return f"{type(exc).__name__}: {exc}"


def prepare_imagefolder(
    src: str | os.PathLike,
    dst_url: str,
    *,
    groups_file: str | os.PathLike | None = None,
    on_corrupt: Literal["skip", "fail"] = "skip",
    val_fraction: float = 0.1,
    shard_rows: int = 2000,
    max_per_class: int | None = None,
    overwrite: bool = False,
    workers: int | None = None,
    storage_options: Mapping[str, Any] | None = None,
    progress: bool = True,
) -> Manifest:
    """Turn an ImageFolder tree (ImageNet layout) on local disk into shards at `dst_url`.

    Layout: ``src/train/<class>/*`` and ``src/val/<class>/*`` give the splits; otherwise ``src/<class>/*``
    with a hash of ``<class>/<file>`` holding out `val_fraction` (stable when files are added). Labels are
    class folders in sorted order; keys are ``{split}/{class}/{file}``. Every image is decoded once, in a
    pool of `workers` threads (default: CPU count); corrupt or truncated files are skipped and listed in the
    manifest (`on_corrupt="skip"`) or stop the run with a DataError naming the file (`"fail"`).
    `max_per_class` takes the first N files of each class and split (sorted by name), without copying.
    `groups_file` is a JSON object {class_folder: group_name}; group ids follow first appearance over the
    sorted classes.
    """
    if on_corrupt not in ("skip", "fail"):
        raise ValueError(f"on_corrupt must be 'skip' or 'fail', got {on_corrupt!r}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if max_per_class is not None and max_per_class < 1:
        raise ValueError(f"max_per_class must be >= 1, got {max_per_class}")
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        # Someone in this process turned it on; truncated files would then pass as valid images.
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True in this process: prepare cannot detect "
                           "truncated files; leave it False")
    src = os.path.abspath(os.fspath(src))
    if not os.path.isdir(src):
        raise DataError(f"source folder {src} does not exist" if not os.path.exists(src) else f"source {src} is not a folder")
    classes, items, layout = _scan(src, val_fraction, max_per_class)
    if not items:
        raise DataError(f"no images found under {src}")
    if groups_file is not None:
        class_groups, group_names = _read_groups(os.fspath(groups_file), classes)
    else:
        class_groups, group_names = [-1] * len(classes), []
    class_entries = [
        ClassEntry(id=i, name=c, wnid=c if _WNID.match(c) else None, group=class_groups[i]) for i, c in enumerate(classes)
    ]
    skipped: list[SkippedFile] = []
    workers = workers or os.cpu_count() or 1

    def batches(pool: concurrent.futures.Executor, advance) -> Iterator[tuple[str, pa.Table]]:
        window = 256  # bounded memory: decode 256 files, hand their rows on, continue
        for start in range(0, len(items), window):
            chunk = items[start : start + window]
            rows: dict[str, dict[str, list]] = {}
            for item, result in zip(chunk, pool.map(_load_image, [i.path for i in chunk])):
                if isinstance(result, str):
                    if on_corrupt == "fail":
                        raise DataError(f"corrupt image {item.path}: {result} (use --on-corrupt skip to leave it out)")
                    skipped.append(SkippedFile(file=item.shown, reason=result))
                    continue
                data, height, width = result
                cols = rows.setdefault(item.split, {n: [] for n in SHARD_SCHEMA.names})
                cols["key"].append(f"{item.split}/{item.class_name}/{item.rel.replace(os.sep, '/')}")
                cols["image"].append(data)
                cols["label"].append(item.label)
                cols["group"].append(class_groups[item.label])
                cols["domain"].append(0)
                cols["height"].append(height)
                cols["width"].append(width)
            advance(len(chunk))
            for split, cols in rows.items():
                yield split, pa.table(cols, schema=SHARD_SCHEMA)
        if len(skipped) == len(items):
            raise DataError(f"no readable images under {src}: all {len(items)} files were skipped "
                            f"(first: {skipped[0].file}: {skipped[0].reason})")

    source = {
        "kind": "imagefolder",
        "path": src,
        **layout,
        "groups_file": os.path.abspath(os.fspath(groups_file)) if groups_file is not None else None,
        "max_per_class": max_per_class,
        "on_corrupt": on_corrupt,
    }
    bar = progress_bar() if progress else None
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool, bar or contextlib.nullcontext():
        task = bar.add_task(f"prepare {os.path.basename(src)}", total=len(items)) if bar else None
        return write_shards(
            dst_url,
            batches(pool, lambda n: bar.advance(task, n) if bar else None),
            name=os.path.basename(src),
            source=source,
            image_size=None,
            classes=class_entries,
            groups=[GroupEntry(id=i, name=n) for i, n in enumerate(group_names)],
            domains=[DomainEntry(id=0, name="default")],
            skipped=skipped,
            shard_rows=shard_rows,
            overwrite=overwrite,
            storage_options=storage_options,
        )


def progress_bar():
    """The rich progress bar that prepare and synth show."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
