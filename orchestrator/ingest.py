"""Getting images out of shards: Ray Data pipelines for training, and in-process arrays for evaluation.

Training: `chunk_dataset(...)` is a Ray Dataset of decoded uint8 images (`image`: [H, W, 3]) for the rows of the
given chunks. Each shard is read once per pass by one task that checks its sha256 against the manifest, keeps the
chunk's rows and hands them on; decoding runs in parallel tasks beside the training workers.
Evaluation: `load_split_arrays(...)` decodes a split (optionally capped per class) into one tensor.
"""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
from PIL import Image

from orchestrator import storage
from orchestrator.errors import DataError
from orchestrator.shards import Manifest, read_shard
from orchestrator.streams import StreamPlan

INDEX_COLUMNS = ["key", "label", "group", "domain"]


def decode_image(data: bytes, size: int, key: str = "?") -> np.ndarray:
    """Encoded bytes -> uint8 [size, size, 3]: shorter side resized to `size`, then centre-cropped."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.format == "JPEG":
                img.draft("RGB", (size, size))  # DCT-domain downscale: decoding a 224 px JPEG for 64 px is ~4x cheaper
            img = img.convert("RGB")
            w, h = img.size
            scale = size / min(w, h)
            if (w, h) != (size, size):
                nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
                img = img.resize((nw, nh), Image.BILINEAR, reducing_gap=None if scale > 0.5 else 2.0)
                left, top = (nw - size) // 2, (nh - size) // 2
                img = img.crop((left, top, left + size, top + size))
            return np.asarray(img, dtype=np.uint8)
    except (OSError, ValueError) as exc:
        raise DataError(f"row {key}: image cannot be decoded ({exc})") from exc


def decode_table(table: pa.Table, size: int) -> np.ndarray:
    keys = table.column("key").to_pylist()
    images = table.column("image").to_pylist()
    out = np.empty((len(images), size, size, 3), dtype=np.uint8)
    for i, (key, data) in enumerate(zip(keys, images)):
        out[i] = decode_image(data, size, key)
    return out


@dataclass(frozen=True)
class ShardRef:
    url: str
    sha256: str
    rows: int


def shard_refs(manifest: Manifest, data_url: str, split: str) -> list[ShardRef]:
    entries = manifest.shard_entries(split)
    if not entries:
        raise DataError(f"{data_url}: the manifest has no shards for split {split!r}")
    return [ShardRef(storage.join(data_url, e.path), e.sha256, e.rows) for e in entries]


class ReadChunkRows:
    """Ray Data UDF: one shard reference in, that shard's rows of the wanted chunks out (sha256-verified)."""

    def __init__(self, plan: StreamPlan, chunks: Sequence[int], storage_options: dict[str, Any]):
        self.plan = plan
        self.chunks = list(chunks)
        self.storage_options = storage_options

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        tables = []
        for url, sha in zip(batch["url"], batch["sha256"]):
            table = read_shard(str(url), expected_sha256=str(sha), columns=["key", "image", "label", "domain"],
                               storage_options=self.storage_options)
            tables.append(self.plan.select(table, self.chunks))
        return pa.concat_tables(tables)


class DecodeImages:
    """Ray Data UDF: encoded `image` bytes -> uint8 [N, size, size, 3] (only the image goes on to training)."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, table: pa.Table) -> dict[str, np.ndarray]:
        return {"image": decode_table(table, self.size)}


def chunk_dataset(
    shards: Sequence[ShardRef],
    plan: StreamPlan,
    chunks: Sequence[int],
    image_size: int,
    storage_options: dict[str, Any] | None = None,
    decode_cpus: float = 0.5,
):
    """A Ray Dataset of the decoded training images of `chunks` (a union for joint training)."""
    import ray.data

    items = [{"url": s.url, "sha256": s.sha256} for s in shards]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.randomize_block_order()
    ds = ds.map_batches(
        ReadChunkRows(plan, chunks, storage_options or {}), batch_size=1, batch_format="numpy", num_cpus=decode_cpus
    )
    return ds.map_batches(DecodeImages(image_size), batch_size=256, batch_format="pyarrow", num_cpus=decode_cpus)


def chunk_rows(plan: StreamPlan, chunks: Sequence[int]) -> int:
    return sum(plan.chunks[c].rows for c in chunks)


@dataclass
class SplitArrays:
    images: Any  # torch uint8 [N, 3, H, W]
    labels: np.ndarray  # int64 [N]
    domains: np.ndarray  # int64 [N]
    keys: list[str]


def load_split_arrays(
    manifest: Manifest,
    data_url: str,
    split: str,
    image_size: int,
    storage_options: dict[str, Any] | None = None,
    max_per_class: int | None = None,
    threads: int = 4,
) -> SplitArrays:
    """Read and decode a whole split in this process (evaluation banks and queries)."""
    import torch

    refs = shard_refs(manifest, data_url, split)
    tables = [read_shard(r.url, expected_sha256=r.sha256, storage_options=storage_options) for r in refs]
    table = pa.concat_tables(tables).sort_by("key")
    if max_per_class is not None:
        labels = table.column("label").to_numpy()
        keep = np.zeros(len(labels), dtype=bool)
        for label in np.unique(labels):
            keep[np.flatnonzero(labels == label)[:max_per_class]] = True
        table = table.filter(pa.array(keep))
    parts = np.array_split(np.arange(table.num_rows), max(1, threads * 4))
    with ThreadPoolExecutor(max_workers=threads) as pool:
        decoded = list(pool.map(lambda idx: decode_table(table.take(pa.array(idx)), image_size),
                                [p for p in parts if len(p)]))
    images = np.concatenate(decoded) if decoded else np.zeros((0, image_size, image_size, 3), np.uint8)
    return SplitArrays(
        images=torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(),
        labels=table.column("label").to_numpy().astype(np.int64),
        domains=table.column("domain").to_numpy().astype(np.int64),
        keys=table.column("key").to_pylist(),
    )
