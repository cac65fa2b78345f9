"""Frozen-backbone feature extraction for the kNN and linear-probe evaluators.

Usage::

    from evaluators.features import extract_features
    train_x, train_y = extract_features(method.backbone, train_batches, device="cuda", amp_dtype=torch.bfloat16)
    test_x, test_y = extract_features(method.backbone, test_batches, device="cuda")

``batches`` yields ``(images uint8 [B,3,H,W], labels int64 [B])`` exactly as the data layer delivers them; the
ImageNet normalisation is applied here (``trainers.views.augment.normalize``) so evaluation sees the same input
distribution as training. The backbone is switched to eval mode for the pass (BatchNorm running statistics,
no dropout) and every submodule's previous mode is restored afterwards, even when a batch is rejected.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import nullcontext

import torch
from torch import Tensor, nn

from trainers.views.augment import normalize

__all__ = ["extract_features"]


def extract_features(
    backbone: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    device: str | torch.device = "cpu",
    amp_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    """Run ``backbone`` over every batch without gradients and collect its outputs.

    Args:
        backbone: module mapping float ``[B,3,H,W]`` to ``[B,D]``; it must already live on ``device``
            (it is not moved, so the caller keeps control of where its weights are).
        batches: iterable of ``(images, labels)``, images uint8 ``[B,3,H,W]``, labels integer ``[B]``.
        device: where the forward passes run; images are moved there as uint8 (4x less traffic than float).
        amp_dtype: autocast dtype (``torch.bfloat16`` / ``torch.float16``) for the forward, or None for full
            precision. Features are returned as float32 either way.

    Returns:
        ``(features float32 [N,D] on CPU, labels int64 [N] on CPU)``, rows in iteration order.

    Raises:
        ValueError: a batch has the wrong dtype/shape, labels do not match the batch, the backbone output is
            not ``[B,D]`` or is not finite, the backbone is on another device, or ``batches`` is empty.
    """
    device = torch.device(device)
    param = next(backbone.parameters(), None)
    if param is not None and (
        param.device.type != device.type or (device.index is not None and param.device.index != device.index)
    ):
        raise ValueError(
            f"backbone is on {param.device} but device={str(device)!r}; move it first with backbone.to(device)"
        )

    # Remember every submodule's mode, not just the root's: a caller may keep e.g. a frozen BN in eval.
    modes = [(module, module.training) for module in backbone.modules()]
    feats: list[Tensor] = []
    labels: list[Tensor] = []
    backbone.eval()
    try:
        autocast = (
            torch.autocast(device_type=device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext()
        )
        with torch.no_grad(), autocast:
            for index, (images, targets) in enumerate(batches):
                _check_batch(index, images, targets)
                out = backbone(normalize(images.to(device, non_blocking=True)))
                if out.ndim != 2 or out.shape[0] != images.shape[0]:
                    raise ValueError(
                        f"batch {index}: backbone returned shape {tuple(out.shape)}, "
                        f"expected [{images.shape[0]}, D]"
                    )
                out = out.float()
                if not torch.isfinite(out).all():
                    raise ValueError(f"batch {index}: backbone returned non-finite features (NaN/inf)")
                feats.append(out.cpu())
                labels.append(targets.to("cpu", torch.int64))
    finally:
        for module, training in modes:
            module.training = training

    if not feats:
        raise ValueError("batches is empty: no images to extract features from")
    dims = {f.shape[1] for f in feats}
    if len(dims) != 1:
        raise ValueError(f"backbone returned different feature sizes across batches: {sorted(dims)}")
    return torch.cat(feats), torch.cat(labels)


def _check_batch(index: int, images: Tensor, targets: Tensor) -> None:
    if not isinstance(images, Tensor) or images.dtype != torch.uint8:
        found = images.dtype if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"batch {index}: images must be a uint8 tensor [B,3,H,W], found {found}")
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"batch {index}: images must have shape [B,3,H,W], found {tuple(images.shape)}")
    if not isinstance(targets, Tensor) or targets.dtype.is_floating_point or targets.dtype == torch.bool:
        found = targets.dtype if isinstance(targets, Tensor) else type(targets).__name__
        raise ValueError(f"batch {index}: labels must be an integer tensor [B], found {found}")
    if targets.shape != (images.shape[0],):
        raise ValueError(
            f"batch {index}: labels have shape {tuple(targets.shape)}, expected [{images.shape[0]}] to match images"
        )
