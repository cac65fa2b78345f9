"""BYOL (Grill et al., 2020, "Bootstrap Your Own Latent").

An online network (encoder, projector, predictor) learns to predict, for one view, the projection that a slowly
moving target network (an exponential moving average of the online encoder and projector) gives for another
view of the same image. No negatives are needed.

Usage::

    method = BYOL(backbone, base_momentum=0.99)
    out = train_step(method, method, optimizer, views, batch, ctx)   # trainers.engine.step: step + EMA

Only the online parameters need the optimizer; the target's are frozen (requires_grad False) and the engine moves
them by EMA (`momentum_pairs`) over the model's progress (the line's, unless a weight reset rebuilt the model).
`state_dict()` holds the target too, so a checkpoint resumes exactly.

Options (`BYOLConfig`, the single source of their defaults; the spec's `methods.byol` is validated against it):
`proj_hidden`, `proj_out`, `pred_hidden`, `base_momentum`, `final_momentum`.

Reference: J.-B. Grill et al., "Bootstrap Your Own Latent: A New Approach to Self-Supervised Learning",
NeurIPS 2020, arXiv:2006.07733.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn

from trainers.config import ComponentConfig
from trainers.engine.types import Batch, StepContext, StepOutput, ViewSet
from trainers.methods.base import Method, check_views
from trainers.methods.heads import frozen_copy, mlp

_REDUCTIONS = ("mean", "none")


class BYOLConfig(ComponentConfig):
    """BYOL's hyper-parameters with the paper's defaults (Grill et al., 2020)."""

    proj_hidden: int = Field(4096, ge=1, description="hidden width of the projector MLP (4096 in the paper)")
    proj_out: int = Field(256, ge=1, description="projection size, also the predictor's output (256 in the paper)")
    pred_hidden: int = Field(4096, ge=1, description="hidden width of the predictor MLP (4096 in the paper)")
    base_momentum: float = Field(
        0.99, ge=0, le=1, allow_inf_nan=False,
        description="target EMA momentum at the start of the run, tau_base (0.99; the paper's 1000-epoch ImageNet "
                    "runs use 0.996); it rises to final_momentum on a cosine over the run",
    )
    final_momentum: float = Field(
        1.0, ge=0, le=1, allow_inf_nan=False,
        description="target EMA momentum at the end of the run (1.0 in the paper: the target freezes)",
    )
    predictor_lr_scale: float = Field(
        1.0, gt=0, allow_inf_nan=False,
        description="the predictor's LR as a multiple of the scheduled LR (1 in the paper)",
    )

    @model_validator(mode="after")
    def _momentum_rises(self) -> "BYOLConfig":
        if self.final_momentum < self.base_momentum:
            raise ValueError(
                f"final_momentum ({self.final_momentum}) must be >= base_momentum ({self.base_momentum}): "
                "the target should slow down over the run, not speed up"
            )
        return self


_DEFAULTS = BYOLConfig()


def byol_loss(p: Tensor, z: Tensor, reduction: str = "mean") -> Tensor:
    """Normalised mean squared error ||p/|p| - z/|z|||^2 = 2 - 2 cos(p, z) (BYOL eq. 2).

    Args:
        p: online predictions `[B, D]`.
        z: target projections `[B, D]`; pass them detached (the method computes them without gradient).
        reduction: "mean" -> scalar; "none" -> `[B]`.
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if p.dim() != 2 or p.shape != z.shape:
        raise ValueError(f"p and z must both be [B, D] with equal shapes, got {tuple(p.shape)} and {tuple(z.shape)}")
    dtype = torch.promote_types(p.dtype, torch.float32)
    with torch.autocast(p.device.type, enabled=False):  # the cosine in float32 even under mixed precision
        terms = 2 - 2 * F.cosine_similarity(p.to(dtype), z.to(dtype), dim=1)
    return terms.mean() if reduction == "mean" else terms


class BYOL(Method):
    """Online encoder + projector + predictor, EMA target encoder + projector (Grill et al., 2020).

    The engine moves the target (`momentum_pairs`) after every optimizer step with the momentum of the model's
    progress (cosine from base_momentum to final_momentum over the model's life: the whole line, or from a weight
    reset to the next one). With local views the online network predicts every view and the targets are the global
    views only (the multi-crop recipe). Options: `BYOLConfig`.
    """

    Config = BYOLConfig
    name = "byol"

    def __init__(self, backbone: nn.Module, **options) -> None:
        super().__init__(backbone, options)
        cfg = self.config
        self.base_momentum = cfg.base_momentum
        self.final_momentum = cfg.final_momentum
        self.projector = mlp(self.feature_dim, cfg.proj_hidden, cfg.proj_out)
        self.predictor = mlp(cfg.proj_out, cfg.pred_hidden, cfg.proj_out)
        self.target_backbone = frozen_copy(backbone)
        self.target_projector = frozen_copy(self.projector)

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.backbone, self.target_backbone), (self.projector, self.target_projector)]

    def param_groups(self, weight_decay: float) -> list[dict]:
        groups = super().param_groups(weight_decay)
        if self.config.predictor_lr_scale != 1.0:
            predictor = {id(p) for p in self.predictor.parameters()}
            split = []
            for group in groups:
                own = [p for p in group["params"] if id(p) in predictor]
                rest = [p for p in group["params"] if id(p) not in predictor]
                if rest:
                    split.append({**group, "params": rest})
                if own:
                    split.append({**group, "params": own, "lr_scale": self.config.predictor_lr_scale})
            groups = split
        return groups

    def training_step(self, views: ViewSet, batch: Batch, ctx: StepContext) -> StepOutput:
        check_views("BYOL", views)
        # One pass per view keeps BN statistics per view (as in the paper) and allows views of different sizes.
        z_online = [self.projector(self.backbone(v)) for v in views.all]
        p = [self.predictor(zi) for zi in z_online]
        with torch.no_grad():
            z = [self.target_projector(self.target_backbone(v)) for v in views.global_]
        pairs = [byol_loss(p[a], z[b], reduction="none")
                 for a in range(len(p)) for b in range(len(z)) if a != b]
        per_sample = torch.stack(pairs).mean(dim=0)
        return StepOutput(per_sample.mean(), per_sample.detach(), embeddings=z_online[: len(views.global_)])

    def distill_loss(self, p: Tensor, z: Tensor) -> Tensor:
        """BYOL's normalised MSE, 2 - 2 cos(p, z)."""
        return byol_loss(p, z.detach())
