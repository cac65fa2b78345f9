"""SimSiam (Chen & He, 2021): a Siamese network whose predictor regresses the stop-gradient projection of the other view.

Each view goes through the encoder and a 3-layer projector (BN after every layer, the last without affine) to z;
a 2-layer bottleneck predictor maps z to p. The loss is the symmetrised negative cosine
D(p1, stopgrad(z2)) / 2 + D(p2, stopgrad(z1)) / 2; the stop-gradient alone prevents collapse: no negatives,
no momentum encoder. The predictor trains at a fixed learning rate (the official `--fix-pred-lr`).

Usage::

    method = SimSiam(backbone)
    out = method.training_step(views, batch, ctx)
    optimizer = build_optimizer("sgd", method.param_groups(1e-4), lr=peak_lr)   # predictor groups: fixed_lr

Options (`SimSiamConfig`): `proj_hidden`, `proj_out`, `pred_hidden`, `fix_pred_lr`, `predictor_lr`.

Reference: X. Chen, K. He, "Exploring Simple Siamese Representation Learning", CVPR 2021, arXiv:2011.10566
(official code: github.com/facebookresearch/simsiam).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from trainers.config import ComponentConfig
from trainers.engine.types import Batch, StepContext, StepOutput, ViewSet
from trainers.methods.base import Method, check_views
from trainers.methods.heads import mlp

_REDUCTIONS = ("mean", "none")


class SimSiamConfig(ComponentConfig):
    """SimSiam's hyper-parameters with the paper's defaults (Chen & He, 2021)."""

    proj_hidden: int = Field(2048, ge=1, description="hidden width of the 3-layer projector (2048 in the paper)")
    proj_out: int = Field(2048, ge=1, description="projection size z, also the predictor's output (2048 in the "
                                                  "paper)")
    pred_hidden: int = Field(512, ge=1, description="bottleneck width of the 2-layer predictor (512 in the paper)")
    fix_pred_lr: bool = Field(
        True,
        description="keep the predictor's LR fixed while the schedule decays the rest (True: the paper's "
                    "ImageNet recipe, `--fix-pred-lr`, section 4.4); False puts the predictor on the schedule",
    )
    predictor_lr: float | None = Field(
        None, gt=0, allow_inf_nan=False,
        description="the predictor's fixed LR when fix_pred_lr is set; None (the paper): the optimiser's peak "
                    "LR, the `init_lr` = lr x batch / 256 of the official code, set when the optimiser is built and kept from "
                    "the first step (a warm-up does not apply to it)",
    )


def simsiam_loss(p: Tensor, z: Tensor, reduction: str = "mean") -> Tensor:
    """D(p, stopgrad(z)) = -cos(p, z) per image (SimSiam eq. 1); z is detached here.

    Args:
        p: predictions `[B, D]` of one view.
        z: projections `[B, D]` of the other view (its gradient is stopped).
        reduction: "mean" -> scalar; "none" -> `[B]`.
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if p.dim() != 2 or p.shape != z.shape:
        raise ValueError(f"p and z must both be [B, D] with equal shapes, got {tuple(p.shape)} and {tuple(z.shape)}")
    if p.shape[0] == 0:
        raise ValueError("simsiam_loss needs a non-empty batch")
    dtype = torch.promote_types(p.dtype, torch.float32)
    with torch.autocast(p.device.type, enabled=False):  # the cosine in float32 even under mixed precision
        terms = -F.cosine_similarity(p.to(dtype), z.detach().to(dtype), dim=1)
    return terms.mean() if reduction == "mean" else terms


class SimSiam(Method):
    """Encoder + projector + predictor with a stop-gradient on the target branch (Chen & He, 2021).

    With two views the loss is exactly D(p1, z2) / 2 + D(p2, z1) / 2; with more, the mean of D(p_a, z_b) over
    every ordered pair a != b, the targets z being the global views only (local views are predicted, never
    targets, as in BYOL's multi-crop). `param_groups` marks the predictor's groups `fixed_lr` (see
    `SimSiamConfig.fix_pred_lr`): `trainers.optim.set_lr` then never changes their LR. Options: `SimSiamConfig`.
    """

    Config = SimSiamConfig
    name = "simsiam"

    def __init__(self, backbone: nn.Module, **options) -> None:
        super().__init__(backbone, options)
        cfg = self.config
        # Linear-BN-ReLU, Linear-BN-ReLU, Linear-BN(no affine); no bias before a BN.
        self.projector = mlp(self.feature_dim, cfg.proj_hidden, cfg.proj_out, layers=3, last_bn=True,
                             last_affine=False)
        # Linear-BN-ReLU, Linear (with bias, no BN on the output).
        self.predictor = mlp(cfg.proj_out, cfg.pred_hidden, cfg.proj_out)

    def param_groups(self, weight_decay: float) -> list[dict]:
        """The default decay / no-decay groups, each split into the rest and the predictor's part.

        With `fix_pred_lr` the predictor's groups carry `fixed_lr: True` and, when `predictor_lr` is set, that
        `lr`; without it they take the optimiser's `lr` (the peak LR the loop builds it with) and keep it.
        """
        groups = super().param_groups(weight_decay)
        if not self.config.fix_pred_lr:
            return groups
        predictor = {id(p) for p in self.predictor.parameters()}
        fixed: dict = {"fixed_lr": True}
        if self.config.predictor_lr is not None:
            fixed["lr"] = self.config.predictor_lr
        split = []
        for group in groups:
            rest = [p for p in group["params"] if id(p) not in predictor]
            own = [p for p in group["params"] if id(p) in predictor]
            split.append({**group, "params": rest})
            if own:
                split.append({**group, "params": own, **fixed})
        return split

    def training_step(self, views: ViewSet, batch: Batch, ctx: StepContext) -> StepOutput:
        check_views("SimSiam", views)
        z = [self.projector(self.backbone(v)) for v in views.all]
        p = [self.predictor(zi) for zi in z]
        targets = z[: len(views.global_)]
        pairs = [simsiam_loss(p[a], targets[b], reduction="none")
                 for a in range(len(p)) for b in range(len(targets)) if a != b]
        per_sample = torch.stack(pairs).mean(dim=0)
        return StepOutput(per_sample.mean(), per_sample.detach(), embeddings=targets)

    def distill_loss(self, p: Tensor, z: Tensor) -> Tensor:
        """SimSiam's negative cosine, -cos(p, stopgrad(z))."""
        return simsiam_loss(p, z)
