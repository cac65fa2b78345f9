"""Getting images out of shards: Ray Data pipelines for training, and in-process arrays for evaluation.

Training: `chunk_dataset(...)` is a Ray Dataset of decoded uint8 images (`image`: [H, W, 3]) for the rows of the
given chunks. Each shard is read once per pass by one task that checks its sha256 against the manifest, keeps the
chunk's rows and hands them on; decoding runs in parallel tasks beside the training workers.
Evaluation: `load_split_arrays(...)` decodes a split (optionally capped per class) into one tensor.

Bad rows: a row whose image bytes do not decode (corrupt or truncated JPEG from an older or foreign tool) is
left out and counted (`on_corrupt="skip"`, the default) or stops the read with a DataError naming the shard and
the row key (`on_corrupt="fail"`). Skipped keys come back from `decode_table` and `load_split_arrays`; in a Ray
Data pipeline, pass a `CorruptRowCounter` actor to `chunk_dataset(..., counter=...)` and read its `totals()`:

    counter = start_corrupt_row_counter()
    ds = chunk_dataset(refs, plan, [0], 64, counter=counter)
    ...                                         # train over ds
    totals = ray.get(counter.totals.remote())   # {"rows": 2, "per_shard": {...}, "keys": [...]}
"""

from __future__ import annotations

import hashlib
import io
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator, Literal, Sequence

import numpy as np
import pyarrow as pa
from PIL import Image

from orchestrator import storage
from orchestrator.data.manifest import Manifest
from orchestrator.data.shards import read_shard
from orchestrator.errors import DataError

if TYPE_CHECKING:  # a pipeline reads a stream plan; the plan package reads data's manifests
    from orchestrator.plan.streams import StreamPlan

logger = logging.getLogger(__name__)
INDEX_COLUMNS = ["key", "label", "group", "domain"]
OnCorrupt = Literal["skip", "fail"]
SHARD_COLUMN = "shard"  # the (redacted) shard URL each row came from, so a bad row's message can name its shard


def _check_on_corrupt(on_corrupt: str) -> None:
    if on_corrupt not in ("skip", "fail"):
        raise ValueError(f"on_corrupt must be 'skip' or 'fail', got {on_corrupt!r}")


def decode_image(data: bytes, size: int, key: str = "?", shard: str | None = None) -> np.ndarray:
    """Encoded bytes -> uint8 [size, size, 3]: shorter side resized to `size`, then centre-cropped.

    Bytes that do not decode (corrupt, truncated, not an image, empty) raise DataError naming the row key and,
    when given, its shard.
    """
    try:
        if not data:
            raise ValueError("no image bytes")
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
    # Decoders raise many types for bad bytes (OSError "image file is truncated", UnidentifiedImageError,
    # SyntaxError, ValueError, struct.error, DecompressionBombError...): each means "this row is not an image".
    except Exception as exc:  # noqa: BLE001
        where = f"shard {shard}, row {key}" if shard else f"row {key}"
        raise DataError(f"{where}: image cannot be decoded ({type(exc).__name__}: {exc})") from exc


def decode_table(
    table: pa.Table, size: int, on_corrupt: OnCorrupt = "skip"
) -> tuple[np.ndarray, list[str]]:
    """Decode the `image` column: (uint8 [M, size, size, 3] for the rows that decode, keys of the rows that did not).

    Rows keep their order; a skipped row adds nothing, so M = num_rows - len(skipped). With a `shard` column
    (see ReadChunkRows) messages name each row's shard. `on_corrupt="fail"` raises the first row's DataError.
    """
    images, ok = _decode_rows(table, size, on_corrupt)
    keys = table.column("key").to_pylist()
    return images, [k for k, good in zip(keys, ok) if not good]


def _decode_rows(table: pa.Table, size: int, on_corrupt: OnCorrupt) -> tuple[np.ndarray, np.ndarray]:
    """(images of the rows that decode, bool mask [num_rows] of those rows)."""
    _check_on_corrupt(on_corrupt)
    keys = table.column("key").to_pylist()
    images = table.column("image").to_pylist()
    shards = table.column(SHARD_COLUMN).to_pylist() if SHARD_COLUMN in table.column_names else [None] * len(keys)
    out = np.empty((len(images), size, size, 3), dtype=np.uint8)
    ok = np.ones(len(images), dtype=bool)
    n = 0
    for i, (key, data, shard) in enumerate(zip(keys, images, shards)):
        try:
            out[n] = decode_image(data, size, key, shard)
            n += 1
        except DataError:
            if on_corrupt == "fail":
                raise
            ok[i] = False
    return out[:n], ok


