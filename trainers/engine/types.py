"""What flows through the engine: the batch a worker receives, the views a method sees, what a step returns.

    batch = Batch.from_images(images_uint8)              # labels -1, index 0..B-1, domain 0 when unknown
    views = make_view_set(batch.images, plan, generator)  # trainers.views.plan: ViewSet(global_=[...], local=[...])
    out = method.training_step(views, batch, ctx)         # StepOutput(loss, per_sample [B], terms {"loss/x": t},
                                                          #            embeddings [per global view])

Plain dataclasses over tensors, so a test, the chunk loop, the online loop and a benchmark all build them alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import Tensor


@dataclass
class Batch:
    """One training batch as ingest hands it to a worker.

    Attributes:
        images: uint8 `[B, 3, H, W]`.
        labels: int64 `[B]`, -1 where the data set has no label for the row.
        index: int64 `[B]`, a stable integer id of each row (from its key), for replay buffers and RALS.
        domain: int64 `[B]`, the row's domain (0 when the data set has one).
        mix: set when a strategy trains on mixed inputs (LUMP's mixup): the views are
            `mix.weight x` this batch's views `+ (1 - mix.weight) x` those of `mix.labels`' rows; a method that
            uses labels weighs its loss the same way. None for plain batches.
        repeated: the epoch has delivered these rows before (the reader cycles a class-subsampled chunk to keep
            its planned steps): buffers do not offer them to their reservoir again.
    """

    images: Tensor
    labels: Tensor
    index: Tensor
    domain: Tensor
    mix: LabelMix | None = None
    repeated: bool = False

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4 or self.images.shape[1] != 3:
            raise ValueError(f"Batch.images must be uint8 [B, 3, H, W], got {self.images.dtype} "
                             f"{tuple(self.images.shape)}")
        b = self.images.shape[0]
        for name in ("labels", "index", "domain"):
            value = getattr(self, name)
            if value.shape != (b,):
                raise ValueError(f"Batch.{name} must be [{b}] like images, got {tuple(value.shape)}")
        if self.mix is not None and self.mix.labels.shape != (b,):
            raise ValueError(f"Batch.mix.labels must be [{b}] like images, got {tuple(self.mix.labels.shape)}")

    @classmethod
    def from_images(cls, images: Tensor, labels: Tensor | None = None, index: Tensor | None = None,
                    domain: Tensor | None = None) -> "Batch":
        """A batch of `images` with whatever else is known; the rest filled as unknown (-1 labels, 0 domain)."""
        b, device = images.shape[0], images.device
        return cls(
            images=images,
            labels=labels if labels is not None else torch.full((b,), -1, dtype=torch.long, device=device),
            index=index if index is not None else torch.arange(b, device=device),
            domain=domain if domain is not None else torch.zeros(b, dtype=torch.long, device=device),
        )

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def has_labels(self) -> bool:
        return bool((self.labels >= 0).all())

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Batch":
        mix = None if self.mix is None else LabelMix(self.mix.labels.to(device, non_blocking=non_blocking),
                                                    self.mix.weight)
        return Batch(*(t.to(device, non_blocking=non_blocking)
                       for t in (self.images, self.labels, self.index, self.domain)), mix=mix,
                     repeated=self.repeated)

    def cat(self, other: "Batch") -> "Batch":
        """This batch followed by `other` (images must have the same size): replay and RALS mix batches."""
        if self.mix is not None or other.mix is not None:
            raise ValueError("Batch.cat: a mixed batch (Batch.mix) cannot be joined: its rows share one weight")
        return Batch(*(torch.cat([a, b]) for a, b in zip(
            (self.images, self.labels, self.index, self.domain), (other.images, other.labels, other.index,
                                                                  other.domain))))

    def select(self, rows: Tensor) -> "Batch":
        mix = None if self.mix is None else LabelMix(self.mix.labels[rows], self.mix.weight)
        return Batch(self.images[rows], self.labels[rows], self.index[rows], self.domain[rows], mix=mix,
                     repeated=self.repeated)


@dataclass(frozen=True)
class LabelMix:
    """A mixed batch's partner labels and weight: its inputs are `weight x own + (1 - weight) x partner's`."""

    labels: Tensor  # int64 [B], the partner rows' labels (-1 where unknown)
    weight: float  # in [0, 1]


@dataclass
class ViewSet:
    """The augmented views of one batch: `global_` (full-size crops) and `local` (small multi-crop crops).

    Every tensor is float `[B, 3, S, S]`, normalised; sizes are equal within a list and may differ between them.

    Attributes:
        local_weight: the share of the loss from terms whose student / query view is local (the plan's
            `local_loss_weight`), for the methods that weigh them; None: the method's plain mean over its terms.
        overlap_fallbacks: int64 scalar, local crops of this batch that found no box inside the plan's IoU band
            (each took its nearest candidate); None when the plan bounds no overlap.
    """

    global_: list[Tensor]
    local: list[Tensor] = field(default_factory=list)
    local_weight: float | None = None
    overlap_fallbacks: Tensor | None = None

    @property
    def all(self) -> list[Tensor]:
        return [*self.global_, *self.local]

    def __len__(self) -> int:
        return len(self.global_) + len(self.local)

    def map(self, fn) -> "ViewSet":
        return replace(self, global_=[fn(v) for v in self.global_], local=[fn(v) for v in self.local])


@dataclass
class StepOutput:
    """What a method's `training_step` returns.

    Attributes:
        loss: the scalar to minimise (this rank's share; DDP averages gradients over ranks).
        per_sample: `[B]`, each image's contribution (its mean is `loss` where the method's loss is a mean of
            per-image terms); RALS and data-quality checks rank samples by it. Detached use only.
        terms: named scalars to log, e.g. {"loss/invariance": ..., "momentum": ...}.
        embeddings: `[B, D]` per global view, `embeddings[i]` of `views.global_[i]` (the first len(embeddings)
            global views), each what `Method.embedder()` gives for that view, still attached to the graph: what a
            strategy that distils the representation reads (CaSSLe), so it needs no second forward pass.
    """

    loss: Tensor
    per_sample: Tensor
    terms: dict[str, Tensor] = field(default_factory=dict)
    embeddings: list[Tensor] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.loss.dim() != 0:
            raise ValueError(f"StepOutput.loss must be a scalar, got shape {tuple(self.loss.shape)}")
        if self.per_sample.dim() != 1:
            raise ValueError(f"StepOutput.per_sample must be [B], got shape {tuple(self.per_sample.shape)}")

    def with_extra(self, name: str, value: Tensor) -> "StepOutput":
        """A copy whose loss adds `value` (a strategy's penalty), logged as `terms[name]`."""
        return replace(self, loss=self.loss + value, terms={**self.terms, name: value.detach()})


@dataclass(frozen=True)
class StepContext:
    """Where training stands at a step, for methods and strategies.

    Attributes:
        step: optimizer steps taken on the line before this one (counts across chunks; the global progress).
        total_steps: the line's planned steps, or None when unbounded (online streams).
        chunk: the chunk being trained (-1 online).
        epoch: the epoch inside the chunk.
        lr: the learning rate of this step (of the first parameter group).
        rank, world_size: this worker's place under DDP.
        stream_batch: the stream batch being learned (online), else None.
        steps_per_epoch: optimizer steps per epoch of the current chunk, when known.
        model_start: the line step at which the current model was built: 0, or the step of the chunk where a
            weight reset (joint training `from_scratch`) rebuilt it. Every per-model schedule (the EMA momentum,
            DINO's teacher-temperature warm-up and last-layer freeze, SwAV's prototype freeze and queue start)
            counts from here: a rebuilt model starts them over, as a fresh run would.
        model_end: the line step at which the current model's planned life ends: the next rebuild, or the line's
            end; None: `total_steps`. The EMA's cosine runs from `model_start` to here.
        model_epochs: epochs the current model completed before this step, counted over every chunk it trained
            (of whatever size): its epoch index, never decreasing. None when the loop does not count epochs
            (online streams, benchmarks): the methods then derive one from the step.
    """

    step: int
    total_steps: int | None
    chunk: int = 0
    epoch: int = 0
    lr: float = 0.0
    rank: int = 0
    world_size: int = 1
    stream_batch: int | None = None
    steps_per_epoch: int | None = None  # of the current chunk (a fallback for epoch-based schedules)
    model_start: int = 0
    model_end: int | None = None
    model_epochs: int | None = None

    @property
    def progress(self) -> float:
        """step / total_steps in [0, 1]: the line's progress; 0 when the total is unknown."""
        if not self.total_steps:
            return 0.0
        return min(1.0, max(0.0, self.step / self.total_steps))

    @property
    def model_step(self) -> int:
        """Optimizer steps the current model has taken before this one (the line's step when never rebuilt)."""
        return self.step - self.model_start

    @property
    def model_steps(self) -> int | None:
        """The current model's planned steps, from its build to `model_end`; None when unknown (unbounded)."""
        end = self.model_end if self.model_end is not None else self.total_steps
        return None if not end else max(0, end - self.model_start)

    @property
    def model_progress(self) -> float:
        """model_step / model_steps in [0, 1], the progress of the per-model schedules (the EMA momentum); equal
        to `progress` for a model built at the line's start; 0 when the model's length is unknown."""
        if not self.model_steps:
            return 0.0
        return min(1.0, max(0.0, self.model_step / self.model_steps))


__all__ = ["Batch", "LabelMix", "StepContext", "StepOutput", "ViewSet"]
