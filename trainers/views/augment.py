"""Batched SimCLR/BYOL-style augmentations on uint8 image batches, on whatever device the batch lives on.

Each transform is one tensor op over the whole batch with per-sample random parameters, so a view of a
256-image batch costs a handful of kernel launches rather than 256 PIL pipelines:

1. random resized crop: per-sample boxes drawn like torchvision's `RandomResizedCrop` (area fraction in
   `scale`, log-uniform aspect ratio in `ratio`, 10 attempts, then a centre crop), resampled to `size` by a
   single `torchvision.ops.roi_align` call (bilinear; averages several samples per output pixel when shrinking);
2. horizontal flip with `flip_p`;
3. colour jitter with `jitter_p`: brightness, contrast, saturation, hue, in that fixed order (torchvision
   shuffles the order per call), each factor drawn per sample; hue is a rotation of the chroma plane in YIQ;
4. grayscale with `gray_p`;
5. gaussian blur with `blur_p`, sigma per sample in [0.1, 2.0], odd kernel ~10% of `size`, reflect padding,
   as two separable depthwise (grouped) convolutions with one kernel per sample;
6. solarize with `solarize_p` (pixels >= 0.5 become 1 - x);
7. ImageNet mean/std normalisation.

Usage::

    from trainers.views.augment import default_view_configs, make_views, normalize
    g = torch.Generator().manual_seed(0)                          # optional: same seed -> same views
    v1, v2 = make_views(images_uint8, default_view_configs(32), generator=g)   # float [B, 3, 32, 32] each
    feats = backbone(normalize(images_uint8))                     # evaluation: no augmentation
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import roi_align

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# ITU-R 601 luma weights, as torchvision's rgb_to_grayscale.
_LUMA = (0.2989, 0.587, 0.114)
# RGB -> YIQ (NTSC); the inverse is computed once in float64 so a zero hue rotation is the identity.
_RGB_TO_YIQ = torch.tensor(
    [[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], dtype=torch.float64
)
_YIQ_TO_RGB = torch.linalg.inv(_RGB_TO_YIQ)

BLUR_SIGMA = (0.1, 2.0)
SOLARIZE_THRESHOLD = 0.5
CROP_ATTEMPTS = 10
MIN_VIEW_SIZE = 8


@dataclass(frozen=True)
class AugmentConfig:
    """Parameters of one view; probabilities are per sample.

    Defaults are SimCLR's ImageNet recipe (Chen et al., 2020, appendix A) with BYOL's solarisation.
    `brightness`, `contrast`, `saturation` give factors uniform in [max(0, 1 - v), 1 + v]; `hue` gives a
    rotation uniform in [-hue, hue] turns (at most 0.5).
    """

    size: int
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    gray_p: float = 0.2
    blur_p: float = 0.5
    solarize_p: float = 0.2

    def __post_init__(self) -> None:
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < MIN_VIEW_SIZE:
            raise ValueError(f"size must be an int >= {MIN_VIEW_SIZE}, got {self.size!r}")
        lo, hi = _pair("scale", self.scale)
        if not 0.0 < lo <= hi <= 1.0:
            raise ValueError(f"scale must satisfy 0 < min <= max <= 1 (area fractions), got {self.scale!r}")
        lo, hi = _pair("ratio", self.ratio)
        if not 0.0 < lo <= hi:
            raise ValueError(f"ratio must satisfy 0 < min <= max (width / height), got {self.ratio!r}")
        for name in ("flip_p", "jitter_p", "gray_p", "blur_p", "solarize_p"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} is a probability and must be in [0, 1], got {value!r}")
        for name in ("brightness", "contrast", "saturation"):
            value = getattr(self, name)
            if not 0.0 <= value < math.inf:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if not 0.0 <= self.hue <= 0.5:
            raise ValueError(f"hue must be in [0, 0.5] (fraction of a turn), got {self.hue!r}")


def _pair(name: str, value: Sequence[float]) -> tuple[float, float]:
    if len(value) != 2:
        raise ValueError(f"{name} must be a (min, max) pair, got {value!r}")
    return float(value[0]), float(value[1])


def default_view_configs(size: int, count: int = 2) -> list[AugmentConfig]:
    """`count` identical default views of side `size` (the symmetric SimCLR recipe)."""
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count!r}")
    return [AugmentConfig(size=size) for _ in range(count)]


def normalize(images: Tensor) -> Tensor:
    """uint8 `[..., 3, H, W]` -> float32 of the same shape and device, ImageNet mean/std normalised."""
    if images.dtype != torch.uint8:
        raise ValueError(f"normalize expects uint8 images, got dtype {images.dtype}")
    if images.dim() < 3 or images.shape[-3] != 3:
        raise ValueError(f"normalize expects [..., 3, H, W] images, got shape {tuple(images.shape)}")
    return _normalize_unit(images.float().div_(255.0))


def _normalize_unit(x: Tensor) -> Tensor:
    mean = torch.tensor(IMAGENET_MEAN, dtype=x.dtype, device=x.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=x.dtype, device=x.device).view(3, 1, 1)
    return (x - mean) / std


def sample_crop_boxes(
    n: int,
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Draw `n` RandomResizedCrop boxes inside a `height` x `width` image.

    Follows torchvision: up to 10 attempts of (area fraction ~ U(scale), log aspect ~ U(log ratio)), the first
    that fits wins; otherwise the largest centre crop with the aspect clamped into `ratio`. Unlike torchvision
    the box side and offset are not rounded to whole pixels: roi_align samples at sub-pixel positions anyway.

    Returns:
        float32 `[n, 4]` boxes `(x1, y1, x2, y2)` in pixel-edge coordinates (pixel i spans [i, i + 1)).
    """
    u = _uniform((n, CROP_ATTEMPTS, 4), generator, device)
    area = height * width * (scale[0] + (scale[1] - scale[0]) * u[..., 0])
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * u[..., 1])
    w = torch.sqrt(area * aspect)
    h = torch.sqrt(area / aspect)
    fits = (w <= width) & (h <= height)
    # argmax returns the first maximal index, i.e. the first attempt that fits.
    first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)
    w, h = w.gather(1, first).squeeze(1), h.gather(1, first).squeeze(1)
    ux, uy = u[..., 2].gather(1, first).squeeze(1), u[..., 3].gather(1, first).squeeze(1)
    x1, y1 = ux * (width - w), uy * (height - h)
    sampled = torch.stack([x1, y1, x1 + w, y1 + h], dim=1)

    in_ratio = width / height
    if in_ratio < ratio[0]:
        cw, ch = float(width), width / ratio[0]
    elif in_ratio > ratio[1]:
        cw, ch = height * ratio[1], float(height)
    else:
        cw, ch = float(width), float(height)
    cx, cy = (width - cw) / 2, (height - ch) / 2
    centre = torch.tensor([cx, cy, cx + cw, cy + ch], dtype=sampled.dtype, device=sampled.device)
    return torch.where(fits.any(dim=1, keepdim=True), sampled, centre)


