"""A live online stream (`online.source`): a folder or bucket prefix polled for Parquet shards as they arrive.

    poller = ShardPoller(source, manifest)          # rank 0: lists the folder, verifies what has arrived
    news = poller.poll()                            # Poll(arrived=[Arrival...], skipped=[Skip...], end=None)
    stream = PolledStream(source, manifest, rank, broadcast)     # every rank
    for rows in stream.rows(): ...                  # numpy dicts (key, image bytes, label, domain, shard), in order

Arrival: `NAME.parquet` has arrived once its completion sidecar `NAME.parquet.sha256` is beside it; the sidecar
holds the hex sha256 of the shard's bytes (alone, or as `sha256sum` writes it). A producer writes the shard, then
the sidecar, so a shard still being uploaded is never read. An arrived shard is checked against its digest, the
shard schema (`orchestrator.data.shards`) and the data set's classes and domains; one that fails is *skipped*:
named in a warning and in the stream's record (`Skip`), and the stream goes on.

Order: shards are learned in the poll round that first saw them complete, and within a round by the sidecar's
modification time, then by name. The stream ends when no shard has arrived for `stall_after_s` (`end="stalled"`)
or the folder holds the end marker (`end="ended"`, after the shards that arrived with it).

Under DDP rank 0 alone lists and verifies; each round's news goes to every rank through `broadcast` (a gloo
`broadcast_object_list`), so all ranks read the same shards in the same order, each verifying the digest again.
`state_dict()` (the arrivals and skips so far) goes into the checkpoint: a restored stream reads its arrivals again
in the same order (the consumer skips the batches it has learned) and then polls on, ignoring every shard seen.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from orchestrator import storage
from orchestrator.data.manifest import Manifest
from orchestrator.data.shards import read_shard
from orchestrator.errors import DataError
from orchestrator.spec_online import PollSource

logger = logging.getLogger(__name__)

SIDECAR = ".sha256"
STREAM_COLUMNS = ("key", "image", "label", "domain")
_HEX = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class Arrival:
    name: str  # file name inside the polled folder
    sha256: str
    rows: int


@dataclass(frozen=True)
class Skip:
    name: str
    reason: str


@dataclass
class Poll:
    """One listing's news: shards that arrived and passed their checks, shards skipped, and whether it ended."""

    arrived: list[Arrival] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)
    end: str | None = None  # None, "stalled" or "ended"


def _mtime(info: dict[str, Any]) -> float:
    value = info.get("mtime", info.get("LastModified", info.get("updated", 0.0)))
    return value.timestamp() if hasattr(value, "timestamp") else float(value or 0.0)


