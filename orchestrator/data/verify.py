"""`streamssl data verify`: every shard of a data set checked against its manifest, each problem naming its shard.

    from orchestrator.data.verify import verify
    report = verify("file:///tmp/inette")            # deep: sha256, schema, rows, labels, unique keys
    report = verify(url, deep=False)                  # quick: present with the recorded byte size
    verify(url, raise_on_error=True)                  # DataError listing every failing shard
"""

from __future__ import annotations

import concurrent.futures
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from orchestrator import storage
from orchestrator.data.manifest import Manifest, ShardEntry, dataset_root, load_manifest
from orchestrator.data.shards import INDEX_COLUMNS, SHARD_SCHEMA, check_schema, sha256_hex
from orchestrator.errors import DataError


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
        sha = sha256_hex(data)
        if sha != entry.sha256:
            problems.append(f"sha256 mismatch (manifest {entry.sha256}, found {sha})")
        keys, rows, schema_ok = None, None, False
        try:
            pf = pq.ParquetFile(pa.BufferReader(data))
            check_schema(pf.schema_arrow, SHARD_SCHEMA.names, storage.redact(shard_url))
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
