"""BYOL (Grill et al., 2020, "Bootstrap Your Own Latent").

An online network (encoder, projector, predictor) learns to predict, for one view, the projection that a slowly
moving target network (an exponential moving average of the online encoder and projector) gives for another
view of the same image. No negatives are needed.

Usage::

    from trainers.methods import METHODS
    method = METHODS["byol"](backbone, base_momentum=0.99)
    out = method([view1, view2])
    out["loss"].backward(); optimizer.step()
    method.momentum_update(step / total_steps)   # after every optimizer step; progress over the whole run

Only the online parameters need the optimizer; the target's are frozen (requires_grad False) and move by EMA.
`state_dict()` holds the target too, so a checkpoint resumes exactly.

Options (`BYOLConfig`, the single source of their defaults; the spec's `methods.byol` is validated against it):
`proj_hidden`, `proj_out`, `pred_hidden`, `base_momentum`, `final_momentum`.

Reference: J.-B. Grill et al., "Bootstrap Your Own Latent: A New Approach to Self-Supervised Learning",
NeurIPS 2020, arXiv:2006.07733.
"""

from __future__ import annotations

import copy
import math
from itertools import permutations

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn

from trainers.config import ComponentConfig

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


def _mlp(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    """BYOL's projector / predictor: Linear, BN, ReLU, Linear."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden, bias=False),
        nn.BatchNorm1d(hidden),
        nn.ReLU(inplace=True),
        nn.Linear(hidden, out_dim),
    )


class BYOL(nn.Module):
    """Online encoder + projector + predictor, EMA target encoder + projector (Grill et al., 2020).

    Args:
        backbone: encoder with `.out_dim`; its copy at construction starts the target.
        proj_hidden, proj_out, pred_hidden, base_momentum, final_momentum: see `BYOLConfig` (their defaults and
            bounds come from there); the predictor maps proj_out -> proj_out.

    Attributes:
        config: the validated `BYOLConfig`.
    """

    def __init__(
        self,
        backbone: nn.Module,
        *,
        proj_hidden: int = _DEFAULTS.proj_hidden,
        proj_out: int = _DEFAULTS.proj_out,
        pred_hidden: int = _DEFAULTS.pred_hidden,
        base_momentum: float = _DEFAULTS.base_momentum,
        final_momentum: float = _DEFAULTS.final_momentum,
    ) -> None:
        super().__init__()
        in_dim = getattr(backbone, "out_dim", None)
        if isinstance(in_dim, bool) or not isinstance(in_dim, int) or in_dim < 1:
            raise ValueError(f"backbone must have a positive int out_dim, got {in_dim!r}")
        self.config = cfg = BYOLConfig.parse(
            "BYOL", proj_hidden=proj_hidden, proj_out=proj_out, pred_hidden=pred_hidden,
            base_momentum=base_momentum, final_momentum=final_momentum,
        )
        proj_hidden, proj_out, pred_hidden = cfg.proj_hidden, cfg.proj_out, cfg.pred_hidden
        self.base_momentum = cfg.base_momentum
        self.final_momentum = cfg.final_momentum
        self.momentum = self.base_momentum  # last value used by momentum_update, for logging

        self.backbone = backbone
        self.projector = _mlp(in_dim, proj_hidden, proj_out)
        self.predictor = _mlp(proj_out, pred_hidden, proj_out)
        self.target_backbone = copy.deepcopy(backbone)
        self.target_projector = copy.deepcopy(self.projector)
        for param in self._target_params():
            param.requires_grad_(False)

    def _online_params(self) -> list[nn.Parameter]:
        return [*self.backbone.parameters(), *self.projector.parameters()]

    def _target_params(self) -> list[nn.Parameter]:
        return [*self.target_backbone.parameters(), *self.target_projector.parameters()]

    def momentum_at(self, progress: float) -> float:
        """Cosine schedule: base_momentum at progress 0, final_momentum at progress 1 (BYOL section 3.2)."""
        if not 0.0 <= progress <= 1.0:
            raise ValueError(f"progress must be in [0, 1], got {progress!r}")
        gap = self.final_momentum - self.base_momentum
        return self.final_momentum - gap * (math.cos(math.pi * progress) + 1) / 2

    @torch.no_grad()
    def momentum_update(self, progress: float) -> None:
        """target <- m * target + (1 - m) * online, with m = momentum_at(progress); call after each step."""
        m = self.momentum_at(progress)
        self.momentum = m
        # lerp(t, o, 1 - m) = t + (1 - m)(o - t) = m t + (1 - m) o, one fused kernel per dtype/device group.
        torch._foreach_lerp_(self._target_params(), self._online_params(), 1.0 - m)

    def forward(self, views: list[Tensor]) -> dict[str, Tensor]:
        """Views: >= 2 float `[B, 3, S, S]` (S may differ between views).

        Returns:
            "loss": scalar, the mean over ordered view pairs (a, b), a != b, of byol_loss(p_a, target z_b);
                for two views that is (L + L_sym) / 2 in the paper's notation, i.e. in [0, 4];
            "per_sample": `[B]`, each image's term averaged over the pairs; its mean is "loss".
        """
        if len(views) < 2:
            raise ValueError(f"BYOL needs at least 2 views, got {len(views)}")
        batch = views[0].shape[0]
        for i, v in enumerate(views):
            if v.dim() != 4 or v.shape[0] != batch:
                raise ValueError(f"view {i} must be [{batch}, 3, S, S] like view 0, got {tuple(v.shape)}")
        # One pass per view keeps BN statistics per view (as in the paper) and allows views of different sizes.
        p = [self.predictor(self.projector(self.backbone(v))) for v in views]
        with torch.no_grad():
            z = [self.target_projector(self.target_backbone(v)) for v in views]
        pairs = [byol_loss(p[a], z[b], reduction="none") for a, b in permutations(range(len(views)), 2)]
        per_sample = torch.stack(pairs).mean(dim=0)
        return {"loss": per_sample.mean(), "per_sample": per_sample}
