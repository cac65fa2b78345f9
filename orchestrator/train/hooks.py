"""What a caller of the experiment driver can hang on it: how a sweep trial runs the same driver as `streamssl run`.

    hooks = DriverHooks(parent_tags={PARENT: trial_run}, run_prefix="trial-003/", on_score=report)
    run_experiment(spec, hooks=hooks)   # report(0, {"knn_top1": 0.41, ...}) once every line's chunk 0 is evaluated

`on_score(index, metrics, final)` is called once per chunk (or online segment), in order, with each headline metric
averaged over the plan's lines, as soon as the last line's evaluation of that index is logged; `final` says it is
the plan's last (nothing is left to train after it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable


class TrialStopped(BaseException):
    """Raised through the driver when whoever consumes the scores stops the run early (ASHA). A BaseException, so
    the driver's failure handling does not mark the runs FAILED: the sweep records them as stopped."""


@dataclass
class DriverHooks:
    parent_tags: dict[str, str] = field(default_factory=dict)  # extra tags of the plan run (its MLflow parent)
    run_prefix: str = ""  # before every run name of the plan ("trial-003/"), so trials' runs tell apart
    on_score: Callable[[int, dict[str, float], bool], None] | None = None
    _scores: dict[int, dict[str, dict[str, float]]] = field(default_factory=dict)
    _final: set[int] = field(default_factory=set)
    _next: int = 0

    def scored(self, line: str, index: int, metrics: dict[str, float], lines: list[str], final: bool) -> None:
        """Line `line`'s headline metrics at chunk (segment) `index`; `lines` are the lines still training."""
        if self.on_score is None:
            return
        self._scores.setdefault(index, {})[line] = dict(metrics)
        if final:
            self._final.add(index)
        while self._next in self._scores and set(lines) <= set(self._scores[self._next]):
            by_line = [self._scores[self._next][name] for name in lines]
            keys = set.intersection(*(set(m) for m in by_line)) if by_line else set()
            mean = {key: sum(m[key] for m in by_line) / len(by_line) for key in sorted(keys)}
            index, self._next = self._next, self._next + 1
            self.on_score(index, mean, index in self._final)


__all__ = ["DriverHooks", "TrialStopped"]
