"""MAS: Memory Aware Synapses (Aljundi et al., 2018, "Memory Aware Synapses: Learning what (not) to forget").

After each chunk the importance of every backbone weight is estimated without labels, as the magnitude of the
gradient of the squared L2 norm of the representation, ``Omega = mean_batches |d ||f(x)||^2 / d theta|`` over the
finished chunk's data (the batch-mean gradient per batch, as common implementations do, rather than one backward
pass per sample), and added to the importance of the chunks before it. While the next chunks train, the loss gains
``lambd * sum Omega (theta - theta*)^2`` against the weights theta* at the end of the last chunk, so weights the
past representation depends on move less. Only the backbone is regularised: the heads are the method's own.

Under DDP each rank estimates Omega on its shard of the chunk and the estimates are averaged, so every rank
holds the same importances and anchor (the checkpoint stores rank 0's).

MAS composes with `sequential` only: `joint` (from scratch) re-initialises the model every chunk, and pulling a
fresh network towards the last chunk's weights would make it a warm start by penalty (and without from_scratch JT
already trains on every past chunk), so `joint+mas` is refused by the stack and by the spec.

Reference: R. Aljundi, F. Babiloni, M. Elhoseiny, M. Rohrbach, T. Tuytelaars, ECCV 2018, arXiv:1711.09601.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from pydantic import Field
from torch import Tensor, nn

from trainers.config import ComponentConfig
from trainers.engine.distributed import all_reduce_mean
from trainers.engine.types import Batch, StepContext, StepOutput, ViewSet
from trainers.strategies.base import ChunkEnd, Strategy
from trainers.views.augment import normalize


class MASConfig(ComponentConfig):
    """The spec's `strategy.mas` options."""

    lambd: float = Field(
        1.0, ge=0, allow_inf_nan=False,
        description="weight of the penalty lambd * sum Omega d^2; SGD on it is stable while lr * 2 * lambd * max Omega < 2 "
                    "(the importances are gradient magnitudes: tens are common), so large values need a small LR",
    )
    batches: int = Field(20, ge=1, description="batches of the finished chunk that estimate the importances")


def representation_importance(backbone: nn.Module, batches, max_batches: int,
                              device: torch.device) -> dict[str, Tensor]:
    """`mean over batches of |grad of mean_i ||f(x_i)||^2|` per floating parameter of `backbone` (eval mode)."""
    params = {name: p for name, p in backbone.named_parameters() if p.requires_grad}
    omega = {name: torch.zeros_like(p) for name, p in params.items()}
    was_training = backbone.training
    backbone.eval()  # running BN statistics: the representation as evaluation sees it
    seen = 0
    try:
        for batch in batches:
            if seen >= max_batches:
                break
            images = batch.images if isinstance(batch, Batch) else batch
            features = backbone(normalize(images.to(device)))
            grads = torch.autograd.grad(features.pow(2).sum(dim=1).mean(), list(params.values()),
                                        allow_unused=True)
            for name, grad in zip(params, grads):
                if grad is not None:
                    omega[name] += grad.abs()
            seen += 1
    finally:
        backbone.train(was_training)
    if seen:
        omega = {name: value / seen for name, value in omega.items()}
    return {name: all_reduce_mean(value) for name, value in omega.items()}


class MAS(Strategy):
    """See the module docstring. Options: `MASConfig`."""

    name = "mas"
    bases = ("sequential",)

    def __init__(self, lambd: float = 1.0, batches: int = 20) -> None:
        cfg = MASConfig.parse("mas", lambd=lambd, batches=batches)
        self.lambd, self.batches = cfg.lambd, cfg.batches
        self.omega: dict[str, Tensor] = {}  # accumulated importances, by backbone parameter name
        self.anchor: dict[str, Tensor] = {}  # theta* (the backbone at the end of the last chunk)
        self.chunks = 0  # chunks whose importances are in omega

    def extra_loss(self, method: nn.Module, out: StepOutput, views: ViewSet, batch: Batch,
                   ctx: StepContext) -> dict[str, Tensor]:
        if not self.omega or self.lambd == 0:
            return {}
        total = out.loss.new_zeros(())
        for name, param in method.backbone.named_parameters():
            if name in self.omega:
                omega, anchor = self.omega[name], self.anchor[name]
                if omega.device != param.device:
                    self.omega[name] = omega = omega.to(param.device)
                    self.anchor[name] = anchor = anchor.to(param.device)
                total = total + (omega * (param - anchor).pow(2)).sum()
        return {"mas_penalty": self.lambd * total}

    def on_chunk_end(self, end: ChunkEnd) -> None:
        backbone = end.method.backbone
        limit = min(self.batches, end.max_batches or self.batches)
        fresh = representation_importance(backbone, end.batches(), limit, end.device)
        self.omega = {name: self.omega[name].to(value.device) + value if name in self.omega else value
                      for name, value in fresh.items()}
        self.anchor = {name: p.detach().clone() for name, p in backbone.named_parameters() if name in fresh}
        self.chunks += 1

    def state_dict(self) -> dict[str, Any]:
        return {"omega": dict(self.omega), "anchor": dict(self.anchor), "chunks": self.chunks}

    def load_state_dict(self, states: Sequence[dict[str, Any]], rank: int = 0, world_size: int = 1) -> None:
        states = [s for s in states if s]
        if states:  # identical on every rank
            self.omega, self.anchor = dict(states[0]["omega"]), dict(states[0]["anchor"])
            self.chunks = states[0]["chunks"]


__all__ = ["MAS", "MASConfig", "representation_importance"]
