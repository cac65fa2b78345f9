"""The one optimisation step every loop shares (chunks, online stream batches, slimmable sandwich, fine-tuning).

    ctx = StepContext(step=line_step, total_steps=line_steps, chunk=c, epoch=e, lr=lr, rank=r, world_size=w)
    out = train_step(model, method, optimizer, views, batch, ctx, autocast=autocast)

`model` is the method, or its DDP wrapper (whose forward is the method's `training_step`); `method` the bare
module (for hooks, EMA pairs). The EMA of `momentum_pairs()` uses the momentum at the model's progress
`ctx.model_progress`: a target network's schedule runs once over the model's life (the whole line, unless a weight
reset rebuilds the model: then it starts again at base_momentum), not once per chunk.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager, nullcontext

import torch
from torch import Tensor, nn

from trainers.engine.types import Batch, StepContext, StepOutput, ViewSet

ExtraLoss = Callable[[StepOutput, ViewSet, Batch, StepContext], dict[str, Tensor]]


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; the message names the method, the step and the LR."""


@torch.no_grad()
def ema_update(pairs: Iterable[tuple[nn.Module, nn.Module]], momentum: float) -> None:
    """target <- m * target + (1 - m) * online for every parameter of every (online, target) pair."""
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {momentum!r}")
    targets, onlines = [], []
    for online, target in pairs:
        t_params, o_params = list(target.parameters()), list(online.parameters())
        if len(t_params) != len(o_params):
            raise ValueError(f"EMA pair {type(online).__name__} -> {type(target).__name__}: parameter counts "
                             f"differ ({len(o_params)} vs {len(t_params)})")
        targets += t_params
        onlines += o_params
    if targets and momentum < 1.0:
        # lerp(t, o, 1 - m) = m t + (1 - m) o: one fused kernel per dtype/device group.
        torch._foreach_lerp_(targets, onlines, 1.0 - momentum)


def train_step(
    model: nn.Module,
    method: nn.Module,
    optimizer: torch.optim.Optimizer,
    views: ViewSet,
    batch: Batch,
    ctx: StepContext,
    *,
    autocast: AbstractContextManager | None = None,
    extra_losses: Sequence[ExtraLoss] = (),
) -> StepOutput:
    """Forward, backward, hooks, optimizer step, EMA; returns the method's StepOutput (loss still attached).

    `extra_losses` (strategies: MAS penalty, CaSSLe distillation) each return named scalars added to the loss
    and logged as terms.
    """
    optimizer.zero_grad(set_to_none=True)
    with autocast if autocast is not None else nullcontext():
        out: StepOutput = model(views, batch, ctx)
        for extra in extra_losses:
            for name, value in extra(out, views, batch, ctx).items():
                out = out.with_extra(name, value)
    out.loss.backward()
    method.on_after_backward(ctx)
    optimizer.step()
    pairs = method.momentum_pairs()
    if pairs:
        momentum = method.momentum_at(ctx.model_progress)
        ema_update(pairs, momentum)
        out.terms["momentum"] = torch.tensor(momentum)
    method.on_step_end(ctx)
    if views.overlap_fallbacks is not None:  # local crops outside the plan's IoU band (the nearest was taken)
        out.terms["views/overlap_fallbacks"] = views.overlap_fallbacks.detach().float()
    return out


__all__ = ["ExtraLoss", "NonFiniteLossError", "ema_update", "train_step"]
