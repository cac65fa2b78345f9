"""From a validated spec to the experiment plan: data, stream plan, lines and jobs, each with a stable key.

    plan = build_plan(spec)          # reads the manifest (`orchestrator.data.materialise` made the data first)
    for job in plan.jobs: ...        # one job per (line, chunk); job.key is the same on every re-run

A key hashes what decides the job's numbers (spec identity, data digest, stream-plan digest, line, chunk), so a
re-run with `--resume` recognises finished jobs, and a changed spec or data set never reuses them.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from orchestrator import storage
from orchestrator.data.downstream import DownstreamSet, resolve_downstream
from orchestrator.data.manifest import Manifest, load_manifest
from orchestrator.data.shards import read_index
from orchestrator.errors import DataError, SpecError
from orchestrator.plan.data_factors import group_label_map
from orchestrator.plan.streams import StreamPlan, make_plan
from orchestrator.spec.experiment import Spec, identity_digest
from trainers.registry import METHOD_REGISTRY, STRATEGY_REGISTRY
from trainers.strategies import build_strategy
from trainers.strategies.buffer import RowBuffer


@dataclass(frozen=True)
class Line:
    method: str
    strategy: str

    @property
    def id(self) -> str:
        """`simclr-sequential`, `simclr-sequential-replay-mas`: usable in MLflow metric keys (no '+')."""
        return "-".join([self.method, *self.strategy.split("+")])


@dataclass(frozen=True)
class Job:
    line: Line
    chunk: int
    training_chunks: tuple[int, ...]
    key: str

    @property
    def name(self) -> str:
        return f"{self.line.id}/chunk-{self.chunk}"


@dataclass
class ExperimentPlan:
    spec: Spec
    data_url: str
    manifest: Manifest
    stream: StreamPlan
    lines: list[Line]
    jobs: list[Job]
    key: str  # identifies the whole plan (parent MLflow run)
    downstream: tuple[DownstreamSet, ...] = ()  # eval.downstream, resolved to shards
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def data_digest(self) -> str:
        return self.manifest.digest

    def jobs_of(self, line: Line) -> list[Job]:
        return [j for j in self.jobs if j.line == line]


def _digest(*parts: str) -> str:
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:16]


def read_manifest(spec: Spec) -> Manifest:
    """The manifest at data.url; a synthetic set not generated yet is a DataError saying what makes it."""
    url, options = spec.data.url, spec.data.storage_options
    if spec.data.synthetic is not None and not storage.exists(storage.join(url, "manifest.json"), options):
        raise DataError(f"{url}: the synthetic set (data.synthetic) is not generated yet; `streamssl run` generates "
                        "it before planning (a dry run writes nothing)")
    return load_manifest(url, storage_options=options)


def check_labels(spec: Spec, labels: np.ndarray) -> None:
    """A method that trains on labels needs every training row labelled, and room for every class id."""
    for method in spec.lines.method:
        if not METHOD_REGISTRY[method].needs_labels:
            continue
        unlabelled = int((labels < 0).sum())
        if unlabelled:
            raise SpecError(
                f"lines.method: {method} trains on labels, but {unlabelled} of {len(labels)} rows of "
                f"{spec.data.url} split {spec.data.train_split!r} have none (label -1); use a self-supervised method"
            )
        classes = spec.methods[method].get("num_classes")
        if classes is not None and len(labels) and int(labels.max()) >= classes:
            raise SpecError(
                f"methods.{method}.num_classes: {classes}, but the training split has label {int(labels.max())}; "
                f"set it to at least {int(labels.max()) + 1}"
            )


def check_strategies(spec: Spec, stream) -> None:
    """Strategy options the stream cannot satisfy, as SpecErrors before anything trains."""
    if stream.num_chunks < 2:
        return
    seen = sum(chunk.rows for chunk in stream.chunks[:-1])  # what a buffer can have taken in before the last chunk
    for name in spec.strategies_used:
        if not issubclass(STRATEGY_REGISTRY[name].build, RowBuffer):  # replay, lump: a buffer of past rows
            continue
        size = getattr(spec.strategy, name).size
        if size > seen:
            raise SpecError(
                f"strategy.{name}.size: {size} rows, but the stream delivers only {seen} rows "
                f"before its last chunk, so the buffer could never fill; use at most {seen}"
            )


def build_plan(spec: Spec) -> ExperimentPlan:
    """The plan of a spec whose data exists (`orchestrator.data.materialise` makes it): reads, never writes."""
    manifest = read_manifest(spec)
    for split in (spec.data.train_split, spec.data.eval_split):
        if split not in manifest.splits:
            raise DataError(
                f"{spec.data.url}: split {split!r} (data.train_split / data.eval_split) is not in the manifest; "
                f"it has {sorted(manifest.splits)}"
            )
    index = read_index(spec.data.url, spec.data.train_split, storage_options=spec.data.storage_options)
    labels = np.asarray(index.column("label").to_numpy())
    if spec.data.labels == "group":  # supervised lines train on the groups (every class needs one: a SpecError)
        labels = np.where(labels >= 0, group_label_map(manifest)[np.maximum(labels, 0)], -1)
    check_labels(spec, labels)
    stream = make_plan(index, manifest, spec.stream.kind, spec.stream.chunks, spec.stream.seed,
                       class_fraction=spec.data.class_fraction,
                       order=spec.online.order if spec.online is not None else "class_incremental")
    check_strategies(spec, stream)
    identity = identity_digest(spec)
    plan_key = _digest(identity, manifest.digest, stream.digest)
    lines = [Line(m, s) for m in spec.lines.method for s in spec.lines.strategy]
    jobs = []
    for line in lines:
        if spec.stream.kind == "online":  # one job: the whole stream (its segments are evaluated as it goes)
            jobs.append(Job(line, 0, tuple(range(stream.num_chunks)), _digest(plan_key, line.id, "online")))
            continue
        strategy = build_strategy(line.strategy)
        for t in range(stream.num_chunks):
            jobs.append(Job(line, t, tuple(strategy.training_chunks(t)), _digest(plan_key, line.id, str(t))))
    return ExperimentPlan(spec, spec.data.url, manifest, stream, lines, jobs, plan_key,
                          downstream=resolve_downstream(spec))
