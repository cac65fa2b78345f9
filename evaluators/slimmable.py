"""Evaluate a slimmable backbone at every width: BN recalibrated per width (US-Net), kNN top-1, params and MACs.

Usage::

    from evaluators.slimmable import evaluate_widths
    metrics = evaluate_widths(backbone, calibration_images, train_batches, test_batches)
    metrics["knn_top1@w0.5"], metrics["params@w0.5"], metrics["macs@w0.5"]

For each width (default 1.0, 0.9, ..., 0.3, 0.25): the BatchNorm running statistics are recomputed at that width
from the calibration images (`trainers.backbones.slimmable.recalibrate_bn`: reset, cumulative average in train
mode, no gradient), the train (bank) and test features are extracted at that width
(`evaluators.features.extract_features`), and the kNN top-1 of `evaluators.knn` is computed. The backbone is left
as it came: its BN statistics, its width and every module's mode are restored afterwards.

`width_features` gives the features at one width for other protocols (a linear probe per width).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Union

import torch
from torch import Tensor, nn

from evaluators.features import extract_features
from evaluators.knn import knn_accuracy
from trainers.backbones.slimmable import check_width, is_slimmable, recalibrate_bn, set_width, width_cost
from trainers.views.augment import normalize

DEFAULT_WIDTHS: tuple[float, ...] = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.25)

# Batches of (uint8 images [B, 3, H, W], int64 labels [B]); a callable is called once per width for a fresh pass.
LabelledBatches = Union[Sequence[tuple[Tensor, Tensor]], Callable[[], Iterable[tuple[Tensor, Tensor]]]]
# uint8 images [N, 3, H, W] (split into batches here), or a sequence / callable of uint8 image batches.
CalibrationImages = Union[Tensor, Sequence[Tensor], Callable[[], Iterable[Tensor]]]


def width_key(metric: str, width: float) -> str:
    """`metric@w<width>` with at least one decimal: knn_top1@w1.0, knn_top1@w0.5, knn_top1@w0.25."""
    text = f"{width:.4f}".rstrip("0")
    return f"{metric}@w{text}0" if text.endswith(".") else f"{metric}@w{text}"


def _calibration_batches(images: CalibrationImages, batch_size: int) -> Iterable[Tensor]:
    if callable(images):
        return images()
    if isinstance(images, Tensor):
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3 or images.shape[0] < 2:
            raise ValueError(f"calibration images must be uint8 [N >= 2, 3, H, W], got {images.dtype} "
                             f"{tuple(images.shape)}")
        return list(images.split(batch_size))
    return images


def _labelled(batches: LabelledBatches) -> Iterable[tuple[Tensor, Tensor]]:
    return batches() if callable(batches) else batches


def width_features(backbone: nn.Module, width: float, calibration: CalibrationImages,
                   batches: Sequence[LabelledBatches], *, device: str | torch.device = "cpu",
                   amp_dtype: torch.dtype | None = None, calibration_batch: int = 256) -> list[tuple[Tensor, Tensor]]:
    """Recalibrate BN at `width`, then `(features, labels)` of each of `batches` at that width (the backbone is
    left at `width` with those statistics; `evaluate_widths` restores them)."""
    width = check_width(width)
    if not is_slimmable(backbone):
        raise ValueError(f"width_features needs a slimmable backbone, got {type(backbone).__name__}")
    device = torch.device(device)

    def calibrate_forward(module: nn.Module, images: Tensor) -> Tensor:
        if images.dtype != torch.uint8:
            raise ValueError(f"calibration batches must be uint8 images, got {images.dtype}")
        return module(normalize(images.to(device)))

    recalibrate_bn(backbone, width, _calibration_batches(calibration, calibration_batch), forward=calibrate_forward)
    return [extract_features(backbone, _labelled(b), device=device, amp_dtype=amp_dtype) for b in batches]


def evaluate_widths(
    backbone: nn.Module,
    calibration: CalibrationImages,
    train: LabelledBatches,
    test: LabelledBatches,
    *,
    widths: Sequence[float] = DEFAULT_WIDTHS,
    k: int = 20,
    temperature: float = 0.07,
    device: str | torch.device = "cpu",
    amp_dtype: torch.dtype | None = None,
    calibration_batch: int = 256,
    image_size: int | None = None,
) -> dict[str, float]:
    """kNN top-1, params and MACs of `backbone` at each of `widths`, keyed `knn_top1@w0.5`, `params@w0.5`,
    `macs@w0.5` (MACs of one image of side `image_size`, by default the test images' side).

    Raises:
        ValueError: a width outside [0.25, 1.0], repeated widths, a backbone that is not slimmable, or what the
            feature extraction and the kNN refuse (empty or malformed batches).
    """
    checked = [check_width(w) for w in widths]
    if not checked or len({width_key("", w) for w in checked}) != len(checked):
        raise ValueError(f"widths must be distinct and at least one, got {list(widths)}")
    if not is_slimmable(backbone):
        raise ValueError(f"evaluate_widths needs a slimmable backbone, got {type(backbone).__name__}")
    saved = {name: buf.clone() for name, buf in backbone.named_buffers()}
    width_before = getattr(backbone, "current_width", 1.0)
    metrics: dict[str, float] = {}
    try:
        for width in checked:
            (bank, bank_y), (query, query_y) = width_features(
                backbone, width, calibration, [train, test], device=device, amp_dtype=amp_dtype,
                calibration_batch=calibration_batch)
            metrics[width_key("knn_top1", width)] = knn_accuracy(bank, bank_y, query, query_y, k=k,
                                                                 temperature=temperature)
            if image_size is None:
                image_size = next(iter(_labelled(test)))[0].shape[-1]
            cost = width_cost(backbone, width, image_size)
            metrics[width_key("params", width)] = float(cost["params"])
            metrics[width_key("macs", width)] = float(cost["macs"])
    finally:
        buffers = dict(backbone.named_buffers())
        with torch.no_grad():
            for name, value in saved.items():
                buffers[name].copy_(value)
        set_width(backbone, width_before)
    return metrics


__all__ = ["DEFAULT_WIDTHS", "evaluate_widths", "width_features", "width_key"]
