"""Object storage going away: reads retry through an outage and name the URL when it lasts too long.

    .venv/bin/python -m pytest tests/faults/test_storage_outage.py -q

A real S3 endpoint (moto's server, tests/orchestrator/s3_server.py) is stopped and restarted on the same port
while shards are being read; moto keeps its objects in this process, so the data are there again afterwards.

botocore retries a refused connection by itself for several seconds before s3fs gives up; the tests that count
retries set ``config_kwargs={"retries": {"max_attempts": 1}}`` so that every failure reaches streamssl's own
retry layer (the one with the deadline and the message) and the outage outlasts botocore's.
"""

from __future__ import annotations

import threading
import time

import pytest

from orchestrator import storage
from orchestrator.data.manifest import ShardEntry, load_manifest
from orchestrator.data.shards import read_index, read_shard
from orchestrator.data.synth import generate_synthetic
from orchestrator.errors import DataError
from orchestrator.retry import RetryPolicy
from tests.orchestrator.s3_server import DUMMY_SECRET, S3Server


@pytest.fixture(scope="module")
def s3_data():
    """A moto S3 server holding a small synthetic data set (4 train shards, 1 val shard)."""
    with S3Server() as s3:
        url = s3.url("d")
        manifest = generate_synthetic(url, train=200, val=40, image_size=16, shard_rows=50,
                                      storage_options=s3.storage_options, progress=False)
        yield s3, url, manifest
        if s3._server is None:  # a test failed while the server was down
            s3.restart()


def _fast_fail_options(s3: S3Server) -> dict:
    return {**s3.storage_options, "config_kwargs": {"retries": {"max_attempts": 1}}}


def _restart_after(s3: S3Server, seconds: float) -> threading.Thread:
    def later():
        time.sleep(seconds)
        s3.restart()

    thread = threading.Thread(target=later, daemon=True)
    thread.start()
    return thread


def test_reads_ride_out_a_restart(s3_data, monkeypatch):
    s3, url, manifest = s3_data
    monkeypatch.setenv(storage.RETRY_ENV, "30")
    opts = _fast_fail_options(s3)
    read_index(url, "train", opts)  # warm: connections in s3fs's pool now point at the old server
    before = storage.retry_stats()

    s3.stop()
    results: dict[str, object] = {}

    def read(entry: ShardEntry) -> None:
        try:
            table = read_shard(storage.join(url, entry.path), entry.sha256, storage_options=opts)
            results[entry.path] = table.num_rows
        except Exception as exc:  # reported below with the shard's name
            results[entry.path] = exc

    readers = [threading.Thread(target=read, args=(e,)) for e in manifest.shards]
    start = time.monotonic()
    for t in readers:
        t.start()
    restarter = _restart_after(s3, 2.5)
    index: list = []
    index_reader = threading.Thread(target=lambda: index.append(read_index(url, "val", opts)))
    index_reader.start()
    for t in [*readers, index_reader, restarter]:
        t.join(timeout=60)
    elapsed = time.monotonic() - start

    assert {e.path: e.rows for e in manifest.shards} == results  # every read completed, sha256 checked inside
    assert index and index[0].num_rows == 40
    after = storage.retry_stats()
    assert after["retries"] - before["retries"] >= len(manifest.shards) + 1
    assert after["recovered"] - before["recovered"] == len(manifest.shards) + 1  # five shards and the manifest
    assert after["gave_up"] == before["gave_up"]
    assert 2.5 <= elapsed < 20, elapsed
    print(f"recovered {len(manifest.shards)} shard reads + 1 index read {elapsed:.1f} s after the outage began "
          f"(outage 2.5 s), {after['retries'] - before['retries']} retries")


def test_default_botocore_retries_also_recover(s3_data, monkeypatch):
    """With s3fs's default options (botocore retrying inside each call) a short outage is also ridden out."""
    s3, url, manifest = s3_data
    monkeypatch.setenv(storage.RETRY_ENV, "30")
    entry = manifest.shards[-1]
    s3.stop()
    restarter = _restart_after(s3, 2.0)
    start = time.monotonic()
    table = read_shard(storage.join(url, entry.path), entry.sha256, storage_options=s3.storage_options)
    restarter.join()
    assert table.num_rows == entry.rows and time.monotonic() - start >= 2.0


