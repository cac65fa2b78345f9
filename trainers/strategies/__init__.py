"""Continual strategies: which data a chunk trains on, how its weights start, and any state they carry.

A strategy has `training_chunks(t) -> list[int]`, `reset_weights_at(t) -> bool`, and `state_dict()` /
`load_state_dict()` for what goes into a checkpoint (replay buffers, importances, ...). Its records (class,
`Config`, needs) are in `trainers.registry.STRATEGY_REGISTRY`; `STRATEGIES` (name -> class) is a read-only view.
"""

from __future__ import annotations

from typing import Any

from trainers.strategies.joint import Joint, JointConfig
from trainers.strategies.sequential import Sequential, SequentialConfig


def build_strategy(name: str, **options: Any):
    """The strategy `name` with `options` validated (defaults filled in) by its record's `Config`."""
    from trainers.registry import STRATEGY_REGISTRY

    record = STRATEGY_REGISTRY.require(name)
    return record.build(**record.options(options))


def __getattr__(name: str) -> Any:
    if name == "STRATEGIES":  # resolved lazily: trainers.registry imports this package
        from trainers.registry import STRATEGY_REGISTRY

        return STRATEGY_REGISTRY.builders()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["STRATEGIES", "Joint", "JointConfig", "Sequential", "SequentialConfig", "build_strategy"]
