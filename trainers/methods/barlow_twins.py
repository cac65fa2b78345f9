"""Barlow Twins (Zbontar et al., 2021): redundancy reduction between the embeddings of two views.

Both views go through the encoder and a 3-layer projector; each embedding dimension is standardised along the
batch, and the cross-correlation matrix C of the two views' standardised embeddings is pushed towards the
identity: L = sum_i (1 - C_ii)^2 + lambda * sum_{i != j} C_ij^2. The diagonal term makes the embedding invariant
to the augmentations, the off-diagonal one decorrelates its dimensions (no negatives, no target network).

Usage::

    method = BarlowTwins(backbone, lambd=0.0051)
    out = method.training_step(views, batch, ctx)     # views: a ViewSet from trainers.views.plan.make_view_set

Under torch.distributed the statistics are those of the GLOBAL batch: the embeddings are gathered with gradient
(`gather_with_grad`) and the mean, the variance and C are computed over the gathered batch, so 2 ranks give the
loss of one process holding the whole batch (see `barlow_twins_loss`).

Options (`BarlowTwinsConfig`): `proj_hidden`, `proj_out`, `lambd`, `scale_loss`.

Reference: J. Zbontar, L. Jing, I. Misra, Y. LeCun, S. Deny, "Barlow Twins: Self-Supervised Learning via
Redundancy Reduction", ICML 2021, arXiv:2103.03230 (official code: github.com/facebookresearch/barlowtwins).
"""

from __future__ import annotations

import math
from itertools import combinations

import torch
from pydantic import Field
from torch import Tensor, nn

from trainers.config import ComponentConfig
from trainers.engine.distributed import gather_with_grad
from trainers.engine.distributed import world as ranks
from trainers.engine.types import Batch, StepContext, StepOutput, ViewSet
from trainers.methods.base import Method, check_views
from trainers.methods.heads import mlp

_REDUCTIONS = ("mean", "none")
BN_EPS = 1e-5  # the epsilon of the official code's BatchNorm1d(affine=False), inside the square root


class BarlowTwinsConfig(ComponentConfig):
    """Barlow Twins' hyper-parameters with the paper's defaults (Zbontar et al., 2021)."""

    proj_hidden: int = Field(
        8192, ge=1, description="width of the projector's two hidden layers (8192 in the paper: 8192-8192-8192)",
    )
    proj_out: int = Field(8192, ge=1, description="embedding size, the side of the cross-correlation matrix "
                                                  "(8192 in the paper)")
    lambd: float = Field(
        0.0051, ge=0, allow_inf_nan=False,
        description="weight of the redundancy-reduction (off-diagonal) term; 0.0051 in the official code "
                    "(`--lambd`, the value behind the paper's results; the text rounds it to 5e-3)",
    )
    scale_loss: float = Field(
        1.0, gt=0, allow_inf_nan=False,
        description="constant factor on the whole loss; 1 (no scaling) as in the current official code, which "
                    "removed the early `--scale-loss` (1/32, 0.024 for the released model) in favour of a "
                    "separate bias LR",
    )


_DEFAULTS = BarlowTwinsConfig()


