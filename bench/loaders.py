"""The usual alternative to streamssl's pipeline, and the device-decode variant of it, for bench/ingest.py and
bench/end_to_end.py.

- `ShardImages` / `FileImages`: map-style torch Datasets over the same images (the Parquet shards' rows, or the
  ImageFolder files they were made from), decoded with PIL per sample and transformed with torchvision per sample
  (`center_transform`: resize shorter side + centre crop to uint8; `TwoViews`: two SimCLR views per sample).
- `dataloader(...)`: a torch DataLoader over them with N spawned, persistent workers.
- `bytes_dataset(...)`: `orchestrator.data.ingest.chunk_dataset(..., decode="device")`: the chunk's rows with the JPEG
  bytes undecoded; `device_decoded_batches(...)` decodes them in the consumer with the runner's
  `DeviceBatchDecoder` (`trainers.views.decode.decode_jpeg_batch`: nvjpeg on CUDA, libjpeg-turbo on CPU).

Kept in their own module so DataLoader workers (spawned) can import them.
"""

from __future__ import annotations

import io
from typing import Any, Callable, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

# ---------------------------------------------------------------------------------------------- per-sample transforms


def center_transform(size: int):
    """PIL -> uint8 [3, size, size]: shorter side to `size` (bilinear, antialiased), centre crop."""
    from torchvision import transforms as T

    return T.Compose([T.Resize(size, interpolation=T.InterpolationMode.BILINEAR, antialias=True),
                      T.CenterCrop(size), T.PILToTensor()])


class TwoViews:
    """PIL -> (view, view): the SimCLR recipe of an AugmentConfig with classic per-sample torchvision transforms."""

    def __init__(self, aug, count: int = 2):
        from torchvision import transforms as T

        from bench.common import augmentation_ops
        from trainers.views.augment import IMAGENET_MEAN, IMAGENET_STD

        # PIL uint8: >= 128 is views.py's >= 0.5
        ops = augmentation_ops(aug, T, 128) + [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
        self.transform = T.Compose(ops)
        self.count = count

    def __call__(self, img) -> tuple[torch.Tensor, ...]:
        return tuple(self.transform(img) for _ in range(self.count))


def open_rgb(data: bytes, draft_size: int | None = None):
    """PIL decode to RGB; `draft_size` enables JPEG DCT-domain downscaling as orchestrator.data.ingest.decode_image."""
    from PIL import Image

    img = Image.open(io.BytesIO(data))
    if draft_size and img.format == "JPEG":
        img.draft("RGB", (draft_size, draft_size))
    return img.convert("RGB")


# ---------------------------------------------------------------------------------------------- datasets


class ShardImages(Dataset):
    """Every row of the given local Parquet shards: (transform(image), label). Each worker reads the shards once."""

    def __init__(self, shard_paths: Sequence[str], rows: Sequence[int], transform: Callable,
                 draft_size: int | None = None):
        self.shard_paths = list(shard_paths)
        self.offsets = [0]
        for n in rows:
            self.offsets.append(self.offsets[-1] + int(n))
        self.transform = transform
        self.draft_size = draft_size
        self._columns: list[Any] | None = None  # per process, loaded on first use

    def __len__(self) -> int:
        return self.offsets[-1]

    def _load(self) -> list[Any]:
        import pyarrow.parquet as pq

        columns = []
        for path in self.shard_paths:
            table = pq.read_table(path, columns=["image", "label"])
            columns.append((table.column("image").combine_chunks(), table.column("label").to_pylist()))
        return columns

    def __getitem__(self, index: int):
        if self._columns is None:
            self._columns = self._load()
        import bisect

        shard = bisect.bisect_right(self.offsets, index) - 1
        images, labels = self._columns[shard]
        row = index - self.offsets[shard]
        img = open_rgb(images[row].as_py(), self.draft_size)
        return self.transform(img), labels[row]

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_columns"] = None  # workers read the shards themselves
        return state


class FileImages(Dataset):
    """ImageFolder files [(path, label)]: PIL open per sample, transform."""

    def __init__(self, files: Sequence[tuple[str, int]], transform: Callable, draft_size: int | None = None):
        self.files = list(files)
        self.transform = transform
        self.draft_size = draft_size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        path, label = self.files[index]
        with open(path, "rb") as fh:
            img = open_rgb(fh.read(), self.draft_size)
        return self.transform(img), label


def dataloader(dataset: Dataset, batch_size: int, workers: int, pin_memory: bool = False, seed: int = 0) -> DataLoader:
    """Shuffled, drop_last, `workers` spawned persistent workers (spawn: the driver may hold Ray's threads)."""
    g = torch.Generator().manual_seed(seed)
    extra: dict[str, Any] = {}
    if workers > 0:
        extra = {"persistent_workers": True, "multiprocessing_context": "spawn", "prefetch_factor": 2}
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True, num_workers=workers,
                      pin_memory=pin_memory, generator=g, **extra)


