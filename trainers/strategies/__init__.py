"""Continual strategies: which data a chunk trains on, how its weights start, what the steps add, their state.

A line's strategy is a base (`sequential`, `joint`) and any aids (`replay`, `mas`, `lump`, `cassle`) written
`sequential+replay+mas`; `build_strategy` makes the `StrategyStack` of them (the protocol is in
`trainers.strategies.base`). Their records (class, `Config`) are in `trainers.registry.STRATEGY_REGISTRY`;
`STRATEGIES` (name -> class) is a read-only view.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from trainers.strategies.base import ChunkEnd, Strategy, StrategyStack
from trainers.strategies.cassle import CaSSLe, CaSSLeConfig
from trainers.strategies.joint import Joint, JointConfig
from trainers.strategies.lump import Lump, LumpConfig
from trainers.strategies.mas import MAS, MASConfig
from trainers.strategies.replay import Replay, ReplayConfig
from trainers.strategies.sequential import Sequential, SequentialConfig


def strategy_parts(name: str) -> list[str]:
    """'sequential+replay+mas' -> ['sequential', 'replay', 'mas']."""
    return [part.strip() for part in name.split("+")]


def build_strategy(name: str, options: Mapping[str, Mapping[str, Any]] | None = None) -> StrategyStack:
    """The line strategy `name` (`base+aid+...`), each part with its `options[part]` validated (defaults filled
    in) by its record's `Config`."""
    from trainers.registry import STRATEGY_REGISTRY

    options = options or {}
    parts = []
    for part in strategy_parts(name):
        record = STRATEGY_REGISTRY.require(part)
        parts.append(record.build(**record.options(options.get(part))))
    return StrategyStack(parts)


def __getattr__(name: str) -> Any:
    if name == "STRATEGIES":  # resolved lazily: trainers.registry imports this package
        from trainers.registry import STRATEGY_REGISTRY

        return STRATEGY_REGISTRY.builders()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["MAS", "STRATEGIES", "CaSSLe", "CaSSLeConfig", "ChunkEnd", "Joint", "JointConfig", "Lump", "LumpConfig",
           "MASConfig", "Replay", "ReplayConfig", "Sequential", "SequentialConfig", "Strategy", "StrategyStack",
           "build_strategy", "strategy_parts"]