def test_outage_past_the_deadline_names_the_url_without_credentials(s3_data, monkeypatch):
    s3, url, manifest = s3_data
    monkeypatch.setenv(storage.RETRY_ENV, "2")
    opts = _fast_fail_options(s3)
    entry = manifest.shards[0]
    shard_url = storage.join(url, entry.path)
    before = storage.retry_stats()
    s3.stop()
    try:
        start = time.monotonic()
        with pytest.raises(DataError) as err:
            read_shard(shard_url, entry.sha256, storage_options=opts)
        elapsed = time.monotonic() - start
        with pytest.raises(storage.StorageUnavailableError, match=r"manifest\.json"):
            load_manifest(url, opts)
        with pytest.raises(storage.StorageUnavailableError, match=r"cannot write .*new\.bin"):
            storage.write_bytes_atomic(storage.join(url, "new.bin"), b"x", opts)
    finally:
        s3.restart()
    message = str(err.value)
    assert isinstance(err.value, storage.StorageUnavailableError)
    assert f"storage unreachable: cannot read {shard_url} " in message
    assert "streamssl run --resume" in message and storage.RETRY_ENV in message
    assert DUMMY_SECRET not in message and DUMMY_SECRET not in repr(err.value)
    assert elapsed < 2 + 3, elapsed  # the deadline plus at most one (fast-failing) call
    assert storage.retry_stats()["gave_up"] - before["gave_up"] == 3
    # and the data are all there again once the endpoint is back
    assert read_shard(shard_url, entry.sha256, storage_options=opts).num_rows == entry.rows


def test_credentials_in_a_url_stay_out_of_messages(s3_data):
    s3, url, manifest = s3_data
    entry = manifest.shards[0]
    secret_url = storage.join(url, entry.path).replace("s3://", f"s3://{DUMMY_SECRET}:{DUMMY_SECRET}@")
    with pytest.raises(DataError) as err:  # s3fs does not take credentials from an s3:// URL: a bad request
        read_shard(secret_url, entry.sha256, storage_options=s3.storage_options)
    assert DUMMY_SECRET not in str(err.value) and storage.join(url, entry.path) in str(err.value)


def test_missing_object_fails_at_once_without_retries(s3_data, monkeypatch):
    s3, url, manifest = s3_data
    monkeypatch.setenv(storage.RETRY_ENV, "30")
    before = storage.retry_stats()
    start = time.monotonic()
    with pytest.raises(DataError, match=r"shard s3://.*/d/train-00099\.parquet: missing"):
        read_shard(storage.join(url, "train-00099.parquet"), storage_options=s3.storage_options)
    with pytest.raises(DataError, match=r"/d/nope\.bin does not exist"):
        storage.read_bytes(storage.join(url, "nope.bin"), s3.storage_options)
    assert time.monotonic() - start < 5
    assert storage.retry_stats() == before


def test_retry_policy_from_env(monkeypatch):
    monkeypatch.delenv(storage.RETRY_ENV, raising=False)
    assert storage.retry_policy() == RetryPolicy()
    assert RetryPolicy().deadline >= 30
    monkeypatch.setenv(storage.RETRY_ENV, "4")
    policy = storage.retry_policy()
    assert policy.deadline == 4 and policy.max_delay <= 4
    monkeypatch.setenv(storage.RETRY_ENV, "0")
    assert storage.retry_policy().attempts == 1
    monkeypatch.setenv(storage.RETRY_ENV, "soon")
    with pytest.raises(DataError, match=storage.RETRY_ENV):
        storage.retry_policy()
    with pytest.raises(ValueError, match="attempts"):
        RetryPolicy(attempts=0)
    delays = [RetryPolicy(initial_delay=0.5, max_delay=2).delay(n) for n in range(1, 10)]
    assert all(0 <= d <= 2 for d in delays)


def test_transient_errors_are_told_apart():
    import botocore.exceptions as bex

    refused = bex.EndpointConnectionError(endpoint_url="http://127.0.0.1:1")
    assert storage.is_transient(refused)
    assert storage.is_transient(ConnectionResetError(104, "reset"))
    assert storage.is_transient(TimeoutError())
    server_error = bex.ClientError({"Error": {"Code": "InternalError"}, "ResponseMetadata": {"HTTPStatusCode": 500}},
                                   "GetObject")
    wrapped = OSError(5, "We encountered an internal error")
    wrapped.__cause__ = server_error  # what s3fs raises for a 500
    assert storage.is_transient(wrapped)
    assert not storage.is_transient(FileNotFoundError("s3://b/x"))
    assert not storage.is_transient(PermissionError("denied"))
    assert not storage.is_transient(OSError(5, "bad request"))
    assert not storage.is_transient(DataError("shard x: sha256 mismatch"))


@pytest.mark.slow
def test_ray_data_read_recovers_from_an_outage(s3_data, ray_local):
    """chunk_dataset's read tasks (other processes, default 60 s policy) wait out a 3 s outage."""
    from orchestrator.data.ingest import chunk_dataset, chunk_rows, shard_refs
    from orchestrator.plan.streams import make_plan

    s3, url, manifest = s3_data
    opts = _fast_fail_options(s3)
    plan = make_plan(read_index(url, "train", opts), manifest, "random_class", 2, seed=0)
    ds = chunk_dataset(shard_refs(manifest, url, "train"), plan, [0, 1], 16, opts)
    s3.stop()
    restarter = _restart_after(s3, 3.0)
    start = time.monotonic()
    rows = sum(len(b["image"]) for b in ds.iter_batches(batch_size=64, batch_format="numpy"))
    restarter.join()
    assert rows == chunk_rows(plan, [0, 1]) == 200
    print(f"Ray Data read of 4 shards finished {time.monotonic() - start:.1f} s after a 3 s outage began")
