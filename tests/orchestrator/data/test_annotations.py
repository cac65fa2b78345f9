"""VOC and COCO readers -> detection shards -> torchvision targets: the round trip keeps every box, label and mask;
broken input is refused naming the file and the record, or skipped and counted.

    PYTHONPATH=$PWD .venv/bin/python -m pytest tests/orchestrator/data/test_annotations.py -q
"""

from __future__ import annotations

import json
import os
import shutil
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from orchestrator.data.annotations import AnnotationError, read_coco, read_voc
from orchestrator.data.detection_shards import (
    DetectionShards,
    load_detection_manifest,
    prepare_detection_set,
    read_detection_split,
    write_detection_shards,
)
from orchestrator.data.synth_detection import generate_detection_set
from orchestrator.errors import DataError

SPLITS = ("train", "val")


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    return generate_detection_set(tmp_path_factory.mktemp("shapes") / "set", train=10, val=4, seed=1)


@pytest.fixture
def trees(made, tmp_path):
    """A copy of both trees the test may break."""
    shutil.copytree(made.voc_root, tmp_path / "voc")
    shutil.copytree(made.coco_root, tmp_path / "coco")
    return str(tmp_path / "voc"), str(tmp_path / "coco")


def _coco(coco_root: str, split: str, **kw):
    return read_coco(os.path.join(coco_root, "annotations", f"instances_{split}.json"),
                     os.path.join(coco_root, "images"), split, **kw)


def test_voc_round_trip_keeps_every_box_and_label(made, tmp_path) -> None:
    parsed = [read_voc(made.voc_root, s, made.classes) for s in SPLITS]
    manifest = write_detection_shards(str(tmp_path / "shards"), parsed, name="shapes", shard_rows=4)
    assert [c.name for c in manifest.classes] == list(made.classes)
    assert manifest.splits["train"].rows == 10 and len(manifest.splits["train"].shards) == 3
    for split in SPLITS:
        data = DetectionShards(str(tmp_path / "shards"), split)
        stems = open(os.path.join(made.voc_root, "ImageSets/Main", f"{split}.txt")).read().split()
        assert len(data) == len(stems)
        for index, stem in enumerate(stems):
            image, target = data[index]
            assert image.dtype == torch.uint8 and image.shape == (3, 64, 64)
            objects = ET.parse(os.path.join(made.voc_root, "Annotations", f"{stem}.xml")).getroot().findall("object")
            # VOC's 1-based inclusive corners -> continuous xyxy: [xmin - 1, ymin - 1, xmax, ymax]
            expected = [[float(o.findtext(f"bndbox/{t}")) - d for t, d in
                         (("xmin", 1), ("ymin", 1), ("xmax", 0), ("ymax", 0))] for o in objects]
            assert target["boxes"].tolist() == expected
            assert target["labels"].tolist() == [made.classes.index(o.findtext("name")) + 1 for o in objects]
            assert target["image_id"].item() == index and not target["difficult"].any()
        assert manifest.objects[split] == sum(len(o) for o in data.table.column("annotations").to_pylist())


def test_coco_round_trip_keeps_boxes_labels_and_masks(made, tmp_path) -> None:
    parsed = [_coco(made.coco_root, s) for s in SPLITS]
    assert parsed[0].source_ids == (1, 3, 5, 7) and parsed[0].classes == made.classes
    write_detection_shards(str(tmp_path / "shards"), parsed, name="shapes")
    kinds = set()
    for split in SPLITS:
        doc = json.load(open(os.path.join(made.coco_root, "annotations", f"instances_{split}.json")))
        data = DetectionShards(str(tmp_path / "shards"), split, masks=True)
        assert len(data) == len(doc["images"])
        for index, entry in enumerate(doc["images"]):
            _, target = data[index]
            anns = [a for a in doc["annotations"] if a["image_id"] == entry["id"]]
            assert target["boxes"].tolist() == [[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)]
            assert target["labels"].tolist() == [[1, 3, 5, 7].index(a["category_id"]) + 1 for a in anns]
            assert target["area"].tolist() == [a["area"] for a in anns]
            for mask, ann in zip(target["masks"], anns):
                seg = ann["segmentation"]
                kinds.add(type(seg).__name__)
                rle = (mask_utils.frPyObjects(seg, 64, 64) if isinstance(seg, list)
                       else [{"size": seg["size"], "counts": seg["counts"].encode()}])
                written = mask_utils.decode(mask_utils.merge(rle))
                assert mask.dtype == torch.uint8 and np.array_equal(mask.numpy(), written)
    assert kinds == {"list", "dict"}


