"""The supervised baseline (SL): a linear classifier on the backbone features, trained with cross-entropy.

The same loop, streams, augmentations and backbone as the self-supervised methods, but the labels as the
training signal: the standard supervised recipe (He, Zhang, Ren, Sun, "Deep Residual Learning for Image
Recognition", CVPR 2016, arXiv:1512.03385; cross-entropy on augmented crops, optional label smoothing of
Szegedy et al., 2016). It is the SL reference the streaming-SSL study compares every method against (Hu, Yang,
Hong, et al., "How Well Does Self-Supervised Pre-Training Perform with Streaming Data?", ICLR 2022,
arXiv:2104.12081).

Usage::

    method = Supervised(backbone, num_classes=100)
    out = method.training_step(views, batch, ctx)      # batch.labels must all be known (>= 0)

Every global view is an augmented copy of its image; each view is classified and the loss is the mean of the
cross-entropy over the views and the images. Local (multi-crop) views are not used. On a mixed batch
(`Batch.mix`, LUMP's mixup: inputs `w x + (1 - w) x'`) each image's loss is `w CE(y) + (1 - w) CE(y')` (mixup,
Zhang et al., ICLR 2018, arXiv:1710.09412).

Options (`SupervisedConfig`): `num_classes`, `label_smoothing`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from trainers.config import ComponentConfig
from trainers.engine.types import Batch, StepContext, StepOutput, ViewSet
from trainers.methods.base import Method, check_views

_REDUCTIONS = ("mean", "none")


class SupervisedConfig(ComponentConfig):
    """The supervised baseline's options."""

    num_classes: int = Field(
        1000, ge=2,
        description="outputs of the linear classifier; must cover every label of the data (labels 0 .. "
                    "num_classes - 1). 1000 by default (ImageNet, the paper's setting); set it to the data set's "
                    "class count (the orchestrator can fill it from the manifest)",
    )
    label_smoothing: float = Field(
        0.0, ge=0, lt=1, allow_inf_nan=False,
        description="label smoothing of the cross-entropy (0: plain cross-entropy, the ResNet recipe; 0.1 is "
                    "Szegedy et al.'s)",
    )


def supervised_loss(logits: Tensor, labels: Tensor, label_smoothing: float = 0.0,
                    reduction: str = "mean") -> Tensor:
    """Cross-entropy of `logits` `[B, K]` against int `labels` `[B]` in [0, K), in float32; "none" -> `[B]`.

    Raises a ValueError naming how many rows have an unknown label (-1) or one outside [0, K).
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if not 0 <= label_smoothing < 1:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}")
    if logits.dim() != 2 or labels.dim() != 1 or logits.shape[0] != labels.shape[0]:
        raise ValueError(f"logits must be [B, K] and labels [B], got {tuple(logits.shape)} and "
                         f"{tuple(labels.shape)}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"labels must be integer class indices, got {labels.dtype}")
    check_labels(labels, logits.shape[1])
    dtype = torch.promote_types(logits.dtype, torch.float32)
    with torch.autocast(logits.device.type, enabled=False):
        return F.cross_entropy(logits.to(dtype), labels.long(), reduction=reduction,
                               label_smoothing=label_smoothing)


def check_labels(labels: Tensor, num_classes: int) -> None:
    """A ValueError naming how many of the B labels are unknown (< 0) or >= num_classes."""
    unknown = int((labels < 0).sum())
    if unknown:
        raise ValueError(f"supervised: {unknown} of {labels.shape[0]} rows lack labels (label -1); the supervised "
                         f"baseline needs a labelled data set")
    too_big = int((labels >= num_classes).sum())
    if too_big:
        raise ValueError(f"supervised: {too_big} of {labels.shape[0]} labels are >= num_classes ({num_classes}, "
                         f"largest label {int(labels.max())}); set methods.supervised.num_classes to the data set's "
                         f"class count")


class Supervised(Method):
    """Backbone + linear classifier trained with cross-entropy on the labels; the SL baseline.

    `per_sample` is each image's cross-entropy averaged over its global views (its mean is the loss).
    Options: `SupervisedConfig`.
    """

    Config = SupervisedConfig
    name = "supervised"
    needs_labels = True
    min_global_views = 1

    def __init__(self, backbone: nn.Module, **options) -> None:
        super().__init__(backbone, options)
        self.classifier = nn.Linear(self.feature_dim, self.config.num_classes)

    def training_step(self, views: ViewSet, batch: Batch, ctx: StepContext) -> StepOutput:
        b = check_views("supervised", views, min_global=1)
        if len(batch) != b:
            raise ValueError(f"supervised: the batch has {len(batch)} labels for {b} images per view")
        check_labels(batch.labels, self.config.num_classes)
        if batch.mix is not None:  # mixed inputs (LUMP): mixup's loss, each label weighed as its image
            check_labels(batch.mix.labels, self.config.num_classes)
        features = [self.backbone(v) for v in views.global_]
        terms = [self._view_loss(self.classifier(f), batch) for f in features]
        per_sample = torch.stack(terms).mean(dim=0)
        # The embedding is the backbone's features; CaSSLe distils them with the default negative cosine.
        return StepOutput(per_sample.mean(), per_sample.detach(), embeddings=features)

    def _view_loss(self, logits: Tensor, batch: Batch) -> Tensor:
        """`[B]` cross-entropy of one view; `w CE(y) + (1 - w) CE(y_partner)` when the batch is mixed."""
        loss = supervised_loss(logits, batch.labels, self.config.label_smoothing, reduction="none")
        if batch.mix is None:
            return loss
        partner = supervised_loss(logits, batch.mix.labels, self.config.label_smoothing, reduction="none")
        return batch.mix.weight * loss + (1.0 - batch.mix.weight) * partner
