"""SwAV (Caron et al., 2020): online clustering with swapped predictions over multi-crop views.

Every crop is embedded (encoder, projection MLP, L2 normalisation) and scored against K learnable prototypes.
The global crops get soft cluster codes from a few Sinkhorn-Knopp iterations that spread the batch equally over the
prototypes (computed without gradient, on the whole global batch); each crop's softmax(z . c / t) then predicts the
codes of the *other* global crops. Small local crops are predicted but never assigned; with small batches a queue
of past embeddings enlarges the set Sinkhorn balances.

Usage::

    method = SwAV(backbone, n_prototypes=3000, queue_length=3840)
    out = train_step(method, method, optimizer, views, batch, ctx)   # views: 2 global + local crops

Options (`SwAVConfig`, the single source of their defaults; the spec's `methods.swav` is validated against it):
`proj_hidden`, `proj_out`, `n_prototypes`, `temperature`, `epsilon`, `sinkhorn_iterations`, `assign_views`,
`queue_length`, `epoch_queue_starts`, `freeze_prototypes_iters`.

Distributed semantics (differences from facebookresearch/swav are noted):

- Sinkhorn runs on the global batch: each rank exponentiates its own scores and only the sums of Q (the total,
  and the per-prototype row sums) are all-reduced, as the official `distributed_sinkhorn`; 2 ranks get the codes
  one process holding both halves would get.
- The queue holds *gathered* embeddings (every rank's rows, newest first), so it is the same buffer on every rank
  as the engine requires (DDP broadcasts rank 0's buffers; a checkpoint holds rank 0's state). The official queue
  is per rank (queue_length / world rows each, saved per rank); here rank r feeds rows r, r + W, r + 2W, ... of the
  shared queue to the distributed Sinkhorn, so the global Sinkhorn problem is the same (queue_length past rows plus
  the global batch) and it resumes exactly from the one checkpoint. Like the official code the queue is used only
  once it is full, and before the current batch is pushed into it.
- The queue starts at the model's epoch >= `epoch_queue_starts`: `ctx.model_epochs` (epochs completed since the
  model was built, over chunks of any size; never decreasing), else `ctx.model_step // ctx.steps_per_epoch`, else
  ctx.epoch (online streams).
- Prototypes are L2-normalised at construction and in `on_step_end` after every step that updated them (the official
  code normalises at the start of each iteration; the result is the same, keeps `forward` free of in-place parameter
  writes under DDP, and checkpoints hold normalised prototypes). During the model's first `freeze_prototypes_iters`
  steps (`ctx.model_step`: a weight reset freezes a rebuilt model's prototypes again) their gradient is dropped in
  `on_after_backward` (set to None, as the official code: the optimizer skips them, weight decay and momentum
  included).
- Same-size crops share one encoder pass and the projector sees all crops at once (as the official multi-crop
  forward): BN statistics are over all the crops of a size.

Reference: M. Caron, I. Misra, J. Mairal, P. Goyal, P. Bojanowski, A. Joulin, "Unsupervised Learning of Visual
Features by Contrasting Cluster Assignments", NeurIPS 2020, arXiv:2006.09882 (defaults from main_swav.py).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from trainers.config import ComponentConfig
from trainers.engine.distributed import all_reduce_sum, gather
from trainers.engine.distributed import world as ranks
from trainers.engine.types import Batch, StepContext, StepOutput, ViewSet
from trainers.methods.base import Method, check_views, weigh_view_terms
from trainers.methods.heads import mlp

_REDUCTIONS = ("mean", "none")


class SwAVConfig(ComponentConfig):
    """SwAV's hyper-parameters with the paper's defaults (Caron et al., 2020; facebookresearch/swav main_swav.py)."""

    proj_hidden: int = Field(2048, ge=1, description="hidden width of the projection MLP (2048 in the paper)")
    proj_out: int = Field(128, ge=1, description="size of the L2-normalised embedding (feat_dim, 128 in the paper)")
    n_prototypes: int = Field(3000, ge=1, description="number of prototypes K (3000 in the paper)")
    temperature: float = Field(
        0.1, gt=0, allow_inf_nan=False,
        description="softmax temperature of the swapped prediction (0.1 in the paper)",
    )
    epsilon: float = Field(
        0.05, gt=0, allow_inf_nan=False,
        description="entropic regularisation of Sinkhorn-Knopp, Q = exp(scores / epsilon) (0.05 in the paper)",
    )
    sinkhorn_iterations: int = Field(3, ge=1, description="Sinkhorn-Knopp iterations (3 in the paper)")
    assign_views: int = Field(
        2, ge=1,
        description="the first this many global views get codes (crops_for_assign [0, 1] in the paper: 2); the "
                    "other views are only predicted",
    )
    queue_length: int = Field(
        0, ge=0,
        description="past embeddings (all ranks together) added to the Sinkhorn input; 0 = no queue (the official "
                    "default; the paper uses 3840 for its small-batch setting of 256 images)",
    )
    epoch_queue_starts: int = Field(
        15, ge=0,
        description="the model's epoch (the line's, unless a weight reset rebuilt it) from which the queue is "
                    "filled (15 in the paper)",
    )
    freeze_prototypes_iters: int = Field(
        313, ge=0,
        description="the prototypes get no update during this many first steps of the model (of the line; a "
                    "weight reset freezes a rebuilt model's again) (313 in the paper)",
    )


_DEFAULTS = SwAVConfig()


def _check_positive(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


@torch.no_grad()
def sinkhorn_knopp(scores: Tensor, epsilon: float = _DEFAULTS.epsilon,
                   iterations: int = _DEFAULTS.sinkhorn_iterations) -> Tensor:
    """Soft codes that spread the samples equally over the prototypes (SwAV eq. 3, Sinkhorn-Knopp).

    Q = exp(scores / epsilon)^T (K x N over all ranks) is scaled to total 1, then `iterations` times each row
    (prototype) to 1/K and each column (sample) to 1/N; the result is returned rescaled so that every sample's
    codes sum to 1. Under torch.distributed N counts every rank's rows: the total and the row sums are
    all-reduced, so the codes equal those of one process holding all the rows (ranks may hold different numbers
    of rows). A global constant (the largest score over all ranks) is taken off before the exponential; it
    cancels in the first normalisation and keeps exp from overflowing.

    Args:
        scores: `[N_local, K]` similarities of this rank's samples to the prototypes (no gradient is taken).
        epsilon: > 0.
        iterations: >= 1.

    Returns:
        `[N_local, K]`, float32 at least, each row summing to 1.
    """
    _check_positive("epsilon", epsilon)
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"iterations must be an int >= 1, got {iterations!r}")
    if scores.dim() != 2 or scores.shape[0] == 0 or scores.shape[1] == 0:
        raise ValueError(f"scores must be a non-empty [N, K], got {tuple(scores.shape)}")
    with torch.autocast(scores.device.type, enabled=False):
        s = scores.detach().to(torch.promote_types(scores.dtype, torch.float32))
        top = gather(s.max().reshape(1)).max()
        q = torch.exp((s - top) / epsilon).T  # [K, N_local]
        k = q.shape[0]
        n = all_reduce_sum(torch.tensor(float(q.shape[1]), dtype=q.dtype, device=q.device))  # samples, all ranks
        q = q / all_reduce_sum(q.sum())
        for _ in range(iterations):
            q = q / all_reduce_sum(q.sum(dim=1, keepdim=True)) / k  # each prototype: total mass 1 / K
            q = q / q.sum(dim=0, keepdim=True) / n  # each sample: mass 1 / N
        return (q * n).T


def swapped_prediction(scores: Sequence[Tensor], codes: Sequence[Tensor], temperature: float = _DEFAULTS.temperature,
                       reduction: str = "mean", local_weight: float | None = None,
                       global_views: int | None = None) -> Tensor:
    """SwAV's swapped prediction (eq. 1-2): each view's softmax(scores / t) predicts the codes of the other views.

    loss_i = mean_{i < len(codes)} mean_{v != i} -sum_k codes[i][:, k] log softmax(scores[v] / t)[:, k].

    Args:
        scores: `[B, K]` per view (z_v . c_k: normalised embeddings against normalised prototypes), the assigned
            views first.
        codes: `[B, K]` codes of views 0 .. len(codes) - 1 (treated as constants).
        temperature: t > 0.
        reduction: "mean" -> scalar; "none" -> `[B]`, each image's term averaged over its assignment views and
            the views predicting them (its mean is the "mean" loss).
        local_weight: None for that plain mean (every assignment view has the same number of predicting views, so
            it is the mean over all (i, v) terms); else the terms whose predicting view v is local (v >=
            `global_views`) share this weight and the others 1 - local_weight, each group averaged
            (`weigh_view_terms`; the plain mean is local_weight = L / (G - 1 + L)).
        global_views: how many of the first scores are global views; needed with `local_weight`.
    """
    _check_positive("temperature", temperature)
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if len(scores) < 2:
        raise ValueError(f"swapped prediction needs at least 2 views, got {len(scores)}")
    if not 1 <= len(codes) <= len(scores):
        raise ValueError(f"need between 1 and {len(scores)} code tensors (one per assigned view), got {len(codes)}")
    shape = scores[0].shape
    if len(shape) != 2 or shape[0] == 0:
        raise ValueError(f"scores must be non-empty [B, K] tensors, got {tuple(shape)}")
    for kind, group in (("scores", scores), ("codes", codes)):
        for i, t in enumerate(group):
            if t.shape != shape:
                raise ValueError(f"{kind}[{i}] must be {tuple(shape)} like scores[0], got {tuple(t.shape)}")
    if local_weight is not None and not (global_views is not None and len(codes) <= global_views < len(scores)):
        raise ValueError(f"local_weight needs global_views between {len(codes)} (the assigned views) and "
                         f"{len(scores) - 1}, got {global_views!r}")
    with torch.autocast(scores[0].device.type, enabled=False):
        dtype = torch.promote_types(scores[0].dtype, torch.float32)
        log_p = [F.log_softmax(s.to(dtype) / temperature, dim=1) for s in scores]
        if local_weight is not None:
            pairs = [(i, v) for i in range(len(codes)) for v in range(len(scores)) if v != i]
            terms = [-(codes[i].detach().to(dtype) * log_p[v]).sum(dim=1) for i, v in pairs]
            per_sample = weigh_view_terms(terms, [v >= global_views for _, v in pairs], local_weight)
            return per_sample.mean() if reduction == "mean" else per_sample
        per_assign = []
        for i, q in enumerate(codes):
            q = q.detach().to(dtype)
            per_assign.append(torch.stack([-(q * log_p[v]).sum(dim=1)
                                           for v in range(len(scores)) if v != i]).mean(dim=0))
        per_sample = torch.stack(per_assign).mean(dim=0)
    return per_sample.mean() if reduction == "mean" else per_sample


def swav_loss(z: Sequence[Tensor], prototypes: Tensor, temperature: float = _DEFAULTS.temperature,
              epsilon: float = _DEFAULTS.epsilon, iterations: int = _DEFAULTS.sinkhorn_iterations,
              assign_views: int = _DEFAULTS.assign_views, queue: Tensor | None = None,
              reduction: str = "mean", local_weight: float | None = None, global_views: int | None = None) -> Tensor:
    """The SwAV loss of a batch's views: codes of the first `assign_views` views by Sinkhorn, swapped prediction.

    Args:
        z: projections `[B, D]` per view, the assigned (global) views first; L2-normalised here.
        prototypes: `[K, D]` prototype vectors (the method keeps them L2-normalised; used as given).
        temperature, epsilon, iterations: see `swapped_prediction` and `sinkhorn_knopp`.
        assign_views: how many of the first views get codes (>= 1, < len(z)).
        queue: optional `[assign_views, L, D]` past normalised embeddings, the same on every rank; their scores
            against the current prototypes join the Sinkhorn input of the matching view (rank r contributes rows
            r, r + W, ...: together the ranks add each queued row once). No gradient flows into it.
        reduction: "mean" or "none" (`[B]`).
        local_weight, global_views: the local terms' share of the loss, see `swapped_prediction`.

    Under torch.distributed Sinkhorn normalises over the global batch (every rank must call this together);
    each rank's loss is the mean over its own images, and the gradients equal world x those of one process holding
    the whole batch (DDP's averaging then gives the same step).
    """
    if isinstance(assign_views, bool) or not isinstance(assign_views, int) or assign_views < 1:
        raise ValueError(f"assign_views must be an int >= 1, got {assign_views!r}")
    if len(z) <= assign_views:
        raise ValueError(f"swav_loss needs more views than assign_views ({assign_views}), got {len(z)}")
    if z[0].dim() != 2:
        raise ValueError(f"z must be [B, D] tensors, got {tuple(z[0].shape)}")
    for i, v in enumerate(z):
        if v.shape != z[0].shape:
            raise ValueError(f"z[{i}] must be {tuple(z[0].shape)} like z[0], got {tuple(v.shape)}")
    d = z[0].shape[1]
    if prototypes.dim() != 2 or prototypes.shape[1] != d:
        raise ValueError(f"prototypes must be [K, {d}], got {tuple(prototypes.shape)}")
    if queue is not None and (queue.dim() != 3 or queue.shape[0] != assign_views or queue.shape[2] != d):
        raise ValueError(f"queue must be [{assign_views}, L, {d}], got {tuple(queue.shape)}")
    b = z[0].shape[0]
    with torch.autocast(z[0].device.type, enabled=False):
        dtype = torch.promote_types(z[0].dtype, torch.float32)
        c = prototypes.to(dtype)
        scores = [F.normalize(v.to(dtype), dim=1) @ c.T for v in z]
        rank, size = ranks()
        codes = []
        for i in range(assign_views):
            target = scores[i].detach()
            if queue is not None and queue.shape[1] > 0:
                with torch.no_grad():
                    target = torch.cat([queue[i, rank::size].to(dtype) @ c.detach().T, target])
            codes.append(sinkhorn_knopp(target, epsilon, iterations)[-b:])
        return swapped_prediction(scores, codes, temperature, reduction, local_weight, global_views)


class SwAV(Method):
    """Encoder + projection MLP + prototypes trained by swapped cluster-assignment prediction (Caron et al., 2020).

    Buffers: `queue` `[assign_views, queue_length, proj_out]` (gathered embeddings, newest first) and
    `queue_filled` (rows of it holding embeddings); both in the state dict, identical on all ranks.
    Options: `SwAVConfig`.
    """

    Config = SwAVConfig
    name = "swav"
    needs_local_views = True
    min_global_views = 2

    def __init__(self, backbone: nn.Module, **options) -> None:
        super().__init__(backbone, options)
        cfg = self.config
        self.projector = mlp(self.feature_dim, cfg.proj_hidden, cfg.proj_out)
        self.prototypes = nn.Linear(cfg.proj_out, cfg.n_prototypes, bias=False)
        self.normalize_prototypes()
        self.register_buffer("queue", torch.zeros(cfg.assign_views, cfg.queue_length, cfg.proj_out))
        self.register_buffer("queue_filled", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def normalize_prototypes(self) -> None:
        """Every prototype (row of the weight) to unit L2 norm, in place."""
        w = self.prototypes.weight
        w.copy_(F.normalize(w, dim=1))

    def model_epoch(self, ctx: StepContext) -> int:
        """The model's epoch at this step: ctx.model_epochs; without it ctx.model_step // steps_per_epoch, or
        ctx.epoch without steps_per_epoch."""
        if ctx.model_epochs is not None:
            return ctx.model_epochs
        return ctx.model_step // ctx.steps_per_epoch if ctx.steps_per_epoch else ctx.epoch

    def training_step(self, views: ViewSet, batch: Batch, ctx: StepContext) -> StepOutput:
        cfg = self.config
        b = check_views("SwAV", views, min_global=max(2, cfg.assign_views), need_local=True)
        # One encoder pass per crop size and one projector pass over every crop, as the official multi-crop forward.
        features = [self.backbone(torch.cat(views.global_))]
        features.append(self.backbone(torch.cat(views.local)))
        z = self.projector(torch.cat(features)).split(b)
        length = self.queue.shape[1]
        queue_full = length > 0 and int(self.queue_filled) >= length
        per_sample = swav_loss(z, self.prototypes.weight, cfg.temperature, cfg.epsilon, cfg.sinkhorn_iterations,
                               cfg.assign_views, queue=self.queue if queue_full else None, reduction="none",
                               local_weight=views.local_weight, global_views=len(views.global_))
        if length > 0 and self.model_epoch(ctx) >= cfg.epoch_queue_starts:
            self._push(z[: cfg.assign_views])
        terms = {"loss/swav": per_sample.mean().detach(),
                 "swav/queue_used": torch.tensor(float(queue_full))}
        return StepOutput(per_sample.mean(), per_sample.detach(), terms, embeddings=list(z[: len(views.global_)]))

    # ------------------------------------------------------------------ continual distillation (CaSSLe)
    def distill_loss(self, p: Tensor, z: Tensor) -> Tensor:
        """Cluster-assignment distillation, the analogue of the paper's code ("knowledge" distiller): the
        cross-entropy between softmax(c . z^ / t) of the frozen embedding (the target) and softmax(c . p^ / t) of
        the prediction, over L2-normalised vectors, at the method's temperature. The code scores the target with a
        copy of the previous model's prototypes and the prediction with a second, trainable set; here both sides
        use the current prototypes, detached: the distillation moves neither set in either version, and the
        frozen copy stays the embedder alone (no second prototype module to keep and checkpoint)."""
        if p.dim() != 2 or p.shape != z.shape:
            raise ValueError(f"p and z must both be [B, D] with equal shapes, got {tuple(p.shape)} and "
                             f"{tuple(z.shape)}")
        t = self.config.temperature
        with torch.autocast(p.device.type, enabled=False):
            dtype = torch.promote_types(p.dtype, torch.float32)
            c = self.prototypes.weight.detach().to(dtype)
            target = F.softmax(F.normalize(z.detach().to(dtype), dim=1) @ c.T / t, dim=1)
            log_pred = F.log_softmax(F.normalize(p.to(dtype), dim=1) @ c.T / t, dim=1)
            return -(target * log_pred).sum(dim=1).mean()

    @torch.no_grad()
    def _push(self, z_assign: Sequence[Tensor]) -> None:
        """Every rank's normalised embeddings of the assigned views to the front of the queue (same on all ranks)."""
        new = torch.stack([gather(F.normalize(v.detach().float(), dim=1)) for v in z_assign]).to(self.queue.dtype)
        length = self.queue.shape[1]
        self.queue.copy_(torch.cat([new, self.queue], dim=1)[:, :length])
        self.queue_filled.fill_(min(length, int(self.queue_filled) + new.shape[1]))

    def on_after_backward(self, ctx: StepContext) -> None:
        if ctx.model_step < self.config.freeze_prototypes_iters:
            self.prototypes.weight.grad = None  # the optimizer skips the prototypes (no decay, no momentum)

    def on_step_end(self, ctx: StepContext) -> None:
        # Frozen steps leave the prototypes untouched (no gradient), so they are still unit vectors.
        if ctx.model_step >= self.config.freeze_prototypes_iters:
            self.normalize_prototypes()


__all__ = ["SwAV", "SwAVConfig", "sinkhorn_knopp", "swapped_prediction", "swav_loss"]