def _uniform(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device | str | None) -> Tensor:
    # Draw on the generator's own device (a CPU generator cannot feed a CUDA kernel), then move.
    source = generator.device if generator is not None else device
    u = torch.rand(shape, generator=generator, device=source)
    return u if device is None else u.to(device)


def _gray(x: Tensor) -> Tensor:
    """`[B, 3, H, W]` -> luma `[B, 1, H, W]`."""
    r, g, b = x.unbind(dim=1)
    return (_LUMA[0] * r + _LUMA[1] * g + _LUMA[2] * b).unsqueeze(1)


def _hue_matrices(turns: Tensor) -> Tensor:
    """Per-sample RGB -> RGB matrices `[B, 3, 3]` rotating the IQ (chroma) plane by `turns` `[B]` turns.

    Written as I + YIQ2RGB (R - I) RGB2YIQ so that a zero rotation is exactly the identity.
    """
    theta = turns.double() * (2 * math.pi)
    cos_m1, sin = torch.cos(theta) - 1, torch.sin(theta)
    delta = torch.zeros(turns.shape[0], 3, 3, dtype=torch.float64, device=turns.device)
    delta[:, 1, 1], delta[:, 1, 2], delta[:, 2, 1], delta[:, 2, 2] = cos_m1, -sin, sin, cos_m1
    to_rgb, to_yiq = _YIQ_TO_RGB.to(turns.device), _RGB_TO_YIQ.to(turns.device)
    eye = torch.eye(3, dtype=torch.float64, device=turns.device)
    return (eye + to_rgb @ delta @ to_yiq).float()


def _blur_kernel_size(size: int) -> int:
    return max(3, 2 * int(0.05 * size) + 1)


def _blur(x: Tensor, sigma: Tensor, apply: Tensor) -> Tensor:
    """Separable gaussian blur of `x` `[B, 3, H, W]`, sigma `[B]`; samples with `apply` False are unchanged."""
    b, c, h, w = x.shape
    k = _blur_kernel_size(min(h, w))
    t = torch.arange(k, dtype=x.dtype, device=x.device) - k // 2
    kernel = torch.exp(-(t**2) / (2 * sigma[:, None] ** 2))
    kernel = kernel / kernel.sum(dim=1, keepdim=True)
    # A one-hot kernel reproduces the input exactly, so unblurred samples ride along in the same conv.
    identity = (t == 0).to(x.dtype).expand(b, k)
    kernel = torch.where(apply[:, None], kernel, identity).repeat_interleave(c, dim=0)  # [B*3, k]
    pad = k // 2
    y = F.pad(x.reshape(1, b * c, h, w), (pad, pad, pad, pad), mode="reflect")
    y = F.conv2d(y, kernel.view(b * c, 1, 1, k), groups=b * c)
    y = F.conv2d(y, kernel.view(b * c, 1, k, 1), groups=b * c)
    return y.view(b, c, h, w)


