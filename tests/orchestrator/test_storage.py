"""Storage URLs: local paths, file://, memory:// and s3:// (moto server over HTTP) behave alike.

    cd /work/main && .venv/bin/python -m pytest tests/orchestrator/test_storage.py -q
"""

from __future__ import annotations

import os
import pickle

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from fsspec.implementations.local import LocalFileSystem
from fsspec.implementations.memory import MemoryFileSystem

from orchestrator import storage
from orchestrator.errors import DataError
from tests.orchestrator.s3_server import DUMMY_SECRET, S3Server


def test_resolve_local_forms(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fs, path = storage.resolve("rel/x.bin")
    assert isinstance(fs, LocalFileSystem) and path == str(tmp_path / "rel" / "x.bin")
    fs, path = storage.resolve(f"file://{tmp_path}/a")
    assert isinstance(fs, LocalFileSystem) and path == f"{tmp_path}/a"
    fs, path = storage.resolve("memory://bucket/k")
    assert isinstance(fs, MemoryFileSystem) and path == "/bucket/k"
    assert storage.is_local("/x") and storage.is_local("file:///x") and not storage.is_local("s3://b/x")


def test_join():
    assert storage.join("s3://b/x/", "a", "/b.json") == "s3://b/x/a/b.json"
    assert storage.join("memory://m", "") == "memory://m"
    assert storage.join("/data/sets", "a", "b") == "/data/sets/a/b"
    assert storage.join("file:///data", "m.json") == "file:///data/m.json"


@pytest.mark.parametrize("scheme", ["plain", "file", "memory"])
def test_write_read_exists_remove(tmp_path, scheme):
    root = {"plain": str(tmp_path / "r"), "file": f"file://{tmp_path}/r", "memory": f"memory://st-{tmp_path.name}/r"}[scheme]
    url = storage.join(root, "deep", "f.bin")
    assert not storage.exists(url)
    storage.write_bytes_atomic(url, b"one")
    storage.write_bytes_atomic(url, b"two")  # replaces
    assert storage.exists(url) and storage.read_bytes(url) == b"two"
    if scheme != "memory":
        assert os.listdir(tmp_path / "r" / "deep") == ["f.bin"]  # no temporary files left behind
    storage.remove(url)
    storage.remove(url)  # a missing file is not an error
    assert not storage.exists(url)
    storage.write_bytes_atomic(url, b"x")
    storage.remove_tree(root)
    assert not storage.exists(url) and not storage.exists(root)
    storage.remove_tree(root)
    with pytest.raises(DataError, match=r"deep/f\.bin does not exist"):
        storage.read_bytes(url)


def test_failed_local_write_keeps_the_old_file(tmp_path):
    url = str(tmp_path / "f.bin")
    storage.write_bytes_atomic(url, b"old")
    with pytest.raises(TypeError):
        storage.write_bytes_atomic(url, "not bytes")  # fails inside the write, after the temp file exists
    assert storage.read_bytes(url) == b"old" and os.listdir(tmp_path) == ["f.bin"]


def test_unknown_protocol_and_credentials_in_urls(tmp_path):
    with pytest.raises(DataError, match=r"cannot open nosuchproto://x"):
        storage.resolve("nosuchproto://x")
    assert storage.redact("s3://AKID:s3cr3t@bucket/key") == "s3://bucket/key"
    assert storage.redact("/plain/path") == "/plain/path"


def test_pyarrow_filesystem(tmp_path):
    table = pa.table({"a": [1, 2, 3]})
    fs, path = storage.pyarrow_filesystem(str(tmp_path))
    assert isinstance(fs, pafs.LocalFileSystem)
    pq.write_table(table, f"{path}/t.parquet", filesystem=fs)
    assert pq.read_table(str(tmp_path / "t.parquet")).equals(table)
    url = f"memory://pafs-{tmp_path.name}"
    storage.write_bytes_atomic(storage.join(url, "t.parquet"), (tmp_path / "t.parquet").read_bytes())
    fs, path = storage.pyarrow_filesystem(url)
    assert isinstance(fs, pafs.PyFileSystem)
    assert pq.read_table(f"{path}/t.parquet", filesystem=fs).equals(table)
    storage.remove_tree(url)


def test_s3_through_moto_server(tmp_path):
    with S3Server() as s3:
        opts = s3.storage_options
        url = s3.url("dir", "obj.bin")
        assert not storage.exists(url, opts)
        storage.write_bytes_atomic(url, b"payload", opts)
        assert storage.exists(url, opts) and storage.read_bytes(url, opts) == b"payload"
        fs, path = storage.resolve(url, opts)
        assert path == f"{s3.bucket}/dir/obj.bin"
        assert DUMMY_SECRET not in repr(fs) and DUMMY_SECRET not in str(fs)
        with pytest.raises(DataError) as err:
            storage.read_bytes(s3.url("dir", "missing.bin"), opts)
        assert "missing.bin does not exist" in str(err.value) and DUMMY_SECRET not in str(err.value)

        # What Ray Data gets: a pyarrow filesystem that survives pickling into another task.
        pq.write_table(pa.table({"a": [1, 2]}), str(tmp_path / "t.parquet"))
        storage.write_bytes_atomic(s3.url("dir", "t.parquet"), (tmp_path / "t.parquet").read_bytes(), opts)
        pa_fs, root = storage.pyarrow_filesystem(s3.url("dir"), opts)
        assert DUMMY_SECRET not in repr(pa_fs)
        again = pickle.loads(pickle.dumps(pa_fs))
        assert pq.read_table(f"{root}/t.parquet", filesystem=again).column("a").to_pylist() == [1, 2]

        storage.remove_tree(s3.url("dir"), opts)
        assert not storage.exists(url, opts)
