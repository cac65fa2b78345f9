"""Continual strategies: which data a chunk trains on, how its weights start, and any state they carry.

A strategy has `training_chunks(t) -> list[int]`, `reset_weights_at(t) -> bool`, and `state_dict()` /
`load_state_dict()` for what goes into a checkpoint (replay buffers, importances, ...).
"""

from trainers.strategies.joint import Joint
from trainers.strategies.sequential import Sequential

STRATEGIES = {"sequential": Sequential, "joint": Joint}


def build_strategy(name: str, **options):
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; known: {sorted(STRATEGIES)}")
    return STRATEGIES[name](**options)
