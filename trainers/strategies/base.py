"""The strategy protocol, and a line's strategies composed into one.

A line has one *base* strategy (sequential or joint: which chunks it trains on, whether weights restart) and any
number of *aids* (replay, MAS, ...) that change batches, add losses or keep state. `Strategy` gives every hook a
no-op default, so each strategy implements only what it changes; `StrategyStack` calls them in order::

    stack = build_strategy("sequential+replay+mas", {"replay": {"size": 2000}, "mas": {"lambd": 1.0}})
    batch = stack.prepare_batch(batch, ctx)            # replay mixes buffer rows in
    views = make_view_set(batch.images, plan, generator)
    views, batch = stack.prepare_views(views, batch, ctx, augment)   # LUMP mixes buffer rows' views in
    out = train_step(..., extra_losses=stack.extra_losses(method))   # MAS penalty
    stack.after_step(batch_before_mixing, ctx)          # replay stages the new rows
    stack.on_chunk_end(context)                         # MAS importances, replay merges the staged rows

Modules: `modules(method, prepare)` gives the modules a strategy keeps beside the method (CaSSLe's predictor and
frozen copy). The trainer calls it whenever it (re)builds the model, optimises their trainable parameters with the
method's and checkpoints their weights once, like the method's (they must be the same on every rank); `prepare`
puts a module that trains on the device in its training form (its own DDP wrapper under torch.distributed, so a
module idle for a chunk does not stall the model's gradient reduction).

State: `state_dict()` is this rank's state; a checkpoint stores every rank's (gathered by the trainer), and
`load_state_dict(states, rank, world_size)` gets all of them, so a strategy whose state is sharded over ranks
(replay's buffer) can take back its own shard, or re-deal the union when the world size changed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from trainers.engine.types import Batch, StepContext, StepOutput, ViewSet

Augment = Callable[[Tensor], ViewSet]  # uint8 [B, 3, H, W] -> their views under the line's view plan


@dataclass
class ChunkEnd:
    """What `on_chunk_end` may use: the trained method, the chunk, its data again, and where to compute.

    `batches()` yields the chunk's training batches (this rank's shard, uint8 images) from the start of an epoch;
    `max_batches` bounds how many a strategy should read (MAS's importance estimate).
    """

    method: nn.Module
    chunk: int
    batches: Callable[[], Iterable[Batch]]
    device: torch.device
    rank: int = 0
    world_size: int = 1
    max_batches: int | None = None


class Strategy:
    """No-op hooks; subclasses override what they change. `name` is the record's name."""

    name = "strategy"
    is_base = False  # sequential and joint decide the chunks and the weight resets; aids do not
    bases: tuple[str, ...] | None = None  # an aid's allowed bases (None: any); the spec checks lines against it

    def training_chunks(self, chunk: int) -> list[int]:
        raise NotImplementedError(f"{self.name} is not a base strategy: it does not choose the training chunks")

    def reset_weights_at(self, chunk: int) -> bool:
        return False

    def setup(self, rank: int, world_size: int) -> None:
        """Called before every chunk with this worker's place (a sharded state sizes its shard by it)."""

    def modules(self, method: nn.Module, prepare: Callable[[nn.Module], nn.Module]) -> dict[str, nn.Module]:
        """Modules this strategy keeps beside `method` (see the module docstring); none by default."""
        return {}

    def prepare_batch(self, batch: Batch, ctx: StepContext) -> Batch:
        """The batch the step trains on (on the training device)."""
        return batch

    def prepare_views(self, views: ViewSet, batch: Batch, ctx: StepContext,
                      augment: Augment) -> tuple[ViewSet, Batch]:
        """The views (and their batch) the step trains on, given the augmented views of `batch`; `augment` makes
        the views of other rows (e.g. a buffer's) with the same plan and generator."""
        return views, batch

    def extra_loss(self, method: nn.Module, out: StepOutput, views: ViewSet, batch: Batch,
                   ctx: StepContext) -> dict[str, Tensor]:
        """Named scalars added to the method's loss (and logged as its terms)."""
        return {}

    def after_step(self, batch: Batch, ctx: StepContext) -> None:
        """Called after the optimizer step with the batch as the stream delivered it (before any mixing)."""

    def on_chunk_end(self, end: ChunkEnd) -> None:
        """Called once after the chunk's last step, on every rank."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, states: Sequence[dict[str, Any]], rank: int = 0, world_size: int = 1) -> None:
        """`states`: every rank's `state_dict()` as the checkpoint stored them (one entry per saving rank)."""


class StrategyStack(Strategy):
    """A base strategy and its aids, called in order; state keyed by each strategy's name."""

    def __init__(self, strategies: Sequence[Strategy]) -> None:
        bases = [s for s in strategies if s.is_base]
        if len(bases) != 1 or not strategies[0].is_base:
            raise ValueError(f"a line needs exactly one base strategy (sequential or joint) first, got "
                             f"{[s.name for s in strategies]}")
        names = [s.name for s in strategies]
        if len(set(names)) != len(names):
            raise ValueError(f"a strategy is listed twice: {names}")
        for aid in strategies[1:]:
            if aid.bases is not None and strategies[0].name not in aid.bases:
                raise ValueError(f"{'+'.join(names)}: {aid.name} needs the base {' or '.join(aid.bases)}, not "
                                 f"{strategies[0].name}")
        self.strategies = list(strategies)
        self.base = strategies[0]
        self.name = "+".join(names)
        self.is_base = True

    def training_chunks(self, chunk: int) -> list[int]:
        return self.base.training_chunks(chunk)

    def reset_weights_at(self, chunk: int) -> bool:
        return self.base.reset_weights_at(chunk)

    def setup(self, rank: int, world_size: int) -> None:
        for strategy in self.strategies:
            strategy.setup(rank, world_size)

    def modules(self, method: nn.Module, prepare: Callable[[nn.Module], nn.Module]) -> dict[str, nn.Module]:
        """Each strategy's modules under its name (`{"cassle": ModuleDict(predictor=..., frozen=...)}`)."""
        held = {s.name: s.modules(method, prepare) for s in self.strategies}
        return {name: nn.ModuleDict(own) for name, own in held.items() if own}

    def prepare_batch(self, batch: Batch, ctx: StepContext) -> Batch:
        for strategy in self.strategies:
            batch = strategy.prepare_batch(batch, ctx)
        return batch

    def prepare_views(self, views: ViewSet, batch: Batch, ctx: StepContext,
                      augment: Augment) -> tuple[ViewSet, Batch]:
        for strategy in self.strategies:
            views, batch = strategy.prepare_views(views, batch, ctx, augment)
        return views, batch

    def extra_losses(self, method: nn.Module) -> list[Callable[[StepOutput, ViewSet, Batch, StepContext],
                                                               dict[str, Tensor]]]:
        """The engine's `extra_losses` for `method`: one callable per strategy that overrides `extra_loss`."""
        own = [s for s in self.strategies if type(s).extra_loss is not Strategy.extra_loss]
        return [lambda out, views, batch, ctx, s=s: s.extra_loss(method, out, views, batch, ctx) for s in own]

    def after_step(self, batch: Batch, ctx: StepContext) -> None:
        for strategy in self.strategies:
            strategy.after_step(batch, ctx)

    def on_chunk_end(self, end: ChunkEnd) -> None:
        for strategy in self.strategies:
            strategy.on_chunk_end(end)

    def state_dict(self) -> dict[str, Any]:
        return {s.name: s.state_dict() for s in self.strategies}

    def load_state_dict(self, states: Sequence[dict[str, Any]], rank: int = 0, world_size: int = 1) -> None:
        for strategy in self.strategies:
            strategy.load_state_dict([state.get(strategy.name, {}) for state in states], rank, world_size)


__all__ = ["Augment", "ChunkEnd", "Strategy", "StrategyStack"]
