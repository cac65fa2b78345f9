"""LUMP: Lifelong Unsupervised Mixup (Madaan, Yoon, Li, Liu, Hwang, "Representational Continuity for Unsupervised
Continual Learning", ICLR 2022, arXiv:2110.06976).

A buffer of past chunks' rows (`trainers.strategies.buffer.RowBuffer`: staged during a chunk, merged at its end,
sharded over DDP ranks) and, from the first step that has buffer rows on (the second chunk), mixup of every
stream batch with as many buffer rows: B rows drawn uniformly with replacement, augmented with the line's view
plan, and one weight per step ``lambda ~ Beta(alpha, alpha)``; view i of each stream row is mixed with view i of
its buffer partner, ``x_mix = lambda x_stream + (1 - lambda) x_buffer``, after augmentation, and the method's
loss is computed on the mixed views only (as the paper: the loss of the mixed pair replaces the plain one).
Chunk 0 trains as sequential does.

Methods with labels mix them too (mixup): the batch carries the partners' labels and lambda (`Batch.mix`), and
the supervised baseline's loss is ``lambda CE(y_stream) + (1 - lambda) CE(y_buffer)``.

lambda is drawn from a generator seeded by (seed, the line's step), so every DDP rank mixes with the same weight
(one lambda per global step, as the paper's single-batch step) and a resumed run draws the same weights with no
extra state. Unlike the paper's code, whose reservoir also takes the current task's rows, the buffer holds past
chunks only (as replay's), so lambda mixes the present with the past.

LUMP composes with `sequential` only: `joint` trains on every past chunk already.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
from pydantic import Field
from torch import Tensor

from trainers.engine.types import Batch, LabelMix, StepContext, ViewSet
from trainers.strategies.base import Augment
from trainers.strategies.buffer import BufferConfig, RowBuffer


class LumpConfig(BufferConfig):
    """The spec's `strategy.lump` options."""

    alpha: float = Field(
        0.4, gt=0, allow_inf_nan=False,
        description="mixup weights lambda ~ Beta(alpha, alpha); 0.4 as every config of the paper's code "
                    "(github.com/divyam3897/UCL, configs/*.yaml: train.alpha 0.4), which puts most lambdas near 0 or 1",
    )


def mix(a: Tensor, b: Tensor, weight: float) -> Tensor:
    """weight x a + (1 - weight) x b."""
    return weight * a + (1.0 - weight) * b


class Lump(RowBuffer):
    """See the module docstring. Options: `LumpConfig`."""

    name = "lump"
    bases = ("sequential",)

    def __init__(self, size: int = 2000, alpha: float = LumpConfig().alpha, policy: str = "reservoir",
                 seed: int = 0) -> None:
        cfg = LumpConfig.parse("lump", size=size, alpha=alpha, policy=policy, seed=seed)
        super().__init__(cfg.size, cfg.policy, cfg.seed)
        self.alpha = cfg.alpha

    def mix_weight(self, step: int) -> float:
        """lambda of the line's step `step`: Beta(alpha, alpha), the same on every rank and every rerun."""
        rng = np.random.default_rng([self.seed % 2**63, step])
        return float(rng.beta(self.alpha, self.alpha))

    def prepare_views(self, views: ViewSet, batch: Batch, ctx: StepContext,
                      augment: Augment) -> tuple[ViewSet, Batch]:
        if not self.drawable(batch.images.device):  # the first chunk (or a rank's empty shard): nothing to mix with
            return views, batch
        if batch.mix is not None:
            raise ValueError("lump: the batch is mixed already (two mixing strategies in one line?)")
        partner = self.draw(len(batch), batch.images.device)
        partner_views = augment(partner.images)
        weight = self.mix_weight(ctx.step)
        mixed = replace(views,
                        global_=[mix(a, b, weight) for a, b in zip(views.global_, partner_views.global_, strict=True)],
                        local=[mix(a, b, weight) for a, b in zip(views.local, partner_views.local, strict=True)])
        return mixed, replace(batch, mix=LabelMix(partner.labels, weight))


__all__ = ["Lump", "LumpConfig", "mix"]