def test_voc_and_coco_of_the_same_set_give_the_same_targets(made, tmp_path) -> None:
    write_detection_shards(str(tmp_path / "v"), [read_voc(made.voc_root, "val", made.classes)], name="v")
    write_detection_shards(str(tmp_path / "c"), [_coco(made.coco_root, "val")], name="c")
    voc, coco = DetectionShards(str(tmp_path / "v"), "val"), DetectionShards(str(tmp_path / "c"), "val")
    for i in range(len(voc)):
        (a, ta), (b, tb) = voc[i], coco[i]
        assert torch.equal(a, b) and torch.equal(ta["boxes"], tb["boxes"]) and torch.equal(ta["labels"], tb["labels"])


def _edit_xml(voc_root: str, stem: str, edit) -> str:
    path = os.path.join(voc_root, "Annotations", f"{stem}.xml")
    tree = ET.parse(path)
    edit(tree.getroot())
    tree.write(path)
    return path


def _first_object(root: ET.Element) -> ET.Element:
    return root.findall("object")[0]


def test_broken_voc_records_are_named(made, trees) -> None:
    voc_root, _ = trees
    n = len(ET.parse(os.path.join(voc_root, "Annotations", "000002.xml")).getroot().findall("object"))
    _edit_xml(voc_root, "000002", lambda r: setattr(_first_object(r).find("bndbox/xmax"), "text", "70"))
    with pytest.raises(AnnotationError, match=rf"000002\.xml: object 1 of {n}: box .*xmax 70.* outside the 64x64"):
        read_voc(voc_root, "train", made.classes)
    shutil.copy(os.path.join(made.voc_root, "Annotations", "000002.xml"), os.path.join(voc_root, "Annotations"))
    _edit_xml(voc_root, "000003", lambda r: setattr(r.findall("object")[-1].find("name"), "text", "blob"))
    with pytest.raises(AnnotationError, match=r"000003\.xml: object (\d) of \1: unknown class 'blob'"):
        read_voc(voc_root, "train", made.classes)
    with open(os.path.join(voc_root, "Annotations", "000003.xml"), "w") as f:
        f.write("<annotation><object><name>disc</name>")
    with pytest.raises(AnnotationError, match=r"000003\.xml: image 000003: malformed XML"):
        read_voc(voc_root, "train", made.classes)
    shutil.copy(os.path.join(made.voc_root, "Annotations", "000003.xml"), os.path.join(voc_root, "Annotations"))
    os.remove(os.path.join(voc_root, "JPEGImages", "000004.jpg"))
    with pytest.raises(AnnotationError, match=r"JPEGImages/000004\.jpg: image 000004: the image file does not exist"):
        read_voc(voc_root, "train", made.classes)
    with pytest.raises(DataError, match=r"ImageSets/Main/test\.txt: no such split list"):
        read_voc(voc_root, "test", made.classes)


def test_broken_coco_records_are_named(made, trees) -> None:
    _, coco_root = trees
    file = os.path.join(coco_root, "annotations", "instances_train.json")
    original = json.load(open(file))

    def broken(edit) -> None:
        doc = json.loads(json.dumps(original))
        edit(doc)
        json.dump(doc, open(file, "w"))

    first = original["annotations"][0]["id"]
    broken(lambda d: d["annotations"][0].update(bbox=[50.0, 5.0, 20.0, 10.0]))
    with pytest.raises(AnnotationError, match=rf"instances_train\.json: annotation {first}: box .* outside the 64x64"):
        _coco(coco_root, "train")
    broken(lambda d: d["annotations"][0].update(category_id=2))
    with pytest.raises(AnnotationError, match=rf"annotation {first}: unknown category_id 2; categories are \[1, 3, 5"):
        _coco(coco_root, "train")
    broken(lambda d: d["annotations"][0].update(image_id=999))
    with pytest.raises(AnnotationError, match=rf"annotation {first}: names image_id 999"):
        _coco(coco_root, "train")
    broken(lambda d: d["annotations"][0].update(segmentation={"size": [32, 32], "counts": "abc"}))
    with pytest.raises(AnnotationError, match=rf"annotation {first}: RLE size \[32, 32\] is not the image's"):
        _coco(coco_root, "train")
    broken(lambda d: d["annotations"][0].pop("bbox"))
    with pytest.raises(AnnotationError, match=rf"annotation {first}: bbox must be"):
        _coco(coco_root, "train")
    with open(file, "w") as f:
        f.write(json.dumps(original)[:-40])
    with pytest.raises(AnnotationError, match=r"instances_train\.json: \(the file\): malformed JSON"):
        _coco(coco_root, "train", on_error="skip")  # nothing in a file that does not parse can be kept


