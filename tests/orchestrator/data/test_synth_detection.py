"""The tiny detection generator: seeded and deterministic, and its annotations describe its pixels.

    PYTHONPATH=$PWD .venv/bin/python -m pytest tests/orchestrator/data/test_synth_detection.py -q
"""

from __future__ import annotations

import io
import json
import os
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from orchestrator.data.synth_detection import generate_detection_set


def _tree_bytes(root: str) -> dict[str, bytes]:
    out = {}
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            out[os.path.relpath(path, root)] = open(path, "rb").read()
    return out


def test_the_same_seed_writes_the_same_bytes_and_another_seed_does_not(tmp_path) -> None:
    a = generate_detection_set(tmp_path / "a", train=6, val=2, seed=3)
    b = generate_detection_set(tmp_path / "b", train=6, val=2, seed=3)
    c = generate_detection_set(tmp_path / "c", train=6, val=2, seed=4)
    assert _tree_bytes(a.voc_root) == _tree_bytes(b.voc_root)
    assert _tree_bytes(a.coco_root) == _tree_bytes(b.coco_root)
    assert _tree_bytes(a.voc_root)["JPEGImages/000000.jpg"] != _tree_bytes(c.voc_root)["JPEGImages/000000.jpg"]
    # Image i depends on (seed, i) only: a longer set starts with the same images.
    d = generate_detection_set(tmp_path / "d", train=9, val=0, seed=3)
    assert _tree_bytes(d.voc_root)["Annotations/000005.xml"] == _tree_bytes(a.voc_root)["Annotations/000005.xml"]


def test_both_trees_hold_the_same_objects_and_they_are_in_the_pixels(tmp_path) -> None:
    made = generate_detection_set(tmp_path / "s", train=10, val=4, image_size=64, num_classes=4, seed=0)
    assert sorted(open(os.path.join(made.voc_root, "ImageSets/Main/val.txt")).read().split()) == \
        ["000010", "000011", "000012", "000013"]
    counts, kinds = [], set()
    for split in ("train", "val"):
        doc = json.load(open(os.path.join(made.coco_root, "annotations", f"instances_{split}.json")))
        assert [c["id"] for c in doc["categories"]] == [1, 3, 5, 7]
        for image in doc["images"]:
            anns = [a for a in doc["annotations"] if a["image_id"] == image["id"]]
            counts.append(len(anns))
            stem = image["file_name"][:-4]
            xml = ET.parse(os.path.join(made.voc_root, "Annotations", f"{stem}.xml")).getroot()
            voc = [(o.findtext("name"), [float(o.findtext(f"bndbox/{t}")) for t in ("xmin", "ymin", "xmax", "ymax")])
                   for o in xml.findall("object")]
            pixels = np.asarray(Image.open(io.BytesIO(open(os.path.join(made.coco_root, "images", image["file_name"]),
                                                              "rb").read())), dtype=np.float64)
            for ann, (name, (xmin, ymin, xmax, ymax)) in zip(anns, voc):
                assert made.classes[made.category_ids.index(ann["category_id"])] == name
                x, y, w, h = ann["bbox"]
                assert [xmin - 1, ymin - 1, xmax, ymax] == [x, y, x + w, y + h]
                seg = ann["segmentation"]
                kinds.add(type(seg).__name__)
                rle = (mask_utils.merge(mask_utils.frPyObjects(seg, 64, 64)) if isinstance(seg, list)
                       else {"size": seg["size"], "counts": seg["counts"].encode()})
                assert mask_utils.toBbox(rle).tolist() == [x, y, w, h]
                assert mask_utils.area(rle) == ann["area"]
                mask = mask_utils.decode(rle).astype(bool)
                # The shape is one flat colour (JPEG and the faint noise aside) that differs from the ground.
                inner = pixels[mask].mean(0)
                assert np.abs(pixels[mask] - inner).mean() < 12
                ground_colour = np.median(pixels[~mask & _outside_all(doc, image["id"])], axis=0)
                lum = np.array([0.299, 0.587, 0.114])
                assert abs((inner - ground_colour) @ lum) > 40
    assert set(counts) == {1, 2, 3}
    assert kinds == {"list", "dict"}  # polygons and RLEs both occur


def _outside_all(doc: dict, image_id: int) -> np.ndarray:
    outside = np.ones((64, 64), dtype=bool)
    for ann in doc["annotations"]:
        if ann["image_id"] == image_id:
            x, y, w, h = (int(v) for v in ann["bbox"])
            outside[max(y - 2, 0):y + h + 2, max(x - 2, 0):x + w + 2] = False
    return outside


def test_arguments_out_of_range_and_an_existing_tree_are_refused(tmp_path) -> None:
    with pytest.raises(ValueError, match="num_classes must be in"):
        generate_detection_set(tmp_path / "x", num_classes=9)
    generate_detection_set(tmp_path / "y", train=1, val=0)
    with pytest.raises(FileExistsError, match="already exists"):
        generate_detection_set(tmp_path / "y", train=1, val=0)
