"""Detection shards: parsed VOC/COCO records as Parquet shards with an ``annotations`` column, committed by a
``detection_manifest.json`` with every shard's sha256, and read back as torchvision detection targets.

    from orchestrator.data.annotations import read_coco
    from orchestrator.data.detection_shards import DetectionShards, prepare_detection_set, write_detection_shards
    splits = [read_coco(f"{root}/annotations/instances_{s}.json", f"{root}/images", s) for s in ("train", "val")]
    manifest = write_detection_shards("file:///tmp/shapes-coco", splits, name="shapes")
    # or both steps at once, for a tree in the usual layout:
    manifest = prepare_detection_set(root, "file:///tmp/shapes-coco", format="coco", splits=("train", "val"))
    image, target = DetectionShards("file:///tmp/shapes-coco", "val", masks=True)[0]
    # image uint8 [3, H, W]; target {"boxes" float32 [N, 4] xyxy, "labels" int64 [N], "masks" uint8 [N, H, W],
    #                                "iscrowd" int64 [N], "difficult" bool [N], "area" float32 [N], "image_id" int64}

Why a manifest of its own rather than :class:`orchestrator.data.manifest.Manifest`: that one describes a
classification set (one label, group and domain per row, class ids from 0), which a detection set does not have; a
detection folder carrying a ``manifest.json`` would be taken for a pre-training stream. The format reuses its
pieces (``ShardEntry`` with sha256, ``SplitEntry``, the digest) and adds the classes as detection labels (1..K,
0 being background) with their COCO category ids, the objects per split, and the skipped records (file, record,
reason) of the ``on_error="skip"`` policy. The folder holds ``{split}-{index:05d}.parquet`` shards and
``detection_manifest.json``, written last (the commit point); a failed write removes the shards it wrote.

Shard columns: key, image (encoded bytes as on disk), height, width, annotations (one list per image of
{box: [x0, y0, x1, y1], label, iscrowd, difficult, mask: COCO compressed RLE counts or null, source}).
Reading checks each shard's sha256 and row count against the manifest and fails naming the shard.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import os
from typing import Any, Literal, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from pydantic import Field, ValidationError, model_validator

from orchestrator import storage
from orchestrator.data.annotations import VOC_CLASSES, ParsedSplit, read_coco, read_voc
from orchestrator.data.manifest import (
    MANIFEST_NAME,
    FrozenRecord,
    ShardEntry,
    SplitEntry,
    compute_digest,
    streamssl_version,
)
from orchestrator.data.shards import remove_written, sha256_hex
from orchestrator.errors import DataError

DETECTION_MANIFEST_NAME = "detection_manifest.json"
DETECTION_SCHEMA_VERSION = 1
OBJECT_TYPE = pa.struct([
    ("box", pa.list_(pa.float64(), 4)),
    ("label", pa.int64()),
    ("iscrowd", pa.bool_()),
    ("difficult", pa.bool_()),
    ("mask", pa.string()),
    ("source", pa.string()),
])
DETECTION_SHARD_SCHEMA = pa.schema([
    ("key", pa.string()),
    ("image", pa.binary()),
    ("height", pa.int32()),
    ("width", pa.int32()),
    ("annotations", pa.list_(OBJECT_TYPE)),
])


class DetectionClass(FrozenRecord):
    label: int = Field(ge=1, description="Label value in the annotations; 1..K in list order (0 is background).")
    name: str = Field(min_length=1, description="Class name (VOC <name>, COCO category name).")
    source_id: int | None = Field(default=None, description="COCO category id; null for VOC.")


class SkippedAnnotation(FrozenRecord):
    file: str = Field(description="Annotation (or image) file holding the bad record.")
    record: str = Field(description="The record: 'object 2 of 3' (VOC, 1-based), 'annotation 1234' (COCO).")
    reason: str = Field(description="What was wrong with it.")


class DetectionManifest(FrozenRecord):
    """What ``detection_manifest.json`` holds. Load it with :func:`load_detection_manifest`."""

    schema_version: int = Field(description="Format version; this streamssl reads 1.")
    kind: Literal["detection"] = Field(default="detection", description="Always 'detection'.")
    name: str = Field(description="Data set name.")
    created_by: str = Field(description="'streamssl <version>' that wrote it.")
    created_at: str = Field(description="ISO 8601 time of writing (UTC).")
    source: dict[str, Any] = Field(description="{'format': 'voc'|'coco', 'splits': [...]}.")
    classes: tuple[DetectionClass, ...] = Field(min_length=1, description="Classes, label = position + 1.")
    splits: dict[str, SplitEntry] = Field(description="Images and shard paths per split.")
    objects: dict[str, int] = Field(description="Objects (annotations) per split.")
    shards: tuple[ShardEntry, ...] = Field(description="Every shard with rows, bytes and sha256.")
    skipped: tuple[SkippedAnnotation, ...] = Field(default=(), description="Records left out by on_error='skip'.")
    digest: str = Field(pattern=r"^[0-9a-f]{64}$", description="compute_digest(shards).")

    @model_validator(mode="after")
    def _consistent(self) -> "DetectionManifest":
        if self.schema_version != DETECTION_SCHEMA_VERSION:
            raise ValueError(f"schema_version {self.schema_version} is not {DETECTION_SCHEMA_VERSION}")
        labels = [c.label for c in self.classes]
        if labels != list(range(1, len(labels) + 1)):
            raise ValueError(f"class labels must be 1..{len(labels)} in order, found {labels}")
        for split, entry in self.splits.items():
            listed = [s for s in self.shards if s.split == split]
            if tuple(s.path for s in listed) != entry.shards or sum(s.rows for s in listed) != entry.rows:
                raise ValueError(f"splits.{split} does not match the shards of split {split!r}")
        if compute_digest(self.shards) != self.digest:
            raise ValueError("digest does not match the shards' (path, sha256) pairs")
        return self

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), indent=2) + "\n"


def _records_table(parsed: ParsedSplit) -> pa.Table:
    rows = []
    for r in parsed.records:
        rows.append([{"box": [float(v) for v in r.boxes[i]], "label": int(r.labels[i]), "iscrowd": bool(r.iscrowd[i]),
                      "difficult": bool(r.difficult[i]), "mask": r.masks[i], "source": r.sources[i]}
                     for i in range(len(r.labels))])
    return pa.table({"key": [r.key for r in parsed.records], "image": [r.image for r in parsed.records],
                     "height": [r.height for r in parsed.records], "width": [r.width for r in parsed.records],
                     "annotations": rows}, schema=DETECTION_SHARD_SCHEMA)


def _parquet(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression={"key": "zstd", "image": "none", "height": "zstd", "width": "zstd",
                                             "annotations": "zstd"}, row_group_size=max(1, min(table.num_rows, 512)))
    return sink.getvalue().to_pybytes()


def write_detection_shards(
    dst_url: str,
    splits: Sequence[ParsedSplit],
    *,
    name: str,
    shard_rows: int = 500,
    overwrite: bool = False,
    storage_options: Mapping[str, Any] | None = None,
) -> DetectionManifest:
    """Write the parsed splits (one format, the same classes) as shards at `dst_url` and commit the manifest.

    Refuses a destination holding a data set (either manifest) unless `overwrite`, which first removes the old
    detection manifest and its shards (a classification set's ``manifest.json`` is never overwritten here).
    """
    if shard_rows < 1:
        raise ValueError(f"shard_rows must be >= 1, got {shard_rows}")
    if not splits:
        raise ValueError("no splits to write")
    first = splits[0]
    for p in splits[1:]:
        if (p.format, p.classes, p.source_ids) != (first.format, first.classes, first.source_ids):
            raise ValueError(f"split {p.split!r} differs from {first.split!r} in format or classes")
    names = [p.split for p in splits]
    if len(set(names)) != len(names):
        raise ValueError(f"split names repeat: {names}")
    keys = [r.key for p in splits for r in p.records]
    if len(set(keys)) != len(keys):
        raise ValueError("record keys repeat across splits")
    shown = storage.redact(dst_url)
    manifest_url = storage.join(dst_url, DETECTION_MANIFEST_NAME)
    if storage.exists(storage.join(dst_url, MANIFEST_NAME), storage_options):
        raise DataError(f"{shown} holds a classification data set ({MANIFEST_NAME}); write detection shards elsewhere")
    if storage.exists(manifest_url, storage_options):
        if not overwrite:
            raise DataError(f"{shown} already holds a detection set ({DETECTION_MANIFEST_NAME}); pass overwrite")
        old = load_detection_manifest(dst_url, storage_options)
        storage.remove(manifest_url, storage_options)
        for entry in old.shards:
            storage.remove(storage.join(dst_url, entry.path), storage_options)
    written: list[ShardEntry] = []
    try:
        for parsed in splits:
            table = _records_table(parsed)
            for index, start in enumerate(range(0, max(table.num_rows, 1), shard_rows)):
                data = _parquet(table.slice(start, shard_rows))
                path = f"{parsed.split}-{index:05d}.parquet"
                storage.write_bytes_atomic(storage.join(dst_url, path), data, storage_options)
                written.append(ShardEntry(path=path, split=parsed.split, rows=min(shard_rows, table.num_rows - start),
                                          bytes=len(data), sha256=sha256_hex(data)))
        manifest = DetectionManifest(
            schema_version=DETECTION_SCHEMA_VERSION, name=name, created_by=f"streamssl {streamssl_version()}",
            created_at=dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat(),
            source={"format": first.format, "splits": names},
            classes=tuple(DetectionClass(label=k + 1, name=n, source_id=s)
                          for k, (n, s) in enumerate(zip(first.classes, first.source_ids))),
            splits={p.split: SplitEntry(rows=len(p.records),
                                        shards=tuple(s.path for s in written if s.split == p.split)) for p in splits},
            objects={p.split: sum(len(r.labels) for r in p.records) for p in splits},
            shards=tuple(written),
            skipped=tuple(SkippedAnnotation(file=s.file, record=s.record, reason=s.reason)
                          for p in splits for s in p.skipped),
            digest=compute_digest(written),
        )
        storage.write_bytes_atomic(manifest_url, manifest.to_json().encode(), storage_options)
    except BaseException:
        remove_written(dst_url, written, storage_options)
        raise
    return manifest


def prepare_detection_set(
    src: str,
    dst_url: str,
    *,
    format: Literal["voc", "coco"],
    splits: Sequence[str] = ("train", "val"),
    classes: Sequence[str] | None = None,
    images: str = "images",
    on_error: Literal["raise", "skip"] = "raise",
    name: str | None = None,
    shard_rows: int = 500,
    overwrite: bool = False,
    storage_options: Mapping[str, Any] | None = None,
) -> DetectionManifest:
    """Read the VOC tree or COCO tree at `src` (a local folder) and write its `splits` as a detection set.

    VOC: ``ImageSets/Main/{split}.txt`` per split, `classes` (default: VOC's 20). COCO:
    ``annotations/instances_{split}.json`` per split, images under ``src/{images}`` where `images` may hold
    ``{split}`` (``"{split}2017"`` for COCO 2017's own layout).
    """
    if format == "voc":
        parsed = [read_voc(src, s, tuple(classes) if classes else VOC_CLASSES, on_error) for s in splits]
    elif format == "coco":
        if classes is not None:
            raise ValueError("a COCO file names its own categories; classes is for VOC")
        parsed = [read_coco(os.path.join(src, "annotations", f"instances_{s}.json"),
                            os.path.join(src, images.format(split=s)), s, on_error) for s in splits]
    else:
        raise ValueError(f"format must be 'voc' or 'coco', got {format!r}")
    return write_detection_shards(dst_url, parsed, name=name or os.path.basename(os.path.normpath(src)),
                                  shard_rows=shard_rows, overwrite=overwrite, storage_options=storage_options)


def load_detection_manifest(url: str, storage_options: Mapping[str, Any] | None = None) -> DetectionManifest:
    """Read and validate the ``detection_manifest.json`` of the folder at `url`."""
    murl = storage.join(url, DETECTION_MANIFEST_NAME)
    shown = storage.redact(murl)
    try:
        raw = storage.fetch(murl, storage_options)
    except FileNotFoundError:
        raise DataError(f"no detection set at {storage.redact(url)}: {shown} does not exist") from None
    try:
        return DetectionManifest.model_validate(json.loads(raw))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{shown} is not valid JSON: {exc}") from None
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '(manifest)'}: {e['msg']}" for e in exc.errors())
        raise DataError(f"{shown} is invalid: {problems}") from None


def read_detection_split(url: str, split: str, storage_options: Mapping[str, Any] | None = None,
                         manifest: DetectionManifest | None = None) -> pa.Table:
    """Every row of `split`, each shard checked against the manifest's sha256 and row count (the manifest read from
    `url` unless given)."""
    manifest = manifest or load_detection_manifest(url, storage_options)
    if split not in manifest.splits:
        raise DataError(f"detection set {manifest.name!r} has no split {split!r}; it has {sorted(manifest.splits)}")
    tables = []
    for entry in (s for s in manifest.shards if s.split == split):
        shard_url = storage.join(url, entry.path)
        shown = storage.redact(shard_url)
        try:
            data = storage.fetch(shard_url, storage_options)
        except FileNotFoundError:
            raise DataError(f"shard {shown}: missing (the manifest lists it)") from None
        if sha256_hex(data) != entry.sha256:
            raise DataError(f"shard {shown}: sha256 mismatch (manifest {entry.sha256}, found {sha256_hex(data)})")
        try:
            table = pq.read_table(pa.BufferReader(data))
        except (pa.ArrowException, OSError) as exc:
            raise DataError(f"shard {shown}: not a readable Parquet file: {exc}") from None
        if not table.schema.equals(DETECTION_SHARD_SCHEMA) or table.num_rows != entry.rows:
            raise DataError(f"shard {shown}: not {entry.rows} rows of the detection shard schema")
        tables.append(table)
    return pa.concat_tables(tables) if tables else DETECTION_SHARD_SCHEMA.empty_table()


class DetectionShards(torch.utils.data.Dataset):
    """A split of a detection set as (image uint8 [3, H, W], target) pairs in torchvision's detection format.

    Images stay uint8 (torchvision's detectors want float in [0, 1]: ``image.float() / 255``). With
    ``masks=True`` every object must carry a mask (a COCO-format set); ``area`` is the mask's pixel count then,
    the box's area otherwise. ``image_id`` is the row's position in the split. The split is read once, verified.
    ``classes`` are the set's class names, label k + 1 being ``classes[k]``.
    """

    def __init__(self, url: str, split: str, *, masks: bool = False,
                 storage_options: Mapping[str, Any] | None = None, manifest: DetectionManifest | None = None) -> None:
        self.url, self.split, self.masks = url, split, masks
        manifest = manifest or load_detection_manifest(url, storage_options)  # read once by a caller that has it
        self.classes = tuple(c.name for c in manifest.classes)
        self.table = read_detection_split(url, split, storage_options, manifest)
        self.keys = self.table.column("key").to_pylist()

    def __len__(self) -> int:
        return self.table.num_rows

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        row = self.table.slice(index, 1).to_pylist()[0]
        pixels = np.array(Image.open(io.BytesIO(row["image"])).convert("RGB"))
        image = torch.from_numpy(pixels).permute(2, 0, 1).contiguous()
        objects = row["annotations"]
        boxes = torch.tensor([o["box"] for o in objects], dtype=torch.float32).reshape(-1, 4)
        target = {
            "boxes": boxes,
            "labels": torch.tensor([o["label"] for o in objects], dtype=torch.int64),
            "iscrowd": torch.tensor([int(o["iscrowd"]) for o in objects], dtype=torch.int64),
            "difficult": torch.tensor([o["difficult"] for o in objects], dtype=torch.bool),
            "image_id": torch.tensor(index, dtype=torch.int64),
            "area": (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]),
        }
        if self.masks:
            height, width = row["height"], row["width"]
            missing = [o["source"] for o in objects if o["mask"] is None]
            if missing:
                raise DataError(f"detection set {storage.redact(self.url)}, {row['key']}: {', '.join(missing)} "
                                "have no mask (VOC-format sets hold boxes only)")
            rles = [{"size": [height, width], "counts": o["mask"].encode("ascii")} for o in objects]
            decoded = mask_utils.decode(rles) if rles else np.zeros((height, width, 0), dtype=np.uint8)
            target["masks"] = torch.from_numpy(np.ascontiguousarray(decoded.transpose(2, 0, 1)))
            target["area"] = target["masks"].flatten(1).sum(1).to(torch.float32)
        return image, target
