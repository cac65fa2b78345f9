"""Downstream sets beyond the held-out split (`eval.downstream`): other data sets, other domains, held-out classes,
each evaluated with the every-chunk protocols on the frozen backbone after every chunk
(`orchestrator.evaluate.evaluation.evaluate_downstream`).

    prepare_downstream(spec)                 # writes: ImageFolder entries become shards (once), a run's data step
    sets = resolve_downstream(spec)          # reads: a missing URL, preparation or split is an error naming it
    url, manifest = downstream_shards(url, {}, "streamssl-runs/downstream/pets", "--data", ["train", "val"])
    manifest = detection_downstream(url, {}, "--data", ["train", "val"])       # a detection set, prepared

An entry's `url` is a folder of prepared shards (manifest.json beside them) or an ImageFolder tree on local disk,
which is prepared once into `<storage.workdir>/downstream/<name>` (as `streamssl data prepare` would). Its own
train split is the kNN bank / linear probe's training set and its eval split the queries, so the classes need not
be the pre-training data's.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from orchestrator import storage
from orchestrator.data.detection_shards import DETECTION_MANIFEST_NAME, DetectionManifest, load_detection_manifest
from orchestrator.data.manifest import MANIFEST_NAME, Manifest, load_manifest
from orchestrator.data.prepare import prepare_imagefolder
from orchestrator.errors import DataError, SpecError


@dataclass(frozen=True)
class DownstreamSet:
    """A resolved `eval.downstream` entry: where its shards are and what they hold."""

    name: str
    url: str  # the shards (for an ImageFolder entry: where they were prepared)
    manifest: Manifest
    train_split: str
    eval_split: str
    storage_options: dict[str, Any]
    max_train_per_class: int | None


def _is_imagefolder(path: str) -> bool:
    return os.path.isdir(path) and any(os.path.isdir(os.path.join(path, entry)) for entry in os.listdir(path))


def _prepared_at(spec, entry) -> tuple[str | None, str, dict[str, Any]]:
    """(the ImageFolder tree or None, where the entry's shards are or will be, their storage options)."""
    url, options = entry.url, entry.storage_options
    if storage.exists(storage.join(url, "manifest.json"), options):
        return None, url, options
    local = url[len("file://"):] if url.startswith("file://") else url
    if "://" in local or not _is_imagefolder(local):
        where = f"eval.downstream[{spec.eval.downstream.index(entry)}] ({entry.name!r})"
        raise SpecError(f"{where}.url: {url!r} holds neither prepared shards (no manifest.json) nor an "
                        "ImageFolder tree (class folders of images)")
    return local, str(spec.workdir / "downstream" / entry.name), {}


def downstream_shards(url: str, storage_options: dict[str, Any], prepared_url: str, where: str,
                      splits: list[str]) -> tuple[str, Manifest]:
    """One downstream set outside a spec (`streamssl eval --data URL`): the prepared shards at `url`, or the
    ImageFolder tree at `url` prepared once into `prepared_url`; a SpecError naming `where` when `url` is neither
    or lacks one of `splits`."""
    if not storage.exists(storage.join(url, "manifest.json"), storage_options):
        local = url[len("file://"):] if url.startswith("file://") else url
        if "://" in local or not _is_imagefolder(local):
            raise SpecError(f"{where}: {url!r} holds neither prepared shards (no manifest.json) nor an ImageFolder "
                            "tree (class folders of images)")
        url, storage_options = prepared_url, {}
        if not storage.exists(storage.join(url, "manifest.json")):
            prepare_imagefolder(local, url, progress=False)
    manifest = load_manifest(url, storage_options=storage_options)
    _check_splits(manifest.splits, url, where, splits)
    return url, manifest


def _check_splits(present, url: str, where: str, wanted: list[str]) -> None:
    for split in wanted:
        if split not in present:
            raise SpecError(f"{where}: split {split!r} is not in {storage.redact(url)}; it has {sorted(present)}")


def detection_downstream(url: str, storage_options: dict[str, Any], where: str, splits: list[str]
                         ) -> DetectionManifest:
    """The manifest of the detection set prepared at `url` (`streamssl data prepare-detection`); a SpecError naming
    `where` when `url` holds no detection set (a classification set or a VOC/COCO tree say what to do) or lacks one
    of `splits`."""
    if not storage.exists(storage.join(url, DETECTION_MANIFEST_NAME), storage_options):
        if storage.exists(storage.join(url, MANIFEST_NAME), storage_options):
            what = "a classification set (manifest.json); detection and segmentation need boxes"
        else:
            what = f"no prepared detection set (no {DETECTION_MANIFEST_NAME})"
        raise SpecError(f"{where}: {storage.redact(url)} holds {what}. Prepare a VOC or COCO tree with "
                        "`streamssl data prepare-detection SRC DST --format voc|coco` and pass DST")
    manifest = load_detection_manifest(url, storage_options)
    _check_splits(manifest.splits, url, where, splits)
    return manifest


def prepare_downstream(spec, progress: bool = False) -> None:
    """Prepare every ImageFolder `eval.downstream` entry into `<storage.workdir>/downstream/<name>` (once)."""
    for entry in spec.eval.downstream:
        tree, url, options = _prepared_at(spec, entry)
        if tree is not None and not storage.exists(storage.join(url, "manifest.json"), options):
            prepare_imagefolder(tree, url, progress=progress)


def resolve_downstream(spec) -> tuple[DownstreamSet, ...]:
    """Every `eval.downstream` entry as shards with a manifest (read only: `prepare_downstream` writes them)."""
    resolved = []
    for i, entry in enumerate(spec.eval.downstream):
        where = f"eval.downstream[{i}] ({entry.name!r})"
        tree, url, options = _prepared_at(spec, entry)
        if tree is not None and not storage.exists(storage.join(url, "manifest.json"), options):
            raise DataError(f"{where}.url: the ImageFolder tree {tree} is not prepared yet (it would be at {url}); "
                            "`streamssl run` prepares it before planning (a dry run writes nothing)")
        manifest = load_manifest(url, storage_options=options)
        for field, split in (("train_split", entry.train_split), ("eval_split", entry.eval_split)):
            if split not in manifest.splits:
                raise SpecError(f"{where}.{field}: split {split!r} is not in {url}; it has {sorted(manifest.splits)}")
        resolved.append(DownstreamSet(entry.name, url, manifest, entry.train_split, entry.eval_split, options,
                                      entry.max_train_per_class))
    return tuple(resolved)
