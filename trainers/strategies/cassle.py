"""CaSSLe: Fini et al., 2022, "Self-Supervised Models are Continual Learners" (CVPR 2022).

From the second chunk on, a frozen copy of the model as it was at the end of the previous chunk (its `embedder()`:
backbone + projector) gives a target embedding z_f of every global view; a predictor g (Linear-BN-ReLU-Linear)
maps the current model's embedding of the same view, z, into the frozen model's space, and the method's own loss
between g(z) and z_f is added to the loss::

    L = L_method + lambd * mean over global views v of  method.distill_loss(g(z_v), z_f_v)

so the current representation must keep the past one predictable from it (the predictor lets it move, unlike a
plain feature-distillation penalty). The loss form is each method's (`Method.distill_loss`: BYOL 2 - 2 cos,
SimSiam -cos, Barlow Twins its cross-correlation loss, SwAV and DINO a cross-entropy over their prototypes;
supervised: negative cosine on the features), logged as the term `cassle_distill`. Chunk 0 has no past model, so
no term.

As the reference code (its defaults are ours; each difference it had is an option):

* Contrastive methods (SimCLR, MoCo-v2, MoCo-v2+) use the code's "contrastive" distiller, not the per-view
  `distill_loss` (`contrastive: cross`, `contrastive_distill_loss`): the predictions of all global views against
  the frozen embeddings of all global views, each prediction's positive the frozen embedding of its own image and
  view, its negatives every other frozen embedding (of both views), and symmetrically each frozen embedding
  against all predictions, at `temperature` 0.2 (the code's `--distill_temperature`). There are no
  prediction-prediction (or frozen-frozen) pairs, which the method's NT-Xent on (g(z), z_f) has
  (`contrastive: method`). Under DDP the columns are the global batch's (the code's are each GPU's own).
* Every global view is distilled: a method that embeds fewer views than it trains on (asymmetric MoCo-v2 puts only
  its query view through the online encoder) gets the rest embedded by `embedder()` with gradient, as the code's
  methods (all symmetric) report both.
* The frozen model normalises with each batch's statistics (`frozen_bn: batch`): the code's frozen encoder is a
  submodule that Lightning puts in train mode with the model. Its running statistics are never updated here
  (`track_running_stats` off), so the copy stays bit for bit the end of the last chunk; `frozen_bn: running`
  runs it in eval mode on those running statistics instead.

Placement. The predictor and the frozen copy are the strategy's `modules()`: the trainer optimises the predictor
with the method's parameters, checkpoints both once (rank 0's weights, which every rank holds), and trains the
predictor through its own DDP wrapper (`prepare`), so its gradients are averaged over ranks like the model's and
its idle chunk 0 does not stall the model's gradient reduction. The frozen copy gets no gradient (BN mode:
`frozen_bn` above); at a chunk's end it takes the method's weights and, under DDP, rank 0's buffers (the ranks' BN
statistics differ by their last batches), so all ranks distil towards the same model and a resume gets exactly
that model back.

Only the sequential base makes sense: joint training restarts from random weights on all data seen so far (there
is nothing to keep from a previous model), so `joint+cassle` is refused by the stack and by the spec.

Reference: E. Fini, V. G. T. da Costa, X. Alameda-Pineda, E. Ricci, K. Alahari, J. Mairal, CVPR 2022,
arXiv:2112.04215; code github.com/DonkeyShot21/cassle (distillers/, predictor hidden 2048, lambda 1,
distill temperature 0.2; losses/simclr.py `simclr_distill_loss_func`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from trainers.config import ComponentConfig
from trainers.engine.distributed import gather, gather_with_grad, world
from trainers.engine.types import Batch, StepContext, StepOutput, ViewSet
from trainers.methods.heads import frozen_copy, mlp
from trainers.methods.moco_v2 import MoCoV2
from trainers.methods.simclr import SimCLR
from trainers.strategies.base import ChunkEnd, Strategy


class CaSSLeConfig(ComponentConfig):
    """The spec's `strategy.cassle` options."""

    lambd: float = Field(1.0, ge=0, allow_inf_nan=False,
                         description="weight of the distillation term (1 in the paper)")
    hidden: int = Field(2048, ge=1, description="hidden width of the predictor g (2048 in the paper's code)")
    frozen_bn: Literal["batch", "running"] = Field(
        "batch", description="BN of the frozen model: batch: train mode, each batch's statistics (the paper's code); "
                             "running: eval mode, the running statistics at the end of the last chunk",
    )
    contrastive: Literal["cross", "method"] = Field(
        "cross", description="SimCLR and MoCo: cross: the paper's code's contrastive distiller (predictions against "
                             "frozen embeddings and back, no prediction-prediction negatives); method: the method's "
                             "NT-Xent on (g(z), z_f) per view",
    )
    temperature: float = Field(
        0.2, gt=0, allow_inf_nan=False,
        description="temperature of the cross contrastive distillation (0.2, the paper's code's default, which its "
                    "scripts keep); the other methods, and contrastive: method, use the method's own",
    )


