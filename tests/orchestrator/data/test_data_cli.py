"""`streamssl data synth|prepare|verify|synth-detection|prepare-detection` through Typer's CliRunner: exit codes and what they print.

    cd /work/main && .venv/bin/python -m pytest tests/orchestrator/data/test_data_cli.py -q
"""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest
import typer
from PIL import Image
from typer.testing import CliRunner

from cli.data import app, parse_storage_options
from orchestrator.data.manifest import load_manifest

runner = CliRunner()
WIDE = {"COLUMNS": "200"}  # keep rich tables on one line per row


def _invoke(*args: str):
    return runner.invoke(app, list(args), env=WIDE)


def _jpeg(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def test_synth_then_verify(tmp_path):
    dst = str(tmp_path / "synth")
    result = _invoke("synth", dst, "--train", "200", "--val", "40", "--image-size", "16", "--groups", "4",
                     "--domains", "3", "--shard-rows", "100")
    assert result.exit_code == 0, result.output
    manifest = load_manifest(dst)
    assert {k: v.rows for k, v in manifest.splits.items()} == {"train": 200, "val": 40}
    assert len(manifest.groups) == 4 and len(manifest.domains) == 3 and manifest.num_classes == 8
    for text in ("train rows", "200", "val rows", "classes", "digest", manifest.digest, "photo, sketch, negative"):
        assert text in result.output

    result = _invoke("verify", dst)
    assert result.exit_code == 0, result.output
    assert "ok" in result.output and "all 3 shards match their sha256" in result.output and manifest.digest in result.output
    result = _invoke("verify", dst, "--quick")
    assert result.exit_code == 0 and "present with the recorded sizes" in result.output

    result = _invoke("synth", dst, "--train", "10")
    assert result.exit_code == 3 and "already holds a data set" in result.output and "--overwrite" in result.output
    result = _invoke("synth", dst, "--groups", "9")
    assert result.exit_code == 2  # typer's range check: a usage error, before any work


def test_verify_bad_data_exits_3_naming_the_shard(tmp_path):
    dst = str(tmp_path / "synth")
    assert _invoke("synth", dst, "--train", "60", "--val", "0", "--image-size", "8", "--shard-rows", "30").exit_code == 0
    path = os.path.join(dst, "train-00001.parquet")
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0x01
    open(path, "wb").write(bytes(data))
    result = _invoke("verify", dst)
    assert result.exit_code == 3
    assert "train-00001.parquet: sha256 mismatch" in result.output and "train-00000" not in result.output
    assert "Traceback" not in result.output
    result = _invoke("verify", str(tmp_path / "nothing-here"))
    assert result.exit_code == 3 and "no data set at" in result.output


def test_prepare_with_skipped_file_groups_and_failure_modes(tmp_path):
    src = tmp_path / "src"
    for cls in ("ant", "bee"):
        os.makedirs(src / cls)
        for i in range(5):
            (src / cls / f"{i}.jpg").write_bytes(_jpeg(i))
    (src / "bee" / "broken.jpg").write_bytes(_jpeg(9)[:60])
    groups = tmp_path / "groups.json"
    groups.write_text(json.dumps({"ant": "insect", "bee": "insect"}))

    dst = str(tmp_path / "out")
    result = _invoke("prepare", str(src), dst, "--groups", str(groups), "--val-fraction", "0.2", "--shard-rows", "4")
    assert result.exit_code == 0, result.output
    assert "skipped bee/broken.jpg" in result.output and "classes" in result.output
    manifest = load_manifest(dst)
    assert manifest.skipped.count == 1 and [g.name for g in manifest.groups] == ["insect"]
    assert sum(s.rows for s in manifest.splits.values()) == 10

    result = _invoke("prepare", str(src), str(tmp_path / "out2"), "--on-corrupt", "fail")
    assert result.exit_code == 3 and "broken.jpg" in result.output
    assert not os.path.exists(tmp_path / "out2" / "manifest.json")
    result = _invoke("prepare", str(tmp_path / "missing"), str(tmp_path / "out3"))
    assert result.exit_code == 3 and "does not exist" in result.output
    result = _invoke("prepare", str(src), str(tmp_path / "out4"), "--storage-option", "novalue")
    assert result.exit_code == 2 and "KEY=VALUE" in result.output


def test_prepare_a_class_subset_and_its_complement(tmp_path):
    """Pre-train on some classes, prepare the others as the held-out transfer set: labels 0..k-1 in sorted order,
    the groups file may name the classes left out, and an unknown class is a data error listing the folders."""
    src = tmp_path / "src"
    for split in ("train", "val"):
        for c, cls in enumerate(("ant", "bee", "cat", "dog")):
            os.makedirs(src / split / cls)
            for i in range(2):
                (src / split / cls / f"{i}.jpg").write_bytes(_jpeg(10 * c + i))
    groups = tmp_path / "groups.json"
    groups.write_text(json.dumps({"ant": "insect", "bee": "insect", "cat": "pet", "dog": "pet"}))
    kept, held = str(tmp_path / "kept"), str(tmp_path / "held")
    assert _invoke("prepare", str(src), kept, "--classes", "bee,ant", "--groups", str(groups)).exit_code == 0
    result = _invoke("prepare", str(src), held, "--classes", "dog, cat")
    assert result.exit_code == 0, result.output
    for url, names in ((kept, ["ant", "bee"]), (held, ["cat", "dog"])):
        manifest = load_manifest(url)
        assert [(c.id, c.name) for c in manifest.classes] == list(enumerate(names))
        assert {k: v.rows for k, v in manifest.splits.items()} == {"train": 4, "val": 4}
        assert manifest.source["classes"] == names
    import pyarrow.parquet as pq

    keys = [k for shard in load_manifest(held).shards for k in pq.read_table(os.path.join(held, shard.path))["key"].to_pylist()]
    assert len(keys) == 8 and all(k.split("/")[1] in ("cat", "dog") for k in keys)
    result = _invoke("prepare", str(src), str(tmp_path / "bad"), "--classes", "cat,cow")
    assert result.exit_code == 3 and "['cow']" in result.output and "ant, bee, cat, dog" in result.output
    assert not os.path.exists(tmp_path / "bad" / "manifest.json")


def test_synth_detection_then_prepare_both_formats(tmp_path):
    from orchestrator.data.detection_shards import DetectionShards, load_detection_manifest
    from orchestrator.data.synth_detection import DETECTION_SHAPES

    trees = tmp_path / "shapes"
    result = _invoke("synth-detection", str(trees), "--train", "6", "--val", "3", "--image-size", "32",
                     "--num-classes", "2")
    assert result.exit_code == 0, result.output
    assert (trees / "voc" / "ImageSets" / "Main" / "val.txt").read_text().split() == ["000006", "000007", "000008"]
    assert _invoke("synth-detection", str(trees)).exit_code == 2  # never over an existing tree
    assert _invoke("synth-detection", str(tmp_path / "x"), "--num-classes", str(len(DETECTION_SHAPES) + 1)
                   ).exit_code == 2  # the option's bound is the generator's shape count

    voc = str(tmp_path / "voc")
    result = _invoke("prepare-detection", str(trees / "voc"), voc, "--format", "voc", "--classes", "disc,square",
                     "--shard-rows", "4")
    assert result.exit_code == 0, result.output
    assert "classes (label 1..2): disc, square" in result.output
    manifest = load_detection_manifest(voc)
    assert {s: e.rows for s, e in manifest.splits.items()} == {"train": 6, "val": 3} and len(manifest.shards) == 3
    coco = str(tmp_path / "coco")
    assert _invoke("prepare-detection", str(trees / "coco"), coco, "--format", "coco").exit_code == 0
    image, target = DetectionShards(coco, "val", masks=True)[0]
    assert image.shape == (3, 32, 32) and target["masks"].shape[0] == target["boxes"].shape[0] >= 1

    result = _invoke("prepare-detection", str(trees / "coco"), str(tmp_path / "c2"), "--format", "coco",
                     "--classes", "disc")
    assert result.exit_code == 2 and "--classes is for VOC" in result.output
    (trees / "voc" / "Annotations" / "000001.xml").write_text("<annotation><object>")
    result = _invoke("prepare-detection", str(trees / "voc"), str(tmp_path / "v2"), "--format", "voc",
                     "--classes", "disc,square")
    assert result.exit_code == 3 and "000001.xml" in result.output and "malformed XML" in result.output
    assert not (tmp_path / "v2").exists()  # nothing half-written
    result = _invoke("prepare-detection", str(trees / "voc"), str(tmp_path / "v3"), "--format", "voc",
                     "--classes", "disc,square", "--on-error", "skip")
    assert result.exit_code == 0 and "skipped" in result.output and "000001.xml" in result.output
    assert load_detection_manifest(str(tmp_path / "v3")).splits["train"].rows == 5


def test_parse_storage_options():
    assert parse_storage_options(None) is None
    parsed = parse_storage_options(["client_kwargs.endpoint_url=http://127.0.0.1:9000", "anon=false", "max=3", "key=k=v"])
    assert parsed == {"client_kwargs": {"endpoint_url": "http://127.0.0.1:9000"}, "anon": False, "max": 3, "key": "k=v"}
    with pytest.raises(typer.BadParameter):
        parse_storage_options(["=x"])
