"""CaSSLe: Fini et al., 2022, "Self-Supervised Models are Continual Learners" (CVPR 2022).

From the second chunk on, a frozen copy of the model as it was at the end of the previous chunk (its `embedder()`:
backbone + projector) gives a target embedding z_f of every global view; a predictor g (Linear-BN-ReLU-Linear)
maps the current model's embedding of the same view, z, into the frozen model's space, and the method's own loss
between g(z) and z_f is added to the loss::

    L = L_method + lambd * mean over global views v of  method.distill_loss(g(z_v), z_f_v)

so the current representation must keep the past one predictable from it (the predictor lets it move, unlike a
plain feature-distillation penalty). The loss form is each method's (`Method.distill_loss`: SimCLR and MoCo
InfoNCE with the frozen projection as the positive, BYOL 2 - 2 cos, SimSiam -cos, Barlow Twins its
cross-correlation loss, SwAV and DINO a cross-entropy over their prototypes; supervised: negative cosine on the
features), logged as the term `cassle_distill`. Chunk 0 has no past model, so no term.

Placement. The predictor and the frozen copy are the strategy's `modules()`: the trainer optimises the predictor
with the method's parameters, checkpoints both once (rank 0's weights, which every rank holds), and trains the
predictor through its own DDP wrapper (`prepare`), so its gradients are averaged over ranks like the model's and
its idle chunk 0 does not stall the model's gradient reduction. The frozen copy gets no gradient and stays in eval
mode (running BN statistics: the past model as evaluation sees it); at a chunk's end it takes the method's weights
and, under DDP, rank 0's buffers (the ranks' BN statistics differ by their last batches), so all ranks distil
towards the same model and a resume gets exactly that model back.

Only the sequential base makes sense: joint training restarts from random weights on all data seen so far (there
is nothing to keep from a previous model), so `joint+cassle` is refused by the stack and by the spec.

Reference: E. Fini, V. G. T. da Costa, X. Alameda-Pineda, E. Ricci, K. Alahari, J. Mairal, CVPR 2022,
arXiv:2112.04215; code github.com/DonkeyShot21/cassle (distillers/, predictor hidden 2048, lambda 1).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from pydantic import Field
from torch import Tensor, nn

from trainers.config import ComponentConfig
from trainers.distributed import world
from trainers.engine.types import Batch, StepContext, StepOutput, ViewSet
from trainers.methods.heads import frozen_copy, mlp
from trainers.strategies.base import ChunkEnd, Strategy


class CaSSLeConfig(ComponentConfig):
    """The spec's `strategy.cassle` options."""

    lambd: float = Field(1.0, ge=0, allow_inf_nan=False,
                         description="weight of the distillation term (1 in the paper)")
    hidden: int = Field(2048, ge=1, description="hidden width of the predictor g (2048 in the paper's code)")


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

    def __init__(self, lambd: float = 1.0, hidden: int = 2048) -> None:
        cfg = CaSSLeConfig.parse("cassle", lambd=lambd, hidden=hidden)
        self.lambd, self.hidden = cfg.lambd, cfg.hidden
        self.predictor: Predictor | None = None  # the bare module (optimizer, checkpoint)
        self.train_predictor: nn.Module | None = None  # what a step calls: the DDP wrapper under DDP
        self.frozen: nn.Module | None = None
        self.frozen_chunk = -1  # the chunk whose end `frozen` holds; -1: none yet (chunk 0)

    def modules(self, method: nn.Module, prepare: Callable[[nn.Module], nn.Module]) -> dict[str, nn.Module]:
        self.predictor = Predictor(method.embedding_dim, self.hidden)
        self.train_predictor = prepare(self.predictor)
        # Same architecture as the embedder from the start, so a checkpoint's weights load into it; its weights
        # mean something only once a chunk has ended (frozen_chunk >= 0).
        self.frozen = frozen_copy(method.embedder()).eval()
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
        current = out.embeddings
        with torch.no_grad():
            target = [self.frozen(view) for view in views.global_[: len(current)]]
        predicted = self.train_predictor(current)
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
        self.frozen.eval()
        self.frozen_chunk = end.chunk

    # The weights are the trainer's to save (once, with the method's); this is only whether they are live yet.
    def state_dict(self) -> dict[str, Any]:
        return {"frozen_chunk": self.frozen_chunk}

    def load_state_dict(self, states: Sequence[dict[str, Any]], rank: int = 0, world_size: int = 1) -> None:
        states = [s for s in states if s]
        if states:  # the same on every rank
            self.frozen_chunk = states[0]["frozen_chunk"]


__all__ = ["CaSSLe", "CaSSLeConfig", "Predictor"]
