"""MoCo-v2 (Chen, Fan, Girshick, He, 2020, "Improved Baselines with Momentum Contrastive Learning").

A query encoder (backbone + 2-layer MLP projector) is trained with InfoNCE to pick, for each image, the key of
another view of it, computed by a momentum (EMA) copy of the encoder, among a FIFO queue of keys of past batches
(the negatives). The queue decouples the number of negatives from the batch size; the slowly moving key encoder
keeps the queued keys consistent. MoCo-v2 is MoCo (He et al., CVPR 2020) with SimCLR's MLP head, its
augmentations and a cosine LR schedule.

Usage::

    method = MoCoV2(backbone, queue_size=65536)
    out = train_step(method, method, optimizer, views, batch, ctx)   # trainers.engine.step: step, EMA, enqueue

The step (asymmetric, as the paper): q = projector(backbone(view 1)), k = target(view 2) without gradient,
loss = CE([q.k, q.queue] / t, target 0) per image. With `symmetric` (MoCo-v2+) both directions are averaged.
The keys of the step are enqueued in `on_step_end` (after the backward and the optimizer step, so the queue the
loss read is never modified while autograd may still need it), gathered from every rank with
`trainers.engine.distributed.gather`, so every rank writes the same global batch of keys, in rank order, and the queue
buffer stays identical on all ranks (as DDP's buffer broadcast assumes).

Shuffle-BN. The paper shuffles the key batch across GPUs before the key encoder so that a query and its positive
key are never normalised with the statistics of the same sub-batch (otherwise the BN statistics leak which
images share a batch and the model can cheat the pretext task). Here the key encoder runs in train mode on the
rank's own batch with per-rank BN (or SyncBN in the heads with `sync_bn`), without shuffling: a shuffle needs a
permutation broadcast plus an all-gather of the images themselves, outside the engine's collectives
(`gather`, `all_reduce`), and it is a no-op on one worker, where the whole batch is one BN batch anyway. The
query and key of an image are still computed in separate forward passes (each view its own BN batch). The
critical-factors study's code (MoCo-v2+, `moco_v2_plus`) and solo-learn train MoCo without shuffle-BN (SyncBN or
per-GPU BN instead). Expect the cheat to matter most with small per-rank batches; `sync_bn` dilutes it.

Options (`MoCoV2Config`, the single source of their defaults): `proj_hidden`, `proj_out`, `proj_bn`,
`temperature`, `queue_size`, `base_momentum`, `final_momentum`, `symmetric`. The paper's optimisation (SGD, LR
0.03 x batch / 256, momentum 0.9, weight decay 1e-4, cosine LR, 200 epochs, batch 256) is the loop's, not the
method's.

References: X. Chen, H. Fan, R. Girshick, K. He, "Improved Baselines with Momentum Contrastive Learning",
arXiv:2003.04297, 2020; K. He, H. Fan, Y. Wu, S. Xie, R. Girshick, "Momentum Contrast for Unsupervised Visual
Representation Learning", CVPR 2020, arXiv:1911.05722.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn

from trainers.config import ComponentConfig
from trainers.engine.distributed import gather
from trainers.engine.types import Batch, StepContext, StepOutput, ViewSet
from trainers.methods.base import Method, check_views, weigh_view_terms
from trainers.methods.heads import frozen_copy, mlp
from trainers.methods.simclr import nt_xent_loss

_REDUCTIONS = ("mean", "none")


class MoCoV2Config(ComponentConfig):
    """MoCo-v2's hyper-parameters with the paper's defaults (Chen et al., 2020)."""

    proj_hidden: int = Field(
        2048, ge=1, description="hidden width of the projector MLP (2048 in the paper: the ResNet-50 feature size)",
    )
    proj_out: int = Field(128, ge=1, description="size of the keys and queries the loss sees (128 in the paper)")
    proj_bn: bool = Field(
        False,
        description="BatchNorm in the projector's hidden layer (False in the paper: Linear-ReLU-Linear; MoCo-v2+ "
                    "uses BN)",
    )
    temperature: float = Field(
        0.2, gt=0, allow_inf_nan=False, description="InfoNCE temperature t (0.2 in the paper; MoCo v1 used 0.07)",
    )
    queue_size: int = Field(
        65536, ge=1,
        description="number of negative keys in the queue, K (65536 in the paper); any size works, the FIFO wraps "
                    "around when it is not a multiple of the global batch",
    )
    base_momentum: float = Field(
        0.999, ge=0, le=1, allow_inf_nan=False,
        description="key-encoder EMA momentum at the start of the run (0.999 in the paper)",
    )
    final_momentum: float = Field(
        0.999, ge=0, le=1, allow_inf_nan=False,
        description="key-encoder EMA momentum at the end of the run (0.999 in the paper: constant; the engine "
                    "moves it on a cosine from base_momentum when they differ)",
    )
    symmetric: bool = Field(
        False,
        description="average the loss of both directions (query view 1 / key view 2 and the reverse) (False in "
                    "the paper: the query is view 1, the key view 2; MoCo-v2+ sets it)",
    )

    @model_validator(mode="after")
    def _momentum_rises(self) -> "MoCoV2Config":
        if self.final_momentum < self.base_momentum:
            raise ValueError(
                f"final_momentum ({self.final_momentum}) must be >= base_momentum ({self.base_momentum}): "
                "the key encoder should slow down over the run, not speed up"
            )
        return self


_DEFAULTS = MoCoV2Config()


def moco_infonce_loss(
    q: Tensor, k: Tensor, queue: Tensor, temperature: float = _DEFAULTS.temperature, reduction: str = "mean"
) -> Tensor:
    """InfoNCE of MoCo (He et al., 2020, eq. 1) for queries against their positive keys and a queue of negatives.

    l_i = -log( exp(q_i . k_i / t) / (exp(q_i . k_i / t) + sum_j exp(q_i . n_j / t)) ), with q_i and k_i
    L2-normalised here and n_j the rows of `queue` (stored L2-normalised): cross entropy over the logits
    [q_i . k_i, q_i . n_1, ..., q_i . n_K] / t with target 0.

    Args:
        q: queries `[B, D]` (gradient flows into them).
        k: positive keys `[B, D]`, row i the key of query i; detached here (keys carry no gradient).
        queue: negative keys `[K, D]`; detached here. Do not modify it in place before the backward.
        temperature: t > 0.
        reduction: "mean" -> scalar; "none" -> `[B]` (l_i per query).

    The loss needs no cross-rank work: every rank holds the same queue, and each query's term involves only its
    own key. Computed in at least float32 even under autocast.
    """
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if q.dim() != 2 or q.shape != k.shape:
        raise ValueError(f"q and k must both be [B, D] with equal shapes, got {tuple(q.shape)} and {tuple(k.shape)}")
    if q.shape[0] == 0:
        raise ValueError("moco_infonce_loss needs a non-empty batch")
    if queue.dim() != 2 or queue.shape[1] != q.shape[1] or queue.shape[0] == 0:
        raise ValueError(f"queue must be [K, {q.shape[1]}] with K >= 1 (the queries' width), got "
                         f"{tuple(queue.shape)}")
    with torch.autocast(q.device.type, enabled=False):  # 1/t-scaled logits in float32 even under bf16 autocast
        dtype = torch.promote_types(q.dtype, torch.float32)
        q = F.normalize(q.to(dtype), dim=1)
        k = F.normalize(k.detach().to(dtype), dim=1)
        positive = (q * k).sum(dim=1, keepdim=True)  # [B, 1]
        negative = q @ queue.detach().to(dtype).T  # [B, K]
        logits = torch.cat([positive, negative], dim=1) / temperature
        target = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
        terms = F.cross_entropy(logits, target, reduction="none")
    return terms.mean() if reduction == "mean" else terms


@torch.no_grad()
def enqueue_keys(queue: Tensor, ptr: Tensor, keys: Tensor) -> None:
    """Write `keys` `[N, D]` into the FIFO `queue` `[K, D]` at `ptr` (a long `[1]`), wrapping around; in place.

    Row i goes to position (ptr + i) mod K; `ptr` moves to (ptr + N) mod K. When N > K only the last K keys are
    written (the earlier ones would be overwritten within the same step anyway). The caller passes the keys of
    the whole global batch, already L2-normalised, identical on every rank.
    """
    if keys.dim() != 2 or keys.shape[1] != queue.shape[1]:
        raise ValueError(f"keys must be [N, {queue.shape[1]}] like the queue's rows, got {tuple(keys.shape)}")
    n, size = keys.shape[0], queue.shape[0]
    skip = max(0, n - size)
    rows = torch.arange(n - skip, device=queue.device)
    index = (ptr.to(queue.device) + skip + rows) % size
    queue.index_copy_(0, index, keys[skip:].to(queue.dtype))
    ptr.copy_((ptr + n) % size)


def enqueue_view(step: int, global_views: int) -> int:
    """The global view whose keys a symmetric step enqueues: a fair draw seeded by the step.

    The critical-factors code draws view 1 or 2 with probability 1/2 every step; seeding the draw with the line's
    step makes it identical on every rank and reproducible across a resume.
    """
    g = torch.Generator().manual_seed(int(step))
    return int(torch.randint(global_views, (1,), generator=g))


class MoCoV2(Method):
    """Query encoder (backbone + projector), EMA key encoder, InfoNCE against a queue (Chen et al., 2020).

    Asymmetric (the paper): exactly 2 global views, query view 1, key view 2 (its keys are enqueued). Symmetric:
    every view (global and local) is a query against the key of every other global view, the per-image loss the
    mean over those pairs (or, with `views.local_weight`, the local queries' pairs weighted local_weight and the
    global ones 1 - local_weight, each group averaged), and one global view's keys (a draw per step,
    `enqueue_view`) are enqueued, so the queue turns over by one global batch a step either way. Options:
    `MoCoV2Config`.
    """

    Config = MoCoV2Config
    name = "moco_v2"
    config: MoCoV2Config

    def __init__(self, backbone: nn.Module, **options) -> None:
        super().__init__(backbone, options)
        cfg = self.config
        self.temperature = cfg.temperature
        self.symmetric = cfg.symmetric
        self.base_momentum = cfg.base_momentum
        self.final_momentum = cfg.final_momentum
        # MoCo-v2: Linear-ReLU-Linear with biases; with proj_bn the SimCLR-v2 / BYOL head (Linear-BN-ReLU-Linear).
        self.projector = mlp(self.feature_dim, cfg.proj_hidden, cfg.proj_out, hidden_bn=cfg.proj_bn)
        self.target_backbone = frozen_copy(backbone)
        self.target_projector = frozen_copy(self.projector)
        # Random unit keys to start (as the paper); drawn from the seeded global RNG, so every rank built with the
        # same seed starts with the same queue (and DDP broadcasts rank 0's buffers before each forward anyway).
        self.register_buffer("queue", F.normalize(torch.randn(cfg.queue_size, cfg.proj_out), dim=1))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))
        self._pending_keys: Tensor | None = None

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.backbone, self.target_backbone), (self.projector, self.target_projector)]

    # ------------------------------------------------------------------ the step
    def query(self, view: Tensor) -> Tensor:
        """The online query of a view."""
        return self.predict(self.projector(self.backbone(view)))

    def predict(self, z: Tensor) -> Tensor:
        """The query from the online projection `z` (itself here; MoCo-v2+ adds its predictor)."""
        return z

    @torch.no_grad()
    def key(self, view: Tensor) -> Tensor:
        """The key of a view: the target in train mode (batch-statistics BN, see the module docstring)."""
        return self.target_projector(self.target_backbone(view))

    def training_step(self, views: ViewSet, batch: Batch, ctx: StepContext) -> StepOutput:
        check_views(type(self).__name__, views)
        if not self.symmetric and (len(views.global_) != 2 or views.local):
            raise ValueError(
                f"{type(self).__name__} with symmetric False (the paper's asymmetric loss) needs exactly 2 global "
                f"views and no local views, got {len(views.global_)} global and {len(views.local)} local views; "
                "set symmetric: true for more views"
            )
        queue = self.queue
        if self.symmetric:
            keys = [self.key(v) for v in views.global_]
            z = [self.projector(self.backbone(v)) for v in views.all]
            queries = [self.predict(zi) for zi in z]
            pairs = [(a, b) for a in range(len(queries)) for b in range(len(keys)) if a != b]
            terms = [moco_infonce_loss(queries[a], keys[b], queue, self.temperature, "none") for a, b in pairs]
            local = [a >= len(views.global_) for a, _ in pairs]  # local views come after the global ones
            per_sample = weigh_view_terms(terms, local, views.local_weight)
            enqueue = keys[enqueue_view(ctx.step, len(keys))]
        else:
            k = self.key(views.global_[1])
            z = [self.projector(self.backbone(views.global_[0]))]  # only view 1 goes through the online encoder
            per_sample = moco_infonce_loss(self.predict(z[0]), k, queue, self.temperature, "none")
            enqueue = k
        if self.training:  # written after the optimizer step (on_step_end): the loss above read the queue as it was
            self._pending_keys = enqueue.detach()
        return StepOutput(per_sample.mean(), per_sample.detach(), embeddings=z[: len(views.global_)])

    # ------------------------------------------------------------------ continual distillation (CaSSLe)
    def distill_loss(self, p: Tensor, z: Tensor) -> Tensor:
        """InfoNCE with the frozen projection as the positive and the batch's other rows as negatives (SimCLR's
        NT-Xent at MoCo's temperature), as the paper's code distils MoCo-v2+. Not against the queue: it holds the
        current key encoder's keys, another embedding space than the frozen model's."""
        return nt_xent_loss(p, z.detach(), self.temperature)

    @torch.no_grad()
    def enqueue(self, keys: Tensor) -> None:
        """Normalise this rank's `keys` `[b, D]`, gather every rank's (rank order) and push them into the queue."""
        if keys.dim() != 2 or keys.shape[1] != self.queue.shape[1]:
            raise ValueError(f"keys must be [b, {self.queue.shape[1]}], got {tuple(keys.shape)}")
        with torch.autocast(keys.device.type, enabled=False):
            keys = F.normalize(keys.float(), dim=1)
        enqueue_keys(self.queue, self.queue_ptr, gather(keys))

    def on_step_end(self, ctx: StepContext) -> None:
        if self._pending_keys is not None:
            keys, self._pending_keys = self._pending_keys, None
            self.enqueue(keys)


__all__ = ["MoCoV2", "MoCoV2Config", "enqueue_keys", "enqueue_view", "moco_infonce_loss"]
