"""Shards and manifests: prepare from ImageFolder trees, write, read, verify, and every failure naming its file.

    cd /work/main && .venv/bin/python -m pytest tests/orchestrator/data/test_shards.py -q
    STREAMSSL_REAL_DATA=../shared/datasets/imagenette .venv/bin/python -m pytest tests/orchestrator/data/test_shards.py -m real_data
"""

from __future__ import annotations

import io
import json
import os
import shutil

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from orchestrator import storage
from orchestrator.data.manifest import load_manifest
from orchestrator.data.prepare import IMAGE_EXTENSIONS, prepare_imagefolder
from orchestrator.data.shards import INDEX_COLUMNS, SHARD_SCHEMA, read_index, read_shard, read_split, write_shards
from orchestrator.data.synth import generate_synthetic
from orchestrator.data.verify import verify
from orchestrator.errors import DataError
from tests.orchestrator.s3_server import DUMMY_SECRET, S3Server


def _jpeg(mode: str, size: tuple[int, int], seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "L": 1, "CMYK": 4}[mode]
    pixels = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    img = Image.frombytes(mode, size, pixels.tobytes())
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _png(size: tuple[int, int], seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _write(path, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as fh:
        fh.write(data)


def _tree(root, corrupt: bool = True):
    """Class folders directly under root: 3 classes, odd formats and (optionally) two unreadable files."""
    for c, cls in enumerate(["n01440764", "n02102040", "tulip"]):
        for i in range(6):
            _write(os.path.join(root, cls, f"img{i}.JPEG"), _jpeg("RGB", (20 + c, 16 + i), seed=10 * c + i))
    _write(os.path.join(root, "n01440764", "gray.JPEG"), _jpeg("L", (18, 18), seed=100))
    _write(os.path.join(root, "n02102040", "cmyk.jpg"), _jpeg("CMYK", (17, 19), seed=101))
    _write(os.path.join(root, "tulip", "flower.png"), _png((12, 14), seed=102))
    _write(os.path.join(root, "tulip", "notes.txt"), b"not an image and not an image name")
    if corrupt:
        whole = _jpeg("RGB", (64, 64), seed=103)
        _write(os.path.join(root, "n01440764", "truncated.JPEG"), whole[: len(whole) // 2])
        _write(os.path.join(root, "tulip", "garbage.jpg"), np.random.default_rng(1).bytes(500))
    return root


def _modes(table: pa.Table) -> dict[str, str]:
    return {k: Image.open(io.BytesIO(b)).mode for k, b in zip(table.column("key").to_pylist(), table.column("image").to_pylist())}


@pytest.fixture(scope="module")
def synth_url(tmp_path_factory):
    url = str(tmp_path_factory.mktemp("synth") / "ds")
    generate_synthetic(url, train=300, val=60, image_size=16, shard_rows=100, progress=False)
    return url


@pytest.fixture
def synth_copy(synth_url, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(synth_url, dst)
    return str(dst)


# ------------------------------------------------------------------------------------------ prepare


def test_prepare_skips_corrupt_files_and_keeps_grayscale_cmyk_png(tmp_path):
    src = _tree(tmp_path / "src")
    m = prepare_imagefolder(src, str(tmp_path / "out"), val_fraction=0.3, shard_rows=7, progress=False)

    assert m.skipped.count == 2
    assert sorted(f.file for f in m.skipped.files) == ["n01440764/truncated.JPEG", "tulip/garbage.jpg"]
    assert all(f.reason for f in m.skipped.files)
    assert [c.name for c in m.classes] == ["n01440764", "n02102040", "tulip"]
    assert [c.wnid for c in m.classes] == ["n01440764", "n02102040", None]
    assert [c.group for c in m.classes] == [-1, -1, -1] and m.groups == ()
    assert m.image_size is None and m.source["kind"] == "imagefolder" and m.source["layout"] == "class folders"
    assert sum(s.rows for s in m.splits.values()) == 18 + 3  # txt ignored, 2 corrupt skipped
    assert all(s.rows <= 7 for s in m.shards)
    assert verify(str(tmp_path / "out")).ok

    table = pa.concat_tables(read_split(str(tmp_path / "out"), s) for s in m.splits)
    keys = table.column("key").to_pylist()
    assert len(set(keys)) == len(keys) == 21
    modes = _modes(table)
    key_of = {k.split("/", 1)[1]: k for k in keys}  # "class/file" -> "split/class/file"
    assert modes[key_of["n01440764/gray.JPEG"]] == "L"
    assert modes[key_of["n02102040/cmyk.jpg"]] == "CMYK"
    assert modes[key_of["tulip/flower.png"]] == "RGB"
    # JPEG bytes are kept exactly; sizes are recorded per image.
    row = keys.index(key_of["n02102040/img3.JPEG"])
    with open(src / "n02102040" / "img3.JPEG", "rb") as fh:
        assert table.column("image")[row].as_py() == fh.read()
    assert (table.column("height")[row].as_py(), table.column("width")[row].as_py()) == (19, 21)
    assert table.column("label")[row].as_py() == 1 and table.column("domain")[row].as_py() == 0
    # Hash hold-out: both splits used, and the same files land in the same split on a second run.
    assert set(m.splits) == {"train", "val"} and m.splits["val"].rows > 0
    again = prepare_imagefolder(src, str(tmp_path / "out2"), val_fraction=0.3, shard_rows=7, progress=False)
    assert again.digest == m.digest


def test_prepare_fail_mode_names_the_file_and_leaves_nothing(tmp_path):
    src = _tree(tmp_path / "src")
    dst = tmp_path / "out"
    # Either corrupt file may come first (rows are written in a hashed order); the message names the one it met.
    with pytest.raises(DataError, match=r"n01440764/truncated\.JPEG|tulip/garbage\.jpg"):
        prepare_imagefolder(src, str(dst), on_corrupt="fail", shard_rows=2, progress=False)
    assert not dst.exists() or sorted(os.listdir(dst)) == []


def test_prepare_uses_train_val_folders_and_groups_file(tmp_path):
    src = tmp_path / "src"
    for split, n in (("train", 4), ("val", 2)):
        for c, cls in enumerate(["cat", "dog", "truck", "zebra"]):
            for i in range(n):
                _write(str(src / split / cls / f"{i}.jpg"), _jpeg("RGB", (10, 10), seed=c * 10 + i))
    groups = tmp_path / "groups.json"
    groups.write_text(json.dumps({"zebra": "animal", "truck": "vehicle", "dog": "animal", "cat": "pet"}))
    m = prepare_imagefolder(src, str(tmp_path / "out"), groups_file=groups, progress=False)
    assert m.source["layout"] == "train/val folders" and m.source["val_fraction"] is None
    assert {k: v.rows for k, v in m.splits.items()} == {"train": 16, "val": 8}
    # Group ids follow first appearance over the sorted classes: cat→pet, dog→animal, truck→vehicle.
    assert [g.name for g in m.groups] == ["pet", "animal", "vehicle"]
    assert [c.group for c in m.classes] == [0, 1, 2, 1]
    index = read_index(str(tmp_path / "out"), "val").sort_by("key")
    assert index.column_names == ["key", "label", "group", "domain"]
    assert index.column("key").to_pylist()[:2] == ["val/cat/0.jpg", "val/cat/1.jpg"]
    assert index.column("group").to_pylist() == [0, 0, 1, 1, 2, 2, 1, 1]

    groups.write_text(json.dumps({"cat": "pet", "dog": "animal", "truck": "vehicle", "zebra": "animal", "lion": "x"}))
    with pytest.raises(DataError, match="lion"):
        prepare_imagefolder(src, str(tmp_path / "o2"), groups_file=groups, progress=False)
    groups.write_text(json.dumps({"cat": "pet", "dog": "animal"}))
    with pytest.raises(DataError, match=r"no group for classes \['truck', 'zebra'\]"):
        prepare_imagefolder(src, str(tmp_path / "o3"), groups_file=groups, progress=False)
    groups.write_text("[1, 2]")
    with pytest.raises(DataError, match="JSON object"):
        prepare_imagefolder(src, str(tmp_path / "o4"), groups_file=groups, progress=False)
    m = prepare_imagefolder(src, str(tmp_path / "o5"), max_per_class=1, progress=False)
    assert {k: v.rows for k, v in m.splits.items()} == {"train": 4, "val": 4}
    assert m.source["max_per_class"] == 1


def test_prepare_source_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        prepare_imagefolder(tmp_path / "nowhere", str(tmp_path / "out"), progress=False)
    (tmp_path / "flat").mkdir()
    _write(str(tmp_path / "flat" / "loose.jpg"), _jpeg("RGB", (8, 8), 0))
    with pytest.raises(DataError, match="no images found"):
        prepare_imagefolder(tmp_path / "flat", str(tmp_path / "out"), progress=False)
    src = _tree(tmp_path / "src", corrupt=False)
    (src / "empty_class").mkdir()
    with pytest.raises(DataError, match=r"empty_class holds no images"):
        prepare_imagefolder(src, str(tmp_path / "out"), progress=False)
    only_bad = tmp_path / "bad"
    _write(str(only_bad / "a" / "x.jpg"), b"garbage")
    with pytest.raises(DataError, match=r"no readable images.*all 1 files"):
        prepare_imagefolder(only_bad, str(tmp_path / "out"), progress=False)
    assert not (tmp_path / "out").exists() or os.listdir(tmp_path / "out") == []


# ------------------------------------------------------------------------------------------ write


def test_write_refuses_existing_data_set_and_overwrite_replaces_it(tmp_path):
    url = str(tmp_path / "ds")
    generate_synthetic(url, train=60, val=20, image_size=8, shard_rows=20, progress=False)
    assert len(os.listdir(url)) == 5
    with pytest.raises(DataError, match="already holds a data set"):
        generate_synthetic(url, train=10, val=0, image_size=8, progress=False)
    m = generate_synthetic(url, train=10, val=0, image_size=8, overwrite=True, progress=False)
    assert sorted(os.listdir(url)) == ["manifest.json", "train-00000.parquet"]
    assert load_manifest(url).digest == m.digest


def test_write_failure_removes_written_shards(tmp_path):
    url = str(tmp_path / "ds")
    rows = {
        "key": [f"train/{i}" for i in range(10)], "image": [b"x"] * 10, "label": [0] * 10,
        "group": [-1] * 10, "domain": [0] * 10, "height": [1] * 10, "width": [1] * 10,
    }

    def batches():
        yield "train", pa.table(rows, schema=SHARD_SCHEMA)
        yield "train", pa.table(rows, schema=SHARD_SCHEMA)  # duplicate keys: refused mid-way

    with pytest.raises(ValueError, match="appears twice"):
        write_shards(url, batches(), name="t", source={"kind": "test"}, image_size=None,
                            classes=[{"id": 0, "name": "a", "group": -1}], groups=[],
                            domains=[{"id": 0, "name": "d"}], shard_rows=4)
    assert os.listdir(url) == []


# ------------------------------------------------------------------------------------------ read / verify


def test_verify_and_read_sound_data_set(synth_url):
    report = verify(synth_url)
    assert report.ok and report.deep and len(report.shards) == 4
    assert [c.rows for c in report.shards] == [100, 100, 100, 60]
    assert all(c.schema_ok and c.present for c in report.shards)
    quick = verify(synth_url, deep=False)
    assert quick.ok and quick.shards[0].sha256 is None
    index = read_index(synth_url, "train")
    assert index.num_rows == 300 and index.column_names == list(INDEX_COLUMNS)
    m = load_manifest(os.path.join(synth_url, "manifest.json"))
    assert m == load_manifest(synth_url)
    with pytest.raises(DataError, match=r"no split 'test'.*\['train', 'val'\]"):
        m.shard_entries("test")


def test_flipped_byte_is_a_sha_mismatch_naming_the_shard(synth_copy):
    path = os.path.join(synth_copy, "train-00001.parquet")
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(path, "wb").write(bytes(data))
    sha = load_manifest(synth_copy).shard_entries("train")[1].sha256

    report = verify(synth_copy)
    assert not report.ok
    assert [f.path for f in report.failures] == ["train-00001.parquet"]
    assert "sha256 mismatch" in report.failures[0].problems[0]
    assert verify(synth_copy, deep=False).ok  # same size: only the deep check sees it
    with pytest.raises(DataError, match=r"train-00001\.parquet: sha256 mismatch \(manifest " + sha):
        read_shard(path, expected_sha256=sha)
    with pytest.raises(DataError, match=r"train-00001\.parquet.*sha256 mismatch"):
        verify(synth_copy, raise_on_error=True)
    with pytest.raises(DataError, match=r"train-00001\.parquet: sha256 mismatch"):
        read_index(synth_copy, "train")


def test_missing_and_truncated_shards_are_named(synth_copy):
    os.remove(os.path.join(synth_copy, "train-00000.parquet"))
    truncated = os.path.join(synth_copy, "val-00000.parquet")
    data = open(truncated, "rb").read()
    open(truncated, "wb").write(data[: len(data) // 3])

    report = verify(synth_copy)
    problems = {f.path: f.problems for f in report.failures}
    assert set(problems) == {"train-00000.parquet", "val-00000.parquet"}
    assert problems["train-00000.parquet"] == ("missing",)
    assert any("bytes, the manifest says" in p for p in problems["val-00000.parquet"])
    assert verify(synth_copy, deep=False).failures[0].present is False
    with pytest.raises(DataError) as err:
        verify(synth_copy, raise_on_error=True)
    assert "train-00000.parquet: missing" in str(err.value) and "val-00000.parquet" in str(err.value)
    assert "2 of 4 shards" in str(err.value)
    with pytest.raises(DataError, match=r"val-00000\.parquet: not a readable Parquet file"):
        read_shard(truncated)
    with pytest.raises(DataError, match=r"train-00000\.parquet: missing"):
        read_index(synth_copy, "train")


def test_manifest_schema_version_and_unknown_keys(synth_copy):
    path = os.path.join(synth_copy, "manifest.json")
    doc = json.load(open(path))
    json.dump({**doc, "schema_version": 2}, open(path, "w"))
    with pytest.raises(DataError, match=r"manifest .*manifest\.json has schema_version 2, but this streamssl .* reads schema_version 1"):
        load_manifest(synth_copy)
    json.dump({**doc, "colour": "blue"}, open(path, "w"))
    with pytest.raises(DataError, match=r"manifest\.json is invalid: colour: Extra inputs"):
        load_manifest(synth_copy)
    json.dump({**doc, "digest": "0" * 64}, open(path, "w"))
    with pytest.raises(DataError, match="digest does not match"):
        load_manifest(synth_copy)
    with pytest.raises(DataError, match=r"no data set at .*nowhere"):
        load_manifest(os.path.join(synth_copy, "nowhere"))


def test_memory_round_trip():
    url = "memory://streamssl-test/shards-roundtrip"
    storage.remove_tree(url)
    m = generate_synthetic(url, train=50, val=10, image_size=8, shard_rows=25, progress=False)
    assert storage.exists(storage.join(url, "manifest.json"))
    assert verify(url).ok
    assert read_index(url, "train").num_rows == 50
    table = read_shard(storage.join(url, m.shards[2].path), m.shards[2].sha256)
    assert table.num_rows == 10 and table.schema == SHARD_SCHEMA
    storage.remove_tree(url)


def test_s3_round_trip_through_moto_server():
    with S3Server() as s3:
        url = s3.url("synth")
        opts = s3.storage_options
        m = generate_synthetic(url, train=120, val=30, image_size=8, shard_rows=50, storage_options=opts, progress=False)
        assert [s.path for s in m.shards] == ["train-00000.parquet", "train-00001.parquet", "train-00002.parquet", "val-00000.parquet"]
        report = verify(url, opts)
        assert report.ok and [c.rows for c in report.shards] == [50, 50, 20, 30]
        table = read_shard(storage.join(url, "val-00000.parquet"), m.shards[3].sha256, storage_options=opts)
        assert table.num_rows == 30
        assert Image.open(io.BytesIO(table.column("image")[0].as_py())).size == (8, 8)
        assert load_manifest(url, opts).digest == m.digest
        # Tamper through S3 itself: verify names the shard and never shows the secret.
        storage.write_bytes_atomic(storage.join(url, "train-00001.parquet"), b"PAR1 not really", opts)
        with pytest.raises(DataError) as err:
            verify(url, opts, raise_on_error=True)
        assert "train-00001.parquet" in str(err.value) and DUMMY_SECRET not in str(err.value)


# ------------------------------------------------------------------------------------------ real data


@pytest.mark.real_data
def test_prepare_imagenette_keeps_grayscale(tmp_path, real_data):
    """Full imagenette (about 10 s on 2 cores); STREAMSSL_REAL_DATA_PER_CLASS=N takes a subset instead."""
    root = str(real_data)
    per_class = int(os.environ.get("STREAMSSL_REAL_DATA_PER_CLASS", "0")) or None
    groups = tmp_path / "groups.json"
    groups.write_text(json.dumps({
        "n01440764": "animal", "n02102040": "animal", "n02979186": "device", "n03000684": "device",
        "n03394916": "device", "n03028079": "structure/vehicle", "n03417042": "structure/vehicle",
        "n03425413": "structure/vehicle", "n03445777": "equipment", "n03888257": "equipment",
    }))
    url = str(tmp_path / "inette")
    m = prepare_imagefolder(root, url, groups_file=groups, max_per_class=per_class, progress=False)
    expected = {}
    gray = 0
    for split in ("train", "val"):
        files = [os.path.join(dp, f) for dp, _, fs in os.walk(os.path.join(root, split)) for f in fs
                 if f.lower().endswith(IMAGE_EXTENSIONS)]
        by_class: dict[str, list[str]] = {}
        for f in sorted(files):
            by_class.setdefault(os.path.basename(os.path.dirname(f)), []).append(f)
        kept = [f for fs in by_class.values() for f in fs[: per_class or None]]
        expected[split] = len(kept)
        for f in kept:
            with Image.open(f) as img:
                gray += img.mode == "L"
    assert {k: v.rows for k, v in m.splits.items()} == expected
    assert m.skipped.count == 0 and len(m.classes) == 10 and len(m.groups) == 4
    assert verify(url).ok
    found = 0
    for split in m.splits:
        modes = _modes(read_split(url, split, columns=["key", "image"]))
        found += sum(mode == "L" for mode in modes.values())
    assert found == gray and (per_class or gray == 242)
