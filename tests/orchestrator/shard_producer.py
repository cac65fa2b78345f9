"""A producer of a live stream for the polled-source tests: it writes shards into a folder the way
`online.source` expects them (the Parquet shard first, its `.sha256` sidecar last).

    rows = train_rows(synthetic_url)                   # the synthetic data set's train rows, a pyarrow Table
    publish(folder, "b-001.parquet", rows.slice(0, 48))           # shard + correct sidecar
    publish(folder, "bad.parquet", rows.slice(48, 48), digest="0" * 64)   # a sidecar that does not match
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from orchestrator.data.shards import SHARD_SCHEMA, read_split


def train_rows(data_url: str) -> pa.Table:
    return read_split(data_url, "train").select(SHARD_SCHEMA.names).cast(SHARD_SCHEMA)


def shard_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table.select(SHARD_SCHEMA.names).cast(SHARD_SCHEMA), buf)
    return buf.getvalue()


def publish(folder: str | Path, name: str, table: pa.Table, digest: str | None = None) -> str:
    """Write `table` as shard `name` in `folder`, then its sidecar (`digest`, or the shard's true sha256);
    returns the true sha256."""
    data = shard_bytes(table)
    true = hashlib.sha256(data).hexdigest()
    Path(folder, name).write_bytes(data)
    partial = Path(folder, name + ".sha256.tmp")
    partial.write_text(f"{digest or true}  {name}\n")  # as sha256sum writes it
    os.replace(partial, Path(folder, name + ".sha256"))  # the sidecar appears whole
    return true
