"""Class-balanced, seeded label-fraction subsets of a training split (the 1% / 10% semi-supervised protocols).

Usage::

    from evaluators.label_subsets import check_disjoint, label_subset
    subset = label_subset(train_labels, fraction=0.1, seed=0)        # subset.indices: sorted int64 rows
    check_disjoint(subset, val_keys, subset_keys=train_keys)         # ValueError naming the shared rows
    json.dump(subset.to_record(), f)                                 # the artifact the orchestrator logs
    images, labels = train_images[subset.indices], train_labels[subset.indices]

Rule: class ``c`` with ``n_c`` rows contributes ``max(1, floor(fraction * n_c + 0.5))`` rows (round half up, so
1% of 150 rows is 2, and at least one row so every class stays in the label space), drawn without replacement
by a NumPy generator seeded with ``seed`` (never the global RNG); classes are visited in increasing label order,
so a (labels, fraction, seed) triple always gives the same rows. SimCLR's and BYOL's 1%/10% ImageNet subsets are
fixed lists of files instead; this is the same protocol for any labelled split, with the list recorded.

The record holds the indices themselves and their SHA-256 (of the sorted indices as little-endian int64), so two
runs can be checked to have fine-tuned on the same rows without comparing lists.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch import Tensor

__all__ = ["LabelSubset", "check_disjoint", "check_fraction", "label_subset", "per_class_count"]

# Overlapping ids quoted in a disjointness error before "... and N more".
_QUOTED_OVERLAP = 10


@dataclass(frozen=True, eq=False)
class LabelSubset:
    """Chosen rows of a labelled split.

    ``indices``: read-only sorted int64 ``[M]`` rows of the split; ``class_counts`` / ``class_totals``: rows chosen
    / available per class label, in increasing label order.
    """

    fraction: float
    seed: int
    indices: np.ndarray
    class_counts: dict[int, int]
    class_totals: dict[int, int]

    @property
    def size(self) -> int:
        return int(self.indices.size)

    @property
    def sha256(self) -> str:
        """Hex SHA-256 of the sorted indices as little-endian int64 bytes."""
        return hashlib.sha256(self.indices.astype("<i8").tobytes()).hexdigest()

    def to_record(self, include_indices: bool = True) -> dict[str, Any]:
        """A JSON-able description; ``include_indices=False`` keeps only the hash (for very large splits)."""
        record: dict[str, Any] = {
            "fraction": self.fraction,
            "seed": self.seed,
            "rows": self.size,
            "split_rows": sum(self.class_totals.values()),
            "class_counts": {str(c): n for c, n in self.class_counts.items()},
            "class_totals": {str(c): n for c, n in self.class_totals.items()},
            "indices_sha256": self.sha256,
        }
        if include_indices:
            record["indices"] = self.indices.tolist()
        return record


def check_fraction(fraction: Any) -> float:
    """``fraction`` as a float in (0, 1]; a ValueError saying what was given otherwise."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float, np.integer, np.floating)):
        raise ValueError(f"fraction must be a number in (0, 1], got {fraction!r}")
    value = float(fraction)
    if not (math.isfinite(value) and 0.0 < value <= 1.0):
        raise ValueError(f"fraction must be in (0, 1] (e.g. 0.01 for 1% of the labels), got {fraction!r}")
    return value


def per_class_count(fraction: float, rows: int) -> int:
    """Rows a class of ``rows`` rows contributes at ``fraction``: round half up, at least 1, at most ``rows``."""
    return min(rows, max(1, math.floor(check_fraction(fraction) * rows + 0.5)))


def label_subset(labels: Tensor | np.ndarray | Sequence[int], fraction: float, seed: int = 0) -> LabelSubset:
    """Choose ``fraction`` of every class's rows of a split with ``[N]`` integer ``labels`` (see the module rule).

    Raises:
        ValueError: ``fraction`` outside (0, 1], a negative or bool ``seed``, labels that are not a non-empty 1-D
            integer array, or a negative (unknown) label, naming its row.
    """
    fraction = check_fraction(fraction)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    labels = _labels_array(labels)
    order = np.argsort(labels, kind="stable")
    classes, starts = np.unique(labels[order], return_index=True)
    rng = np.random.default_rng(int(seed))
    chosen, counts, totals = [], {}, {}
    for c, rows in zip(classes.tolist(), np.split(order, starts[1:])):
        take = per_class_count(fraction, rows.size)
        chosen.append(rng.choice(rows, size=take, replace=False))
        counts[int(c)], totals[int(c)] = take, int(rows.size)
    indices = np.sort(np.concatenate(chosen)).astype(np.int64)
    indices.flags.writeable = False
    return LabelSubset(fraction=fraction, seed=int(seed), indices=indices, class_counts=counts, class_totals=totals)


def check_disjoint(
    subset: LabelSubset | Iterable[Any],
    validation: Iterable[Any],
    *,
    subset_keys: Sequence[Any] | None = None,
) -> None:
    """Raise a ValueError naming the rows the fine-tuning subset shares with the validation set.

    Args:
        subset: a :class:`LabelSubset` or any iterable of row ids (ints or row keys).
        validation: the validation set's row ids, in the same id space as the subset's.
        subset_keys: the training split's row keys (``[N]``, aligned with the labels the subset was drawn from);
            given, the subset's indices are mapped to keys before the comparison, so a subset of the ``train``
            split can be checked against ``val`` keys (row indices of two splits are not comparable).
    """
    ids: Iterable[Any] = subset.indices.tolist() if isinstance(subset, LabelSubset) else subset
    if subset_keys is not None:
        keys = list(subset_keys)
        ids = list(ids)
        bad = [i for i in ids if not 0 <= int(i) < len(keys)]
        if bad:
            raise ValueError(f"subset row {bad[0]} is outside subset_keys (length {len(keys)})")
        ids = [keys[int(i)] for i in ids]
    chosen = {_plain(i) for i in ids}
    shared = sorted(chosen & {_plain(v) for v in validation}, key=lambda v: (str(type(v)), v))
    if shared:
        quoted = ", ".join(repr(v) for v in shared[:_QUOTED_OVERLAP])
        more = f" and {len(shared) - _QUOTED_OVERLAP} more" if len(shared) > _QUOTED_OVERLAP else ""
        raise ValueError(
            f"the fine-tuning subset shares {len(shared)} row(s) with the validation set: {quoted}{more}; "
            "draw the subset from a split that excludes the validation rows"
        )


def _plain(value: Any) -> Any:
    """NumPy and torch scalars as Python ones, so 3, np.int64(3) and tensor(3) compare equal in a set."""
    if isinstance(value, (np.generic, Tensor)):
        return value.item()
    return value


def _labels_array(labels: Tensor | np.ndarray | Sequence[int]) -> np.ndarray:
    if isinstance(labels, Tensor):
        labels = labels.detach().cpu().numpy()
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.size == 0:
        raise ValueError(f"labels must be a non-empty 1-D array [N], found shape {tuple(labels.shape)}")
    if labels.dtype == np.bool_ or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers, found {labels.dtype}")
    negative = np.flatnonzero(labels < 0)
    if negative.size:
        raise ValueError(
            f"labels must be >= 0 to draw a class-balanced subset: row {int(negative[0])} has "
            f"{int(labels[negative[0]])} ({negative.size} unlabelled row(s) in all)"
        )
    return labels.astype(np.int64, copy=False)

