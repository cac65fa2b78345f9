"""A metadata-only data set at ImageNet scale: real Parquet shards and manifest.json, every row's key, label, group
and domain, and no images (empty `image` bytes), so planning can be measured at millions of rows in seconds.

    from bench.index_fixture import write_index_dataset
    manifest = write_index_dataset("/tmp/inet-index", rows=1_281_167)   # 1,000 classes in 67 groups, 4 domains

Layout as `streamssl data prepare` writes ImageNet: keys `train/<wnid>/<wnid>_<n>.JPEG`, shards of 2,000 rows in
class order (so a shard holds one or two classes), class ids 0..999 in wnid order, the groups contiguous runs of
~15 classes (a stand-in for a WordNet ancestor level). Domains are dealt per row (row n gets domain n mod D), so every
shard holds every domain, as in a set like DomainNet prepared with a domain column. The val split holds
`val_per_class` rows per class. Planning reads exactly what it reads from a real preparation (manifest, then every
train shard in full with its sha256 checked, keeping the index columns); only the image bytes are missing, so the
figures measure planning's compute, not reading ~140 GB of JPEGs (see bench/README.md).
"""

from __future__ import annotations

import datetime as dt

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
    SplitEntry,
    compute_digest,
    streamssl_version,
)
from orchestrator.data.shards import SHARD_SCHEMA, sha256_hex

IMAGENET_TRAIN_ROWS = 1_281_167


def class_of_rows(rows: int, classes: int) -> np.ndarray:
    """Balanced contiguous labels: row n has class n * classes // rows (classes differ in size by at most 1)."""
    return (np.arange(rows, dtype=np.int64) * classes) // rows


def _shard_bytes(keys: list[str], labels: np.ndarray, class_group: np.ndarray, domains: np.ndarray) -> bytes:
    n = len(keys)
    table = pa.table({
        "key": pa.array(keys, pa.string()),
        "image": pa.array([b""] * n, pa.binary()),
        "label": pa.array(labels, pa.int64()),
        "group": pa.array(class_group[labels], pa.int64()),
        "domain": pa.array(domains, pa.int64()),
        "height": pa.array(np.zeros(n, np.int32)),
        "width": pa.array(np.zeros(n, np.int32)),
    }, schema=SHARD_SCHEMA)
    sink = pa.BufferOutputStream()
    # The options the real shard writer uses for the small columns (zstd, dictionary ints, statistics).
    pq.write_table(table, sink, row_group_size=1024, compression="zstd",
                   use_dictionary=["label", "group", "domain", "height", "width"])
    return sink.getvalue().to_pybytes()


def write_index_dataset(url: str, rows: int = IMAGENET_TRAIN_ROWS, classes: int = 1000, groups: int = 67,
                        domains: int = 4, shard_rows: int = 2000, val_per_class: int = 1) -> Manifest:
    """Write the metadata-only set at `url` (a local folder or fsspec URL) and return its manifest."""
    if not 1 <= groups <= classes <= rows:
        raise ValueError(f"need 1 <= groups ({groups}) <= classes ({classes}) <= rows ({rows})")
    wnids = [f"n{10_000_000 + c:08d}" for c in range(classes)]
    class_group = (np.arange(classes, dtype=np.int64) * groups) // classes
    shards: list[ShardEntry] = []
    for split, total in (("train", rows), ("val", classes * val_per_class)):
        labels_all = class_of_rows(total, classes)
        # The n-th row of a class is `<wnid>_<n>`, as ImageNet's file names number a class's images.
        first_of_class = np.searchsorted(labels_all, np.arange(classes))
        for index, start in enumerate(range(0, total, shard_rows)):
            stop = min(total, start + shard_rows)
            labels = labels_all[start:stop]
            nth = np.arange(start, stop) - first_of_class[labels]
            keys = [f"{split}/{wnids[c]}/{wnids[c]}_{n}.JPEG" for c, n in zip(labels.tolist(), nth.tolist())]
            data = _shard_bytes(keys, labels, class_group, np.arange(start, stop, dtype=np.int64) % domains)
            path = f"{split}-{index:05d}.parquet"
            storage.write_bytes_atomic(storage.join(url, path), data)
            shards.append(ShardEntry(path=path, split=split, rows=stop - start, bytes=len(data), sha256=sha256_hex(data)))
    manifest = Manifest(
        schema_version=SCHEMA_VERSION, name="imagenet-scale-index", created_by=f"streamssl {streamssl_version()}",
        created_at=dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat(),
        source={"kind": "bench.index_fixture", "rows": rows, "classes": classes, "groups": groups, "domains": domains,
                "shard_rows": shard_rows, "images": "none (metadata only)"},
        image_size=None,
        classes=tuple(ClassEntry(id=c, name=w, wnid=w, group=int(class_group[c])) for c, w in enumerate(wnids)),
        groups=tuple(GroupEntry(id=g, name=f"group-{g:02d}") for g in range(groups)),
        domains=tuple(DomainEntry(id=d, name=f"domain-{d}") for d in range(domains)),
        splits={split: SplitEntry(rows=sum(s.rows for s in shards if s.split == split),
                                  shards=tuple(s.path for s in shards if s.split == split)) for split in ("train", "val")},
        shards=tuple(shards),
        digest=compute_digest(shards),
    )
    storage.write_bytes_atomic(storage.join(url, MANIFEST_NAME), manifest.to_json().encode())
    return manifest
