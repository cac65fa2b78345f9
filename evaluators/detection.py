"""Detection and instance segmentation transfer: torchvision's Faster / Mask R-CNN around our pre-trained encoder.

Usage::

    from evaluators.detection import DetectorConfig, build_detector, evaluate_detector, train_detector
    backbone = load_backbone(state)                         # trainers.engine.checkpoint; optionally NormRescale'd
    model = build_detector(backbone, num_classes=20, config=DetectorConfig(model="faster_rcnn"), seed=0)
    result = train_detector(model, train_set, steps=24_000, lr=0.02, batch_size=16, seed=0, device="cuda")
    evaluate_detector(model, val_set)        # {"ap": .., "ap50": .., "ap75": ..} (+ "mask_ap", ... for Mask R-CNN)

Data sets are sequences of ``(image uint8 [3, H, W], target)`` pairs in torchvision's detection format, labels
1..K (0 is background), as ``orchestrator.data.detection_shards.DetectionShards`` yields them; ``num_classes`` is
K. NormRescale (``evaluators.norm_rescale.norm_rescale``) is the caller's step: apply it to the backbone first.

Backbones (`build_detector` deep-copies the one it is given, so the caller's stays as it was):

* ResNet: its four stages (``layer1..layer4``, ``stage_dims`` channels, whatever the width) feed an FPN with a
  max-pooled fifth level, torchvision's ``BackboneWithFPN``; the stem and stages keep their names, so
  ``model.backbone.body.state_dict()`` holds the pre-trained tensors under the backbone's own keys.
* MobileNetV2: torchvision's MobileNet FPN recipe (``fasterrcnn_mobilenet_v3_large_fpn``): an FPN over the last two
  stride groups (96 x width channels, and the ``out_dim``-channel last map) plus a pooled level, each with all five
  anchor sizes. The last map alone would feed 1280 x 7 x 7 features per RoI to the box head (measured: ~20 s a
  step for two 64 px images on the 2-core CPU, against ~0.3 s with the FPN). Body keys are ``features``' indices
  (``model.backbone.body["0"]`` is ``features.0``).
* ViT: refused; torchvision's heads take convolutional feature maps, and the plain-ViT pyramid (ViTDet) is not here.

Anchor sizes default to 8 x the level's stride (torchvision's 32 px at stride 4 ... 512 at 64), so a CIFAR-stem
network (strides 1, 2, 4, 8) gets 8 ... 128 px anchors for its small images; every MobileNet level gets s x (1, 2,
4, 8, 16), s the last map's stride (32, or 8 with the CIFAR stem). Images are normalised inside the model with the
pre-training's ImageNet mean and std.

Normalisation (``norm``): the MoCo detection recipe fine-tunes BN (SyncBN over 8 GPUs, 2 images each);
torchvision's and Detectron's supervised-init recipe freezes it. Default ``"frozen"``: every BatchNorm becomes
torchvision's ``FrozenBatchNorm2d`` with the pre-trained statistics and affine, the safe choice for the 1-4-image
batches of a CPU or a single GPU, where batch statistics are noise; ``"train"`` keeps BN and trains it (BN in frozen
stages still updates its statistics in train mode, as in torchvision). ``trainable_layers`` (0-5) counts stages from
the top, the stem being the fifth; default 5, all of them, as MoCo fine-tunes the whole network.

Training (`train_detector`) is Detectron2's schedule made small: SGD with momentum and weight decay, a linear
warm-up from ``lr / 1000``, then the LR x 0.1 at 3/4 and at 11/12 of the steps (its VOC schedule: 18k and 22k of
24k); a horizontal flip with p 0.5. Crowd objects are left out of training; crowd and VOC ``difficult`` objects are
ignored regions in evaluation (COCO's rule). A seed fixes the heads' initialisation, batch order, flips and the
RPN/RoI samplers, so a run repeats exactly on a CPU (the global RNG is left as it was).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import Field
from torch import Tensor, nn
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.rpn import AnchorGenerator
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.misc import FrozenBatchNorm2d

from evaluators.detection_ap import detection_ap
from trainers.backbones.mobilenet import STAGE_ENDS, MobileNetV2
from trainers.backbones.resnet import ResNet
from trainers.backbones.vit import ViT
from trainers.config import ComponentConfig
from trainers.optim import param_groups
from trainers.views.augment import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["DetectionTaskConfig", "DetectionTrainConfig", "DetectionTrainResult", "DetectorConfig", "DetectorOptions",
           "build_detector", "evaluate_detector", "flip_horizontally", "freeze_batchnorm", "lr_at", "train_detector"]

ASPECT_RATIOS = (0.5, 1.0, 2.0)
WARMUP_FACTOR = 1e-3
DECAY_AT = (3 / 4, 11 / 12)  # fractions of the run after which the LR drops x 0.1 (Detectron2's VOC 18k, 22k of 24k)

Progress = Callable[[int, int, Mapping[str, float]], None]
Sample = tuple[Tensor, Mapping[str, Tensor]]


class DetectorOptions(ComponentConfig):
    """How the detector is built around the backbone, whichever detector it is (module docstring)."""

    norm: Literal["frozen", "train"] = Field(
        "frozen", description="frozen: BatchNorm -> FrozenBatchNorm2d with the pre-trained statistics (small batches); "
                              "train: BN fine-tuned (MoCo's SyncBN recipe, needs batches of several images)")
    trainable_layers: int = Field(5, ge=0, le=5, description="backbone stages trained, from the top; 5: all, stem too")
    min_size: int = Field(800, ge=16, description="the shorter image side is resized to this (torchvision: 800)")
    max_size: int = Field(1333, ge=16, description="upper bound of the longer side after resizing (torchvision: 1333)")
    fpn_channels: int = Field(256, ge=1, description="channels of the FPN levels, the RPN's and the RoI heads' input")
    box_head_dim: int = Field(1024, ge=1, description="width of the two-layer box head (torchvision: 1024)")
    mask_head_dim: int = Field(256, ge=1, description="width of the four mask-head convolutions (torchvision: 256)")
    box_batch_size_per_image: int = Field(
        512, ge=1, description="RoIs sampled per training image for the box head (torchvision and Detectron2: 512; "
                               "Fast R-CNN: 64). On CPU RoIAlign's backward dominates the step and scales with it")
    anchor_sizes: list[int] | None = Field(
        None, description="anchor sides in input pixels: one per FPN level (5) for a ResNet, any number for "
                          "MobileNetV2; None: 8 x each level's stride (module docstring)")


class DetectorConfig(DetectorOptions):
    """How the detector is built around the backbone, and which one (module docstring)."""

    model: Literal["faster_rcnn", "mask_rcnn"] = Field(
        "faster_rcnn", description="faster_rcnn: boxes (VOC detection); mask_rcnn: boxes and instance masks (COCO)")


@dataclass(frozen=True)
class DetectionTrainResult:
    """The budget of a `train_detector` call and its loss."""

    steps: int
    batch_size: int
    train_images: int
    epochs: float  # images seen / train_images
    first_loss: float  # total loss of the first step
    final_loss: float  # mean total loss of the last min(10, steps) steps
    final_terms: dict[str, float]  # the same mean for each of torchvision's loss terms
    loss_curve: tuple[float, ...]  # total loss per step

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def freeze_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every ``nn.BatchNorm2d`` inside `module` (in place) by a ``FrozenBatchNorm2d`` with its statistics."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            if child.running_mean is None or child.running_var is None:
                raise ValueError(f"BatchNorm {name!r} keeps no running statistics: it cannot be frozen (norm='train')")
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
            with torch.no_grad():
                if child.affine:
                    frozen.weight.copy_(child.weight)
                    frozen.bias.copy_(child.bias)
                frozen.running_mean.copy_(child.running_mean)
                frozen.running_var.copy_(child.running_var)
            setattr(module, name, frozen.to(child.running_mean.device))
        else:
            freeze_batchnorm(child)
    return module


def _stage_prefixes(backbone: nn.Module) -> list[tuple[str, ...]]:
    """Parameter-name prefixes of the five trainable units, stem first."""
    if isinstance(backbone, ResNet):
        return [("stem.",), ("layer1.",), ("layer2.",), ("layer3.",), ("layer4.",)]
    bounds = (0, 1, *(end + 1 for end in STAGE_ENDS))  # features[0] is the stem; then the four stride groups
    return [tuple(f"features.{i}." for i in range(lo, hi)) for lo, hi in zip(bounds, bounds[1:])]


def build_detector(backbone: nn.Module, num_classes: int, config: DetectorConfig | None = None, *,
                   seed: int = 0) -> FasterRCNN:
    """Faster R-CNN (or Mask R-CNN) for `num_classes` foreground classes around a copy of `backbone`.

    The new layers (FPN, RPN, heads) are initialised from `seed` without touching the global RNG.

    Raises:
        ValueError: a ViT or unknown backbone, a bad option (max_size < min_size, `anchor_sizes` of the wrong
            length).
    """
    config = config or DetectorConfig()
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int (foreground classes), got {num_classes!r}")
    if isinstance(backbone, ViT):
        raise ValueError("detection: ViT backbones are not supported; torchvision's Faster/Mask R-CNN heads take "
                         "convolutional feature maps and the plain-ViT pyramid (ViTDet) is not implemented here. "
                         "Use a ResNet or MobileNetV2 checkpoint.")
    if not isinstance(backbone, (ResNet, MobileNetV2)):
        raise ValueError(f"detection: backbone {type(backbone).__name__} is not supported; use a ResNet "
                         "(resnet18/34/50) or MobileNetV2")
    if config.max_size < config.min_size:
        raise ValueError(f"max_size ({config.max_size}) must be >= min_size ({config.min_size})")
    body = copy.deepcopy(backbone).float()
    if config.norm == "frozen":
        freeze_batchnorm(body)
    units = _stage_prefixes(body)
    trained = tuple(p for unit in units[len(units) - config.trainable_layers:] for p in unit)
    for name, param in body.named_parameters():
        param.requires_grad_(name.startswith(trained) if trained else False)

    stem_stride = 1 if body.cifar_stem else 4
    if isinstance(body, ResNet):
        trunk, featmaps = body, ["0", "1", "2", "3"]
        return_layers = {f"layer{i + 1}": str(i) for i in range(4)}
        in_channels = list(body.stage_dims)
        if config.anchor_sizes is None:  # one size a level: four stages and the max-pooled fifth
            sizes = [(8 * stem_stride * 2**i,) for i in range(5)]
        elif len(config.anchor_sizes) != 5:
            raise ValueError(f"anchor_sizes: a ResNet FPN has 5 levels, one size each; got {config.anchor_sizes}")
        else:
            sizes = [(s,) for s in config.anchor_sizes]
    else:  # the last two stride groups (torchvision's MobileNet FPN); names inside `features` are indices
        trunk, featmaps = body.features, ["0", "1"]
        return_layers = {str(STAGE_ENDS[2]): "0", str(STAGE_ENDS[3]): "1"}
        in_channels = list(body.stage_dims[2:])
        last_stride = stem_stride * 8
        every = tuple(config.anchor_sizes or (last_stride * 2**k for k in range(5)))
        sizes = [every] * 3  # the same sizes on both levels and the pooled one, as torchvision does
    anchors = AnchorGenerator(sizes=tuple(sizes), aspect_ratios=(ASPECT_RATIOS,) * len(sizes))

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        features = BackboneWithFPN(trunk, return_layers=return_layers, in_channels_list=in_channels,
                                   out_channels=config.fpn_channels)
        channels = config.fpn_channels
        common: dict[str, Any] = dict(
            min_size=config.min_size, max_size=config.max_size,
            image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD), rpn_anchor_generator=anchors,
            box_roi_pool=MultiScaleRoIAlign(featmaps, output_size=7, sampling_ratio=2),
            box_head=TwoMLPHead(channels * 7 * 7, config.box_head_dim),
            box_predictor=FastRCNNPredictor(config.box_head_dim, num_classes + 1),  # + 1: the background
            box_batch_size_per_image=config.box_batch_size_per_image,
        )
        if config.model == "mask_rcnn":
            return MaskRCNN(
                features, **common, mask_roi_pool=MultiScaleRoIAlign(featmaps, output_size=14, sampling_ratio=2),
                mask_head=MaskRCNNHeads(channels, [config.mask_head_dim] * 4, 1),
                mask_predictor=MaskRCNNPredictor(config.mask_head_dim, config.mask_head_dim, num_classes + 1))
        return FasterRCNN(features, **common)


class DetectionTrainConfig(ComponentConfig):
    """The optimiser options of `train_detector` (Detectron2's, but for the batch size and the budget)."""

    lr: float = Field(0.02, gt=0, allow_inf_nan=False, description="peak SGD LR (Detectron2: 0.02 for 16 images)")
    batch_size: int = Field(2, ge=1, description="images per step")
    momentum: float = Field(0.9, ge=0, lt=1, allow_inf_nan=False, description="SGD momentum")
    weight_decay: float = Field(1e-4, ge=0, allow_inf_nan=False, description="L2 on weights (not biases or norms)")
    warmup_steps: int = Field(100, ge=0, description="linear warm-up from lr / 1000 over these steps")
    flip: bool = Field(True, description="random horizontal flip (p 0.5) of the training images")


class DetectionTaskConfig(DetectorOptions, DetectionTrainConfig):
    """One detection or instance-segmentation transfer (`streamssl eval --task detection|segmentation`): the
    detector's options but for the model (the task picks Faster or Mask R-CNN), its optimiser and the budget. The
    defaults are torchvision's and Detectron2's sizes; on a CPU shrink `min_size`/`max_size` to the images and the
    heads (`fpn_channels`, `box_head_dim`, `box_batch_size_per_image`) as bench/detection_smoke.py does."""

    steps: int = Field(1000, ge=1, description="training steps (Detectron2's VOC schedule: 24000 of 16 images)")
    eval_batch_size: int = Field(4, ge=1, description="images per forward pass when scoring the eval split")

    def detector(self, model: Literal["faster_rcnn", "mask_rcnn"]) -> DetectorConfig:
        return DetectorConfig(model=model, **{k: getattr(self, k) for k in DetectorOptions.model_fields})

    def training(self) -> dict[str, Any]:
        """`train_detector`'s keyword options."""
        return {k: getattr(self, k) for k in DetectionTrainConfig.model_fields}


def lr_at(step: int, total_steps: int, peak: float, warmup_steps: int) -> float:
    """The LR of `step` (0-based): linear warm-up from ``peak * WARMUP_FACTOR``, x 0.1 after each of `DECAY_AT`."""
    factor = 0.1 ** sum(step >= round(f * total_steps) for f in DECAY_AT)
    if step < warmup_steps:
        alpha = step / warmup_steps
        factor *= WARMUP_FACTOR * (1 - alpha) + alpha
    return peak * factor


def _as_input(image: Tensor, where: str) -> Tensor:
    if not isinstance(image, Tensor) or image.ndim != 3 or image.shape[0] != 3:
        found = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
        raise ValueError(f"{where}: expected an image tensor [3, H, W], found {found}")
    return image.float() / 255.0 if image.dtype == torch.uint8 else image.float()


def _training_target(target: Mapping[str, Tensor], masks: bool, where: str) -> dict[str, Tensor]:
    """Boxes, labels (and masks) without crowd objects: torchvision trains on every box it is given."""
    if masks and "masks" not in target:
        raise ValueError(f"{where}: Mask R-CNN needs 'masks' in every target (read the set with masks=True)")
    boxes = torch.as_tensor(target["boxes"], dtype=torch.float32).reshape(-1, 4)
    keep = torch.ones(len(boxes), dtype=torch.bool)
    if "iscrowd" in target:
        keep &= torch.as_tensor(target["iscrowd"]).reshape(-1) == 0
    out = {"boxes": boxes[keep], "labels": torch.as_tensor(target["labels"], dtype=torch.int64).reshape(-1)[keep]}
    if masks:
        out["masks"] = torch.as_tensor(target["masks"], dtype=torch.uint8)[keep]
    return out


def flip_horizontally(image: Tensor, target: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
    """Mirror `image` [3, H, W] left-right, with its target's xyxy boxes (x -> W - x) and masks."""
    width = image.shape[-1]
    target = dict(target)
    boxes = target["boxes"].clone()
    boxes[:, 0], boxes[:, 2] = width - target["boxes"][:, 2], width - target["boxes"][:, 0]
    target["boxes"] = boxes
    if "masks" in target:
        target["masks"] = target["masks"].flip(-1)
    return image.flip(-1), target


def _device_of(model: nn.Module, device: str | torch.device | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def train_detector(
    model: FasterRCNN,
    train_dataset: Sequence[Sample],
    *,
    steps: int | None = None,
    epochs: float | None = None,
    lr: float = 0.02,
    batch_size: int = 2,
    momentum: float = 0.9,
    weight_decay: float = 1e-4,
    warmup_steps: int = 100,
    flip: bool = True,
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: Progress | None = None,
) -> DetectionTrainResult:
    """Train `model` (from `build_detector`, in place) for `steps` steps or `epochs` passes over `train_dataset`.

    Batches are drawn from successive seeded permutations of the data set (an epoch's tail runs on into the next).
    `progress(step, total_steps, losses)` is called after every step with the step's loss terms and ``"loss"``.
    The model is left in eval mode.

    Raises:
        ValueError: neither or both of `steps` and `epochs`, a bad option, an empty data set, a malformed sample,
            or a loss that is not finite (the message names the step).
    """
    options = DetectionTrainConfig.parse("train_detector", lr=lr, batch_size=batch_size, momentum=momentum,
                                         weight_decay=weight_decay, warmup_steps=warmup_steps, flip=flip)
    n = len(train_dataset)
    if n == 0:
        raise ValueError("train_detector: the training set is empty")
    if (steps is None) == (epochs is None):
        raise ValueError("train_detector: give exactly one of steps and epochs")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise ValueError(f"train_detector: steps must be a positive int, got {steps!r}")
    if epochs is not None and (isinstance(epochs, bool) or not isinstance(epochs, (int, float)) or not epochs > 0):
        raise ValueError(f"train_detector: epochs must be a positive number, got {epochs!r}")
    total = steps if steps is not None else max(1, math.ceil(epochs * n / options.batch_size))
    device = _device_of(model, device)
    model.to(device)
    masks = bool(model.roi_heads.has_mask())
    groups = [g for g in param_groups(model, options.weight_decay) if g["params"]]
    optimizer = torch.optim.SGD(groups, lr=options.lr, momentum=options.momentum)
    generator = torch.Generator().manual_seed(seed)
    order = torch.empty(0, dtype=torch.int64)
    curve: list[float] = []
    last_terms: list[dict[str, float]] = []
    model.train()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)  # the RPN and RoI samplers draw from the global RNG
            for step in range(total):
                while len(order) < options.batch_size:
                    order = torch.cat([order, torch.randperm(n, generator=generator)])
                rows, order = order[: options.batch_size].tolist(), order[options.batch_size:]
                flips = torch.rand(len(rows), generator=generator) < (0.5 if options.flip else 0.0)
                images, targets = [], []
                for row, flipped in zip(rows, flips.tolist()):
                    image, target = train_dataset[row]
                    where = f"training sample {row}"
                    image, target = _as_input(image, where), _training_target(target, masks, where)
                    if flipped:
                        image, target = flip_horizontally(image, target)
                    images.append(image.to(device))
                    targets.append({k: v.to(device) for k, v in target.items()})
                for group in optimizer.param_groups:
                    group["lr"] = lr_at(step, total, options.lr, options.warmup_steps)
                losses = model(images, targets)
                loss = sum(losses.values())
                if not torch.isfinite(loss):
                    raise ValueError(f"train_detector diverged: non-finite loss at step {step} with lr={options.lr} "
                                     f"({ {k: float(v.detach()) for k, v in losses.items()} }); lower lr")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                terms = {k: float(v.detach()) for k, v in losses.items()} | {"loss": float(loss.detach())}
                curve.append(terms["loss"])
                last_terms = (last_terms + [terms])[-10:]
                if progress is not None:
                    progress(step + 1, total, terms)
    finally:
        model.eval()
    final = {k: sum(t[k] for t in last_terms) / len(last_terms) for k in last_terms[-1]}
    return DetectionTrainResult(
        steps=total, batch_size=options.batch_size, train_images=n, epochs=total * options.batch_size / n,
        first_loss=curve[0], final_loss=final.pop("loss"), final_terms=final, loss_curve=tuple(curve))


def evaluate_detector(model: FasterRCNN, dataset: Sequence[Sample], *, batch_size: int = 4,
                      device: str | torch.device | None = None) -> dict[str, float]:
    """COCO AP, AP50, AP75 of `model`'s boxes on `dataset` (``evaluators.detection_ap``), and for Mask R-CNN the
    same from its masks as ``mask_ap``, ``mask_ap50``, ``mask_ap75``. Crowd and ``difficult`` objects are ignored
    regions. The model is left in eval mode."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"evaluate_detector: batch_size must be a positive int, got {batch_size!r}")
    if len(dataset) == 0:
        raise ValueError("evaluate_detector: the data set is empty")
    device = _device_of(model, device)
    model.to(device).eval()
    masks = bool(model.roi_heads.has_mask())
    predictions, targets = [], []
    with torch.no_grad():
        for start in range(0, len(dataset), batch_size):
            samples = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
            images = [_as_input(image, f"sample {start + k}").to(device) for k, (image, _) in enumerate(samples)]
            for output in model(images):
                predictions.append({k: v.cpu() for k, v in output.items()})
            for k, (_, target) in enumerate(samples):
                if masks and "masks" not in target:
                    raise ValueError(f"sample {start + k}: Mask R-CNN is scored on masks; the target has none")
                n = torch.as_tensor(target["boxes"]).reshape(-1, 4).shape[0]
                ignored = torch.zeros(n, dtype=torch.int64)
                for flag in ("iscrowd", "difficult"):
                    if flag in target:
                        ignored |= torch.as_tensor(target[flag]).reshape(-1).to(torch.int64)
                entry = {"boxes": target["boxes"], "labels": target["labels"], "iscrowd": ignored}
                if masks:
                    entry["masks"] = target["masks"]
                targets.append(entry)
    scores = detection_ap(predictions, targets, "bbox")
    if masks:
        scores |= {f"mask_{k}": v for k, v in detection_ap(predictions, targets, "segm").items()}
    return scores