def row_index(keys: Sequence[str]) -> np.ndarray:
    """Stable int64 ids of row keys (63 bits of blake2b), the `index` of a training Batch (replay, RALS)."""
    return np.array([int.from_bytes(hashlib.blake2b(str(k).encode(), digest_size=8).digest(), "little") >> 1
                     for k in keys], dtype=np.int64)


def _side_columns(table: pa.Table, rows: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """label, domain and index of a table's rows (all, or the boolean mask `rows`), for the Batch."""
    out = {
        "label": table.column("label").to_numpy().astype(np.int64),
        "domain": table.column("domain").to_numpy().astype(np.int64),
        "index": row_index(table.column("key").to_pylist()),
    }
    return out if rows is None else {name: values[rows] for name, values in out.items()}


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
    """Ray Data UDF: one shard reference in, that shard's rows of the wanted chunks out (sha256-verified).

    Rows carry a `shard` column (the redacted URL) so the decode step can name a bad row's shard.
    """

    def __init__(self, plan: StreamPlan, chunks: Sequence[int], storage_options: dict[str, Any], block_rows: int = 64):
        self.block_rows = block_rows
        self.plan = plan
        self.chunks = list(chunks)
        self.storage_options = storage_options

    def __call__(self, batch: dict[str, np.ndarray]) -> Iterator[pa.Table]:
        for url, sha in zip(batch["url"], batch["sha256"]):
            table = read_shard(str(url), expected_sha256=str(sha), columns=["key", "image", "label", "domain"],
                               storage_options=self.storage_options)
            table = self.plan.select(table, self.chunks)
            table = table.append_column(SHARD_COLUMN, pa.array([storage.redact(str(url))] * table.num_rows, pa.string()))
            # Small blocks, yielded as they are cut: decode starts on the first rows of a shard instead of waiting
            # for the whole shard (the first batch of every epoch arrived ~1.4 s late with one block per shard).
            for start in range(0, table.num_rows, self.block_rows):
                yield table.slice(start, self.block_rows)


class CorruptRowCounter:
    """Tally of rows left out as undecodable, shared by every decode task (run it as a Ray actor).

    `add([(shard_url, key), ...])` records rows; `totals()` gives {"rows": n, "per_shard": {url: n},
    "keys": first `keep_keys` keys}. Start one with :func:`start_corrupt_row_counter`.
    """

    def __init__(self, keep_keys: int = 1000):
        self.keep_keys = keep_keys
        self.rows = 0
        self.per_shard: dict[str, int] = {}
        self.keys: list[str] = []

    def add(self, rows: Sequence[tuple[str, str]]) -> int:
        for shard, key in rows:
            self.rows += 1
            self.per_shard[shard] = self.per_shard.get(shard, 0) + 1
            if len(self.keys) < self.keep_keys:
                self.keys.append(key)
        return self.rows

    def totals(self) -> dict[str, Any]:
        return {"rows": self.rows, "per_shard": dict(self.per_shard), "keys": list(self.keys)}


def start_corrupt_row_counter(keep_keys: int = 1000):
    """A CorruptRowCounter Ray actor (no CPU reserved) for `chunk_dataset(..., counter=...)`; Ray must be started."""
    import ray

    return ray.remote(num_cpus=0)(CorruptRowCounter).remote(keep_keys)


class DecodeImages:
    """Ray Data UDF: encoded `image` bytes -> uint8 [N, size, size, 3] (only the image goes on to training).

    Undecodable rows: left out (`on_corrupt="skip"`), each (shard, key) reported to the `counter` actor when one
    is given, or a DataError naming the shard and row key (`"fail"`).
    """

    def __init__(self, size: int, on_corrupt: OnCorrupt = "skip", counter: Any = None):
        _check_on_corrupt(on_corrupt)
        self.size = size
        self.on_corrupt = on_corrupt
        self.counter = counter

    def __call__(self, table: pa.Table) -> dict[str, np.ndarray]:
        images, ok = _decode_rows(table, self.size, self.on_corrupt)
        if not ok.all():
            bad = np.flatnonzero(~ok)
            keys = table.column("key").take(pa.array(bad)).to_pylist()
            shards = (table.column(SHARD_COLUMN).take(pa.array(bad)).to_pylist() if SHARD_COLUMN in table.column_names
                      else ["?"] * len(keys))
            logger.warning("left out %d undecodable rows, e.g. shard %s, row %s", len(keys), shards[0], keys[0])
            if self.counter is not None:
                import ray

                # Waited for: rare, and the tally must be complete once the dataset has been consumed.
                ray.get(self.counter.add.remote(list(zip(shards, keys))))
        return {"image": images, **_side_columns(table, ok)}


def chunk_dataset(
    shards: Sequence[ShardRef],
    plan: StreamPlan,
    chunks: Sequence[int],
    image_size: int,
    storage_options: dict[str, Any] | None = None,
    decode_cpus: float = 0.5,
    *,
    on_corrupt: OnCorrupt = "skip",
    counter: Any = None,
    decode: str = "ray_data",
    seed: int | None = None,
):
    """A Ray Dataset of the decoded training images of `chunks` (a union for joint training).

    Rows come out in the same order on every pass when `seed` is given (seeded shard order, order preserved
    through the parallel read and decode tasks): what a data-exact resume inside a chunk needs.

    `decode="device"` leaves the JPEGs encoded (columns `key`, `image` bytes, `shard`): the consumer decodes each
    batch with :class:`DeviceBatchDecoder`.

    `on_corrupt` and `counter` (a :func:`start_corrupt_row_counter` actor) go to DecodeImages. A DataError raised
    while reading (missing shard, sha256 mismatch, storage unreachable) or decoding reaches the consumer of the
    dataset as a ``RayTaskError(DataError)``: an instance of DataError whose message holds the original text.
    """
    import ray.data

    _check_on_corrupt(on_corrupt)
    items = [{"url": s.url, "sha256": s.sha256} for s in shards]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.randomize_block_order(seed=seed)
    ds = ds.map_batches(
        ReadChunkRows(plan, chunks, storage_options or {}), batch_size=1, batch_format="numpy", num_cpus=decode_cpus
    )
    if decode == "device":
        # The encoded bytes go on to the training workers, which decode on their own device (nvjpeg on a GPU):
        # ~10x fewer bytes through the object store than decoded pixels, and no CPU decode pool to keep up.
        ds = ds.select_columns(["key", "image", "label", "domain", SHARD_COLUMN])
    elif decode == "ray_data":
        ds = ds.map_batches(DecodeImages(image_size, on_corrupt, counter), batch_size=None, batch_format="pyarrow",
                            num_cpus=decode_cpus)
    else:
        raise ValueError(f"decode must be 'ray_data' or 'device', got {decode!r}")
    # A DataError from a read or decode task then reaches the consumer as RayTaskError(DataError), an instance of
    # DataError (exit code 3), instead of being wrapped in Ray Data's UserCodeException.
    ds.context.raise_original_map_exception = True
    if seed is not None:
        ds.context.execution_options.preserve_order = True
    return ds


def release_split(shard: Any) -> bool:
    """End the SplitCoordinator actor behind a Ray Train dataset shard (a `streaming_split` iterator) once every rank
    is done with it; returns whether there was one.

    Ray Train V2 keeps each dataset's coordinator (its streaming executor, ~0.5 GB of private memory) alive until
    the whole worker group ends, holding a handle in its DatasetManager: one per chunk, so a long stream would fill
    the node. Only the rank that owns no more reads of the dataset may call this (the coordinator dies for all).
    Ray Train's own shutdown then finds the coordinator gone: its DatasetManager logs that once, in its own log."""
    import ray

    coordinator = getattr(shard, "_coord_actor", None)  # ray.data's StreamSplitDataIterator (2.51 .. 2.60)
    if coordinator is None:
        return False
    ray.kill(coordinator, no_restart=True)
    return True


def chunk_rows(plan: StreamPlan, chunks: Sequence[int]) -> int:
    return sum(plan.chunks[c].rows for c in chunks)


def planned_chunk_rows(plan: StreamPlan, chunks: Sequence[int]) -> int:
    """The rows the steps are planned on: the chunks' rows before data.class_fraction dropped classes."""
    return sum(plan.chunks[c].planned_rows for c in chunks)


@dataclass
class SplitArrays:
    images: Any  # torch uint8 [N, 3, H, W]
    labels: np.ndarray  # int64 [N]
    domains: np.ndarray  # int64 [N]
    keys: list[str]
    skipped: list[str] = field(default_factory=list)  # keys left out as undecodable (on_corrupt="skip")

    def batches(self, batch_size: int):
        """`(uint8 images, int64 labels)` batches in row order (what feature extraction and the evaluators read)."""
        import torch

        labels = torch.from_numpy(self.labels)
        for start in range(0, len(labels), batch_size):
            yield self.images[start : start + batch_size], labels[start : start + batch_size]


def load_split_arrays(
    manifest: Manifest,
    data_url: str,
    split: str,
    image_size: int,
    storage_options: dict[str, Any] | None = None,
    max_per_class: int | None = None,
    threads: int = 4,
    on_corrupt: OnCorrupt = "skip",
) -> SplitArrays:
    """Read and decode a whole split in this process (evaluation banks and queries).

    Rows whose image does not decode are left out (images, labels, domains and keys stay aligned) and their keys
    listed in `skipped`, or raise a DataError naming shard and key with `on_corrupt="fail"`. `max_per_class`
    caps before decoding, so a class with bad rows may end up with fewer.
    """
    import torch

    _check_on_corrupt(on_corrupt)
    refs = shard_refs(manifest, data_url, split)
    tables = []
    for r in refs:
        t = read_shard(r.url, expected_sha256=r.sha256, storage_options=storage_options)
        tables.append(t.append_column(SHARD_COLUMN, pa.array([storage.redact(r.url)] * t.num_rows, pa.string())))
    table = pa.concat_tables(tables).sort_by("key")
    if max_per_class is not None:
        labels = table.column("label").to_numpy()
        keep = np.zeros(len(labels), dtype=bool)
        for label in np.unique(labels):
            keep[np.flatnonzero(labels == label)[:max_per_class]] = True
        table = table.filter(pa.array(keep))
    parts = [p for p in np.array_split(np.arange(table.num_rows), max(1, threads * 4)) if len(p)]
    with ThreadPoolExecutor(max_workers=threads) as pool:
        decoded = list(pool.map(lambda idx: _decode_rows(table.take(pa.array(idx)), image_size, on_corrupt), parts))
    images = (np.concatenate([d[0] for d in decoded]) if decoded
              else np.zeros((0, image_size, image_size, 3), np.uint8))
    ok = np.concatenate([d[1] for d in decoded]) if decoded else np.zeros(0, dtype=bool)
    keys = table.column("key").to_pylist()
    skipped = [k for k, good in zip(keys, ok) if not good]
    if skipped:
        logger.warning("%s split %s: left out %d undecodable rows, e.g. %s", storage.redact(data_url), split,
                       len(skipped), skipped[0])
        table = table.filter(pa.array(ok))
    return SplitArrays(
        images=torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(),
        labels=table.column("label").to_numpy().astype(np.int64),
        domains=table.column("domain").to_numpy().astype(np.int64),
        keys=table.column("key").to_pylist(),
        skipped=skipped,
    )


class DeviceBatchDecoder:
    """Training-worker side of `decode="device"`: a numpy batch of encoded rows -> uint8 [B, 3, size, size] on the
    worker's device, through `trainers.views.decode.decode_jpeg_batch` (nvjpeg on CUDA, libjpeg-turbo on CPU).

    An undecodable row must not shrink the batch (every DDP rank steps on equal batches, and SimCLR gathers them),
    so under `on_corrupt="skip"` each one is filled with a copy of a row of the same batch that did decode, and
    every bad (shard, key) is reported to `counter` once; a batch with no good row left raises DataError. Under
    "fail" the first bad row raises DataError naming its shard and key.
    """

    def __init__(self, size: int, device: Any, on_corrupt: OnCorrupt = "skip", counter: Any = None):
        _check_on_corrupt(on_corrupt)
        self.size, self.device, self.on_corrupt, self.counter = size, device, on_corrupt, counter

    def __call__(self, batch: dict[str, np.ndarray]):
        """The decoded uint8 `[B, 3, S, S]` images of `batch` (bad rows replaced as described above)."""
        return self.decode(batch)[0]

    def decode(self, batch: dict[str, np.ndarray]):
        """(images, source rows): `source[i]` is the input row image i shows (itself, or the good row copied over
        a bad one), so labels and ids can follow the pixels."""
        from trainers.views.decode import decode_jpeg_batch  # torch: only the device-decode path loads it

        # One pass that reports every bad row: patching rows one at a time and re-decoding could copy a bad row
        # that had not been checked yet into another slot.
        images, bad = decode_jpeg_batch(list(batch["image"]), self.size, self.device, skip_bad=True)
        source = np.arange(len(images))
        if not bad:
            return images, source
        rows = sorted(bad)
        keys = [str(batch["key"][i]) for i in rows]
        shards = [str(batch[SHARD_COLUMN][i]) for i in rows]
        good = [i for i in range(len(images)) if i not in bad]
        if self.on_corrupt == "fail" or not good:
            why = "" if self.on_corrupt == "fail" else f"; no row of its batch of {len(rows)} decodes"
            raise DataError(f"shard {shards[0]}, row {keys[0]}: image cannot be decoded ({bad[rows[0]]}){why}")
        # Cycle through the good rows so several bad rows do not all become copies of one image.
        sources = [good[n % len(good)] for n in range(len(rows))]
        images[rows] = images[sources]
        source[rows] = sources
        logger.warning("replaced %d undecodable rows of a batch of %d by copies of decodable rows: %s", len(rows),
                       len(images), ", ".join(f"shard {s}, row {k}" for s, k in zip(shards, keys)))
        if self.counter is not None:
            import ray

            # Waited for: rare, and the tally must be complete once the dataset has been consumed.
            ray.get(self.counter.add.remote(list(zip(shards, keys))))
        return images, source