def test_skip_policy_drops_the_images_with_bad_records_and_counts_them(made, trees, tmp_path) -> None:
    voc_root, coco_root = trees
    _edit_xml(voc_root, "000001", lambda r: setattr(_first_object(r).find("name"), "text", "blob"))
    _edit_xml(voc_root, "000005", lambda r: setattr(_first_object(r).find("bndbox/ymin"), "text", "-3"))
    voc = read_voc(voc_root, "train", made.classes, on_error="skip")
    assert [r.key for r in voc.records] == [f"train/{i:06d}" for i in (0, 2, 3, 4, 6, 7, 8, 9)]
    assert [(os.path.basename(s.file), s.record.split(" of ")[0]) for s in voc.skipped] == \
        [("000001.xml", "object 1"), ("000005.xml", "object 1")]

    file = os.path.join(coco_root, "annotations", "instances_train.json")
    doc = json.load(open(file))
    doc["annotations"][0]["category_id"] = 4  # drops its image
    doc["annotations"][-1]["image_id"] = 999  # dropped alone: it belongs to no image
    json.dump(doc, open(file, "w"))
    coco = _coco(coco_root, "train", on_error="skip")
    assert len(coco.records) == 9
    bad_ids = (doc["annotations"][0]["id"], doc["annotations"][-1]["id"])
    assert sorted(s.record for s in coco.skipped) == sorted(f"annotation {i}" for i in bad_ids)
    manifest = write_detection_shards(str(tmp_path / "c"), [coco, _coco(coco_root, "val")], name="c")
    assert len(load_detection_manifest(str(tmp_path / "c")).skipped) == 2 == len(manifest.skipped)
    assert manifest.objects["train"] == len(doc["annotations"]) - 1 - sum(
        1 for a in doc["annotations"] if a["image_id"] == doc["annotations"][0]["image_id"])
    with pytest.raises(ValueError, match="on_error"):
        read_voc(voc_root, "train", made.classes, on_error="ignore")  # type: ignore[arg-type]


def test_shards_are_verified_and_a_written_set_is_not_overwritten(made, tmp_path) -> None:
    url = str(tmp_path / "s")
    parsed = [read_voc(made.voc_root, "val", made.classes)]
    manifest = write_detection_shards(url, parsed, name="v")
    with pytest.raises(DataError, match="already holds a detection set"):
        write_detection_shards(url, parsed, name="v")
    write_detection_shards(url, parsed, name="v", overwrite=True)
    shard = os.path.join(url, manifest.shards[0].path)
    data = bytearray(open(shard, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(shard, "wb").write(bytes(data))
    with pytest.raises(DataError, match=r"val-00000\.parquet: sha256 mismatch"):
        read_detection_split(url, "val")
    with pytest.raises(DataError, match="no split 'test'"):
        read_detection_split(url, "test")
    write_detection_shards(str(tmp_path / "v2"), parsed, name="v")
    with pytest.raises(DataError, match=r"val/000010: object 1(, object \d)* have no mask"):
        DetectionShards(str(tmp_path / "v2"), "val", masks=True)[0]


def test_prepare_reads_a_tree_and_writes_the_set(made, tmp_path) -> None:
    voc = prepare_detection_set(made.voc_root, str(tmp_path / "v"), format="voc", classes=made.classes)
    coco = prepare_detection_set(made.coco_root, str(tmp_path / "c"), format="coco")
    assert voc.source == {"format": "voc", "splits": ["train", "val"]} and coco.objects == voc.objects
    assert [c.source_id for c in coco.classes] == [1, 3, 5, 7] and [c.source_id for c in voc.classes] == [None] * 4
    # VOC's own 20 classes by default
    with pytest.raises(AnnotationError, match=r"000000\.xml: object 1 of 2: unknown class 'cross'; classes are \['aer"):
        prepare_detection_set(made.voc_root, str(tmp_path / "x"), format="voc")


def test_a_crowd_region_in_uncompressed_rle_is_read_as_coco_writes_it(made, trees, tmp_path) -> None:
    _, coco_root = trees
    file = os.path.join(coco_root, "annotations", "instances_val.json")
    doc = json.load(open(file))
    region = np.zeros((64, 64), dtype=np.uint8)
    region[40:50, 40:60] = 1
    column_major = region.flatten(order="F")  # COCO's uncompressed counts: alternating runs of 0s and 1s, by column
    edges = np.flatnonzero(np.diff(column_major)) + 1
    counts = np.diff(np.concatenate([[0], edges, [column_major.size]])).tolist()  # starts with a run of 0s
    doc["annotations"][0].update(segmentation={"size": [64, 64], "counts": counts}, iscrowd=1, bbox=[40, 40, 20, 10])
    json.dump(doc, open(file, "w"))
    write_detection_shards(str(tmp_path / "c"), [_coco(coco_root, "val")], name="c")
    _, target = DetectionShards(str(tmp_path / "c"), "val", masks=True)[0]
    assert target["iscrowd"].tolist()[0] == 1 and np.array_equal(target["masks"][0].numpy(), region)
    assert target["area"][0].item() == 200
