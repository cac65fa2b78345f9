"""Sequential training (ST): chunk t trains on chunk t only, starting from chunk t-1's weights."""

from __future__ import annotations

from dataclasses import dataclass

from trainers.config import ComponentConfig
from trainers.strategies.base import Strategy


class SequentialConfig(ComponentConfig):
    """Sequential training takes no options."""


@dataclass(frozen=True)
class Sequential(Strategy):
    name = "sequential"
    is_base = True

    def training_chunks(self, chunk: int) -> list[int]:
        return [chunk]

    def reset_weights_at(self, chunk: int) -> bool:
        return False
