"""Downstream sets beyond the held-out split (`eval.downstream`): other data sets, other domains, held-out classes,
each evaluated with the every-chunk protocols on the frozen backbone after every chunk.

    sets = resolve_downstream(spec)          # before training: a missing URL or split is a SpecError naming it
    metrics = evaluate_downstream(backbone, loaded, eval_spec, seed=0)   # {"<set>.knn_top1": ..., ...}

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
from orchestrator.data.manifest import Manifest, load_manifest
from orchestrator.errors import SpecError


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


def resolve_downstream(spec, progress: bool = False) -> tuple[DownstreamSet, ...]:
    """Every `eval.downstream` entry as shards with a manifest; ImageFolder trees are prepared first (once)."""
    resolved = []
    for i, entry in enumerate(spec.eval.downstream):
        where = f"eval.downstream[{i}] ({entry.name!r})"
        url, options = entry.url, entry.storage_options
        if not storage.exists(storage.join(url, "manifest.json"), options):
            local = url[len("file://"):] if url.startswith("file://") else url
            if "://" in local or not _is_imagefolder(local):
                raise SpecError(f"{where}.url: {url!r} holds neither prepared shards (no manifest.json) nor an "
                                "ImageFolder tree (class folders of images)")
            from orchestrator.data.prepare import prepare_imagefolder

            url, options = str(spec.workdir / "downstream" / entry.name), {}
            if not storage.exists(storage.join(url, "manifest.json"), options):
                prepare_imagefolder(local, url, progress=progress)
        manifest = load_manifest(url, storage_options=options)
        for field, split in (("train_split", entry.train_split), ("eval_split", entry.eval_split)):
            if split not in manifest.splits:
                raise SpecError(f"{where}.{field}: split {split!r} is not in {url}; it has {sorted(manifest.splits)}")
        resolved.append(DownstreamSet(entry.name, url, manifest, entry.train_split, entry.eval_split, options,
                                      entry.max_train_per_class))
    return tuple(resolved)


def evaluate_downstream(backbone, loaded: dict[str, tuple[Any, Any]], eval_spec: dict[str, Any], *,
                        seed: int = 0, device: str = "cpu") -> dict[str, float]:
    """`{set}.{protocol}_top1` (and `_top5`) for every loaded set: `loaded[name] = (bank, queries)` SplitArrays."""
    from orchestrator.evaluation import protocol_scores

    out: dict[str, float] = {}
    for name, (bank, queries) in loaded.items():
        for key, value in protocol_scores(backbone, bank, queries, eval_spec, seed=seed, device=device).items():
            out[f"{name}.{key}"] = value
    return out
