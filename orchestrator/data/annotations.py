"""Readers of detection and instance-segmentation annotations: a Pascal VOC tree and a COCO tree become records of
image bytes with boxes, labels and masks, checked object by object.

    from orchestrator.data.annotations import read_coco, read_voc
    voc = read_voc("/data/VOCdevkit/VOC2007", "trainval")                      # classes: VOC's 20 by default
    coco = read_coco("/data/coco/annotations/instances_val2017.json", "/data/coco/val2017", "val")
    voc.records[0].boxes, voc.records[0].labels, coco.records[0].masks, coco.skipped

Records (:class:`DetectionRecord`) speak torchvision's detection format: boxes xyxy in continuous pixel coordinates
(a box covering pixel columns 0..9 is [0, 10]), labels 1..K (0 is the detectors' background) in the order of
``classes``, masks as COCO compressed RLE strings of the image's size. VOC's 1-based inclusive ``<bndbox>`` becomes
[xmin - 1, ymin - 1, xmax, ymax] (detectron2's convention); VOC detection has no masks; VOC's ``difficult`` flag and
COCO's ``iscrowd`` are kept. COCO category ids, which have gaps, map to labels by ascending id.
:func:`orchestrator.data.detection_shards.write_detection_shards` turns the records into shards.

Bad input raises :class:`AnnotationError` (a DataError) naming the file and the record (``object 2`` of a VOC XML,
1-based; ``annotation 1234`` of a COCO file): a box outside the image or empty, an unknown class name or category id,
a missing field, an image missing or whose size differs from the annotation's, malformed XML. With
``on_error="skip"`` the image holding a bad record is left out whole and listed in ``skipped`` (a partly annotated
image would teach a detector that its unlisted objects are background); a COCO annotation naming no image is left
out alone. A file that cannot be parsed at all (COCO JSON, a split list) raises whatever the policy: nothing in it
can be read.
"""

from __future__ import annotations

import io
import json
import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Any, Callable, Literal, Sequence

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from orchestrator.errors import DataError

OnError = Literal["raise", "skip"]

VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
               "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor")


class AnnotationError(DataError):
    """A record of an annotation file is invalid; `file` and `record` say which."""

    def __init__(self, file: str, record: str, reason: str) -> None:
        super().__init__(f"{file}: {record}: {reason}")
        self.file, self.record, self.reason = file, record, reason


@dataclass(frozen=True)
class DetectionRecord:
    """One image and its objects. Arrays have one row per object, in the file's order."""

    key: str  # "{split}/{image id or file name}", unique across splits
    file: str  # the image file, as the error messages name it
    image: bytes  # encoded as it was on disk
    height: int
    width: int
    boxes: np.ndarray  # float64 [N, 4] xyxy
    labels: np.ndarray  # int64 [N], 1..len(classes)
    iscrowd: np.ndarray  # bool [N]
    difficult: np.ndarray  # bool [N]
    masks: tuple[str | None, ...]  # compressed RLE counts of a height x width mask, None where there is none
    sources: tuple[str, ...]  # "object 2" / "annotation 1234": where each object came from


@dataclass(frozen=True)
class SkippedRecord:
    file: str
    record: str
    reason: str


@dataclass(frozen=True)
class ParsedSplit:
    """What a reader found: class names (label k is classes[k - 1]), their source ids, records, skipped records."""

    format: str  # "voc" | "coco"
    split: str
    classes: tuple[str, ...]
    source_ids: tuple[int | None, ...]  # COCO category ids; None for VOC
    records: tuple[DetectionRecord, ...]
    skipped: tuple[SkippedRecord, ...]


def _check_policy(on_error: str) -> None:
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")