class ShardPoller:
    """Rank 0's side: what has arrived in the folder since the last poll, verified."""

    def __init__(self, source: PollSource, manifest: Manifest, seen: set[str] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.source, self.clock = source, clock
        self.fs, self.root = storage.resolve(source.poll, source.storage_options)
        self.num_classes, self.num_domains = manifest.num_classes, len(manifest.domains)
        self.seen: set[str] = set(seen or ())
        self.last_arrival = clock()  # the stall clock starts at the (re)start
        self.cache: dict[str, pa.Table] = {}  # tables rank 0 verified, read once
        self._warned_missing = False

    def _listing(self) -> dict[str, dict[str, Any]]:
        self.fs.invalidate_cache(self.root)  # s3fs and gcsfs cache listings: a new shard must show
        try:
            entries = storage.call_with_retry(lambda: self.fs.ls(self.root, detail=True), self.source.poll,
                                              what="list")
        except FileNotFoundError:
            if not self._warned_missing:
                self._warned_missing = True
                logger.warning("online.source.poll: %s does not exist (yet); the stream waits for it",
                               storage.redact(self.source.poll))
            return {}
        return {os.path.basename(e["name"].rstrip("/")): e for e in entries if e.get("type", "file") == "file"}

    def poll(self) -> Poll:
        listing = self._listing()
        complete = [n for n in listing if n.endswith(".parquet") and n + SIDECAR in listing and n not in self.seen]
        complete.sort(key=lambda n: (_mtime(listing[n + SIDECAR]), n))
        news = Poll()
        for name in complete:
            self.seen.add(name)
            try:
                table, digest = self._verify(name)
            except DataError as exc:
                logger.warning("online.source: skipped shard %s: %s", name, exc)
                news.skipped.append(Skip(name, str(exc)))
                continue
            self.cache[name] = table
            news.arrived.append(Arrival(name, digest, table.num_rows))
        now = self.clock()
        if complete:  # a shard that failed its checks still shows the producer is alive
            self.last_arrival = now
        elif self.source.end_marker in listing:
            news.end = "ended"
        elif now - self.last_arrival >= self.source.stall_after_s:
            news.end = "stalled"
        return news

    def _verify(self, name: str) -> tuple[pa.Table, str]:
        url = storage.join(self.source.poll, name)
        try:
            text = storage.fetch(url + SIDECAR, self.source.storage_options).decode("ascii", "replace").split()
        except FileNotFoundError:
            raise DataError(f"shard {name}: its sidecar {name}{SIDECAR} vanished") from None
        digest = text[0].lower() if text else ""
        if not _HEX.match(digest):
            raise DataError(f"shard {name}: its sidecar {name}{SIDECAR} holds no hex sha256 digest "
                            f"(found {' '.join(text)[:80]!r})")
        table = read_shard(url, digest, STREAM_COLUMNS, self.source.storage_options)
        labels = table.column("label").to_numpy()
        domains = table.column("domain").to_numpy()
        if len(labels) and (labels.min() < -1 or labels.max() >= self.num_classes):
            raise DataError(f"shard {name}: labels {labels.min()}..{labels.max()} outside the data set's classes "
                            f"(-1 for unknown, 0..{self.num_classes - 1})")
        if len(domains) and (domains.min() < 0 or domains.max() >= self.num_domains):
            raise DataError(f"shard {name}: domains {domains.min()}..{domains.max()} outside the data set's "
                            f"0..{self.num_domains - 1}")
        return table, digest


def single_process(obj: Any) -> Any:
    """The broadcast of a world of one: rank 0's object is everyone's."""
    return obj


class PolledStream:
    """Every rank's side: the rows of the arrived shards, in arrival order, until the stream ends."""

    def __init__(self, source: PollSource, manifest: Manifest, rank: int,
                 broadcast: Callable[[Any], Any] = single_process, state: dict[str, Any] | None = None,
                 sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic) -> None:
        self.source, self.rank, self.broadcast, self.sleep = source, rank, broadcast, sleep
        state = state or {}
        self.arrivals = [Arrival(**a) for a in state.get("arrivals", [])]
        self.skipped = [Skip(**s) for s in state.get("skipped", [])]
        self.end: str | None = None
        seen = {a.name for a in self.arrivals} | {s.name for s in self.skipped}
        self.poller = ShardPoller(source, manifest, seen, clock) if rank == 0 else None

    def state_dict(self) -> dict[str, Any]:
        return {"arrivals": [asdict(a) for a in self.arrivals], "skipped": [asdict(s) for s in self.skipped]}

    def rows(self) -> Iterator[dict[str, np.ndarray]]:
        for arrival in list(self.arrivals):  # a restored stream: what it had seen, in the same order
            yield self._read(arrival)
        while True:
            news = self.broadcast(self.poller.poll() if self.poller is not None else None)
            self.arrivals.extend(news.arrived)
            self.skipped.extend(news.skipped)
            for arrival in news.arrived:
                yield self._read(arrival)
            if news.end is not None:
                self.end = news.end
                return
            if not news.arrived and not news.skipped:
                self.sleep(self.source.interval_s)

    def _read(self, arrival: Arrival) -> dict[str, np.ndarray]:
        table = self.poller.cache.pop(arrival.name, None) if self.poller is not None else None
        if table is None:
            try:
                table = read_shard(storage.join(self.source.poll, arrival.name), arrival.sha256, STREAM_COLUMNS,
                                   self.source.storage_options)
            except DataError as exc:
                raise DataError(f"online.source: shard {arrival.name} arrived with sha256 {arrival.sha256} but "
                                f"cannot be read again as it was: {exc}") from None
        out = {name: table.column(name).to_numpy(zero_copy_only=False) for name in STREAM_COLUMNS}
        out["label"], out["domain"] = out["label"].astype(np.int64), out["domain"].astype(np.int64)
        out["shard"] = np.full(table.num_rows, arrival.name, dtype=object)
        return out
