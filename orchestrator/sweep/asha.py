"""ASHA whose rungs start with what earlier attempts of the sweep recorded.

Tune's own restore rebuilds the rungs only from its experiment folder, and a resumed sweep is a new Tuner (see
`orchestrator.sweep.driver`); without this, the first trials after a resume would face empty rungs and never be
stopped. The recorded trials enter each rung they reached with the value they had there, as if they had run.
"""

from __future__ import annotations

from types import SimpleNamespace

from ray.tune.schedulers import ASHAScheduler


class RefilledASHA(ASHAScheduler):
    def __init__(self, *, metric: str, mode: str, recorded: list[tuple[str, list[tuple[int, float]]]], **options):
        """`recorded`: (name, [(chunk, metric), ...]) of every trial run before; chunk c is Tune's iteration c + 1
        (a trial reports once per chunk)."""
        super().__init__(metric=metric, mode=mode, **options)
        for name, history in recorded:
            past = SimpleNamespace(trial_id=f"recorded:{name}")
            bracket = self._brackets[0]
            for chunk, value in history:
                bracket.on_result(past, chunk + 1, self._metric_op * value)


__all__ = ["RefilledASHA"]
