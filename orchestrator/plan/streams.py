"""Stream plans: which rows of the training index make up each chunk, deterministically from (kind, chunks, seed).

    from orchestrator.plan import streams
    from orchestrator.data.manifest import load_manifest
    from orchestrator.data.shards import read_index
    manifest = load_manifest(url)
    index = read_index(url, "train")                      # key, label, group, domain
    plan = streams.make_plan(index, manifest, "distant_class", num_chunks=3, seed=0)
    chunk0 = plan.select(index, [0])                              # rows of chunk 0
    joint = plan.select(index, [0, 1])                            # joint training up to chunk 1
    on_task = plan.task_mask(1, val_labels, val_domains)         # evaluation rows of task 1

Kinds (`STREAM_REGISTRY`, one record each):
- ``instance``: the rows (sorted by key) in a seeded random order, cut into near-equal chunks; every chunk
  draws from the same distribution (mild shift), so every evaluation row belongs to every task;
- ``random_class``: the classes in a seeded random order, cut into near-equal sets, one per chunk;
- ``distant_class``: whole coarse groups per chunk (groups in a seeded order dealt round-robin), so no two
  chunks share a group: consecutive chunks are semantically far apart. Needs at least as many groups as chunks;
- ``domain``: the domains in a seeded order, cut into near-equal sets. Needs at least as many domains as chunks;
- ``online``: T tasks learned as one stream of small batches (`online.order`: ``instance`` cuts the rows like
  ``instance``, ``class_incremental`` the classes like ``random_class``); the tasks are read one after another
  and cut into stream batches by the online reader (`orchestrator.train.online_runner`).

A plan is small and picklable (label/domain lookup tables, or 8-byte key hashes for ``instance``), so Ray
tasks can filter batches with ``plan.select`` or ``plan.chunk_of``. ``plan.digest`` identifies the exact
per-row assignment: the same data, kind, chunks and seed always give the same digest.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import pyarrow as pa

from orchestrator.data.manifest import Manifest
from orchestrator.errors import DataError, SpecError
from orchestrator.plan.data_factors import kept_classes
from trainers.config import ComponentConfig
from trainers.records import Record, Registry

_DIGEST_VERSION = "streamssl-stream-plan-v1"


@dataclass(frozen=True)
class ChunkSpec:
    """One chunk: the classes and domains it holds and its row count in the training index."""

    index: int
    classes: tuple[int, ...]
    domains: tuple[int, ...]
    rows: int
    # Rows before `data.class_fraction` dropped classes from training: the steps are planned on these.
    unsampled_rows: int | None = None

    @property
    def planned_rows(self) -> int:
        return self.rows if self.unsampled_rows is None else self.unsampled_rows


def _column(table: pa.Table | Mapping[str, Any], name: str) -> Any:
    if isinstance(table, pa.Table):
        return table.column(name).to_numpy(zero_copy_only=False) if name != "key" else table.column(name)
    return table[name]


def _key_hashes(keys: pa.Array | pa.ChunkedArray | Sequence[str]) -> np.ndarray:
    """8-byte blake2b of each key as uint64: a compact, process-independent stand-in for the key string."""
    values = keys.to_pylist() if isinstance(keys, (pa.Array, pa.ChunkedArray)) else list(keys)
    return np.fromiter(
        (int.from_bytes(hashlib.blake2b(k.encode(), digest_size=8).digest(), "little") for k in values),
        dtype=np.uint64,
        count=len(values),
    )


class StreamPlan:
    """A deterministic split of a training index into chunks. Build it with :func:`make_plan`.

    Attributes: ``kind``, ``seed``, ``num_chunks``, ``chunks`` (tuple of ChunkSpec), ``digest`` (hex).
    """

    def __init__(
        self,
        kind: str,
        seed: int,
        chunks: Sequence[ChunkSpec],
        digest: str,
        *,
        unit_chunk: np.ndarray | None = None,
        key_hashes: np.ndarray | None = None,
        key_chunks: np.ndarray | None = None,
        assignment: pa.Table | None = None,
        trained_classes: np.ndarray | None = None,
    ):
        self.kind = kind
        self.seed = seed
        self.chunks = tuple(chunks)
        self.num_chunks = len(self.chunks)
        self.digest = digest
        # Class kinds: chunk per label; domain: chunk per domain; -1 for a unit in no chunk.
        self._unit_chunk = unit_chunk
        # Instance: sorted key hashes and the chunk of each.
        self._key_hashes = key_hashes
        self._key_chunks = key_chunks
        # (key, chunk) of the index the plan was made from; not pickled (see __getstate__).
        self._assignment = assignment
        # data.class_fraction: bool per class, the classes training keeps (None: all); rows of others are in no chunk.
        self.trained_classes = trained_classes

    def __getstate__(self) -> dict[str, Any]:
        # Ship the rule, not the row list: a plan pickled into Ray tasks stays a few bytes per row at most.
        state = dict(self.__dict__)
        state["_assignment"] = None
        return state

    def __repr__(self) -> str:
        return f"StreamPlan(kind={self.kind!r}, num_chunks={self.num_chunks}, seed={self.seed}, digest={self.digest[:12]})"

    def chunk_of(self, table: pa.Table | Mapping[str, np.ndarray]) -> np.ndarray:
        """Chunk of every row (int64 [N]); -1 where the row is in no chunk.

        `table`: a pyarrow Table or a dict of columns (Ray Data's numpy batches). Needs ``key`` for instance
        plans, ``label`` for class plans, ``domain`` for domain plans.
        """
        if self.kind == "instance":
            hashes = _key_hashes(_column(table, "key"))
            pos = np.minimum(np.searchsorted(self._key_hashes, hashes), len(self._key_hashes) - 1)
            found = self._key_hashes[pos] == hashes
            chunks = np.where(found, self._key_chunks[pos], -1).astype(np.int64)
        else:
            values = np.asarray(_column(table, "domain" if self.kind == "domain" else "label"), dtype=np.int64)
            inside = (values >= 0) & (values < len(self._unit_chunk))
            chunks = np.where(inside, self._unit_chunk[np.clip(values, 0, len(self._unit_chunk) - 1)], -1)
            chunks = chunks.astype(np.int64)
        if self.trained_classes is not None:
            labels = np.asarray(_column(table, "label"), dtype=np.int64)
            known = (labels >= 0) & (labels < len(self.trained_classes))
            chunks[~(known & self.trained_classes[np.clip(labels, 0, len(self.trained_classes) - 1)])] = -1
        return chunks

    def select(self, table: pa.Table | Mapping[str, np.ndarray], chunks: Sequence[int]):
        """Rows that belong to any of `chunks`, in their original order (same type as `table`)."""
        wanted = np.asarray(list(chunks), dtype=np.int64)
        bad = wanted[(wanted < 0) | (wanted >= self.num_chunks)]
        if len(bad):
            raise ValueError(f"chunks {bad.tolist()} out of range 0..{self.num_chunks - 1}")
        keep = np.isin(self.chunk_of(table), wanted)
        if isinstance(table, pa.Table):
            return table.filter(pa.array(keep))
        return {name: np.asarray(col)[keep] for name, col in table.items()}

    def task_mask(self, task: int, labels: np.ndarray, domains: np.ndarray) -> np.ndarray:
        """Which evaluation rows belong to task `task` (bool [N]).

        Class kinds: label among the chunk's classes; domain: domain among the chunk's domains; instance: every
        row, since instance chunks share one distribution.
        """
        if not 0 <= task < self.num_chunks:
            raise ValueError(f"task {task} out of range 0..{self.num_chunks - 1}")
        labels, domains = np.asarray(labels), np.asarray(domains)
        if self.kind == "instance":
            return np.ones(len(labels), dtype=bool)
        if self.kind == "domain":
            return np.isin(domains, self.chunks[task].domains)
        return np.isin(labels, self.chunks[task].classes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able description (what the orchestrator records as an artifact)."""
        return {
            "kind": self.kind,
            "seed": self.seed,
            "num_chunks": self.num_chunks,
            "digest": self.digest,
            "chunks": [
                {"index": c.index, "classes": list(c.classes), "domains": list(c.domains), "rows": c.rows,
                 **({} if c.unsampled_rows is None else {"unsampled_rows": c.unsampled_rows})}
                for c in self.chunks
            ],
            **({} if self.trained_classes is None
               else {"trained_classes": np.flatnonzero(self.trained_classes).tolist()}),
        }

    def assignment_table(self, index: pa.Table | None = None) -> pa.Table:
        """(key string, chunk int64) for every row of the training index, sorted by key.

        A plan from make_plan holds its index's assignment; a pickled copy does not (it carries the rule only),
        so pass the index to compute it there.
        """
        if index is not None:
            keys = index.column("key")
            table = pa.table({"key": keys, "chunk": pa.array(self.chunk_of(index), pa.int64())})
            return table.sort_by("key")
        if self._assignment is None:
            raise ValueError("this plan was unpickled without its row assignment: pass the index, "
                             "assignment_table(index)")
        return self._assignment


def _plan_digest(kind: str, seed: int, num_chunks: int, keys: Sequence[str], chunks: np.ndarray) -> str:
    """sha256 over kind, seed, chunk count and every (key, chunk), keys sorted."""
    h = hashlib.sha256(f"{_DIGEST_VERSION}\nkind={kind}\nseed={seed}\nchunks={num_chunks}\n".encode())
    for key, chunk in zip(keys, chunks.tolist()):
        h.update(f"{key}\t{chunk}\n".encode())
    return h.hexdigest()


def _too_many(kind: str, num_chunks: int, units: int, unit: str, units_name: str, hint: str = "") -> SpecError:
    return SpecError(
        f"stream.chunks is {num_chunks}, but a {kind} stream needs at least one {unit} per chunk and there "
        f"are only {units} {units_name}{hint}"
    )


@dataclass(frozen=True)
class _Units:
    """What a kind's partition reads: every row's label and domain (index sorted by key), the manifest, the rng."""

    labels: np.ndarray
    domains: np.ndarray
    manifest: Manifest
    rng: np.random.Generator

    @property
    def all_classes(self) -> tuple[int, ...]:
        return tuple(range(self.manifest.num_classes))

    @property
    def all_domains(self) -> tuple[int, ...]:
        return tuple(range(len(self.manifest.domains)))


@dataclass(frozen=True)
class _Partition:
    """A kind's cut: the chunk of every row, of every class/domain (None when rows are the unit), and per chunk
    the (classes, domains) it holds."""

    row_chunk: np.ndarray
    unit_chunk: np.ndarray | None
    units: list[tuple[tuple[int, ...], tuple[int, ...]]]


def _instance_partition(data: _Units, num_chunks: int) -> _Partition:
    rows = len(data.labels)
    if num_chunks > rows:
        raise _too_many("instance", num_chunks, rows, "row", "rows")
    row_chunk = np.empty(rows, dtype=np.int64)
    for c, part in enumerate(np.array_split(data.rng.permutation(rows), num_chunks)):
        row_chunk[part] = c
    return _Partition(row_chunk, None, [(data.all_classes, data.all_domains)] * num_chunks)


def _by_class(parts: list[np.ndarray], data: _Units) -> _Partition:
    unit_chunk = np.full(data.manifest.num_classes, -1, dtype=np.int64)
    for c, part in enumerate(parts):
        unit_chunk[part] = c
    units = [(tuple(int(x) for x in p), data.all_domains) for p in parts]
    return _Partition(unit_chunk[data.labels], unit_chunk, units)


def _random_class_partition(data: _Units, num_chunks: int) -> _Partition:
    num_classes = data.manifest.num_classes
    if num_chunks > num_classes:
        raise _too_many("random_class", num_chunks, num_classes, "class", "classes")
    return _by_class([np.sort(p) for p in np.array_split(data.rng.permutation(num_classes), num_chunks)], data)


def _distant_class_partition(data: _Units, num_chunks: int) -> _Partition:
    manifest = data.manifest
    if not manifest.groups:
        raise DataError(
            f"data set {manifest.name!r} has no coarse groups, which a distant_class stream needs: "
            "prepare it with --groups FILE (or use streamssl data synth)"
        )
    num_groups = len(manifest.groups)
    if num_chunks > num_groups:
        raise _too_many("distant_class", num_chunks, num_groups, "group", "groups",
                        " (make more with `streamssl data synth --groups N`, or a groups file with more groups)")
    class_group = np.array([c.group for c in manifest.classes], dtype=np.int64)
    chunk_of_group = np.empty(num_groups, dtype=np.int64)
    chunk_of_group[data.rng.permutation(num_groups)] = np.arange(num_groups) % num_chunks  # round-robin deal
    return _by_class([np.flatnonzero(chunk_of_group[class_group] == c) for c in range(num_chunks)], data)


def _domain_partition(data: _Units, num_chunks: int) -> _Partition:
    num_domains = len(data.manifest.domains)
    if num_chunks > num_domains:
        raise _too_many("domain", num_chunks, num_domains, "domain", "domains",
                        " (make more with `streamssl data synth --domains N`)")
    parts = [np.sort(p) for p in np.array_split(data.rng.permutation(num_domains), num_chunks)]
    unit_chunk = np.full(num_domains, -1, dtype=np.int64)
    for c, part in enumerate(parts):
        unit_chunk[part] = c
    return _Partition(unit_chunk[data.domains], unit_chunk, [(data.all_classes, tuple(int(x) for x in p))
                                                             for p in parts])


def _online_partition(data: _Units, num_chunks: int, order: str = "class_incremental") -> _Partition:
    """The tasks of an online stream: rows (`instance`) or classes (`class_incremental`) cut into T sets."""
    if order == "instance":
        return _instance_partition(data, num_chunks)
    if order == "class_incremental":
        return _random_class_partition(data, num_chunks)
    raise SpecError(f"online.order must be 'instance' or 'class_incremental', got {order!r}")


class StreamKindConfig(ComponentConfig):
    """Options of a stream kind (none of today's kinds has any; `stream.chunks` and `stream.seed` are common)."""


# The order is part of every plan: each kind's rng is seeded with its position here, so append, never reorder.
STREAM_REGISTRY = Registry("stream kind", [
    Record("instance", _instance_partition, StreamKindConfig,
           summary="rows in a seeded random order, cut into near-equal chunks (mild shift)"),
    Record("random_class", _random_class_partition, StreamKindConfig,
           summary="classes in a seeded random order, cut into near-equal sets, one per chunk"),
    Record("distant_class", _distant_class_partition, StreamKindConfig,
           summary="whole coarse groups per chunk: consecutive chunks are semantically far apart"),
    Record("domain", _domain_partition, StreamKindConfig,
           summary="domains in a seeded order, cut into near-equal sets, one per chunk"),
    Record("online", _online_partition, StreamKindConfig,
           summary="T tasks (by instance or by class, online.order) read as one stream of small batches"),
])
STREAM_KINDS = STREAM_REGISTRY.names


def make_plan(index: pa.Table, manifest: Manifest, kind: str, num_chunks: int, seed: int,
              class_fraction: float = 1.0, order: str = "class_incremental") -> StreamPlan:
    """Partition the rows of `index` (key, label, domain; usually the train split) into `num_chunks` chunks.

    `order` is the online kind's task order (`online.order`); the other kinds ignore it.

    `class_fraction` < 1 keeps that share of each chunk's classes for training (`orchestrator.plan.data_factors`): the
    other rows are in no chunk, and each chunk remembers its unsampled row count, on which its steps are planned.

    Raises SpecError naming ``stream.kind`` / ``stream.chunks`` for an unknown kind or a chunk count the data
    cannot fill, and DataError when the data lacks what the kind needs (groups) or a chunk would be empty.
    """
    if kind not in STREAM_REGISTRY:
        raise SpecError(f"stream.kind: {STREAM_REGISTRY.unknown(kind)}")
    if isinstance(num_chunks, bool) or not isinstance(num_chunks, (int, np.integer)) or num_chunks < 1:
        raise SpecError(f"stream.chunks must be an integer >= 1, got {num_chunks!r}")
    num_chunks = int(num_chunks)
    for column in ("key", "label", "domain"):
        if column not in index.column_names:
            raise ValueError(f"the index lacks column {column!r} (has {index.column_names})")
    index = index.sort_by("key")  # the plan never depends on the order the rows came in
    keys = index.column("key").to_pylist()
    if len(set(keys)) != len(keys):
        raise DataError("the index holds a key twice; stream plans need unique keys")
    labels = index.column("label").to_numpy(zero_copy_only=False).astype(np.int64)
    domains = index.column("domain").to_numpy(zero_copy_only=False).astype(np.int64)
    if len(keys) == 0:
        raise DataError("the index is empty: there is nothing to split into chunks")
    if labels.min() < 0 or labels.max() >= manifest.num_classes:
        raise DataError(f"index labels outside 0..{manifest.num_classes - 1}: the index is not from this manifest")
    if domains.min() < 0 or domains.max() >= len(manifest.domains):
        raise DataError(f"index domains outside 0..{len(manifest.domains) - 1}: the index is not from this manifest")
    rng = np.random.default_rng(np.random.SeedSequence([seed, STREAM_KINDS.index(kind)]))

    record = STREAM_REGISTRY.require(kind)
    units = _Units(labels, domains, manifest, rng)
    part = record.build(units, num_chunks, order=order) if kind == "online" else record.build(units, num_chunks)
    row_chunk, unit_chunk, specs_units = part.row_chunk, part.unit_chunk, part.units
    key_hashes = key_chunks = None
    if unit_chunk is None:  # rows, not classes or domains, are the unit: look rows up by key hash
        hashes = _key_hashes(keys)
        by_hash = np.argsort(hashes, kind="stable")
        key_hashes, key_chunks = hashes[by_hash], row_chunk[by_hash].astype(np.int32)  # 12 bytes a row
        if len(key_hashes) > 1 and np.any(key_hashes[1:] == key_hashes[:-1]):
            raise DataError("two keys of the index share a 64-bit hash; rename one (vanishingly rare)")

    trained = unsampled = None
    if class_fraction < 1:
        unsampled = np.bincount(row_chunk[row_chunk >= 0], minlength=num_chunks)
        trained = kept_classes([units[0] for units in specs_units], manifest.num_classes, class_fraction, seed)
        row_chunk = np.where(trained[labels], row_chunk, -1)
        if key_chunks is not None:
            key_chunks = row_chunk[by_hash].astype(np.int32)
    counts = np.bincount(row_chunk[row_chunk >= 0], minlength=num_chunks)
    empty = [c for c in range(num_chunks) if counts[c] == 0]
    if empty:
        raise DataError(f"{kind} stream with {num_chunks} chunks (seed {seed}): chunks {empty} hold no rows of the "
                        f"index ({len(keys)} rows); use fewer chunks (stream.chunks)")
    chunks = [
        ChunkSpec(index=c, classes=units[0], domains=units[1], rows=int(counts[c]),
                  unsampled_rows=None if unsampled is None else int(unsampled[c]))
        for c, units in enumerate(specs_units)
    ]
    digest = _plan_digest(kind, seed, num_chunks, keys, row_chunk)
    assignment = pa.table({"key": pa.array(keys, pa.string()), "chunk": pa.array(row_chunk, pa.int64())})
    return StreamPlan(kind, seed, chunks, digest, unit_chunk=unit_chunk, key_hashes=key_hashes,
                      key_chunks=key_chunks, assignment=assignment, trained_classes=trained)
