"""RALS's selection log: how much of what RALS chose came from the new stream batch.

    log = SelectionLog()
    log.add_batch([0.6, 0.4, 0.3])   # one stream batch: the new share of the rows chosen at each of its steps
    log.last, log.running_mean       # that batch's mean; the mean over the last 100 batches
    log.profile                      # per local step index, the mean over every batch (the paper's Fig. 3b)
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from typing import Any


class SelectionLog:
    """Per stream batch, the mean new_fraction of its steps; `running_mean` over the last `window` (100) batches.

    And the selection profile: per local step index (0 = a batch's first step), the mean new_fraction over every
    batch learned (`profile`, what the paper's Fig. 3b plots: how the choice moves from the new batch to the
    memory along a batch's cycle), which the per-batch means average away."""

    def __init__(self, window: int = 100) -> None:
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window!r}")
        self._batches: deque[float] = deque(maxlen=window)
        self._step_sums: list[float] = []  # per local step index: sum of its fractions, and how many
        self._step_counts: list[int] = []

    def add_batch(self, fractions: Iterable[float]) -> float:
        """Record one stream batch's per-step fractions (position i = the batch's local step i); returns their
        mean."""
        values = [float(f) for f in fractions]
        if not values:
            raise ValueError("add_batch needs at least one step's fraction")
        mean = sum(values) / len(values)
        self._batches.append(mean)
        grow = len(values) - len(self._step_sums)
        if grow > 0:
            self._step_sums += [0.0] * grow
            self._step_counts += [0] * grow
        for i, value in enumerate(values):
            self._step_sums[i] += value
            self._step_counts[i] += 1
        return mean

    @property
    def last(self) -> float | None:
        return self._batches[-1] if self._batches else None

    @property
    def running_mean(self) -> float | None:
        return sum(self._batches) / len(self._batches) if self._batches else None

    @property
    def profile(self) -> list[float]:
        """Mean new_fraction at each local step index, over every batch that reached that step."""
        return [total / count for total, count in zip(self._step_sums, self._step_counts)]

    def __len__(self) -> int:
        return len(self._batches)

    def state_dict(self) -> dict[str, Any]:
        return {"window": self._batches.maxlen, "batches": list(self._batches), "step_sums": list(self._step_sums),
                "step_counts": list(self._step_counts)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._batches = deque(state["batches"], maxlen=state["window"])
        # (a checkpoint from before the profile has none: it starts empty)
        self._step_sums = list(state.get("step_sums", []))
        self._step_counts = list(state.get("step_counts", []))


__all__ = ["SelectionLog"]