CONTRASTIVE = (SimCLR, MoCoV2)  # the methods the paper's code distils with its "contrastive" distiller


def contrastive_distill_loss(predicted: Sequence[Tensor], frozen: Sequence[Tensor], temperature: float) -> Tensor:
    """The paper's code's contrastive distillation over V views, a scalar::

        (CE(P . Z^T / t, own) + CE(Z . P^T / t, own)) / 2

    P: the L2-normalised predictions of every view stacked `[V*B, D]` (with gradient), Z: the frozen embeddings
    likewise (no gradient); each row's target is the column of its own image and view. For V = 2 on one process this
    is `(simclr_distill_loss_func(p1, p2, z1, z2) + simclr_distill_loss_func(z1, z2, p1, p2)) / 2`. Under
    torch.distributed the rows are this rank's and the columns every rank's (gathered; the gradient reaches each
    prediction through its rank's rows and every rank's columns), as `nt_xent_loss`."""
    if not predicted or len(predicted) != len(frozen):
        raise ValueError(f"one frozen embedding per prediction, got {len(predicted)} and {len(frozen)}")
    shape = predicted[0].shape
    if len(shape) != 2 or any(t.shape != shape for t in (*predicted, *frozen)):
        raise ValueError(f"every view's p and z must be [B, D] of one shape, got "
                         f"{[tuple(t.shape) for t in (*predicted, *frozen)]}")
    with torch.autocast(predicted[0].device.type, enabled=False):
        dtype = torch.promote_types(predicted[0].dtype, torch.float32)
        p = [F.normalize(v.to(dtype), dim=1) for v in predicted]
        z = [F.normalize(v.detach().to(dtype), dim=1) for v in frozen]
        rank, size = world()
        b = shape[0]
        own = torch.arange(b, device=p[0].device) + rank * b
        target = torch.cat([own + v * b * size for v in range(len(p))])

        def cross_entropy(rows: list[Tensor], columns: list[Tensor]) -> Tensor:
            return F.cross_entropy(torch.cat(rows) @ torch.cat(columns).T / temperature, target)

        return (cross_entropy(p, [gather(v) for v in z]) + cross_entropy(z, [gather_with_grad(v) for v in p])) / 2


