"""SimCLR (Chen et al., 2020, "A Simple Framework for Contrastive Learning of Visual Representations").

Each view goes through the encoder and a projection MLP; the NT-Xent loss pulls the two projections of an
image together and pushes them away from every other projection in the (global) batch.

Usage::

    method = SimCLR(backbone, temperature=0.2)
    out = method.training_step(views, batch, ctx)     # views: a ViewSet from trainers.views.plan.make_view_set
    out.loss.backward()

Under torch.distributed every worker's projections are gathered (with gradient) to serve as negatives, so the
effective batch for the contrastive task is the global batch; each worker's loss is the mean over its own
anchors, and DDP's gradient averaging then gives the gradient of the global mean.

Options (`SimCLRConfig`, the single source of their defaults; the spec's `methods.simclr` is validated against
it): `proj_hidden`, `proj_out`, `temperature`.

Reference: T. Chen, S. Kornblith, M. Norouzi, G. Hinton, "A Simple Framework for Contrastive Learning of Visual
Representations", ICML 2020, arXiv:2002.05709.
"""

from __future__ import annotations

import math
from itertools import combinations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from trainers.config import ComponentConfig
from trainers.engine.distributed import gather_with_grad
from trainers.engine.distributed import world as ranks
from trainers.engine.types import Batch, StepContext, StepOutput, ViewSet
from trainers.methods.base import Method, check_views
from trainers.methods.heads import mlp

_REDUCTIONS = ("mean", "none")


class SimCLRConfig(ComponentConfig):
    """SimCLR's hyper-parameters with the paper's defaults (Chen et al., 2020)."""

    proj_hidden: int = Field(
        2048, ge=1,
        description="hidden width of the projection MLP (2048 in the paper: the ResNet-50 feature size)",
    )
    proj_out: int = Field(128, ge=1, description="size of the projection the NT-Xent loss sees (128 in the paper)")
    temperature: float = Field(
        0.1, gt=0, allow_inf_nan=False,
        description="NT-Xent temperature (0.1, the paper's ImageNet setting at large batch; 0.2 to 0.5 suit small "
                    "batches)",
    )


_DEFAULTS = SimCLRConfig()


def nt_xent_loss(
    z1: Tensor, z2: Tensor, temperature: float = _DEFAULTS.temperature, reduction: str = "mean"
) -> Tensor:
    """Normalised temperature-scaled cross entropy (SimCLR eq. 1), averaged over both views of each image.

    With z = [z1; z2] L2-normalised and sim(a, b) = z_a . z_b, the term of anchor i whose positive is j is
    l(i, j) = -log( exp(sim(i, j) / t) / sum_{k != i} exp(sim(i, k) / t) ), the k running over all 2N
    projections of the global batch (N = B * world_size when torch.distributed is initialised).

    Args:
        z1, z2: projections `[B, D]` of two views of the same B images (row i of each is image i).
        temperature: t > 0.
        reduction: "mean" -> scalar; "none" -> `[B]`, (l(i, i + B) + l(i + B, i)) / 2 per local image,
            whose mean is the "mean" loss.

    Under torch.distributed every worker must pass the same B (all_gather needs equal shapes); drop the last
    incomplete batch.
    """
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if z1.dim() != 2 or z1.shape != z2.shape:
        raise ValueError(
            f"z1 and z2 must both be [B, D] with equal shapes, got {tuple(z1.shape)} and {tuple(z2.shape)}"
        )
    b = z1.shape[0]
    if b == 0:
        raise ValueError("nt_xent_loss needs a non-empty batch")
    # Similarities and log-sum-exp in at least float32, autocast or not: half precision loses the 1/t-scaled logits.
    with torch.autocast(z1.device.type, enabled=False):
        return _nt_xent(z1, z2, temperature, reduction)


def _nt_xent(z1: Tensor, z2: Tensor, temperature: float, reduction: str) -> Tensor:
    """nt_xent_loss after validation."""
    b = z1.shape[0]
    dtype = torch.promote_types(z1.dtype, torch.float32)
    z1 = F.normalize(z1.to(dtype), dim=1)
    z2 = F.normalize(z2.to(dtype), dim=1)

    # The gather sends gradients back to the worker that owns each projection.
    rank, world = ranks()
    k1, k2 = gather_with_grad(z1), gather_with_grad(z2)
    n = b * world

    queries = torch.cat([z1, z2], dim=0)  # [2B, D]
    keys = torch.cat([k1, k2], dim=0)  # [2N, D]: all view-1 projections, then all view-2 projections
    logits = queries @ keys.T / temperature  # [2B, 2N]
    local = torch.arange(b, device=z1.device) + rank * b
    self_index = torch.cat([local, local + n])
    positive = torch.cat([local + n, local])
    rows = torch.arange(2 * b, device=z1.device)
    logits = logits.index_put((rows, self_index), torch.tensor(-math.inf, dtype=dtype, device=z1.device))
    terms = F.cross_entropy(logits, positive, reduction="none")  # [2B]
    per_sample = (terms[:b] + terms[b:]) / 2
    return per_sample.mean() if reduction == "mean" else per_sample


class SimCLR(Method):
    """Encoder + projection MLP trained with NT-Xent (Chen et al., 2020).

    Every unordered pair of views (global and local alike) is a positive pair; the loss is the mean over pairs.
    Options: `SimCLRConfig`.
    """

    Config = SimCLRConfig
    name = "simclr"

    def __init__(self, backbone: nn.Module, **options) -> None:
        super().__init__(backbone, options)
        cfg = self.config
        self.temperature = cfg.temperature
        # SimCLR v2's projector: the BN in the hidden layer speeds up and steadies training.
        self.projector = mlp(self.feature_dim, cfg.proj_hidden, cfg.proj_out)

    def training_step(self, views: ViewSet, batch: Batch, ctx: StepContext) -> StepOutput:
        check_views("SimCLR", views)
        # One encoder pass per view keeps BN statistics per view and allows views of different sizes.
        z = [self.projector(self.backbone(v)) for v in views.all]
        pairs = [nt_xent_loss(z[a], z[b], self.temperature, "none") for a, b in combinations(range(len(z)), 2)]
        per_sample = torch.stack(pairs).mean(dim=0)
        return StepOutput(per_sample.mean(), per_sample.detach(), embeddings=z[: len(views.global_)])

    def distill_loss(self, p: Tensor, z: Tensor) -> Tensor:
        """NT-Xent with (p, z) as the two views: each prediction's positive is the frozen projection of its own
        image (and vice versa), the other rows of the global batch its negatives; the method's temperature."""
        return nt_xent_loss(p, z.detach(), self.temperature)
