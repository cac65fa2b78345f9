"""Batched augmentations: shapes, determinism, and that each transform does what it says, per sample."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from trainers.views.augment import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    AugmentConfig,
    _blur,
    default_view_configs,
    make_views,
    normalize,
    sample_crop_boxes,
)

# A config that changes nothing: full-image crop at the input size, every random transform off.
OFF = dict(scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=0.0, jitter_p=0.0, gray_p=0.0, blur_p=0.0, solarize_p=0.0)


def _jitter_only(**factors: float) -> dict:
    """OFF plus colour jitter on every sample, with only the given factors non-zero."""
    zero = {"brightness": 0.0, "contrast": 0.0, "saturation": 0.0, "hue": 0.0}
    return {**OFF, "jitter_p": 1.0, **zero, **factors}


def _images(b: int = 6, size: int = 16, seed: int = 0, low: int = 0, high: int = 256) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(low, high, (b, 3, size, size), generator=g, dtype=torch.uint8)


def _unnormalize(x: Tensor) -> Tensor:
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return x * std + mean


def _luma(x: Tensor) -> Tensor:
    return 0.2989 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]


def _one(images: Tensor, seed: int = 0, **cfg) -> Tensor:
    """One view in [0, 1] (normalisation undone)."""
    (view,) = make_views(images, [AugmentConfig(**cfg)], generator=torch.Generator().manual_seed(seed))
    return _unnormalize(view)


def test_shapes_dtype_and_device() -> None:
    images = _images(b=5, size=20)
    views = make_views(images, [AugmentConfig(size=16), AugmentConfig(size=24), AugmentConfig(size=8)])
    assert [tuple(v.shape) for v in views] == [(5, 3, 16, 16), (5, 3, 24, 24), (5, 3, 8, 8)]
    assert all(v.dtype == torch.float32 and v.device == images.device for v in views)
    assert all(torch.isfinite(v).all() for v in views)
    # Normalised values of [0, 1] pixels lie within (0 - mean) / std .. (1 - mean) / std.
    assert min(v.min().item() for v in views) >= -0.485 / 0.229 - 1e-4
    assert max(v.max().item() for v in views) <= (1 - 0.406) / 0.225 + 1e-4


def test_same_seed_same_views_other_seed_other_views() -> None:
    images = _images()
    configs = default_view_configs(12, count=2)
    a = make_views(images, configs, generator=torch.Generator().manual_seed(7))
    b = make_views(images, configs, generator=torch.Generator().manual_seed(7))
    c = make_views(images, configs, generator=torch.Generator().manual_seed(8))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.allclose(a[0], c[0])
    assert not torch.allclose(a[0], a[1])  # two views of one call differ


def test_channels_last_input_gives_the_same_views() -> None:
    images = _images()
    configs = default_view_configs(12)
    ref = make_views(images, configs, generator=torch.Generator().manual_seed(3))
    out = make_views(images.to(memory_format=torch.channels_last), configs, generator=torch.Generator().manual_seed(3))
    assert all(torch.equal(x, y) for x, y in zip(ref, out))


def test_all_transforms_off_is_normalize() -> None:
    images = _images()
    (view,) = make_views(images, [AugmentConfig(size=16, **OFF)])
    assert torch.allclose(view, normalize(images), atol=1e-5)


def test_crops_differ_between_samples_and_match_their_boxes() -> None:
    # One ramp image repeated (R = 8x, G = 8y, B = 4(x + y) at pixel (y, x)): any difference between samples
    # comes from the per-sample crop, and bilinear sampling of a linear ramp is exact, so each output pixel
    # can be checked against the position its box puts it at.
    ramp = torch.arange(32, dtype=torch.float32) * 8
    xs, ys = ramp.view(1, 32).expand(32, 32), ramp.view(32, 1).expand(32, 32)
    image = torch.stack([xs, ys, (xs + ys) / 2]).to(torch.uint8)
    images = image.expand(8, 3, 32, 32).contiguous()
    crop_only = {**OFF, "scale": (0.1, 0.5), "ratio": (3 / 4, 4 / 3)}
    views = _one(images, seed=1, size=8, **crop_only)
    flat = views.flatten(1)
    assert all(not torch.allclose(flat[i], flat[j]) for i in range(8) for j in range(i + 1, 8))

    # The same generator stream gives the same boxes (the crop draws first).
    boxes = sample_crop_boxes(8, 32, 32, (0.1, 0.5), (3 / 4, 4 / 3), generator=torch.Generator().manual_seed(1))
    checked = 0
    for n in range(8):
        x1, y1, x2, y2 = boxes[n].tolist()
        bw, bh = (x2 - x1) / 8, (y2 - y1) / 8
        for i in range(8):
            for j in range(8):
                # Skip bins that reach past the outermost pixel centres, where sampling clamps to the border.
                if x1 + j * bw < 0.5 or x1 + (j + 1) * bw > 31.5 or y1 + i * bh < 0.5 or y1 + (i + 1) * bh > 31.5:
                    continue
                # Bin centre in pixel-centre coordinates (pixel k's centre is at k + 0.5 in box coordinates).
                cx, cy = x1 + (j + 0.5) * bw - 0.5, y1 + (i + 0.5) * bh - 0.5
                expected = torch.tensor([8 * cx, 8 * cy, 4 * (cx + cy)]) / 255
                assert torch.allclose(views[n, :, i, j], expected, atol=1e-4), (n, i, j)
                checked += 1
    assert checked > 200


def test_crop_boxes_respect_scale_ratio_and_bounds() -> None:
    g = torch.Generator().manual_seed(0)
    boxes = sample_crop_boxes(4000, 40, 60, (0.2, 0.6), (0.5, 2.0), generator=g)
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    area = w * h / (40 * 60)
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
    assert (boxes[:, 2] <= 60 + 1e-4).all() and (boxes[:, 3] <= 40 + 1e-4).all()
    assert area.min() >= 0.2 - 1e-5 and area.max() <= 0.6 + 1e-5
    assert (w / h).min() >= 0.5 - 1e-5 and (w / h).max() <= 2.0 + 1e-5
    # Scale is sampled uniformly: about half the areas fall below the middle of the range.
    assert 0.4 < (area < 0.4).float().mean().item() < 0.6
    # Positions are spread: box centres cover both halves of the image.
    centre_x = (boxes[:, 0] + boxes[:, 2]) / 2
    assert 0.3 < (centre_x < 30).float().mean().item() < 0.7


def test_crop_falls_back_to_a_centre_crop() -> None:
    # An area of >= 90% at aspect >= 3 never fits a square: every sample takes the centre crop of aspect 3.
    boxes = sample_crop_boxes(5, 30, 30, (0.9, 1.0), (3.0, 4.0), generator=torch.Generator().manual_seed(0))
    expected = torch.tensor([0.0, 10.0, 30.0, 20.0]).expand(5, 4)
    assert torch.allclose(boxes, expected)


def test_flip() -> None:
    images = _images()
    flipped = _one(images, size=16, **{**OFF, "flip_p": 1.0})
    assert torch.allclose(flipped, images.float().flip(-1) / 255, atol=1e-5)
    # p = 0.5 flips some samples and not others.
    half = _one(_images(b=32), size=16, **{**OFF, "flip_p": 0.5})
    plain = _images(b=32).float() / 255
    is_flipped = [torch.allclose(half[i], plain[i].flip(-1), atol=1e-5) for i in range(32)]
    is_plain = [torch.allclose(half[i], plain[i], atol=1e-5) for i in range(32)]
    assert all(f != p for f, p in zip(is_flipped, is_plain))
    assert 6 <= sum(is_flipped) <= 26


def test_grayscale_gives_equal_channels_of_luma() -> None:
    images = _images()
    gray = _one(images, size=16, **{**OFF, "gray_p": 1.0})
    assert torch.allclose(gray[:, 0], gray[:, 1], atol=1e-5) and torch.allclose(gray[:, 1], gray[:, 2], atol=1e-5)
    assert torch.allclose(gray[:, 0], _luma(images.float() / 255), atol=1e-5)
    # With p = 0.2 about a fifth of a large batch is gray.
    some = _one(_images(b=400, size=8), size=8, **{**OFF, "gray_p": 0.2})
    frac = (some[:, 0] - some[:, 1]).abs().flatten(1).amax(1).lt(1e-5).float().mean().item()
    assert 0.12 < frac < 0.28


def test_solarize_inverts_bright_pixels() -> None:
    images = _images()
    out = _one(images, size=16, **{**OFF, "solarize_p": 1.0})
    x = images.float() / 255
    assert torch.allclose(out, torch.where(x >= 0.5, 1 - x, x), atol=1e-5)
    assert out.max() <= 0.5 + 1e-5


def test_brightness_scales_each_sample_by_its_own_factor() -> None:
    # Dark images so no pixel clips at 1: out / in is then one factor per sample, in [0.6, 1.4].
    images = _images(b=16, low=20, high=150)
    out = _one(images, size=16, **_jitter_only(brightness=0.4))
    ratio = (out / (images.float() / 255)).flatten(1)
    factors = ratio.mean(1)
    assert torch.allclose(ratio, factors[:, None].expand_as(ratio), atol=1e-4)
    assert factors.min() >= 0.6 - 1e-5 and factors.max() <= 1.4 + 1e-5
    assert factors.std() > 0.05


def test_contrast_keeps_mean_luma_and_scales_deviations() -> None:
    images = _images(b=8, low=100, high=156)
    x = images.float() / 255
    out = _one(images, size=16, **_jitter_only(contrast=0.4))
    mean_in = _luma(x).mean((1, 2))
    # torchvision's luma weights sum to 0.9999, hence the 2e-4 tolerance on luma.
    assert torch.allclose(_luma(out).mean((1, 2)), mean_in, atol=2e-4)
    dev_in = (x - mean_in.view(-1, 1, 1, 1)).flatten(1)
    dev_out = (out - mean_in.view(-1, 1, 1, 1)).flatten(1)
    c = (dev_out * dev_in).sum(1) / (dev_in * dev_in).sum(1)
    assert torch.allclose(dev_out, c[:, None] * dev_in, atol=1e-5)
    assert c.min() >= 0.6 - 1e-5 and c.max() <= 1.4 + 1e-5 and c.std() > 0.05


def test_saturation_moves_towards_gray_keeping_luma() -> None:
    images = _images(b=8, low=80, high=176)
    x = images.float() / 255
    out = _one(images, size=16, **_jitter_only(saturation=0.5))
    gray = _luma(x).unsqueeze(1)
    assert torch.allclose(_luma(out), _luma(x), atol=2e-4)  # luma weights sum to 0.9999
    s = ((out - gray) * (x - gray)).flatten(1).sum(1) / ((x - gray) ** 2).flatten(1).sum(1)
    assert torch.allclose(out, gray + s.view(-1, 1, 1, 1) * (x - gray), atol=1e-5)
    assert s.min() >= 0.5 - 1e-5 and s.max() <= 1.5 + 1e-5


def test_hue_rotates_chroma_keeping_luma() -> None:
    # Low-saturation images stay inside [0, 1] under any rotation, so nothing clips.
    images = _images(b=8, low=110, high=146)
    x = images.float() / 255
    out = _one(images, size=16, **_jitter_only(hue=0.5))
    y = lambda t: 0.299 * t[:, 0] + 0.587 * t[:, 1] + 0.114 * t[:, 2]  # noqa: E731 - YIQ luma
    assert torch.allclose(y(out), y(x), atol=1e-4)
    # Rotation keeps the chroma magnitude |(I, Q)| per pixel but changes the colour.
    iq = lambda t: torch.stack(  # noqa: E731
        [0.596 * t[:, 0] - 0.274 * t[:, 1] - 0.322 * t[:, 2], 0.211 * t[:, 0] - 0.523 * t[:, 1] + 0.312 * t[:, 2]]
    )
    assert torch.allclose(iq(out).norm(dim=0), iq(x).norm(dim=0), atol=1e-4)
    assert (out - x).abs().amax() > 0.02


def test_jitter_probability_zero_samples_are_untouched() -> None:
    images = _images(b=64, size=8)
    out = _one(images, size=8, **{**OFF, "jitter_p": 0.5})
    x = images.float() / 255
    untouched = (out - x).abs().flatten(1).amax(1) < 1e-5
    assert 16 <= untouched.sum().item() <= 48


def _reference_blur(img: Tensor, sigma: float, k: int) -> Tensor:
    """Direct 2-D gaussian convolution of one [3, H, W] image with reflect padding."""
    t = torch.arange(k, dtype=torch.float64) - k // 2
    g = torch.exp(-(t[:, None] ** 2 + t[None, :] ** 2) / (2 * sigma**2))
    g = (g / g.sum()).float()
    padded = F.pad(img[None], (k // 2,) * 4, mode="reflect")
    return F.conv2d(padded, g.expand(3, 1, k, k), groups=3)[0]


def test_blur_matches_a_direct_2d_gaussian_per_sample() -> None:
    x = torch.rand(3, 3, 40, 40, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.5, 2.0, 1.0])
    apply = torch.tensor([True, True, False])
    out = _blur(x, sigma, apply)
    k = 5  # odd, ~10% of 40
    assert torch.allclose(out[0], _reference_blur(x[0], 0.5, k), atol=1e-5)
    assert torch.allclose(out[1], _reference_blur(x[1], 2.0, k), atol=1e-5)
    assert torch.equal(out[2], x[2])
    assert out[1].var() < out[0].var() < x[0].var()


def test_blur_in_views_smooths_noise_and_keeps_flat_images() -> None:
    noise = _images(b=4, size=32)
    flat = torch.full((2, 3, 32, 32), 77, dtype=torch.uint8)
    out = _one(torch.cat([noise, flat]), size=32, **{**OFF, "blur_p": 1.0})
    assert torch.allclose(out[4:], torch.full_like(out[4:], 77 / 255), atol=1e-5)
    x = noise.float() / 255
    assert (out[:4].flatten(1).var(1) < 0.8 * x.flatten(1).var(1)).all()


def test_normalize() -> None:
    images = _images(b=2, size=4)
    out = normalize(images)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    assert out.dtype == torch.float32 and out.shape == images.shape
    assert torch.allclose(out, (images.float() / 255 - mean) / std)
    black = normalize(torch.zeros(1, 3, 1, 1, dtype=torch.uint8))
    assert math.isclose(black[0, 0, 0, 0].item(), -0.485 / 0.229, rel_tol=1e-6)
    with pytest.raises(ValueError, match="uint8"):
        normalize(images.float())


def test_default_view_configs() -> None:
    configs = default_view_configs(24, count=3)
    assert len(configs) == 3 and all(c == AugmentConfig(size=24) for c in configs)
    c = configs[0]
    assert (c.scale, c.flip_p, c.jitter_p, c.gray_p, c.blur_p, c.solarize_p) == ((0.08, 1.0), 0.5, 0.8, 0.2, 0.5, 0.2)
    assert (c.brightness, c.contrast, c.saturation, c.hue) == (0.4, 0.4, 0.2, 0.1)


@pytest.mark.parametrize(
    ("field", "value"),
    [("size", 4), ("scale", (0.5, 0.2)), ("scale", (0.1, 1.5)), ("ratio", (0.0, 1.0)), ("flip_p", 1.5),
     ("gray_p", -0.1), ("brightness", -1.0), ("hue", 0.7)],
)
def test_config_validation_names_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        AugmentConfig(**{"size": 16, field: value})


def test_make_views_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="uint8"):
        make_views(torch.rand(2, 3, 8, 8), default_view_configs(8))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        make_views(torch.zeros(2, 1, 8, 8, dtype=torch.uint8), default_view_configs(8))
    with pytest.raises(ValueError, match="at least one"):
        make_views(_images(), [])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_views_match_cpu_with_a_cpu_generator() -> None:
    images = _images(b=8, size=32)
    configs = default_view_configs(16)
    cpu = make_views(images, configs, generator=torch.Generator().manual_seed(0))
    gpu = make_views(images.cuda(), configs, generator=torch.Generator().manual_seed(0))
    assert all(v.device.type == "cuda" for v in gpu)
    assert all(torch.allclose(a, b.cpu(), atol=1e-4) for a, b in zip(cpu, gpu))