class Predictor(nn.Module):
    """g: Linear-BN-ReLU-Linear from the embedding to the embedding, applied to each view on its own (BN statistics
    per view, as the paper's code). It takes the list of views' embeddings so that one step is one forward of its
    DDP wrapper."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.net = mlp(dim, hidden, dim)

    def forward(self, embeddings: Sequence[Tensor]) -> list[Tensor]:
        return [self.net(z) for z in embeddings]


class CaSSLe(Strategy):
    """See the module docstring. Options: `CaSSLeConfig`."""

    name = "cassle"
    bases = ("sequential",)

    def __init__(self, lambd: float = 1.0, hidden: int = 2048, frozen_bn: str = "batch", contrastive: str = "cross",
                 temperature: float = 0.2) -> None:
        cfg = CaSSLeConfig.parse("cassle", lambd=lambd, hidden=hidden, frozen_bn=frozen_bn, contrastive=contrastive,
                                 temperature=temperature)
        self.lambd, self.hidden, self.temperature = cfg.lambd, cfg.hidden, cfg.temperature
        self.frozen_bn, self.contrastive = cfg.frozen_bn, cfg.contrastive
        self.predictor: Predictor | None = None  # the bare module (optimizer, checkpoint)
        self.train_predictor: nn.Module | None = None  # what a step calls: the DDP wrapper under DDP
        self.frozen: nn.Module | None = None
        self.frozen_chunk = -1  # the chunk whose end `frozen` holds; -1: none yet (chunk 0)

    def modules(self, method: nn.Module, prepare: Callable[[nn.Module], nn.Module]) -> dict[str, nn.Module]:
        self.predictor = Predictor(method.embedding_dim, self.hidden)
        self.train_predictor = prepare(self.predictor)
        # Same architecture as the embedder from the start, so a checkpoint's weights load into it; its weights
        # mean something only once a chunk has ended (frozen_chunk >= 0).
        self.frozen = frozen_copy(method.embedder())
        for module in self.frozen.modules():  # BN normalises by the batch or the running statistics, never updates them
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.track_running_stats = False
        self.frozen.train(self.frozen_bn == "batch")
        self.frozen_chunk = -1  # a rebuilt model has no past yet
        return {"predictor": self.predictor, "frozen": self.frozen}

    def extra_loss(self, method: nn.Module, out: StepOutput, views: ViewSet, batch: Batch,
                   ctx: StepContext) -> dict[str, Tensor]:
        if self.frozen_chunk < 0:
            return {}
        if self.frozen is None or self.train_predictor is None:
            raise RuntimeError("cassle: modules() was not called: the trainer builds the predictor and the frozen "
                               "copy with the model")
        if not out.embeddings:
            raise ValueError(f"cassle: {type(method).__name__}.training_step reports no StepOutput.embeddings, "
                             "so there is nothing to distil")
        current = list(out.embeddings)
        if len(current) < len(views.global_):  # asymmetric MoCo-v2 embeds its query view only: embed the others
            embedder = method.embedder()
            current += [embedder(view) for view in views.global_[len(current):]]
        self.frozen.train(self.frozen_bn == "batch")  # (whatever mode a caller left the module tree in)
        with torch.no_grad():
            target = [self.frozen(view) for view in views.global_]
        predicted = self.train_predictor(current)
        if self.contrastive == "cross" and isinstance(method, CONTRASTIVE):
            loss = contrastive_distill_loss(predicted, target, self.temperature)
        else:
            loss = torch.stack([method.distill_loss(p, z) for p, z in zip(predicted, target)]).mean()
        return {"cassle_distill": self.lambd * loss}

    @torch.no_grad()
    def on_chunk_end(self, end: ChunkEnd) -> None:
        if self.frozen is None:
            raise RuntimeError("cassle: modules() was not called before the chunk ended")
        self.frozen.load_state_dict(end.method.embedder().state_dict())
        _, size = world()
        if size > 1:  # the same past model on every rank: rank 0's, as the checkpoint stores it
            for tensor in self.frozen.state_dict().values():
                dist.broadcast(tensor, src=0)
        self.frozen.train(self.frozen_bn == "batch")
        self.frozen_chunk = end.chunk

    # The weights are the trainer's to save (once, with the method's); this is only whether they are live yet.
    def state_dict(self) -> dict[str, Any]:
        return {"frozen_chunk": self.frozen_chunk}

    def load_state_dict(self, states: Sequence[dict[str, Any]], rank: int = 0, world_size: int = 1) -> None:
        states = [s for s in states if s]
        if states:  # the same on every rank
            self.frozen_chunk = states[0]["frozen_chunk"]


__all__ = ["CONTRASTIVE", "CaSSLe", "CaSSLeConfig", "Predictor", "contrastive_distill_loss"]
