"""A tiny detection and instance-segmentation set of shapes, written as a Pascal VOC tree and a COCO tree.

    from orchestrator.data.synth_detection import generate_detection_set
    made = generate_detection_set("/tmp/shapes", train=24, val=8, image_size=64, seed=0)
    made.voc_root, made.coco_root, made.classes      # /tmp/shapes/voc, /tmp/shapes/coco, ("disc", "square", ...)

For tests and examples of the detection and segmentation transfer tasks: each image holds 1 to 3 filled shapes
(classes: the shape names) on a flat ground, from the colour palette of :mod:`orchestrator.data.synth` (figure and
ground differ in brightness), with faint pixel noise, stored as JPEG. Shapes do not overlap (their boxes keep 2 px
apart), so every mask is the whole visible shape.

Every shape is a polygon (a disc is a 24-gon); its mask is that polygon rasterised by pycocotools, the image is drawn
from the mask, and the box is the mask's tight box. So the two trees say exactly the same thing:

* ``voc/``: ``JPEGImages/{id}.jpg``, ``Annotations/{id}.xml`` (``<size>``, ``<object><name><difficult>
  <bndbox>`` in VOC's 1-based inclusive pixel coordinates: xmin = x0 + 1, xmax = x1 for the continuous box
  [x0, y0, x1, y1]), ``ImageSets/Main/train.txt`` and ``val.txt``; boxes only, as VOC detection has.
* ``coco/``: ``images/{id}.jpg``, ``annotations/instances_train.json`` and ``instances_val.json`` (``bbox`` [x, y, w,
  h], ``category_id``, ``area`` = mask pixels, ``iscrowd`` 0, ``segmentation`` alternating between a polygon (odd
  annotation ids) and a compressed RLE (even ids), so readers meet both). Category ids are 1, 3, 5, ... on purpose:
  COCO's own ids have gaps, and readers must not take them for labels.

Seeded: image i of the set depends only on (seed, i); the same arguments write byte-identical files.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from orchestrator.data.synth import PALETTE

DETECTION_SHAPES = ("disc", "square", "triangle", "cross", "diamond", "hexagon")


@dataclass(frozen=True)
class DetectionSet:
    """Where :func:`generate_detection_set` wrote the two trees, and the class names (VOC names = COCO names)."""

    voc_root: str
    coco_root: str
    classes: tuple[str, ...]
    category_ids: tuple[int, ...]


def _outline(shape: str) -> np.ndarray:
    """The shape's polygon in its own frame (radius ~1, y down). [V, 2]"""
    if shape == "disc":
        t = np.linspace(0.0, 2 * np.pi, 24, endpoint=False)
        return np.stack([np.cos(t), np.sin(t)], axis=1)
    if shape == "square":
        return np.array([[-0.8, -0.8], [0.8, -0.8], [0.8, 0.8], [-0.8, 0.8]])
    if shape == "triangle":
        return np.array([[0.0, -0.95], [0.95, 0.7], [-0.95, 0.7]])
    if shape == "diamond":
        return np.array([[0.0, -1.0], [1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    if shape == "hexagon":
        t = np.linspace(0.0, 2 * np.pi, 6, endpoint=False)
        return np.stack([np.cos(t), np.sin(t)], axis=1) * 0.95
    if shape == "cross":
        a, b = 0.32, 0.95
        return np.array([[-a, -b], [a, -b], [a, -a], [b, -a], [b, a], [a, a], [a, b], [-a, b], [-a, a], [-b, a],
                         [-b, -a], [-a, -a]])
    raise ValueError(f"unknown shape {shape!r}; shapes are {DETECTION_SHAPES}")


def _luminance(rgb: np.ndarray) -> np.ndarray:
    return rgb @ np.array([0.299, 0.587, 0.114])


def _draw_image(rng: np.random.Generator, size: int, num_classes: int) -> tuple[np.ndarray, list[dict]]:
    """One image uint8 [size, size, 3] and its objects: class index, polygon (flat x, y list), RLE, box xyxy."""
    lum = _luminance(PALETTE)
    ground = int(rng.integers(len(PALETTE)))
    figures = np.flatnonzero(np.abs(lum - lum[ground]) >= 0.25)
    image = np.broadcast_to(PALETTE[ground], (size, size, 3)).copy()
    objects: list[dict] = []
    boxes: list[np.ndarray] = []
    wanted = int(rng.integers(1, 4))
    for _ in range(40):  # rejection sampling of non-overlapping places; a crowded image keeps fewer shapes
        if len(objects) == wanted:
            break
        cls = int(rng.integers(num_classes))
        radius = rng.uniform(0.1, 0.22) * size
        centre = rng.uniform(radius + 1, size - radius - 1, 2)
        angle = rng.uniform(-0.4, 0.4)
        colour = PALETTE[int(rng.choice(figures))]
        rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        polygon = (_outline(DETECTION_SHAPES[cls]) @ rot.T) * radius + centre
        polygon = np.round(np.clip(polygon, 0.0, size), 2)  # 2 decimals: what the JSON stores is what was drawn
        rle = mask_utils.merge(mask_utils.frPyObjects([polygon.reshape(-1).tolist()], size, size))
        x, y, w, h = mask_utils.toBbox(rle)
        if w < 2 or h < 2:
            continue
        box = np.array([x, y, x + w, y + h])
        if any(box[0] < b[2] + 2 and b[0] < box[2] + 2 and box[1] < b[3] + 2 and b[1] < box[3] + 2 for b in boxes):
            continue
        mask = mask_utils.decode(rle).astype(bool)
        image[mask] = colour
        boxes.append(box)
        objects.append({"class": cls, "polygon": polygon.reshape(-1).tolist(), "rle": rle, "box": box})
    image = image + rng.normal(0.0, 0.02, image.shape)
    return (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8), objects


def _jpeg(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=95, subsampling=0)
    return buf.getvalue()


def _voc_xml(stem: str, size: int, objects: list[dict], classes: Sequence[str]) -> str:
    parts = [f"<annotation>\n  <folder>JPEGImages</folder>\n  <filename>{stem}.jpg</filename>\n",
             f"  <size><width>{size}</width><height>{size}</height><depth>3</depth></size>\n"]
    for obj in objects:
        x0, y0, x1, y1 = (int(v) for v in obj["box"])
        parts.append(f"  <object>\n    <name>{classes[obj['class']]}</name>\n    <difficult>0</difficult>\n"
                     f"    <bndbox><xmin>{x0 + 1}</xmin><ymin>{y0 + 1}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax>"
                     "</bndbox>\n  </object>\n")
    parts.append("</annotation>\n")
    return "".join(parts)


def _write(path: str, data: bytes | str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)


def generate_detection_set(
    dst_dir: str | os.PathLike,
    *,
    train: int = 24,
    val: int = 8,
    image_size: int = 64,
    num_classes: int = 4,
    seed: int = 0,
) -> DetectionSet:
    """Draw `train` + `val` images and write them under `dst_dir` as ``voc/`` and ``coco/`` (module docstring).

    Classes are the first `num_classes` of :data:`DETECTION_SHAPES`. Raises ValueError for an argument out of
    range and FileExistsError when `dst_dir` already holds either tree.
    """
    limits = {"train": (train, 1, 100_000), "val": (val, 0, 100_000), "image_size": (image_size, 16, 1024),
              "num_classes": (num_classes, 1, len(DETECTION_SHAPES))}
    for name, (value, lo, hi) in limits.items():
        if not lo <= value <= hi:
            raise ValueError(f"{name} must be in [{lo}, {hi}], got {value}")
    root = os.fspath(dst_dir)
    voc_root, coco_root = os.path.join(root, "voc"), os.path.join(root, "coco")
    for tree in (voc_root, coco_root):
        if os.path.exists(tree):
            raise FileExistsError(f"{tree} already exists; choose an empty destination")
    classes = DETECTION_SHAPES[:num_classes]
    category_ids = tuple(2 * k + 1 for k in range(num_classes))
    splits = {"train": range(train), "val": range(train, train + val)}
    for split, indices in splits.items():
        images, annotations, stems = [], [], []
        for i in indices:
            stem = f"{i:06d}"
            rng = np.random.default_rng(np.random.SeedSequence([seed, i]))
            pixels, objects = _draw_image(rng, image_size, num_classes)
            jpeg = _jpeg(pixels)
            _write(os.path.join(voc_root, "JPEGImages", f"{stem}.jpg"), jpeg)
            _write(os.path.join(voc_root, "Annotations", f"{stem}.xml"), _voc_xml(stem, image_size, objects, classes))
            _write(os.path.join(coco_root, "images", f"{stem}.jpg"), jpeg)
            image_id = i + 1
            images.append({"id": image_id, "file_name": f"{stem}.jpg", "height": image_size, "width": image_size})
            for obj in objects:
                ann_id = 100 * image_id + len([a for a in annotations if a["image_id"] == image_id]) + 1
                x0, y0, x1, y1 = (float(v) for v in obj["box"])
                if ann_id % 2:
                    segmentation: object = [obj["polygon"]]
                else:
                    segmentation = {"size": [image_size, image_size], "counts": obj["rle"]["counts"].decode("ascii")}
                annotations.append({"id": ann_id, "image_id": image_id, "category_id": category_ids[obj["class"]],
                                    "bbox": [x0, y0, x1 - x0, y1 - y0], "area": float(mask_utils.area(obj["rle"])),
                                    "iscrowd": 0, "segmentation": segmentation})
            stems.append(stem)
        _write(os.path.join(voc_root, "ImageSets", "Main", f"{split}.txt"), "".join(f"{s}\n" for s in stems))
        document = {"info": {"description": "streamssl synthetic shapes", "seed": seed}, "images": images,
                    "annotations": annotations,
                    "categories": [{"id": c, "name": n, "supercategory": "shape"}
                                   for c, n in zip(category_ids, classes)]}
        _write(os.path.join(coco_root, "annotations", f"instances_{split}.json"), json.dumps(document, indent=1))
    return DetectionSet(voc_root=voc_root, coco_root=coco_root, classes=classes, category_ids=category_ids)
