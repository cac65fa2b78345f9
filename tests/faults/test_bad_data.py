"""Bad data at read time: undecodable image rows, broken shards, a manifest from another version.

    .venv/bin/python -m pytest tests/faults/test_bad_data.py -q

Shards written by older or foreign tools can hold rows whose image bytes are truncated or not an image at all,
while the shard itself is sound (its sha256 matches the manifest). Those rows are skipped and reported
(on_corrupt="skip") or stop the read naming shard and key ("fail"). A broken shard or manifest always fails
with a DataError naming the file, also when the read happens inside Ray Data tasks.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from orchestrator import storage
from orchestrator.data.ingest import (
    SHARD_COLUMN,
    CorruptRowCounter,
    DecodeImages,
    ShardRef,
    chunk_dataset,
    chunk_rows,
    decode_image,
    decode_table,
    load_split_arrays,
    row_index,
    shard_refs,
    start_corrupt_row_counter,
)
from orchestrator.data.manifest import MANIFEST_NAME, compute_digest, load_manifest
from orchestrator.data.shards import read_index, read_shard, read_split
from orchestrator.data.synth import generate_synthetic
from orchestrator.data.verify import verify
from orchestrator.errors import DataError
from orchestrator.plan.streams import make_plan

SIZE = 16
BAD_ROWS = {3: "truncated", 7: "garbage", 11: "empty"}  # row index in train-00000.parquet -> what is wrong


def _rewrite_shard(root: str, name: str, table: pa.Table) -> None:
    """Replace a shard and update the manifest (sha256, bytes, digest), as a foreign tool's consistent output."""
    path = os.path.join(root, name)
    pq.write_table(table, path)
    data = open(path, "rb").read()
    manifest = load_manifest(root)
    entries = tuple(
        e.model_copy(update={"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}) if e.path == name else e
        for e in manifest.shards
    )
    doc = json.loads(manifest.to_json())
    doc["shards"] = [e.model_dump() for e in entries]
    doc["digest"] = compute_digest(entries)
    with open(os.path.join(root, MANIFEST_NAME), "w") as fh:
        json.dump(doc, fh)


@pytest.fixture(scope="module")
def corrupt_data(tmp_path_factory):
    """(data set folder, keys of the bad rows): 60 train rows in 2 shards, 3 bad rows in train-00000."""
    root = str(tmp_path_factory.mktemp("corrupt"))
    generate_synthetic(root, train=60, val=20, image_size=SIZE, shard_rows=30, progress=False)
    table = read_shard(os.path.join(root, "train-00000.parquet"))
    images = table.column("image").to_pylist()
    for row, kind in BAD_ROWS.items():
        good = images[row]
        images[row] = {"truncated": good[: len(good) * 3 // 4], "garbage": b"\x89 not an image", "empty": b""}[kind]
    table = table.set_column(table.schema.get_field_index("image"), "image", pa.array(images, pa.binary()))
    _rewrite_shard(root, "train-00000.parquet", table)
    assert verify(root).ok  # the shards themselves are sound: only some rows' bytes are bad
    bad_keys = [table.column("key")[r].as_py() for r in sorted(BAD_ROWS)]
    return root, bad_keys


@pytest.fixture()
def data_copy(corrupt_data, tmp_path):
    dst = str(tmp_path / "copy")
    shutil.copytree(corrupt_data[0], dst)
    return dst


# ------------------------------------------------------------------------------------------ undecodable rows


def test_decode_image_names_the_row_and_shard():
    with pytest.raises(DataError, match=r"^shard s3://b/x\.parquet, row k1: image cannot be decoded"):
        decode_image(b"nope", SIZE, "k1", "s3://b/x.parquet")
    with pytest.raises(DataError, match=r"^row k2: image cannot be decoded"):
        decode_image(b"", SIZE, "k2")


def test_decode_table_skips_exactly_the_bad_rows(corrupt_data):
    root, bad_keys = corrupt_data
    table = read_shard(os.path.join(root, "train-00000.parquet"))
    images, skipped = decode_table(table, SIZE)
    assert skipped == bad_keys and images.shape == (30 - len(bad_keys), SIZE, SIZE, 3)
    good = table.filter(pa.array([k not in bad_keys for k in table.column("key").to_pylist()]))
    expected, none = decode_table(good, SIZE)
    assert none == [] and np.array_equal(images, expected)  # order kept, nothing shifted

    with pytest.raises(DataError, match=rf"^row {bad_keys[0]}: image cannot be decoded"):
        decode_table(table, SIZE, on_corrupt="fail")
    with pytest.raises(ValueError, match="on_corrupt"):
        decode_table(table, SIZE, on_corrupt="ignore")


def test_decode_images_udf_adds_nothing_for_a_bad_row(corrupt_data):
    root, bad_keys = corrupt_data
    url = os.path.join(root, "train-00000.parquet")
    table = read_shard(url)
    table = table.append_column(SHARD_COLUMN, pa.array([url] * table.num_rows))
    out = DecodeImages(SIZE)(table)
    assert sorted(out) == ["domain", "image", "index", "label"]
    assert all(len(column) == 30 - len(bad_keys) for column in out.values())
    # Labels, domains and row ids stay with their pixels: the rows that decode, in order.
    good = [i for i, key in enumerate(table.column("key").to_pylist()) if key not in bad_keys]
    assert out["label"].tolist() == [table.column("label")[i].as_py() for i in good]
    assert out["index"].tolist() == row_index([table.column("key")[i].as_py() for i in good]).tolist()
    with pytest.raises(DataError, match=rf"shard {url}, row {bad_keys[0]}: image cannot be decoded"):
        DecodeImages(SIZE, on_corrupt="fail")(table)
    with pytest.raises(ValueError, match="on_corrupt"):
        DecodeImages(SIZE, on_corrupt="drop")


def test_corrupt_row_counter_tallies():
    counter = CorruptRowCounter(keep_keys=2)
    counter.add([("s3://b/a.parquet", "k1"), ("s3://b/a.parquet", "k2")])
    assert counter.add([("s3://b/b.parquet", "k3")]) == 3
    assert counter.totals() == {"rows": 3, "per_shard": {"s3://b/a.parquet": 2, "s3://b/b.parquet": 1},
                                "keys": ["k1", "k2"]}


def test_load_split_arrays_skips_and_keeps_rows_aligned(corrupt_data):
    root, bad_keys = corrupt_data
    manifest = load_manifest(root)
    arrays = load_split_arrays(manifest, root, "train", SIZE, threads=2)
    assert sorted(arrays.skipped) == sorted(bad_keys)
    assert len(arrays.keys) == len(arrays.labels) == len(arrays.domains) == arrays.images.shape[0] == 60 - 3
    assert not set(arrays.keys) & set(bad_keys)
    rows = read_split(root, "train").to_pylist()
    by_key = {r["key"]: r for r in rows}
    for i, key in enumerate(arrays.keys):  # each image, label and domain belongs to its key
        assert arrays.labels[i] == by_key[key]["label"] and arrays.domains[i] == by_key[key]["domain"]
        expected = decode_image(by_key[key]["image"], SIZE, key)
        assert np.array_equal(arrays.images[i].permute(1, 2, 0).numpy(), expected)

    capped = load_split_arrays(manifest, root, "train", SIZE, max_per_class=1)
    assert len(capped.keys) + len(capped.skipped) == manifest.num_classes
    assert load_split_arrays(manifest, root, "val", SIZE).skipped == []


def test_load_split_arrays_fail_names_shard_and_key(corrupt_data):
    root, bad_keys = corrupt_data
    with pytest.raises(DataError) as err:
        load_split_arrays(load_manifest(root), root, "train", SIZE, on_corrupt="fail")
    message = str(err.value)
    assert message.startswith(f"shard {os.path.join(root, 'train-00000.parquet')}, row ")
    assert any(f"row {k}:" in message for k in bad_keys)


# ------------------------------------------------------------------------------------------ broken files


def test_broken_shards_and_manifest_are_named_by_the_ingest_path(data_copy):
    manifest = load_manifest(data_copy)
    # sha256 mismatch: a flipped byte
    path = os.path.join(data_copy, "train-00001.parquet")
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(path, "wb").write(bytes(data))
    with pytest.raises(DataError, match=r"shard .*train-00001\.parquet: sha256 mismatch"):
        load_split_arrays(manifest, data_copy, "train", SIZE)
    # truncated Parquet whose manifest entry matches (a foreign tool's short write)
    val = os.path.join(data_copy, "val-00000.parquet")
    short = open(val, "rb").read()[:500]
    open(val, "wb").write(short)
    with pytest.raises(DataError, match=r"shard .*val-00000\.parquet: not a readable Parquet file"):
        read_shard(val, hashlib.sha256(short).hexdigest())
    # missing shard
    os.remove(os.path.join(data_copy, "train-00000.parquet"))
    with pytest.raises(DataError, match=r"shard .*train-00000\.parquet: missing \(the manifest lists it\)"):
        load_split_arrays(manifest, data_copy, "train", SIZE)
    # manifest from another streamssl
    mpath = os.path.join(data_copy, MANIFEST_NAME)
    doc = json.load(open(mpath))
    json.dump({**doc, "schema_version": 7}, open(mpath, "w"))
    with pytest.raises(DataError, match=rf"manifest {mpath} has schema_version 7, but this streamssl"):
        read_index(data_copy, "train")


# ------------------------------------------------------------------------------------------ through Ray Data


def _plan(root: str):
    manifest = load_manifest(root)
    return manifest, make_plan(read_index(root, "train"), manifest, "random_class", 2, seed=0)


def _consume(ds) -> int:
    return sum(len(b["image"]) for b in ds.iter_batches(batch_size=32, batch_format="numpy"))


@pytest.mark.slow
def test_ray_data_skips_counts_and_fails_on_bad_rows(corrupt_data, ray_local):
    import ray

    root, bad_keys = corrupt_data
    manifest, plan = _plan(root)
    refs = shard_refs(manifest, root, "train")
    counter = start_corrupt_row_counter()
    rows = _consume(chunk_dataset(refs, plan, [0, 1], SIZE, counter=counter))
    assert rows == chunk_rows(plan, [0, 1]) - len(bad_keys)
    totals = ray.get(counter.totals.remote())
    assert totals["rows"] == 3 and sorted(totals["keys"]) == sorted(bad_keys)
    assert totals["per_shard"] == {os.path.join(root, "train-00000.parquet"): 3}

    with pytest.raises(Exception) as err:
        _consume(chunk_dataset(refs, plan, [0, 1], SIZE, on_corrupt="fail"))
    message = str(err.value)
    assert f"shard {os.path.join(root, 'train-00000.parquet')}, row " in message
    assert any(f"row {k}: image cannot be decoded" in message for k in bad_keys)


@pytest.mark.slow
def test_ray_data_read_surfaces_the_data_error(corrupt_data, data_copy, ray_local):
    manifest, plan = _plan(data_copy)
    refs = shard_refs(manifest, data_copy, "train")
    path = os.path.join(data_copy, "train-00001.parquet")
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(path, "wb").write(bytes(data))
    with pytest.raises(Exception) as err:
        _consume(chunk_dataset(refs, plan, [0, 1], SIZE))
    assert f"shard {path}: sha256 mismatch (manifest {refs[1].sha256}" in str(err.value)
    assert isinstance(err.value, DataError), type(err.value).__mro__  # Ray keeps the type: the CLI's exit code holds
    import ray.data

    assert not ray.data.DataContext.get_current().raise_original_map_exception  # set on that dataset only

    os.remove(path)
    with pytest.raises(DataError, match=r"train-00001\.parquet: missing \(the manifest lists it\)"):
        _consume(chunk_dataset(refs, plan, [0, 1], SIZE))

    short = open(os.path.join(data_copy, "val-00000.parquet"), "rb").read()[:500]
    open(path, "wb").write(short)
    truncated = [refs[0], ShardRef(storage.join(data_copy, "train-00001.parquet"), hashlib.sha256(short).hexdigest(), 30)]
    with pytest.raises(DataError, match=r"train-00001\.parquet: not a readable Parquet file"):
        _consume(chunk_dataset(truncated, plan, [0, 1], SIZE))