def _view(x: Tensor, cfg: AugmentConfig, generator: torch.Generator | None, boxes: Tensor | None = None) -> Tensor:
    """One augmented view of `x` float `[B, 3, H, W]` in [0, 1] -> `[B, 3, size, size]` in [0, 1]; crops at
    `boxes` `[B, 4]` when given (sampled under overlap constraints), else at boxes drawn from `cfg`."""
    b, _, h, w = x.shape
    device = x.device
    if boxes is None:
        boxes = sample_crop_boxes(b, h, w, cfg.scale, cfg.ratio, generator=generator, device=device)
    elif boxes.shape != (b, 4):
        raise ValueError(f"crop boxes must be [{b}, 4] (one per image), got {tuple(boxes.shape)}")
    boxes = boxes.to(device=device, dtype=x.dtype)
    index = torch.arange(b, dtype=boxes.dtype, device=device)[:, None]
    # aligned=True: box coordinates are pixel edges, so a full-image box at the input size is the identity.
    x = roi_align(x, torch.cat([index, boxes], dim=1), (cfg.size, cfg.size), 1.0, -1, True)

    u = _uniform((b, 10), generator, device)
    bcast = (b, 1, 1, 1)
    if cfg.flip_p > 0:
        x = torch.where((u[:, 0] < cfg.flip_p).view(bcast), x.flip(-1), x)

    if cfg.jitter_p > 0:
        jitter = u[:, 1] < cfg.jitter_p
        one = torch.ones_like(u[:, 0])

        def factor(v: float, col: int) -> Tensor:
            lo = max(0.0, 1.0 - v)
            return torch.where(jitter, lo + (1.0 + v - lo) * u[:, col], one).view(bcast)

        if cfg.brightness > 0:
            x = (x * factor(cfg.brightness, 2)).clamp_(0.0, 1.0)
        if cfg.contrast > 0:
            mean = _gray(x).mean(dim=(1, 2, 3), keepdim=True)
            x = torch.lerp(mean, x, factor(cfg.contrast, 3)).clamp_(0.0, 1.0)
        if cfg.saturation > 0:
            x = torch.lerp(_gray(x), x, factor(cfg.saturation, 4)).clamp_(0.0, 1.0)
        if cfg.hue > 0:
            turns = torch.where(jitter, cfg.hue * (2 * u[:, 5] - 1), torch.zeros_like(one))
            x = torch.einsum("bij,bjhw->bihw", _hue_matrices(turns), x).clamp_(0.0, 1.0)

    if cfg.gray_p > 0:
        x = torch.where((u[:, 6] < cfg.gray_p).view(bcast), _gray(x).expand_as(x), x)

    if cfg.blur_p > 0:
        sigma = BLUR_SIGMA[0] + (BLUR_SIGMA[1] - BLUR_SIGMA[0]) * u[:, 8]
        x = _blur(x, sigma, u[:, 7] < cfg.blur_p)

    if cfg.solarize_p > 0:
        solarize = (u[:, 9] < cfg.solarize_p).view(bcast) & (x >= SOLARIZE_THRESHOLD)
        x = torch.where(solarize, 1.0 - x, x)
    return x


@torch.no_grad()
def make_views(
    images: Tensor, configs: Sequence[AugmentConfig], generator: torch.Generator | None = None,
    boxes: Sequence[Tensor] | None = None,
) -> list[Tensor]:
    """Augment a batch once per config.

    Args:
        images: uint8 `[B, 3, H, W]` (contiguous or channels_last), on any device.
        configs: one `AugmentConfig` per view wanted.
        generator: optional; on CPU or on the images' device. The same seed gives the same views.
        boxes: optional crop boxes `[B, 4]` per config (`sample_crop_boxes`' format), drawn beforehand when the
            crops of different views depend on each other (`trainers.views.crop_overlap`); their scale is then not
            redrawn from the config.

    Returns:
        `len(configs)` float32 tensors `[B, 3, cfg.size, cfg.size]`, normalised, on the images' device.
    """
    if images.dtype != torch.uint8:
        raise ValueError(f"make_views expects uint8 images, got dtype {images.dtype}")
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"make_views expects images of shape [B, 3, H, W], got {tuple(images.shape)}")
    if len(configs) == 0:
        raise ValueError("make_views needs at least one AugmentConfig")
    if boxes is not None and len(boxes) != len(configs):
        raise ValueError(f"make_views needs one box tensor per config, got {len(boxes)} for {len(configs)}")
    x = images.float().div_(255.0).contiguous()
    crops = boxes if boxes is not None else [None] * len(configs)
    return [_normalize_unit(_view(x, cfg, generator, box)) for cfg, box in zip(configs, crops, strict=True)]


__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "AugmentConfig",
    "default_view_configs",
    "make_views",
    "normalize",
    "sample_crop_boxes",
]
