"""Semi-supervised fine-tuning: the whole network (backbone + a fresh linear head) on a labelled subset.

Usage::

    from evaluators.finetune import FinetuneConfig, finetune, label_fraction_finetune
    result = finetune(backbone, train_images, train_labels, val_images, val_labels, epochs=30, lr=0.05, seed=0)
    print(result.top1, result.top5)                       # fractions of the validation rows
    # the 1% / 10% protocols: a class-balanced seeded subset (evaluators.label_subsets) drawn first
    result, subset = label_fraction_finetune(backbone, train_images, train_labels, val_images, val_labels,
                                             FinetuneConfig(label_fraction=0.1), seed=0)

The protocol of SimCLR's and BYOL's semi-supervised tables, made small: a linear head on the backbone's pooled
features (``backbone.out_dim``), initialised at zero, and the backbone trained with it by SGD with (Nesterov)
momentum under a cosine LR decay to 0, no warm-up. The backbone's LR is ``lr * backbone_lr_scale`` (a smaller
backbone LR keeps more of the pre-trained features on tiny subsets); ``backbone_lr_scale=0`` freezes it (eval
mode, no gradient: a linear probe on augmented views, the frozen baseline). Weight decay skips biases and
normalisation layers (``trainers.optim.param_groups``). Training views are a random resized crop (area in
``[crop_min_scale, 1]``, ``W x W`` for ``W``-wide images) and a horizontal flip, batched on the device
(``trainers.views.augment``); evaluation sees the whole, un-augmented image. Top-1 and top-5 come from the head's
logits on the validation set (top-5 over ``min(5, C)`` classes, so with C <= 5 it is 1.0).

The backbone is trained in place (pass a copy to keep the original) and left in eval mode. Batch order and
augmentation come from a CPU generator seeded with ``seed`` and the head starts at zero, so a call is
deterministic on a given device (on a GPU, up to cuDNN's own non-determinism). Each epoch has
``N // batch_size`` steps, the remainder spread over them, so no step has a lone row BatchNorm cannot normalise.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from evaluators.label_subsets import LabelSubset, label_subset
from trainers.config import ComponentConfig
from trainers.optim import param_groups
from trainers.schedules import WarmupCosine
from trainers.views.augment import MIN_VIEW_SIZE, AugmentConfig, make_views, normalize

__all__ = ["FinetuneConfig", "FinetuneResult", "finetune", "label_fraction_finetune"]

TOP_K = 5


class FinetuneConfig(ComponentConfig):
    """The options of a label-fraction fine-tune (SimCLR's semi-supervised recipe, scaled down)."""

    label_fraction: float = Field(0.1, gt=0, le=1, allow_inf_nan=False,
                                  description="fraction of each class's training rows with their label (0.01, 0.1)")
    epochs: int = Field(30, ge=1, description="passes over the labelled subset")
    batch_size: int = Field(256, ge=2, description="rows per step (>= 2: BatchNorm needs two rows)")
    lr: float = Field(0.05, gt=0, allow_inf_nan=False, description="peak SGD LR of the head, cosine-decayed to 0")
    backbone_lr_scale: float = Field(1.0, ge=0, allow_inf_nan=False,
                                     description="backbone LR = lr x this; 0 freezes the backbone (a probe)")
    momentum: float = Field(0.9, ge=0, lt=1, allow_inf_nan=False, description="SGD momentum")
    nesterov: bool = Field(True, description="Nesterov momentum (SimCLR's fine-tuning uses it)")
    weight_decay: float = Field(0.0, ge=0, allow_inf_nan=False, description="L2 on weights (not biases or norms)")
    crop_min_scale: float = Field(0.08, gt=0, le=1, allow_inf_nan=False,
                                  description="smallest area fraction of the random resized crop")
    flip: bool = Field(True, description="random horizontal flip of the training views")


@dataclass(frozen=True)
class FinetuneResult:
    """Validation accuracy after fine-tuning and the budget it took."""

    top1: float
    top5: float
    epochs: int
    steps: int
    train_rows: int
    val_rows: int
    num_classes: int
    final_loss: float  # mean training loss of the last epoch

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def finetune(
    backbone: nn.Module,
    train_images: Tensor,
    train_labels: Tensor,
    val_images: Tensor,
    val_labels: Tensor,
    *,
    epochs: int = 30,
    batch_size: int = 256,
    lr: float = 0.05,
    backbone_lr_scale: float = 1.0,
    momentum: float = 0.9,
    nesterov: bool = True,
    weight_decay: float = 0.0,
    crop_min_scale: float = 0.08,
    flip: bool = True,
    num_classes: int | None = None,
    feature_dim: int | None = None,
    seed: int = 0,
    device: str | torch.device | None = None,
    amp_dtype: torch.dtype | None = None,
    eval_batch_size: int = 512,
) -> FinetuneResult:
    """Fine-tune ``backbone`` with a new linear head on ``train_*`` and score it on ``val_*`` (module docstring).

    Args:
        backbone: float ``[B,3,H,W]`` -> ``[B, D]``; ``D`` is ``feature_dim`` or else ``backbone.out_dim``.
        train_images, val_images: uint8 ``[N,3,H,W]`` as the data layer delivers them (any device).
        train_labels, val_labels: integer ``[N]`` in ``[0, num_classes)``.
        num_classes: size of the label space; default ``max(train_labels, val_labels) + 1``.
        seed: seeds the batch order and the augmentation.
        device: where to train; default the backbone's device.
        amp_dtype: autocast dtype for the forward passes (``torch.bfloat16``) or None; the loss is float32.

    Raises:
        ValueError: a bad option, images that are not uint8 ``[N,3,H,W]``, labels that do not match them or are
            negative, an unknown feature width, fewer than 2 training rows, or a loss that diverged.
    """
    options = FinetuneConfig.parse(
        "finetune", epochs=epochs, batch_size=batch_size, lr=lr, backbone_lr_scale=backbone_lr_scale,
        momentum=momentum, nesterov=nesterov, weight_decay=weight_decay, crop_min_scale=crop_min_scale, flip=flip,
    )
    _check_split("train", train_images, train_labels)
    _check_split("val", val_images, val_labels)
    if train_images.shape[0] < 2:
        raise ValueError(f"finetune needs at least 2 training rows (BatchNorm), got {train_images.shape[0]}")
    needed = int(max(train_labels.max(), val_labels.max())) + 1
    if num_classes is None:
        num_classes = needed
    elif isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < needed:
        raise ValueError(f"num_classes must be an integer >= the largest label + 1 = {needed}, got {num_classes!r}")
    dim = feature_dim if feature_dim is not None else getattr(backbone, "out_dim", None)
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise ValueError(f"the backbone's feature width is unknown: pass feature_dim or give it an int out_dim "
                         f"(found {dim!r})")
    if device is None:
        param = next(backbone.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
    device = torch.device(device)
    backbone.to(device)

    frozen = options.backbone_lr_scale == 0.0
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):  # nn.Linear's own init draws from the global RNG: leave it as it was
        head = nn.Linear(dim, num_classes).to(device)
    nn.init.zeros_(head.weight)  # a zero head starts at uniform predictions, whatever the feature scale
    nn.init.zeros_(head.bias)
    groups = [{**g, "lr_scale": 1.0} for g in param_groups(head, options.weight_decay)]
    if not frozen:
        groups += [{**g, "lr_scale": options.backbone_lr_scale}
                   for g in param_groups(backbone, options.weight_decay)]
    groups = [g for g in groups if g["params"]]
    optimizer = torch.optim.SGD(groups, lr=options.lr, momentum=options.momentum,
                                nesterov=options.nesterov and options.momentum > 0)

    n = train_images.shape[0]
    steps_per_epoch = max(1, n // options.batch_size)
    schedule = WarmupCosine(peak=options.lr, total_steps=options.epochs * steps_per_epoch)
    view = AugmentConfig(size=max(MIN_VIEW_SIZE, int(train_images.shape[-1])), scale=(options.crop_min_scale, 1.0),
                         flip_p=0.5 if options.flip else 0.0, jitter_p=0.0, gray_p=0.0, blur_p=0.0, solarize_p=0.0)
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext()
    labels_on_device = train_labels.to(device, torch.int64)

    # Frozen: BatchNorm keeps its statistics and nothing in the backbone moves (a probe on augmented views).
    trainable = [(p, p.requires_grad) for p in backbone.parameters()]
    backbone.train(not frozen)
    backbone.requires_grad_(not frozen)
    step, epoch_loss = 0, math.nan
    try:
        for _ in range(options.epochs):
            total = 0.0
            for rows in torch.tensor_split(torch.randperm(n, generator=generator), steps_per_epoch):
                for group in optimizer.param_groups:
                    group["lr"] = schedule.lr(step) * group["lr_scale"]
                images = train_images[rows].to(device, non_blocking=True)
                (views,) = make_views(images, [view], generator=generator)
                with autocast:
                    logits = head(backbone(views))
                loss = F.cross_entropy(logits.float(), labels_on_device[rows.to(device)])
                if not torch.isfinite(loss):
                    raise ValueError(f"finetune diverged (non-finite loss at step {step}) with lr={options.lr}; "
                                     "lower lr or backbone_lr_scale")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += loss.item()
                step += 1
            epoch_loss = total / steps_per_epoch
    finally:
        for p, requires_grad in trainable:
            p.requires_grad_(requires_grad)
        backbone.eval()

    top1, top5 = _evaluate(backbone, head, val_images, val_labels, device, autocast, eval_batch_size)
    return FinetuneResult(top1=top1, top5=top5, epochs=options.epochs, steps=step, train_rows=n,
                          val_rows=int(val_images.shape[0]), num_classes=num_classes, final_loss=epoch_loss)


def label_fraction_finetune(
    backbone: nn.Module,
    train_images: Tensor,
    train_labels: Tensor,
    val_images: Tensor,
    val_labels: Tensor,
    config: FinetuneConfig,
    *,
    seed: int = 0,
    **kwargs: Any,
) -> tuple[FinetuneResult, LabelSubset]:
    """Draw ``config.label_fraction`` of every class's training rows (:func:`evaluators.label_subsets.label_subset`
    with ``seed``), fine-tune on them with ``config``'s options, and return the result and the subset (its record
    is the artifact to log). ``kwargs`` go to :func:`finetune` (``device``, ``amp_dtype``, ``num_classes``...)."""
    subset = label_subset(train_labels, config.label_fraction, seed=seed)
    rows = torch.from_numpy(subset.indices.copy())  # the subset keeps its read-only array
    options = config.model_dump(exclude={"label_fraction"})
    num_classes = kwargs.pop("num_classes", None)
    if num_classes is None:  # the label space of the whole split, though 1% of it is what is trained on
        num_classes = int(max(torch.as_tensor(train_labels).max(), torch.as_tensor(val_labels).max())) + 1
    result = finetune(backbone, train_images[rows], torch.as_tensor(train_labels)[rows], val_images, val_labels,
                      num_classes=num_classes, seed=seed, **options, **kwargs)
    return result, subset


def _evaluate(backbone: nn.Module, head: nn.Module, images: Tensor, labels: Tensor, device: torch.device,
              autocast: Any, batch_size: int) -> tuple[float, float]:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"eval_batch_size must be an integer >= 1, got {batch_size!r}")
    hits1 = hits5 = 0
    backbone.eval()
    with torch.no_grad():
        for start in range(0, images.shape[0], batch_size):
            x = normalize(images[start : start + batch_size].to(device))
            y = labels[start : start + batch_size].to(device, torch.int64)
            with autocast:
                logits = head(backbone(x)).float()
            # Stable sort: among tied logits the smaller class id ranks first (a zero head predicts class 0).
            ranked = torch.sort(logits, dim=1, descending=True, stable=True).indices[:, :TOP_K]
            hits = ranked == y[:, None]
            hits1 += int(hits[:, 0].sum())
            hits5 += int(hits.any(dim=1).sum())
    n = images.shape[0]
    return hits1 / n, hits5 / n


def _check_split(split: str, images: Any, labels: Any) -> None:
    if not isinstance(images, Tensor) or images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        found = (images.dtype, tuple(images.shape)) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"{split}_images must be a uint8 tensor [N,3,H,W], found {found}")
    if images.shape[0] == 0:
        raise ValueError(f"{split}_images is empty")
    if min(images.shape[-2:]) < MIN_VIEW_SIZE:
        raise ValueError(f"{split}_images must be at least {MIN_VIEW_SIZE} px a side, found {tuple(images.shape)}")
    if (not isinstance(labels, Tensor) or labels.dtype.is_floating_point or labels.dtype == torch.bool
            or labels.shape != (images.shape[0],)):
        found = (labels.dtype, tuple(labels.shape)) if isinstance(labels, Tensor) else type(labels).__name__
        raise ValueError(f"{split}_labels must be an integer tensor [{images.shape[0]}], found {found}")
    if labels.min() < 0:
        row = int(torch.nonzero(labels < 0)[0])
        raise ValueError(f"{split}_labels must be >= 0: row {row} has {int(labels[row])}")

