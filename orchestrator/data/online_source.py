"""A live online stream (`online.source`): a folder or bucket prefix polled for Parquet shards as they arrive.

    poller = ShardPoller(source, manifest)          # rank 0: lists the folder, verifies what has arrived
    news = poller.poll()                            # Poll(arrived=[Arrival...], skipped=[Skip...], end=None)
    stream = PolledStream(source, manifest, rank, broadcast)     # every rank
    for rows in stream.rows(): ...                  # numpy dicts (key, image bytes, label, domain, shard), in order

Arrival: `NAME.parquet` has arrived once its completion sidecar `NAME.parquet.sha256` is beside it; the sidecar
holds the hex sha256 of the shard's bytes (alone, or as `sha256sum` writes it). A producer writes the shard, then
the sidecar, so a shard still being uploaded is never read. An arrived shard is checked against its digest, the
shard schema (`orchestrator.data.shards`) and the data set's classes and domains.

Passing states are waited out: a sidecar caught empty or half-written (`sha256sum X > X.sha256` truncates the file
before it writes it), a shard or sidecar that vanished, or a digest that does not match the shard's bytes (the
sidecar was written before the upload was complete) is tried again, when the listing shows either file changed or
`interval_s` passed, until `grace_s` after the poller first saw the shard complete. Only what is still wrong then,
and what cannot change (labels or domains outside the data set, a digest-matching file that is not Parquet), is
*skipped*: named in a warning and in the stream's record (`Skip`), and the stream goes on. A shard whose bytes were
learned already under another name (same sha256) is skipped as a duplicate.

Order: shards are learned in the poll round that first saw them complete, and within a round by the sidecar's
modification time, then by name; one still within its grace does not hold the others back. A poll verifies shards
until one passes and returns it (rank 0 never reads a whole backlog before the first is learned; the next poll
follows at once). The stream ends when no shard has arrived for `stall_after_s` (`end="stalled"`) or the folder
holds the end marker (`end="ended"`), in both cases only once no shard is waiting out its grace.

Under DDP rank 0 alone lists and verifies; each round's news goes to every rank through `broadcast` (a gloo
`broadcast_object_list`), so all ranks read the same shards in the same order, each verifying the digest again.
`state_dict()` (the arrivals and skips so far) goes into the checkpoint. A restored stream trusts that record: it
reads only the shards (or the rest of the shard) at and after the row it resumes at (`rows(skip_rows)`), never
the ones learned already, which the producer may have deleted since; a needed shard that is gone is recorded as
skipped (or, when partly learned, cut to what was learned). It then polls on, ignoring every name and every digest
seen.
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
import pyarrow.parquet as pq

from orchestrator import storage
from orchestrator.data.manifest import Manifest
from orchestrator.data.shards import check_schema, read_shard, sha256_hex
from orchestrator.errors import DataError
from orchestrator.spec.online import PollSource

logger = logging.getLogger(__name__)

SIDECAR = ".sha256"
STREAM_COLUMNS = ("key", "image", "label", "domain")
_HEX = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class Arrival:
    name: str  # file name inside the polled folder
    sha256: str
    rows: int  # rows the stream takes from it


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


class _Passing(DataError):
    """A check that may pass later (the producer is still writing): tried again until the grace period ends."""


@dataclass
class _Waiting:
    first_seen: float  # the poller's clock when the shard first showed complete
    last_try: float
    signature: tuple  # the listing's (size, mtime) of shard and sidecar at the last try


def _mtime(info: dict[str, Any]) -> float:
    value = info.get("mtime", info.get("LastModified", info.get("updated", 0.0)))
    return value.timestamp() if hasattr(value, "timestamp") else float(value or 0.0)


def _signature(listing: dict[str, dict[str, Any]], name: str) -> tuple:
    return tuple((listing[n].get("size"), _mtime(listing[n])) if n in listing else None for n in (name, name + SIDECAR))


class ShardPoller:
    """Rank 0's side: what has arrived in the folder since the last poll, verified. `seen`: names decided already
    (learned or skipped); `digests`: sha256 -> name of the shards learned already (duplicates are skipped)."""

    def __init__(self, source: PollSource, manifest: Manifest, seen: set[str] | None = None,
                 clock: Callable[[], float] = time.monotonic, digests: dict[str, str] | None = None) -> None:
        self.source, self.clock = source, clock
        self.fs, self.root = storage.resolve(source.poll, source.storage_options)
        self.num_classes, self.num_domains = manifest.num_classes, len(manifest.domains)
        self.seen: set[str] = set(seen or ())
        self.digests: dict[str, str] = dict(digests or {})
        self.queue: list[str] = []  # complete, not yet decided, in the order first seen
        self.waiting: dict[str, _Waiting] = {}  # of the queue, those tried and waiting out their grace
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

    def listed(self) -> set[str]:
        """The file names in the folder now."""
        return set(self._listing())

    def poll(self) -> Poll:
        listing = self._listing()
        queued = set(self.queue)
        fresh = [n for n in listing if n.endswith(".parquet") and n + SIDECAR in listing
                 and n not in self.seen and n not in queued]
        fresh.sort(key=lambda n: (_mtime(listing[n + SIDECAR]), n))
        self.queue.extend(fresh)
        news, now = Poll(), self.clock()
        for name in list(self.queue):
            signature, waiting = _signature(listing, name), self.waiting.get(name)
            if (waiting is not None and signature == waiting.signature and now - waiting.last_try < self.source.interval_s
                    and now - waiting.first_seen < self.source.grace_s):
                continue  # neither file changed since the last try: the same answer
            try:
                if None in signature:
                    raise _Passing(f"shard {name}: {'it' if signature[0] is None else 'its sidecar'} vanished "
                                   "from the folder")
                table, digest = self._verify(name)
            except _Passing as exc:
                first = waiting.first_seen if waiting is not None else now
                if now - first < self.source.grace_s:
                    if waiting is None:
                        logger.info("online.source: shard %s not ready (%s); trying again for up to %gs",
                                    name, exc, self.source.grace_s)
                    self.waiting[name] = _Waiting(first, now, signature)
                    continue
                self._skip(news, name, f"{exc} (still after the {self.source.grace_s:g}s grace period)")
                continue
            except DataError as exc:
                self._skip(news, name, str(exc))
                continue
            if digest in self.digests:
                self._skip(news, name, f"shard {name}: a duplicate of {self.digests[digest]} (the same bytes, "
                                       f"sha256 {digest}), learned once")
                continue
            self._decide(name)
            self.digests[digest] = name
            self.cache[name] = table
            news.arrived.append(Arrival(name, digest, table.num_rows))
            break  # yield it before verifying the next
        if fresh or news.arrived or news.skipped:  # a shard that failed its checks still shows the producer is alive
            self.last_arrival = now
        if not self.queue and not news.arrived and not news.skipped:
            if self.source.end_marker in listing:
                news.end = "ended"
            elif now - self.last_arrival >= self.source.stall_after_s:
                news.end = "stalled"
        return news

    def _decide(self, name: str) -> None:
        self.queue.remove(name)
        self.waiting.pop(name, None)
        self.seen.add(name)

    def _skip(self, news: Poll, name: str, reason: str) -> None:
        self._decide(name)
        logger.warning("online.source: skipped shard %s: %s", name, reason)
        news.skipped.append(Skip(name, reason))

    def _verify(self, name: str) -> tuple[pa.Table, str]:
        url = storage.join(self.source.poll, name)
        try:
            text = storage.fetch(url + SIDECAR, self.source.storage_options).decode("ascii", "replace").split()
        except FileNotFoundError:
            raise _Passing(f"shard {name}: its sidecar {name}{SIDECAR} vanished") from None
        digest = text[0].lower() if text else ""
        if not _HEX.match(digest):
            raise _Passing(f"shard {name}: its sidecar {name}{SIDECAR} holds no hex sha256 digest "
                           f"(found {' '.join(text)[:80]!r})")
        try:
            data = storage.fetch(url, self.source.storage_options)
        except FileNotFoundError:
            raise _Passing(f"shard {name}: vanished") from None
        found = sha256_hex(data)
        if found != digest:
            raise _Passing(f"shard {name}: sha256 mismatch (sidecar {digest}, found {found})")
        try:
            parquet = pq.ParquetFile(pa.BufferReader(data))
            check_schema(parquet.schema_arrow, STREAM_COLUMNS, name)
            table = parquet.read(columns=list(STREAM_COLUMNS))
        except (pa.ArrowException, OSError) as exc:
            raise DataError(f"shard {name}: not a readable Parquet file: {exc}") from None
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
        self.reads = 0  # shards this rank read (a restored stream reads only those it still needs)
        seen = {a.name for a in self.arrivals} | {s.name for s in self.skipped}
        digests = {a.sha256: a.name for a in self.arrivals}
        self.poller = ShardPoller(source, manifest, seen, clock, digests) if rank == 0 else None

    def state_dict(self) -> dict[str, Any]:
        return {"arrivals": [asdict(a) for a in self.arrivals], "skipped": [asdict(s) for s in self.skipped]}

    def rows(self, skip_rows: int = 0) -> Iterator[dict[str, np.ndarray]]:
        """The stream's rows from row `skip_rows` on (a restored stream: the rows learned before are not read)."""
        yield from self._restored(skip_rows)
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

    def _restored(self, skip_rows: int) -> Iterator[dict[str, np.ndarray]]:
        """The arrivals recorded before a restart, from row `skip_rows` on; rank 0 says which are gone."""
        offsets = np.cumsum([0] + [a.rows for a in self.arrivals])
        needed = [i for i, a in enumerate(self.arrivals) if a.rows and offsets[i + 1] > skip_rows]
        if not needed:
            return
        gone = None
        if self.poller is not None:
            listed = self.poller.listed()
            gone = [i for i in needed if self.arrivals[i].name not in listed]
        gone = set(self.broadcast(gone))
        for i in needed:
            arrival, learned = self.arrivals[i], max(0, skip_rows - int(offsets[i]))
            if i in gone:
                # Deleted by the producer before the stream had learned it all: what was learned stays recorded.
                reason = (f"shard {arrival.name}: deleted from the folder before it was learned"
                          + (f" (after {learned} of its {arrival.rows} rows)" if learned else ""))
                logger.warning("online.source: %s; the stream goes on without it", reason)
                self.arrivals[i] = Arrival(arrival.name, arrival.sha256, learned)
                self.skipped.append(Skip(arrival.name, reason))
                continue
            rows = self._read(arrival)
            yield {k: v[learned:] for k, v in rows.items()} if learned else rows
        self.arrivals = [a for i, a in enumerate(self.arrivals) if a.rows or i not in gone]

    def _read(self, arrival: Arrival) -> dict[str, np.ndarray]:
        self.reads += 1
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