def loader_batches(loader: DataLoader, device: str) -> Iterator[torch.Tensor]:
    """The DataLoader's image batches on `device` (a generator: the loader's iterator starts on the first next())."""
    for images, _ in loader:
        yield images.to(device, non_blocking=True)


# ---------------------------------------------------------------------------------------------- Ray: bytes through


def bytes_dataset(shards, plan, chunks: Sequence[int], size: int, read_cpus: float = 0.5):
    """The chunk's rows with their JPEGs still encoded: `chunk_dataset(..., decode="device")`, what the runner uses
    with `data.decode: device` (columns key, image, shard). Without that option (an older orchestrator), the same
    read stage built here."""
    from orchestrator.data.ingest import chunk_dataset

    try:
        return chunk_dataset(shards, plan, chunks, size, decode_cpus=read_cpus, decode="device")
    except TypeError:  # no `decode` parameter
        import ray.data

        from orchestrator.data.ingest import ReadChunkRows

        items = [{"url": s.url, "sha256": s.sha256} for s in shards]
        ds = ray.data.from_items(items, override_num_blocks=len(items)).randomize_block_order()
        ds = ds.map_batches(ReadChunkRows(plan, chunks, {}), batch_size=1, batch_format="numpy", num_cpus=read_cpus)
        return ds.select_columns(["image"])


def _batch_decoder(size: int, device: str) -> Callable[[dict[str, Any]], torch.Tensor]:
    """orchestrator.data.ingest.DeviceBatchDecoder (the runner's consumer side) when there is one, else the bare call."""
    try:
        from orchestrator.data.ingest import DeviceBatchDecoder
    except ImportError:
        from trainers.views.decode import decode_jpeg_batch

        return lambda batch: decode_jpeg_batch(list(batch["image"]), size, device)
    return DeviceBatchDecoder(size, device)


def device_decoded_batches(ds, batch_size: int, size: int, device: str, seed: int = 0,
                           shuffle_buffer: int | None = None) -> Iterator[torch.Tensor]:
    """uint8 [B, 3, size, size] on `device`: Ray Data delivers JPEG bytes, the consumer decodes each batch
    (``trainers.views.decode.decode_jpeg_batch``), as runner._train_fn does with `data.decode: device`."""
    decode = _batch_decoder(size, device)
    for batch in ds.iter_batches(batch_size=batch_size, batch_format="numpy", drop_last=True,
                                 local_shuffle_buffer_size=shuffle_buffer, local_shuffle_seed=seed):
        yield decode(batch)


def ray_cpu_batches(ds, batch_size: int, device: str, seed: int = 0, shuffle_buffer: int | None = None,
                    labels: bool = False) -> Iterator[Any]:
    """What the Ray Train worker does with chunk_dataset (runner._train_fn): uint8 NHWC batches -> NCHW on device;
    with `labels`, `Batch`es of (images, int64 labels) for the methods whose record needs labels."""
    dtypes = ({"image": torch.uint8, "label": torch.int64, "domain": torch.int64, "index": torch.int64} if labels
              else torch.uint8)
    for batch in ds.iter_torch_batches(batch_size=batch_size, dtypes=dtypes, drop_last=True,
                                       local_shuffle_buffer_size=shuffle_buffer, local_shuffle_seed=seed,
                                       device="cpu"):
        images = batch["image"].permute(0, 3, 1, 2).to(device, non_blocking=True)
        if labels:
            from trainers.engine.types import Batch

            yield Batch.from_images(images, labels=batch["label"].to(device, non_blocking=True))
        else:
            yield images
