"""The polled source of a live online stream (`orchestrator.data.online_source`) on real files: what counts as arrived,
the arrival order, skipped shards, the end (marker or stall), and a restored stream that continues in the same
order. No Ray: the stream is read the way a world of one reads it, with a clock the test drives."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from orchestrator.data.manifest import load_manifest
from orchestrator.data.online_source import Poll, PolledStream, ShardPoller
from orchestrator.errors import SpecError
from orchestrator.spec.experiment import validate_spec
from orchestrator.spec.online import PollSource
from tests.orchestrator.shard_producer import publish, train_rows
from tests.specs import tiny_spec


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _touch(path: Path, when: float) -> None:
    os.utime(path, (when, when))


def drain(poller: ShardPoller) -> Poll:
    """Poll until a round has no news (a poll returns at most one verified shard): all that is there now."""
    out = Poll()
    while True:
        news = poller.poll()
        out.arrived += news.arrived
        out.skipped += news.skipped
        if not news.arrived and not news.skipped:
            out.end = news.end
            return out


@pytest.fixture
def rows(synthetic_url: str):
    return train_rows(synthetic_url)


def test_shards_arrive_with_their_sidecar_in_sidecar_order_and_bad_ones_are_skipped(
        tmp_path: Path, synthetic_url: str, rows) -> None:
    manifest = load_manifest(synthetic_url)
    source = PollSource(poll=str(tmp_path), interval_s=1, stall_after_s=10, grace_s=0)  # wrong is skipped at once
    clock = Clock()
    poller = ShardPoller(source, manifest, clock=clock)
    assert poller.poll().arrived == []  # an empty folder: nothing yet, not stalled
    now = time.time()
    publish(tmp_path, "zz.parquet", rows.slice(0, 10))
    _touch(tmp_path / "zz.parquet.sha256", now - 3)  # arrived first, though last by name
    publish(tmp_path, "aa.parquet", rows.slice(10, 7))
    _touch(tmp_path / "aa.parquet.sha256", now - 2)
    publish(tmp_path, "bad.parquet", rows.slice(17, 5), digest="0" * 64)
    (tmp_path / "pending.parquet").write_bytes(b"still uploading")  # no sidecar: not arrived
    first = poller.poll()
    assert [a.name for a in first.arrived] == ["zz.parquet"]  # one verified shard a poll, yielded before the next
    assert list(poller.cache) == ["zz.parquet"]
    news = drain(poller)
    news.arrived[:0] = first.arrived
    assert [(a.name, a.rows) for a in news.arrived] == [("zz.parquet", 10), ("aa.parquet", 7)]
    (skip,) = news.skipped
    assert skip.name == "bad.parquet" and "sha256 mismatch" in skip.reason and "bad.parquet" in skip.reason
    assert news.end is None
    assert poller.poll().arrived == [] and poller.poll().skipped == []  # each shard is news once

    # A shard whose rows are not the data set's (label 99 of 12 classes), and a sidecar that is no digest.
    alien = rows.slice(0, 3)
    alien = alien.set_column(alien.schema.get_field_index("label"), "label", pa.array([99, 99, 99], pa.int64()))
    publish(tmp_path, "alien.parquet", alien)
    (tmp_path / "junk.parquet").write_bytes(b"x")
    (tmp_path / "junk.parquet.sha256").write_text("not a digest\n")
    reasons = {s.name: s.reason for s in drain(poller).skipped}
    assert "outside the data set's classes" in reasons["alien.parquet"]
    assert "holds no hex sha256 digest" in reasons["junk.parquet"]


def test_the_stream_ends_at_the_marker_or_when_nothing_arrives_for_stall_after_s(
        tmp_path: Path, synthetic_url: str, rows) -> None:
    manifest = load_manifest(synthetic_url)
    clock = Clock()
    poller = ShardPoller(PollSource(poll=str(tmp_path), interval_s=1, stall_after_s=10), manifest, clock=clock)
    clock.now = 9.9
    assert poller.poll().end is None
    publish(tmp_path, "a.parquet", rows.slice(0, 4))
    clock.now = 15.0
    assert [a.name for a in poller.poll().arrived] == ["a.parquet"]  # the stall clock restarts here
    clock.now = 24.9
    assert poller.poll().end is None
    clock.now = 25.0
    assert poller.poll().end == "stalled"

    other = tmp_path / "other"
    other.mkdir()
    marked = ShardPoller(PollSource(poll=str(other), interval_s=1, stall_after_s=10), manifest, clock=Clock())
    publish(other, "last.parquet", rows.slice(0, 4))
    (other / "_STREAM_END").write_text("")
    news = marked.poll()
    assert [a.name for a in news.arrived] == ["last.parquet"] and news.end is None  # what came with it first
    assert marked.poll().end == "ended"


def test_a_restored_stream_reads_what_it_had_in_the_same_order_then_polls_on(
        tmp_path: Path, synthetic_url: str, rows) -> None:
    manifest = load_manifest(synthetic_url)
    source = PollSource(poll=str(tmp_path), interval_s=1, stall_after_s=5)
    clock, waits = Clock(), []

    def sleep(seconds: float) -> None:  # the test's time passes when the stream waits
        waits.append(seconds)
        clock.now += seconds

    now = time.time()
    for i, name in enumerate(["c.parquet", "a.parquet", "b.parquet"]):
        publish(tmp_path, name, rows.slice(10 * i, 10))
        _touch(tmp_path / f"{name}.sha256", now - 10 + i)
    stream = PolledStream(source, manifest, 0, sleep=sleep, clock=clock)
    got = list(stream.rows())
    assert [r["shard"][0] for r in got] == ["c.parquet", "a.parquet", "b.parquet"]
    assert np.concatenate([r["key"] for r in got]).tolist() == rows.column("key").to_pylist()[:30]
    assert stream.end == "stalled" and waits == [1.0] * 5  # five empty polls, one interval apart
    state = stream.state_dict()
    assert [a["name"] for a in state["arrivals"]] == ["c.parquet", "a.parquet", "b.parquet"]

    # A resumed stream: the three again, in the recorded order, then only what is new.
    publish(tmp_path, "0-new.parquet", rows.slice(30, 6))
    restored = PolledStream(source, manifest, 0, state=state, sleep=sleep, clock=clock)
    again = list(restored.rows())
    assert [r["shard"][0] for r in again] == ["c.parquet", "a.parquet", "b.parquet", "0-new.parquet"]
    assert [a.name for a in restored.arrivals] == ["c.parquet", "a.parquet", "b.parquet", "0-new.parquet"]
    assert restored.end == "stalled" and len(waits) == 10
    assert again[0]["image"][0] == rows.column("image")[0].as_py()  # the encoded bytes, for the worker to decode


def test_a_rank_other_than_0_reads_what_rank_0_broadcasts(tmp_path: Path, synthetic_url: str, rows) -> None:
    manifest = load_manifest(synthetic_url)
    source = PollSource(poll=str(tmp_path), interval_s=1, stall_after_s=5)
    publish(tmp_path, "x.parquet", rows.slice(0, 8))
    publish(tmp_path, "y.parquet", rows.slice(8, 8), digest="f" * 64)
    source = PollSource(poll=str(tmp_path), interval_s=1, stall_after_s=5, grace_s=3)
    clock = Clock()

    def sleep(seconds: float) -> None:
        clock.now += seconds

    leader = PolledStream(source, manifest, 0, clock=clock, sleep=sleep)
    said = []

    def record(news):
        said.append(news)
        return news

    leader.broadcast = record
    first = list(leader.rows())
    follower = PolledStream(source, manifest, 1, broadcast=lambda _: said.pop(0), sleep=sleep)
    assert follower.poller is None  # it never lists the folder
    second = list(follower.rows())
    assert [r["key"].tolist() for r in second] == [r["key"].tolist() for r in first]
    assert [s.name for s in follower.skipped] == ["y.parquet"] and follower.end == leader.end == "stalled"


def test_polled_source_settings_that_cannot_work_are_refused(synthetic_url: str, tmp_path: Path) -> None:
    def spec(online: dict, **sections) -> dict:
        return tiny_spec("x", synthetic_url, stream={"kind": "online", "chunks": 3},
                         online={"batch_size": 16, "source": {"poll": str(tmp_path)}, **online}, **sections)

    assert validate_spec(spec({})).online.source.stall_after_s == 30.0
    with pytest.raises(SpecError, match=r"stall_after_s \(1.0\) must be at least interval_s \(2.0\)"):
        validate_spec(spec({"source": {"poll": str(tmp_path), "stall_after_s": 1}}))
    with pytest.raises(SpecError, match=r"online.cycle: a polled source"):
        validate_spec(spec({"cycle": True, "max_batches": 5}))
    with pytest.raises(SpecError, match=r"online.time_budget_s: a polled source"):
        validate_spec(spec({"time_budget_s": 1.0}))
    with pytest.raises(SpecError, match=r"a polled stream is learned live by one line, the plan has 2"):
        validate_spec(spec({}, lines={"method": ["simclr"], "strategy": ["sequential", "sequential+cassle"]}))
    with pytest.raises(SpecError, match=r"online.source.*poll"):
        validate_spec(spec({"source": {"interval_s": 1}}))


def test_a_bucket_prefix_is_polled_through_s3(synthetic_url: str, rows) -> None:
    import hashlib

    from orchestrator import storage
    from tests.orchestrator.s3_server import S3Server
    from tests.orchestrator.shard_producer import shard_bytes

    with S3Server(bucket="streamssl-poll") as s3:
        def put(name: str, table, digest: str | None = None) -> None:
            data = shard_bytes(table)
            storage.write_bytes_atomic(s3.url(f"incoming/{name}"), data, s3.storage_options)
            sidecar = (digest or hashlib.sha256(data).hexdigest()).encode()
            storage.write_bytes_atomic(s3.url(f"incoming/{name}.sha256"), sidecar, s3.storage_options)

        source = PollSource(poll=s3.url("incoming/"), interval_s=1, stall_after_s=5, grace_s=0,
                            storage_options=s3.storage_options)
        poller = ShardPoller(source, load_manifest(synthetic_url), clock=Clock())
        assert poller.poll().arrived == []  # no such prefix yet: waited for, not an error
        put("a.parquet", rows.slice(0, 6))
        put("b.parquet", rows.slice(6, 6), digest="1" * 64)
        news = drain(poller)
        assert [a.name for a in news.arrived] == ["a.parquet"] and [s.name for s in news.skipped] == ["b.parquet"]
        put("c.parquet", rows.slice(12, 6))  # a listing cached by s3fs must not hide it
        assert [a.name for a in poller.poll().arrived] == ["c.parquet"]
        storage.write_bytes_atomic(s3.url("incoming/_STREAM_END"), b"", s3.storage_options)
        assert poller.poll().end == "ended"
        # Every rank reads an arrived shard from the bucket itself, checked against the digest rank 0 saw.
        follower = PolledStream(source, load_manifest(synthetic_url), 1,
                                broadcast=lambda _: type(news)(arrived=news.arrived, end="ended"))
        (got,) = list(follower.rows())
        assert got["key"].tolist() == rows.column("key").to_pylist()[:6]


def test_a_sidecar_caught_empty_or_before_the_shard_is_complete_is_waited_for_not_skipped(
        tmp_path: Path, synthetic_url: str, rows) -> None:
    """What `sha256sum X.parquet > X.parquet.sha256` shows for a moment (an empty sidecar), and a sidecar written
    before the shard's upload was complete, are tried again until `grace_s`; only what stays wrong is skipped."""
    from tests.orchestrator.shard_producer import shard_bytes

    manifest = load_manifest(synthetic_url)
    clock = Clock()
    poller = ShardPoller(PollSource(poll=str(tmp_path), interval_s=1, stall_after_s=5, grace_s=30), manifest,
                         clock=clock)
    data = shard_bytes(rows.slice(0, 9))
    (tmp_path / "s.parquet").write_bytes(data)
    (tmp_path / "s.parquet.sha256").write_text("")  # the shell truncated it; sha256sum has not written yet
    news = poller.poll()
    assert news.arrived == [] and news.skipped == [] and news.end is None
    clock.now = 2.0
    (tmp_path / "s.parquet.sha256").write_text(f"{hashlib.sha256(data).hexdigest()}  s.parquet\n")
    news = poller.poll()
    assert [(a.name, a.rows) for a in news.arrived] == [("s.parquet", 9)] and news.skipped == []

    # The sidecar first, then the rest of the shard's bytes.
    late = shard_bytes(rows.slice(9, 7))
    (tmp_path / "t.parquet").write_bytes(late[: len(late) // 2])
    (tmp_path / "t.parquet.sha256").write_text(hashlib.sha256(late).hexdigest())
    clock.now = 3.0
    assert poller.poll().arrived == [] and "t.parquet" in poller.waiting
    clock.now = 10.0
    (tmp_path / "t.parquet").write_bytes(late)
    assert [(a.name, a.rows) for a in poller.poll().arrived] == [("t.parquet", 7)]

    # A sidecar that stays wrong is skipped once the grace period has passed, and not before.
    publish(tmp_path, "u.parquet", rows.slice(16, 4), digest="0" * 64)
    clock.now = 11.0
    assert poller.poll().skipped == []
    clock.now = 40.9
    assert poller.poll().skipped == [] and poller.poll().end is None  # waiting: not stalled
    clock.now = 41.0
    (skip,) = poller.poll().skipped
    assert skip.name == "u.parquet" and "sha256 mismatch" in skip.reason and "30s grace period" in skip.reason
    clock.now = 45.9
    assert poller.poll().end is None
    clock.now = 46.0
    assert poller.poll().end == "stalled"


def test_the_same_bytes_under_two_names_are_learned_once(tmp_path: Path, synthetic_url: str, rows) -> None:
    manifest = load_manifest(synthetic_url)
    clock = Clock()
    stream = PolledStream(PollSource(poll=str(tmp_path), interval_s=1, stall_after_s=3), manifest, 0,
                          sleep=lambda s: setattr(clock, "now", clock.now + s), clock=clock)
    now = time.time()
    digest = publish(tmp_path, "a.parquet", rows.slice(0, 8))
    _touch(tmp_path / "a.parquet.sha256", now - 3)
    publish(tmp_path, "a-copy.parquet", rows.slice(0, 8))
    _touch(tmp_path / "a-copy.parquet.sha256", now - 2)
    publish(tmp_path, "b.parquet", rows.slice(8, 4))
    _touch(tmp_path / "b.parquet.sha256", now - 1)
    got = np.concatenate([r["key"] for r in stream.rows()]).tolist()
    assert got == rows.column("key").to_pylist()[:12]  # 8 + 4 rows, not 8 + 8 + 4
    assert [a.name for a in stream.arrivals] == ["a.parquet", "b.parquet"]
    (skip,) = stream.skipped
    assert skip.name == "a-copy.parquet" and "duplicate of a.parquet" in skip.reason and digest in skip.reason
    # A restored stream knows the digests it learned: a third copy arriving later is a duplicate too.
    publish(tmp_path, "a-again.parquet", rows.slice(0, 8))
    restored = PolledStream(stream.source, manifest, 0, state=stream.state_dict(),
                            sleep=lambda s: setattr(clock, "now", clock.now + s), clock=clock)
    assert list(restored.rows(skip_rows=12)) == [] and restored.reads == 0
    assert [s.name for s in restored.skipped] == ["a-copy.parquet", "a-again.parquet"]


def test_a_restored_stream_reads_only_what_it_still_needs_and_survives_retention(
        tmp_path: Path, synthetic_url: str, rows) -> None:
    """Resuming at row 15 of shards c(10) a(10) b(10): c was learned (and the producer deleted it since), a is
    learned up to its row 5, b not at all. Only a's rest and b are read; a needed shard that is gone is skipped."""
    manifest = load_manifest(synthetic_url)
    source = PollSource(poll=str(tmp_path), interval_s=1, stall_after_s=2)
    clock = Clock()

    def sleep(seconds: float) -> None:
        clock.now += seconds

    now = time.time()
    for i, name in enumerate(["c.parquet", "a.parquet", "b.parquet"]):
        publish(tmp_path, name, rows.slice(10 * i, 10))
        _touch(tmp_path / f"{name}.sha256", now - 10 + i)
    first = PolledStream(source, manifest, 0, sleep=sleep, clock=clock)
    list(first.rows())
    state = first.state_dict()
    keys = rows.column("key").to_pylist()

    (tmp_path / "c.parquet").unlink()  # retention: the producer deletes what it knows was consumed
    (tmp_path / "c.parquet.sha256").unlink()
    restored = PolledStream(source, manifest, 0, state=state, sleep=sleep, clock=clock)
    got = list(restored.rows(skip_rows=15))
    assert np.concatenate([r["key"] for r in got]).tolist() == keys[15:30]
    assert restored.reads == 2 and restored.skipped == []
    assert [a.name for a in restored.arrivals] == ["c.parquet", "a.parquet", "b.parquet"]

    (tmp_path / "b.parquet").unlink()  # gone before it was learned: skipped, the stream goes on
    again = PolledStream(source, manifest, 0, state=state, sleep=sleep, clock=clock)
    got = list(again.rows(skip_rows=15))
    assert np.concatenate([r["key"] for r in got]).tolist() == keys[15:20]
    (skip,) = again.skipped
    assert skip.name == "b.parquet" and "deleted from the folder before it was learned" in skip.reason
    assert [a.name for a in again.arrivals] == ["c.parquet", "a.parquet"]


def test_grace_s_is_validated(synthetic_url: str, tmp_path: Path) -> None:
    spec = tiny_spec("x", synthetic_url, stream={"kind": "online", "chunks": 3},
                     online={"batch_size": 16, "source": {"poll": str(tmp_path), "grace_s": -1}})
    with pytest.raises(SpecError, match=r"online.source.grace_s"):
        validate_spec(spec)
    spec["online"]["source"]["grace_s"] = 5
    assert validate_spec(spec).online.source.grace_s == 5.0


def test_the_rows_after_the_last_full_batch_of_an_ended_stream_are_handed_over_not_dropped(
        tmp_path: Path, synthetic_url: str, rows) -> None:
    """30 rows in batches of 8: 3 batches, and the 6 rows after them as the tail (the runner keeps them in the
    replay memory and reports `tail_rows`)."""
    from orchestrator.train.online_runner import stream_batches

    publish(tmp_path, "a.parquet", rows.slice(0, 30))
    (tmp_path / "_STREAM_END").write_text("")
    stream = PolledStream(PollSource(poll=str(tmp_path), interval_s=1, stall_after_s=5),
                          load_manifest(synthetic_url), 0, sleep=lambda s: None, clock=Clock())
    tail: list = []
    batches = list(stream_batches(iter([stream.rows()]), 8, tail))
    assert [len(b["key"]) for b in batches] == [8, 8, 8] and stream.end == "ended"
    (rest,) = tail
    assert rest["key"].tolist() == rows.column("key").to_pylist()[24:30]
