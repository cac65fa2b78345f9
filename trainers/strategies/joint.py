"""Joint training (JT): chunk t trains on the union of chunks 0..t — the offline reference ST is compared with.

With `from_scratch` (the default, as in the streaming-SSL studies) every chunk restarts from the random
initialisation, so JT of chunk t is exactly "train on everything seen so far"; without it, JT warm-starts from
chunk t-1's weights.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import Field

from trainers.config import ComponentConfig
from trainers.strategies.base import Strategy


class JointConfig(ComponentConfig):
    """Joint training's options (the spec's `strategy.joint` section)."""

    from_scratch: bool = Field(
        True, description="JT of chunk t restarts from random weights (the usual upper bound); false: warm start"
    )


@dataclass(frozen=True)
class Joint(Strategy):
    from_scratch: bool = JointConfig().from_scratch
    name = "joint"
    is_base = True

    def training_chunks(self, chunk: int) -> list[int]:
        return list(range(chunk + 1))

    def reset_weights_at(self, chunk: int) -> bool:
        return self.from_scratch and chunk > 0
