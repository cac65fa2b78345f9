"""Parquet image shards: the shard schema, reading a shard or a split (each shard checked against its sha256 in the
manifest), and writing shards plus the manifest that commits them.

    from orchestrator.data.shards import read_index, read_shard
    index = read_index("file:///tmp/inette", "train")          # key, label, group, domain
    table = read_shard("file:///tmp/inette/train-00000.parquet", manifest.shards[0].sha256)

Shard columns (``SHARD_SCHEMA``): key (string, unique across splits), image (encoded bytes: JPEG kept as
it came), label, group (-1 when the data set has no groups), domain (int64), height, width (int32).
Images may be grayscale or CMYK JPEGs: decode with ``Image.open(...).convert("RGB")``.

Readers fail naming the shard (missing, sha256 mismatch, not Parquet with this schema). A write commits with
manifest.json last; a failed write removes what it wrote.
"""

from __future__ import annotations

import concurrent.futures
import datetime as dt
import hashlib
import os
import re
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from orchestrator import storage
from orchestrator.data.manifest import (
    MANIFEST_NAME,
    SCHEMA_VERSION,
    ClassEntry,
    DomainEntry,
    GroupEntry,
    Manifest,
    ShardEntry,
    Skipped,
    SkippedFile,
    SplitEntry,
    compute_digest,
    dataset_root,
    load_manifest,
    streamssl_version,
)
from orchestrator.errors import DataError

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


def check_schema(table_schema: pa.Schema, columns: Sequence[str], shown: str) -> None:
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
        check_schema(pf.schema_arrow, wanted, shown)
        return pf.read(columns=wanted)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"shard {shown}: not a readable Parquet file (truncated or corrupt?): {exc}") from None


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_shard(
    url: str,
    expected_sha256: str | None = None,
    columns: Sequence[str] | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> pa.Table:
    """One shard as a pyarrow Table, its bytes read once and checked against `expected_sha256`.

    Raises DataError naming the shard when it is missing, its sha256 differs from the manifest's, or it is not
    readable Parquet with the shard schema; transient storage errors are retried (``storage.retry_policy()``) and,
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
        found = sha256_hex(data)
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
        written.append(ShardEntry(path=path, split=split, rows=head.num_rows, bytes=len(data), sha256=sha256_hex(data)))

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
            created_by=f"streamssl {streamssl_version()}",
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
        remove_written(dst_url, written, storage_options)
        raise
    return manifest


def remove_written(dst_url: str, entries: Iterable[ShardEntry], storage_options: Mapping[str, Any] | None) -> None:
    """Remove the shards a failed write had written (nothing half-written is left behind); best effort, so the
    original error is the one the user sees."""
    for entry in entries:
        try:
            storage.remove(storage.join(dst_url, entry.path), storage_options)
        except Exception:
            pass


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
