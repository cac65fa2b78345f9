"""Feature reconstruction: how much of the input a frozen backbone's features keep.

The streaming-SSL study (Hu et al. 2022, "How Well Does Self-Supervised Pre-Training Perform with Streaming
Data?") trains a decoder on frozen features to reconstruct the input image and finds SSL features reconstruct
earlier chunks' images better than supervised ones: SSL keeps more of the input, one reason it forgets less.

Usage::

    from evaluators.reconstruction import reconstruction_error
    result = reconstruction_error(backbone, train_images, eval_images, epochs=20, seed=0)
    result.mse, result.relative_mse        # eval MSE on [0, 1] pixels; and over the mean-image baseline's
    PIL.Image.fromarray(result.grid).save("reconstructions.png")   # originals above, reconstructions below

The backbone runs once over every image without gradients, in eval mode, through
:func:`evaluators.features.extract_features` (it is not changed: its weights, buffers and modes are as before).
A small decoder is then trained on the cached ``[N, D]`` pooled features with Adam to minimise the pixel MSE
against the image in ``[0, 1]``:

    Linear(D, C * 4 * 4) -> [C, 4, 4] -> (ConvTranspose 4x4 stride 2, BatchNorm, ReLU) while the side doubles
    within the image -> bilinear resize to (H, W) when the side is not 4 * 2^k -> 3x3 conv to RGB -> sigmoid

with ``C = hidden`` halved at each upsampling (at least 16). ``mse`` is the mean squared error per pixel and
channel on ``eval_images``; ``baseline_mse`` the same error of the training images' mean image (what a decoder of
constant features can at best learn), so ``relative_mse = mse / baseline_mse`` is below 1 when the features carry
information about the image, and comparable across data sets. The decoder's initialisation (in a forked RNG, the
global one is left as it was) and batch order are seeded from ``seed``: a call is deterministic on a device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn
from torchvision.utils import make_grid

from evaluators.features import extract_features
from trainers.config import ComponentConfig

__all__ = ["ReconstructionConfig", "ReconstructionResult", "FeatureDecoder", "reconstruction_error"]

_START_SIDE = 4
_MIN_CHANNELS = 16


class ReconstructionConfig(ComponentConfig):
    """The options of the feature-reconstruction probe."""

    epochs: int = Field(20, ge=1, description="passes of the decoder over the training features")
    batch_size: int = Field(64, ge=2, description="rows per decoder step (>= 2: the decoder has BatchNorm)")
    lr: float = Field(1e-3, gt=0, allow_inf_nan=False, description="Adam LR of the decoder, cosine-decayed to 0")
    hidden: int = Field(128, ge=_MIN_CHANNELS, description="decoder channels at 4x4, halved at each upsampling")
    samples: int = Field(8, ge=0, description="eval images shown (with their reconstructions) in the grid")


class FeatureDecoder(nn.Module):
    """``[B, D]`` features -> ``[B, 3, H, W]`` images in [0, 1] (the layout in the module docstring)."""

    def __init__(self, feature_dim: int, height: int, width: int, hidden: int = 128):
        super().__init__()
        self.size = (height, width)
        self.hidden = hidden
        self.project = nn.Linear(feature_dim, hidden * _START_SIDE * _START_SIDE)
        layers: list[nn.Module] = []
        channels, side = hidden, _START_SIDE
        while side * 2 <= max(height, width):
            out = max(_MIN_CHANNELS, channels // 2)
            layers += [nn.ConvTranspose2d(channels, out, 4, stride=2, padding=1), nn.BatchNorm2d(out), nn.ReLU()]
            channels, side = out, side * 2
        self.upsample = nn.Sequential(*layers)
        self.to_rgb = nn.Conv2d(channels, 3, 3, padding=1)

    def forward(self, feats: Tensor) -> Tensor:
        x = F.relu(self.project(feats)).view(-1, self.hidden, _START_SIDE, _START_SIDE)
        x = self.upsample(x)
        if tuple(x.shape[-2:]) != self.size:
            x = F.interpolate(x, size=self.size, mode="bilinear", align_corners=False)
        return torch.sigmoid(self.to_rgb(x))


@dataclass(frozen=True, eq=False)
class ReconstructionResult:
    """Reconstruction errors (per pixel and channel, on [0, 1] pixels) and a sample grid.

    ``grid``: read-only uint8 ``[h, w, 3]``, the first ``samples`` eval images on top and their reconstructions
    below (``[0, 0, 3]`` when ``samples`` is 0), ready for ``PIL.Image.fromarray``.
    """

    mse: float
    baseline_mse: float
    relative_mse: float
    train_mse: float
    epochs: int
    steps: int
    train_rows: int
    eval_rows: int
    grid: np.ndarray

    def to_dict(self) -> dict[str, Any]:
        """The numbers (the grid is an image artifact, not a metric)."""
        return {k: v for k, v in self.__dict__.items() if k != "grid"}


def reconstruction_error(
    backbone: nn.Module,
    train_images: Tensor,
    eval_images: Tensor,
    *,
    epochs: int = 20,
    batch_size: int = 64,
    lr: float = 1e-3,
    hidden: int = 128,
    samples: int = 8,
    seed: int = 0,
    device: str | torch.device | None = None,
    amp_dtype: torch.dtype | None = None,
    feature_batch_size: int = 256,
) -> ReconstructionResult:
    """Train a decoder on ``backbone``'s frozen features of ``train_images``; score it on ``eval_images``.

    Args:
        backbone: float ``[B,3,H,W]`` -> ``[B, D]``, already on ``device`` (it is not moved or changed).
        train_images, eval_images: uint8 ``[N,3,H,W]`` with the same ``H, W`` (e.g. this chunk's images and
            earlier chunks' ones).
        device: where features and the decoder run; default the backbone's device.
        amp_dtype: autocast dtype of the feature pass, or None.

    Raises:
        ValueError: a bad option, images that are not uint8 ``[N,3,H,W]`` or differ in size, fewer than 2
            training images, a backbone on another device, or a decoder that diverged.
    """
    options = ReconstructionConfig.parse("reconstruction", epochs=epochs, batch_size=batch_size, lr=lr,
                                         hidden=hidden, samples=samples)
    _check_images("train_images", train_images)
    _check_images("eval_images", eval_images)
    if train_images.shape[-2:] != eval_images.shape[-2:]:
        raise ValueError(f"train_images and eval_images must have the same H, W, found "
                         f"{tuple(train_images.shape[-2:])} and {tuple(eval_images.shape[-2:])}")
    if train_images.shape[0] < 2:
        raise ValueError(f"reconstruction needs at least 2 training images (BatchNorm), got {train_images.shape[0]}")
    if device is None:
        param = next(backbone.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
    device = torch.device(device)

    train_feats = _features(backbone, train_images, device, amp_dtype, feature_batch_size)
    eval_feats = _features(backbone, eval_images, device, amp_dtype, feature_batch_size)
    height, width = int(train_images.shape[-2]), int(train_images.shape[-1])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        decoder = FeatureDecoder(train_feats.shape[1], height, width, options.hidden).to(device)
    optimizer = torch.optim.Adam(decoder.parameters(), lr=options.lr)

    n = train_images.shape[0]
    steps_per_epoch = max(1, n // options.batch_size)  # the remainder spread: no lone row for BatchNorm
    total_steps = options.epochs * steps_per_epoch
    generator = torch.Generator().manual_seed(seed)
    train_feats = train_feats.to(device)
    step, epoch_mse = 0, math.nan
    decoder.train()
    for _ in range(options.epochs):
        total = 0.0
        for rows in torch.tensor_split(torch.randperm(n, generator=generator), steps_per_epoch):
            for group in optimizer.param_groups:
                group["lr"] = options.lr * 0.5 * (1.0 + math.cos(math.pi * step / total_steps))
            target = _unit(train_images[rows], device)
            loss = F.mse_loss(decoder(train_feats[rows.to(device)]), target)
            if not torch.isfinite(loss):
                raise ValueError(f"reconstruction decoder diverged (non-finite loss at step {step}); lower lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item()
            step += 1
        epoch_mse = total / steps_per_epoch

    decoder.eval()
    mean_image = _mean_image(train_images, device, feature_batch_size)
    squared = baseline = 0.0
    reconstructions = []
    with torch.no_grad():
        for start in range(0, eval_images.shape[0], feature_batch_size):
            target = _unit(eval_images[start : start + feature_batch_size], device)
            out = decoder(eval_feats[start : start + feature_batch_size].to(device))
            squared += (out - target).double().square().sum().item()
            baseline += (mean_image - target).double().square().sum().item()
            if sum(r.shape[0] for r in reconstructions) < options.samples:
                reconstructions.append(out.cpu())
    count = eval_images[0].numel() * eval_images.shape[0]
    mse, baseline_mse = squared / count, baseline / count
    grid = _grid(eval_images[: options.samples], torch.cat(reconstructions)[: options.samples]
                 if reconstructions else None)
    return ReconstructionResult(
        mse=mse, baseline_mse=baseline_mse, relative_mse=mse / baseline_mse if baseline_mse > 0 else math.inf,
        train_mse=epoch_mse, epochs=options.epochs, steps=step, train_rows=n, eval_rows=int(eval_images.shape[0]),
        grid=grid,
    )


def _features(backbone: nn.Module, images: Tensor, device: torch.device, amp_dtype: torch.dtype | None,
              batch_size: int) -> Tensor:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"feature_batch_size must be an integer >= 1, got {batch_size!r}")
    dummy = torch.zeros(images.shape[0], dtype=torch.int64)  # extract_features carries labels; these have none
    batches = ((images[s : s + batch_size], dummy[s : s + batch_size]) for s in range(0, images.shape[0], batch_size))
    feats, _ = extract_features(backbone, batches, device=device, amp_dtype=amp_dtype)
    return feats


def _unit(images: Tensor, device: torch.device) -> Tensor:
    return images.to(device).float().div_(255.0)


def _mean_image(images: Tensor, device: torch.device, batch_size: int) -> Tensor:
    total = torch.zeros(images.shape[1:], dtype=torch.float64, device=device)
    for start in range(0, images.shape[0], batch_size):
        total += _unit(images[start : start + batch_size], device).double().sum(dim=0)
    return (total / images.shape[0]).float()


def _grid(originals: Tensor, reconstructions: Tensor | None) -> np.ndarray:
    if reconstructions is None or originals.shape[0] == 0:
        grid = np.zeros((0, 0, 3), dtype=np.uint8)
    else:
        tiles = torch.cat([originals.float().div(255.0), reconstructions.float()])
        image = make_grid(tiles, nrow=originals.shape[0], padding=2, pad_value=1.0)  # [3, h, w] in [0, 1]
        grid = image.mul(255.0).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
    grid.flags.writeable = False
    return grid


def _check_images(name: str, images: Any) -> None:
    if not isinstance(images, Tensor) or images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        found = (images.dtype, tuple(images.shape)) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"{name} must be a uint8 tensor [N,3,H,W], found {found}")
    if images.shape[0] == 0:
        raise ValueError(f"{name} is empty")