def barlow_twins_loss(z1: Tensor, z2: Tensor, lambd: float = _DEFAULTS.lambd, reduction: str = "mean",
                      scale: float = 1.0) -> Tensor:
    """Barlow Twins' loss (paper eq. 1-2) over the global batch; optionally each image's exact share of it.

    Each dimension of z1 and z2 is standardised along the batch (mean 0, biased variance 1 plus `BN_EPS`, as a
    BatchNorm without affine in training mode), giving a_n, b_n; C = 1/N sum_n a_n b_n^T and
    L = scale * (sum_i (1 - C_ii)^2 + lambd * sum_{i != j} C_ij^2).

    Under torch.distributed the rows of every rank are gathered with `gather_with_grad` (differentiable: its
    backward sums all ranks' gradients of the gathered tensor and returns each rank its own rows) and the mean,
    the variance and C are computed over the N = B * world_size gathered rows. Every rank then returns the same
    global L, and rank r's gradient wrt its rows is world_size * dL/dz_r; DDP's averaging over ranks yields
    exactly the parameter gradient of one process holding the whole batch. (The official code all-reduces C
    without autograd, which leaves each rank only its local share: a gradient 1/world_size of the global one.)

    Per-sample attribution (`reduction="none"`, `[B]`, detached, for the local rows): with c^n = a_n b_n^T the
    n-th image's contribution to C (C = mean_n c^n), each squared term splits exactly into per-image shares,
    (1 - C_ii)^2 = mean_n (1 - C_ii)(1 - c^n_ii) and C_ij^2 = mean_n C_ij c^n_ij, so image n gets

        l_n = scale * (sum_i (1 - C_ii)(1 - a_ni b_ni) + lambd * sum_{i != j} C_ij a_ni b_nj),

    each square written as (its root) x (the image's share of that root): the mean of l_n over the global batch
    is L exactly. An image scores high when its views disagree on dimensions that are not yet invariant (and when
    it adds to the remaining redundancy); it may be negative (an image that already pulls C towards the
    identity). Deterministic, finite whenever the loss is.

    Args:
        z1, z2: embeddings `[B, D]` of two views of the same B images (row n of each is image n).
        lambd: weight of the off-diagonal term, >= 0.
        reduction: "mean" -> the scalar L (with gradient); "none" -> `[B]` per-image shares (no gradient).
        scale: factor on the loss, > 0.

    Every rank must pass the same B; the global batch must have at least 2 rows (a variance is needed).
    """
    if not (lambd >= 0 and math.isfinite(lambd)):
        raise ValueError(f"lambd must be a finite number >= 0, got {lambd!r}")
    if not (scale > 0 and math.isfinite(scale)):
        raise ValueError(f"scale must be a finite number > 0, got {scale!r}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    parts = _barlow_parts(z1, z2, lambd, scale, per_sample=reduction == "none")
    return parts["loss"] if reduction == "mean" else parts["per_sample"]


def _standardise(z: Tensor) -> Tensor:
    return (z - z.mean(dim=0)) / torch.sqrt(z.var(dim=0, unbiased=False) + BN_EPS)


def _off_diagonal(c: Tensor) -> Tensor:
    """The d * (d - 1) off-diagonal entries of a square `[d, d]` matrix, flattened."""
    d = c.shape[0]
    return c.flatten()[:-1].view(d - 1, d + 1)[:, 1:].flatten()


def _barlow_parts(z1: Tensor, z2: Tensor, lambd: float, scale: float, per_sample: bool) -> dict[str, Tensor]:
    """The loss (with gradient), its two terms (detached) and, if asked, the per-image shares, from one gather."""
    if z1.dim() != 2 or z1.shape != z2.shape:
        raise ValueError(
            f"z1 and z2 must both be [B, D] with equal shapes, got {tuple(z1.shape)} and {tuple(z2.shape)}"
        )
    rank, size = ranks()
    b = z1.shape[0]
    if b * size < 2:
        raise ValueError(f"barlow_twins_loss needs a global batch of at least 2 rows to standardise, got {b * size}")
    # Standardisation and the D x D cross-correlation in at least float32, autocast or not.
    with torch.autocast(z1.device.type, enabled=False):
        dtype = torch.promote_types(z1.dtype, torch.float32)
        a_all = _standardise(gather_with_grad(z1.to(dtype)))  # [N, D], rank r's rows at r * B
        b_all = _standardise(gather_with_grad(z2.to(dtype)))
        c = a_all.T @ b_all / a_all.shape[0]  # [D, D]
        diag = torch.diagonal(c)
        on_diag = (1 - diag).pow(2).sum()
        off_diag = _off_diagonal(c).pow(2).sum()
        parts = {"loss": scale * (on_diag + lambd * off_diag), "invariance": on_diag.detach(),
                 "redundancy": off_diag.detach()}
        if per_sample:
            with torch.no_grad():
                a, bb, c, diag = (t.detach() for t in (a_all[rank * b:(rank + 1) * b],
                                                       b_all[rank * b:(rank + 1) * b], c, diag))
                own = a * bb  # [B, D]: a_ni b_ni
                invariance = (1 - diag).sum() - own @ (1 - diag)  # sum_i (1 - C_ii)(1 - a_ni b_ni)
                # sum_{i != j} C_ij a_ni b_nj = a_n^T C b_n - sum_i C_ii a_ni b_ni
                redundancy = ((a @ c) * bb).sum(dim=1) - own @ diag
                parts["per_sample"] = scale * (invariance + lambd * redundancy)
    return parts


class BarlowTwins(Method):
    """Encoder + 3-layer projector (Linear-BN-ReLU x 2, Linear) trained with the Barlow Twins loss.

    Every unordered pair of views (global, then local ones) is a pair for the loss; the loss is the mean over
    pairs (the paper uses exactly two views). The final standardisation (the official code's BatchNorm without
    affine, synchronised over GPUs) is part of the loss, over the global batch. Options: `BarlowTwinsConfig`.
    """

    Config = BarlowTwinsConfig
    name = "barlow_twins"

    def __init__(self, backbone: nn.Module, **options) -> None:
        super().__init__(backbone, options)
        cfg = self.config
        self.projector = mlp(self.feature_dim, cfg.proj_hidden, cfg.proj_out, layers=3, bias=False)

    def training_step(self, views: ViewSet, batch: Batch, ctx: StepContext) -> StepOutput:
        check_views("Barlow Twins", views)
        cfg = self.config
        # One encoder pass per view: BN statistics per view, views of different sizes allowed.
        z = [self.projector(self.backbone(v)) for v in views.all]
        parts = [_barlow_parts(z[i], z[j], cfg.lambd, cfg.scale_loss, per_sample=True)
                 for i, j in combinations(range(len(z)), 2)]
        loss = torch.stack([p["loss"] for p in parts]).mean()
        per_sample = torch.stack([p["per_sample"] for p in parts]).mean(dim=0)
        terms = {f"loss/{k}": torch.stack([p[k] for p in parts]).mean() for k in ("invariance", "redundancy")}
        return StepOutput(loss, per_sample, terms, embeddings=z[: len(views.global_)])

    def distill_loss(self, p: Tensor, z: Tensor) -> Tensor:
        """The Barlow Twins loss of (p, z): their cross-correlation over the global batch pushed to the identity,
        with the method's lambd and scale_loss (the paper's "decorrelative" distiller)."""
        return barlow_twins_loss(p, z.detach(), self.config.lambd, scale=self.config.scale_loss)
