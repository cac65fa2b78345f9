"""Data factors of the study: pre-train on a class-subsampled share of the data, or with coarser labels.

    kept = kept_classes(chunk_classes, fraction=0.3, seed=0)   # bool per class: the classes training keeps
    label_map = group_label_map(manifest)                      # class id -> coarse group id (the manifest's groups)

`data.class_fraction` keeps a seeded share of each chunk's classes (at least one per chunk) and drops the other
classes' rows from training, while every chunk still trains as many steps as its full version would (the reader
cycles the kept rows), so only the label diversity falls, not the number of iterations. Evaluation is unchanged: the
held-out tasks keep all their classes, which measures how the representation reaches classes it never saw.
`data.labels: group` makes supervised methods train on the coarse groups instead of the classes (SSL methods ignore
labels), to compare SL and SSL as labels get poorer.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from orchestrator.errors import SpecError


def kept_classes(chunk_classes: Sequence[Sequence[int]], num_classes: int, fraction: float, seed: int) -> np.ndarray:
    """Which classes training keeps (bool [num_classes]): `round(fraction x n)` of each chunk's n classes, at least
    one, drawn with a generator seeded by `seed`. Chunks that share their classes (instance and domain streams hold
    every class) draw once from the union, so the kept set is one set for the whole stream."""
    if not 0 < fraction <= 1:
        raise SpecError(f"data.class_fraction must be in (0, 1], got {fraction!r}")
    kept = np.zeros(num_classes, dtype=bool)
    rng = np.random.default_rng(np.random.SeedSequence([seed, 7919]))  # its own stream: the cut stays the same
    seen: set[tuple[int, ...]] = set()
    for classes in chunk_classes:
        classes = tuple(sorted(classes))
        if classes in seen or not classes:
            continue
        seen.add(classes)
        take = max(1, int(round(fraction * len(classes))))
        kept[rng.choice(np.asarray(classes, dtype=np.int64), size=take, replace=False)] = True
    return kept


def group_label_map(manifest) -> np.ndarray:
    """int64 [num_classes]: the coarse group of every class, for `data.labels: group`; a SpecError naming the field
    when a class has no group."""
    groups = np.array([c.group for c in manifest.classes], dtype=np.int64)
    missing = [c.name for c in manifest.classes if c.group < 0]
    if missing:
        raise SpecError(f"data.labels: group trains on the manifest's coarse groups, but {len(missing)} classes have "
                        f"none (e.g. {missing[:3]}); prepare the data with --groups, or use data.labels: class")
    return groups
