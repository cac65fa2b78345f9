"""The method protocol: what every self-supervised (or supervised) method gives the engine.

    class MyMethod(Method):
        Config = MyConfig                                   # pydantic, every field described, paper defaults
        def __init__(self, backbone, **options): super().__init__(backbone, options); ...heads...
        def training_step(self, views, batch, ctx) -> StepOutput: ...

The engine (`trainers.engine.step.train_step`) calls `model(views, batch, ctx)` (DDP wraps `forward`, which is
`training_step`), backpropagates `loss`, steps the optimizer over `param_groups(weight_decay)`, then moves every
`momentum_pairs()` target towards its online module with the momentum of the model's progress
(`momentum_at(ctx.model_progress)`), so BYOL, MoCo and DINO share one EMA. Hooks run at fixed points of the step;
the default ones do nothing. Per-model schedules read the model's clock (`ctx.model_step`, `ctx.model_epochs`),
which a weight reset restarts.

Continual distillation (CaSSLe, `trainers.strategies.cassle`): `embedder()` is the module from a view to the
embedding the method's loss works on (backbone + projector), `training_step` reports each global view's embedding
in `StepOutput.embeddings`, and `distill_loss(p, z)` is the method's own loss between a prediction of the frozen
past model's embedding and that embedding. The loss form lives here, beside the method's training loss, rather
than in a table in the strategy: it reads the method's own settings (temperature, lambd, prototypes), and a new
method gets CaSSLe by defining it (or inherits the negative-cosine default).

Loss buffers (MoCo's queue, DINO's centre, SwAV's queue) are registered buffers: the checkpoint holds them with
the weights. Under DDP they must stay identical on every rank (DDP broadcasts rank 0's buffers before each
forward), so every update uses gathered or all-reduced values.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainers.config import ComponentConfig
from trainers.engine.types import Batch, StepContext, StepOutput, ViewSet
from trainers.optim import param_groups as default_param_groups


class Method(nn.Module):
    """Base of every method: holds the backbone and the validated config; `forward` is `training_step`.

    Subclasses set `Config` and may set `needs_labels`, `needs_local_views`, `min_global_views` (the registry
    record reads them). Methods with a target network set `base_momentum` / `final_momentum` from their config.
    """

    Config: ClassVar[type[ComponentConfig]]
    name: ClassVar[str] = "method"

    def __init__(self, backbone: nn.Module, options: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        in_dim = getattr(backbone, "out_dim", None)
        if isinstance(in_dim, bool) or not isinstance(in_dim, int) or in_dim < 1:
            raise ValueError(f"{self.name}: backbone must have a positive int out_dim, got {in_dim!r}")
        self.config = self.Config.parse(self.name, **dict(options or {}))
        self.backbone = backbone
        self.feature_dim = in_dim

    # ------------------------------------------------------------------ the step
    def training_step(self, views: ViewSet, batch: Batch, ctx: StepContext) -> StepOutput:
        raise NotImplementedError

    def forward(self, views: ViewSet, batch: Batch, ctx: StepContext) -> StepOutput:
        return self.training_step(views, batch, ctx)

    # ------------------------------------------------------------------ optimisation
    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """Optimizer groups: by default weight decay and LARS adaptation off for biases and norm parameters."""
        return default_param_groups(self, weight_decay)

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        """(online, target) pairs whose target the engine moves by EMA after every optimizer step."""
        return []

    base_momentum: float = 0.0
    final_momentum: float = 0.0

    def momentum_at(self, progress: float) -> float:
        """Cosine from `base_momentum` (progress 0) to `final_momentum` (progress 1) (BYOL section 3.2)."""
        if not 0.0 <= progress <= 1.0:
            raise ValueError(f"progress must be in [0, 1], got {progress!r}")
        gap = self.final_momentum - self.base_momentum
        return self.final_momentum - gap * (math.cos(math.pi * progress) + 1) / 2

    # ------------------------------------------------------------------ hooks
    def on_after_backward(self, ctx: StepContext) -> None:
        """After backward, before the optimizer step (e.g. DINO cancels the last layer's gradient)."""

    def on_step_end(self, ctx: StepContext) -> None:
        """After the optimizer step and the EMA (e.g. SwAV re-normalises its prototypes)."""

    def on_epoch_end(self, ctx: StepContext) -> None:
        """After the last step of an epoch."""

    # ------------------------------------------------------------------ continual distillation (CaSSLe)
    def embedder(self) -> nn.Module:
        """A module sharing this method's weights that maps a view to the embedding `training_step` reports in
        `StepOutput.embeddings`. Default: backbone + `self.projector` for a method that has one (most SSL
        methods), else the backbone (its features; the supervised baseline)."""
        projector = getattr(self, "projector", None)
        return self.backbone if projector is None else nn.Sequential(self.backbone, projector)

    @property
    def embedding_dim(self) -> int:
        """Width of `embedder()`'s output: the projector's `proj_out`, or the backbone's feature width."""
        return self.feature_dim if getattr(self, "projector", None) is None else self.config.proj_out

    def distill_loss(self, p: Tensor, z: Tensor) -> Tensor:
        """The method's loss between `p` `[B, D]` (a prediction, from the current model, of the frozen model's
        embedding; with gradient) and `z` `[B, D]` (the frozen model's embedding of the same view; no gradient):
        CaSSLe's distillation term for one view, a scalar. Default: negative cosine, mean -cos(p_i, z_i), for
        methods whose own loss compares no two embeddings (the supervised baseline)."""
        return negative_cosine(p, z)


def negative_cosine(p: Tensor, z: Tensor) -> Tensor:
    """mean_i -cos(p_i, z_i) over `[B, D]` rows, in float32 (at least) even under autocast; `z` detached."""
    if p.dim() != 2 or p.shape != z.shape:
        raise ValueError(f"p and z must both be [B, D] with equal shapes, got {tuple(p.shape)} and {tuple(z.shape)}")
    dtype = torch.promote_types(p.dtype, torch.float32)
    with torch.autocast(p.device.type, enabled=False):
        return -F.cosine_similarity(p.to(dtype), z.detach().to(dtype), dim=1).mean()


def weigh_view_terms(terms: Sequence[Tensor], local: Sequence[bool], local_weight: float | None = None) -> Tensor:
    """Per-sample loss `[B]` from per-pair terms `[B]`, `local[i]` telling whether term i's student / query view
    is a local crop: the plain mean over all terms when `local_weight` is None (each method's natural average),
    else `(1 - local_weight) * mean(global terms) + local_weight * mean(local terms)` (`views.local.loss_weight`).

    With `local_weight = sum(local) / len(terms)` (the local terms' natural share) the two agree."""
    if not terms or len(terms) != len(local):
        raise ValueError(f"weigh_view_terms needs one local flag per term and at least one term, got {len(terms)} "
                         f"terms and {len(local)} flags")
    if local_weight is None:
        return torch.stack(list(terms)).mean(dim=0)
    if not 0.0 <= local_weight <= 1.0:
        raise ValueError(f"local_weight must be in [0, 1], got {local_weight!r}")
    global_terms = [t for t, is_local in zip(terms, local, strict=True) if not is_local]
    local_terms = [t for t, is_local in zip(terms, local, strict=True) if is_local]
    if not global_terms or not local_terms:
        raise ValueError(f"local_weight {local_weight} needs both global and local terms, got {len(global_terms)} "
                         f"global and {len(local_terms)} local ones")
    return (1.0 - local_weight) * torch.stack(global_terms).mean(dim=0) + local_weight * torch.stack(
        local_terms).mean(dim=0)


def check_views(name: str, views: ViewSet, min_global: int = 2, need_local: bool = False) -> int:
    """Validate a ViewSet for a method; returns the batch size."""
    if len(views.global_) < min_global:
        raise ValueError(f"{name} needs at least {min_global} global views, got {len(views.global_)}")
    if need_local and not views.local:
        raise ValueError(f"{name} needs local (multi-crop) views; set views.local.count >= 1")
    batch = views.global_[0].shape[0]
    for kind, group in (("global", views.global_), ("local", views.local)):
        for i, v in enumerate(group):
            if v.dim() != 4 or v.shape[0] != batch or v.shape[1] != 3:
                raise ValueError(f"{name}: {kind} view {i} must be [{batch}, 3, S, S], got {tuple(v.shape)}")
    return batch


__all__ = ["Method", "check_views", "negative_cosine", "weigh_view_terms"]