def _read_image(path: str, shown: str, record: str) -> tuple[bytes, int, int]:
    """The image's bytes and (height, width) from its header; AnnotationError when missing or unreadable."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise AnnotationError(shown, record, "the image file does not exist") from None
    try:
        width, height = Image.open(io.BytesIO(data)).size
    except Exception as exc:  # PIL raises several kinds for a truncated or foreign file
        raise AnnotationError(shown, record, f"not a readable image: {exc}") from None
    return data, height, width


def _check_box(box: Sequence[float], height: int, width: int, file: str, record: str, written: str) -> None:
    x0, y0, x1, y1 = box
    if not all(np.isfinite(box)):
        raise AnnotationError(file, record, f"box {written} is not finite")
    if not (x0 < x1 and y0 < y1):
        raise AnnotationError(file, record, f"box {written} is empty (xyxy {list(box)})")
    if x0 < 0 or y0 < 0 or x1 > width or y1 > height:
        raise AnnotationError(file, record, f"box {written} lies outside the {width}x{height} image")


def _collect(items: Sequence[Any], read: Callable[[Any], DetectionRecord], on_error: str
             ) -> tuple[list[DetectionRecord], list[SkippedRecord]]:
    records, skipped = [], []
    for item in items:
        try:
            records.append(read(item))
        except AnnotationError as exc:
            if on_error == "raise":
                raise
            skipped.append(SkippedRecord(exc.file, exc.record, exc.reason))
    return records, skipped


# ---- Pascal VOC ---------------------------------------------------------------------------------------------------

def _voc_number(obj: ET.Element, tag: str, file: str, record: str) -> float:
    text = obj.findtext(f"bndbox/{tag}")
    if text is None:
        raise AnnotationError(file, record, f"<bndbox> has no <{tag}>")
    try:
        return float(text)
    except ValueError:
        raise AnnotationError(file, record, f"<{tag}> is {text.strip()!r}, not a number") from None


def _read_voc_image(root: str, split: str, image_id: str, classes: Sequence[str]) -> DetectionRecord:
    xml_file = os.path.join("Annotations", f"{image_id}.xml")
    image_file = os.path.join("JPEGImages", f"{image_id}.jpg")
    shown_xml = os.path.join(root, xml_file)
    try:
        tree = ET.parse(shown_xml).getroot()
    except FileNotFoundError:
        raise AnnotationError(shown_xml, f"image {image_id}", "the annotation file does not exist") from None
    except ET.ParseError as exc:
        raise AnnotationError(shown_xml, f"image {image_id}", f"malformed XML: {exc}") from None
    data, height, width = _read_image(os.path.join(root, image_file), os.path.join(root, image_file),
                                      f"image {image_id}")
    size = (tree.findtext("size/height"), tree.findtext("size/width"))
    if all(s is not None for s in size):
        try:
            written = (int(float(size[0])), int(float(size[1])))
        except ValueError:
            raise AnnotationError(shown_xml, "<size>", f"height/width {size} are not numbers") from None
        if written != (height, width):
            raise AnnotationError(shown_xml, "<size>", f"says {written[1]}x{written[0]}, the image is {width}x{height}")
    label_of = {name: k + 1 for k, name in enumerate(classes)}
    boxes, labels, difficult, sources = [], [], [], []
    objects = tree.findall("object")
    for index, obj in enumerate(objects, 1):
        record = f"object {index} of {len(objects)}"
        name = (obj.findtext("name") or "").strip()
        if name not in label_of:
            raise AnnotationError(shown_xml, record, f"unknown class {name!r}; classes are {list(classes)}")
        xmin, ymin, xmax, ymax = (_voc_number(obj, t, shown_xml, record) for t in ("xmin", "ymin", "xmax", "ymax"))
        box = [xmin - 1.0, ymin - 1.0, xmax, ymax]
        written = f"(xmin {xmin:g}, ymin {ymin:g}, xmax {xmax:g}, ymax {ymax:g})"
        _check_box(box, height, width, shown_xml, record, written)
        boxes.append(box)
        labels.append(label_of[name])
        difficult.append((obj.findtext("difficult") or "0").strip() == "1")
        sources.append(f"object {index}")
    n = len(boxes)
    return DetectionRecord(
        key=f"{split}/{image_id}", file=image_file, image=data, height=height, width=width,
        boxes=np.asarray(boxes, dtype=np.float64).reshape(n, 4), labels=np.asarray(labels, dtype=np.int64),
        iscrowd=np.zeros(n, dtype=bool), difficult=np.asarray(difficult, dtype=bool), masks=(None,) * n,
        sources=tuple(sources))


def read_voc(root: str | os.PathLike, split: str, classes: Sequence[str] = VOC_CLASSES,
             on_error: OnError = "raise") -> ParsedSplit:
    """The images listed in ``ImageSets/Main/{split}.txt`` of the VOC tree at `root`, with their objects."""
    _check_policy(on_error)
    root = os.fspath(root)
    if len(set(classes)) != len(classes) or not classes:
        raise ValueError(f"classes must be distinct names, at least one; got {list(classes)}")
    list_file = os.path.join(root, "ImageSets", "Main", f"{split}.txt")
    try:
        with open(list_file) as f:
            ids = [line.split()[0] for line in f if line.strip()]
    except FileNotFoundError:
        raise DataError(f"{list_file}: no such split list (a VOC tree has ImageSets/Main/{split}.txt)") from None
    records, skipped = _collect(ids, lambda i: _read_voc_image(root, split, i, classes), on_error)
    return ParsedSplit("voc", split, tuple(classes), (None,) * len(classes), tuple(records), tuple(skipped))


# ---- COCO ---------------------------------------------------------------------------------------------------------

def _coco_mask(segmentation: Any, height: int, width: int, file: str, record: str) -> str:
    """A polygon list, an uncompressed RLE or a compressed RLE as compressed RLE counts of a height x width mask."""
    if isinstance(segmentation, list):
        if not segmentation or not all(isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0 for p in segmentation):
            raise AnnotationError(file, record, "segmentation polygons must be lists of at least 3 (x, y) pairs")
        if not all(isinstance(v, (int, float)) for p in segmentation for v in p):
            raise AnnotationError(file, record, "segmentation polygons must hold numbers")
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation, dict) and "counts" in segmentation and "size" in segmentation:
        if list(segmentation["size"]) != [height, width]:
            raise AnnotationError(file, record,
                                  f"RLE size {segmentation['size']} is not the image's [{height}, {width}]")
        counts = segmentation["counts"]
        if isinstance(counts, list):
            rle = mask_utils.frPyObjects(segmentation, height, width)
        elif isinstance(counts, str):
            rle = {"size": [height, width], "counts": counts.encode("ascii")}
        else:
            raise AnnotationError(file, record, "RLE counts must be a list or a string")
    else:
        raise AnnotationError(file, record, "segmentation is neither a polygon list nor an RLE {size, counts}")
    try:
        area = mask_utils.area(rle)  # decodes the counts: a corrupt string fails here rather than in training
    except Exception as exc:
        raise AnnotationError(file, record, f"unreadable RLE: {exc}") from None
    if area == 0:
        raise AnnotationError(file, record, "the mask is empty")
    return rle["counts"].decode("ascii")


def _read_coco_image(image: dict, anns: list[dict], label_of: dict[int, int], images_dir: str, split: str,
                     file: str) -> DetectionRecord:
    name = image["file_name"]
    image_path = os.path.join(images_dir, name)
    data, height, width = _read_image(image_path, image_path, f"image {image['id']}")
    written = (image.get("height"), image.get("width"))
    if written != (None, None) and written != (height, width):
        raise AnnotationError(file, f"image {image['id']}",
                              f"says {image.get('width')}x{image.get('height')}, {image_path} is {width}x{height}")
    boxes, labels, crowd, masks, sources = [], [], [], [], []
    for ann in anns:
        record = f"annotation {ann.get('id')}"
        if ann.get("category_id") not in label_of:
            raise AnnotationError(file, record, f"unknown category_id {ann.get('category_id')!r}; "
                                                f"categories are {sorted(label_of)}")
        bbox = ann.get("bbox")
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, (int, float)) for v in bbox)):
            raise AnnotationError(file, record, f"bbox must be [x, y, w, h] numbers, got {bbox!r}")
        x, y, w, h = (float(v) for v in bbox)
        box = [x, y, x + w, y + h]
        _check_box(box, height, width, file, record, f"[x {x:g}, y {y:g}, w {w:g}, h {h:g}]")
        seg = ann.get("segmentation")
        masks.append(None if seg is None else _coco_mask(seg, height, width, file, record))
        boxes.append(box)
        labels.append(label_of[ann["category_id"]])
        crowd.append(bool(ann.get("iscrowd", 0)))
        sources.append(record)
    n = len(boxes)
    return DetectionRecord(
        key=f"{split}/{name}", file=name, image=data, height=height, width=width,
        boxes=np.asarray(boxes, dtype=np.float64).reshape(n, 4), labels=np.asarray(labels, dtype=np.int64),
        iscrowd=np.asarray(crowd, dtype=bool), difficult=np.zeros(n, dtype=bool), masks=tuple(masks),
        sources=tuple(sources))


def _coco_document(file: str) -> dict:
    try:
        with open(file, "rb") as f:
            doc = json.loads(f.read())
    except FileNotFoundError:
        raise DataError(f"{file}: no such annotation file") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AnnotationError(file, "(the file)", f"malformed JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise AnnotationError(file, "(the file)", f"must hold a JSON object, found {type(doc).__name__}")
    for key in ("images", "annotations", "categories"):
        if not isinstance(doc.get(key), list):
            raise AnnotationError(file, key, f"{key!r} must be a list")
    return doc


def _entries_with(items: list, fields: tuple[str, ...], kind: str, file: str) -> None:
    for index, item in enumerate(items):
        missing = [f for f in fields if not isinstance(item, dict) or f not in item]
        if missing:
            where = f"{kind} {item.get('id')}" if isinstance(item, dict) and "id" in item else f"{kind}s[{index}]"
            raise AnnotationError(file, where, f"has no {', '.join(missing)}")


def read_coco(annotation_file: str | os.PathLike, images_dir: str | os.PathLike, split: str,
              on_error: OnError = "raise") -> ParsedSplit:
    """Every image of a COCO ``instances_*.json`` (images without objects too), its files under `images_dir`."""
    _check_policy(on_error)
    file, images_dir = os.fspath(annotation_file), os.fspath(images_dir)
    doc = _coco_document(file)
    _entries_with(doc["categories"], ("id", "name"), "category", file)
    _entries_with(doc["images"], ("id", "file_name"), "image", file)
    _entries_with(doc["annotations"], ("id", "image_id"), "annotation", file)
    categories = sorted(doc["categories"], key=lambda c: c["id"])
    ids = [c["id"] for c in categories]
    if len(set(ids)) != len(ids):
        raise AnnotationError(file, "categories", f"category ids repeat: {ids}")
    label_of = {c["id"]: k + 1 for k, c in enumerate(categories)}
    images = {img["id"]: img for img in doc["images"]}
    if len(images) != len(doc["images"]):
        raise AnnotationError(file, "images", "image ids repeat")
    by_image: dict[Any, list[dict]] = {i: [] for i in images}
    orphans = []
    for ann in doc["annotations"]:
        if ann["image_id"] in by_image:
            by_image[ann["image_id"]].append(ann)
        else:
            orphans.append(SkippedRecord(file, f"annotation {ann['id']}", f"names image_id {ann['image_id']!r}, "
                                                                         "which the file does not list"))
    if orphans and on_error == "raise":
        raise AnnotationError(orphans[0].file, orphans[0].record, orphans[0].reason)
    def read(img: dict) -> DetectionRecord:
        return _read_coco_image(img, by_image[img["id"]], label_of, images_dir, split, file)

    records, skipped = _collect(list(images.values()), read, on_error)
    return ParsedSplit("coco", split, tuple(c["name"] for c in categories), tuple(ids), tuple(records),
                       tuple(orphans) + tuple(skipped))
