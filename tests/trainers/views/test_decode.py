"""decode_jpeg_batch against PIL decoding of the same bytes: values, shapes, grayscale/CMYK/PNG, corrupt input."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from trainers.views.decode import ImageDecodeError, decode_jpeg_batch, resized_shape


def _photo(height: int, width: int, seed: int) -> np.ndarray:
    """A smooth image with some texture (JPEG-friendly, like a photo rather than noise)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    channels = []
    for c in range(3):
        fx, fy, phase = rng.uniform(0.02, 0.15), rng.uniform(0.02, 0.15), rng.uniform(0, 6.28)
        channels.append(127 + 80 * np.sin(fx * x + phase) * np.cos(fy * y) + 30 * (x / width - y / height))
    image = np.stack(channels, axis=-1) + rng.normal(0, 4, (height, width, 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def _encode(array: np.ndarray, mode: str = "RGB", fmt: str = "JPEG") -> bytes:
    img = Image.fromarray(array)
    if mode != img.mode:
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def _reference(data: bytes, size: int) -> torch.Tensor:
    """PIL: decode, RGB, shorter side to `size` (bilinear), centre crop -> uint8 [3, size, size]."""
    with Image.open(io.BytesIO(data)) as img:
        img = img.convert("RGB")
        w, h = img.size
        nh, nw = resized_shape(h, w, size)
        if (nw, nh) != (w, h):
            img = img.resize((nw, nh), Image.BILINEAR)
        left, top = (nw - size) // 2, (nh - size) // 2
        img = img.crop((left, top, left + size, top + size))
        return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)


def _mean_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().mean().item()


@pytest.fixture(scope="module")
def jpegs() -> list[bytes]:
    shapes = [(96, 128), (128, 96), (64, 64), (80, 80), (96, 128), (50, 70)]
    return [_encode(_photo(h, w, seed)) for seed, (h, w) in enumerate(shapes)]


@pytest.mark.parametrize("size", [32, 64, 100])
def test_matches_pil(jpegs: list[bytes], size: int) -> None:
    out = decode_jpeg_batch(jpegs, size)
    assert out.shape == (len(jpegs), 3, size, size) and out.dtype == torch.uint8 and out.is_contiguous()
    for i, data in enumerate(jpegs):
        diff = _mean_abs_diff(out[i], _reference(data, size))
        assert diff < 1.0, f"image {i}: mean abs diff {diff:.2f} against PIL"


def test_same_size_needs_no_resize(jpegs: list[bytes]) -> None:
    out = decode_jpeg_batch([jpegs[2]], 64)  # a 64 x 64 JPEG at size 64: decode only
    with Image.open(io.BytesIO(jpegs[2])) as img:
        ref = torch.from_numpy(np.asarray(img.convert("RGB")).copy()).permute(2, 0, 1)
    assert _mean_abs_diff(out[0], ref) < 1.0


def test_input_types_give_the_same_batch(jpegs: list[bytes]) -> None:
    as_bytes = decode_jpeg_batch(jpegs[:3], 48)
    as_tensors = decode_jpeg_batch([torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in jpegs[:3]], 48)
    as_arrays = decode_jpeg_batch([np.frombuffer(d, dtype=np.uint8) for d in jpegs[:3]], 48)
    mixed = decode_jpeg_batch([jpegs[0], memoryview(jpegs[1]), bytearray(jpegs[2])], 48)
    for other in (as_tensors, as_arrays, mixed):
        assert torch.equal(as_bytes, other)


def test_grayscale_jpeg_gets_three_equal_channels(jpegs: list[bytes]) -> None:
    gray = _encode(_photo(72, 90, 7), mode="L")
    out = decode_jpeg_batch([jpegs[0], gray], 40)
    assert out.shape == (2, 3, 40, 40)
    assert torch.equal(out[1, 0], out[1, 1]) and torch.equal(out[1, 1], out[1, 2])
    assert _mean_abs_diff(out[1], _reference(gray, 40)) < 2.0
    assert _mean_abs_diff(out[0], _reference(jpegs[0], 40)) < 2.0


def test_cmyk_jpeg_and_png_decode(jpegs: list[bytes]) -> None:
    cmyk = _encode(_photo(60, 60, 8), mode="CMYK")
    png = _encode(_photo(70, 50, 9), fmt="PNG")
    out = decode_jpeg_batch([cmyk, jpegs[1], png], 32)
    for i, data in ((0, cmyk), (1, jpegs[1]), (2, png)):
        diff = _mean_abs_diff(out[i], _reference(data, 32))
        assert diff < 1.0, f"item {i}: mean abs diff {diff:.2f}"


def test_upscales_small_images() -> None:
    small = _encode(_photo(20, 30, 10))
    out = decode_jpeg_batch([small], 48)
    assert out.shape == (1, 3, 48, 48)
    assert _mean_abs_diff(out[0], _reference(small, 48)) < 3.0


@pytest.mark.parametrize("bad", [b"not an image at all", b"", "truncated"])
def test_undecodable_item_names_its_index(jpegs: list[bytes], bad) -> None:
    if bad == "truncated":
        bad = jpegs[3][: len(jpegs[3]) // 3]
    items = [jpegs[0], jpegs[1], bad, jpegs[4]]
    with pytest.raises(ImageDecodeError, match="image 2 ") as info:
        decode_jpeg_batch(items, 32)
    assert info.value.index == 2


def test_corrupt_jpeg_body_with_valid_header(jpegs: list[bytes]) -> None:
    data = bytearray(jpegs[0])
    data[len(data) // 2 :] = b"\x00" * (len(data) - len(data) // 2)  # header intact, entropy data and EOI gone
    try:
        out = decode_jpeg_batch([jpegs[1], bytes(data)], 32)
    except ImageDecodeError as exc:
        assert exc.index == 1
    else:  # a decoder may accept a zeroed tail as (garbled) data; the good image must still be right
        assert _mean_abs_diff(out[0], _reference(jpegs[1], 32)) < 2.0


def test_empty_batch_and_bad_arguments(jpegs: list[bytes]) -> None:
    assert decode_jpeg_batch([], 16).shape == (0, 3, 16, 16)
    with pytest.raises(ValueError, match="size"):
        decode_jpeg_batch(jpegs[:1], 0)
    with pytest.raises(TypeError, match="item 1"):
        decode_jpeg_batch([jpegs[0], 3.5], 16)
    with pytest.raises(TypeError, match="item 0"):
        decode_jpeg_batch([torch.zeros(2, 4, dtype=torch.uint8)], 16)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu(jpegs: list[bytes]) -> None:
    gray = _encode(_photo(72, 90, 7), mode="L")
    items = [*jpegs, gray]
    cpu = decode_jpeg_batch(items, 64, "cpu")
    gpu = decode_jpeg_batch(items, 64, "cuda")
    assert gpu.device.type == "cuda" and gpu.shape == cpu.shape
    assert _mean_abs_diff(gpu.cpu(), cpu) < 2.0


def test_skip_bad_reports_every_undecodable_index_in_one_pass(jpegs: list[bytes]) -> None:
    truncated = jpegs[3][: len(jpegs[3]) // 3]
    items = [b"", b"\xff\xd8 not really a jpeg", jpegs[0], truncated, jpegs[1], b"not an image"]
    out, bad = decode_jpeg_batch(items, 32, skip_bad=True)
    assert sorted(bad) == [0, 1, 3, 5]  # every bad item, adjacent ones included, not just the first
    assert all(isinstance(reason, str) and reason for reason in bad.values())
    assert out.shape == (6, 3, 32, 32) and out.dtype == torch.uint8 and out.is_contiguous()
    reference = decode_jpeg_batch([jpegs[0], jpegs[1]], 32)  # the good items decoded on their own
    assert torch.equal(out[2], reference[0]) and torch.equal(out[4], reference[1])
    assert int(out[[0, 1, 3, 5]].count_nonzero()) == 0  # bad rows are zeros, not leftover memory
    # the default still raises, on the first bad item
    with pytest.raises(ImageDecodeError) as info:
        decode_jpeg_batch(items, 32)
    assert info.value.index == 0


def test_skip_bad_on_a_clean_or_empty_batch(jpegs: list[bytes]) -> None:
    out, bad = decode_jpeg_batch(jpegs[:3], 40, skip_bad=True)
    assert bad == {} and torch.equal(out, decode_jpeg_batch(jpegs[:3], 40))
    out, bad = decode_jpeg_batch([], 16, skip_bad=True)
    assert bad == {} and out.shape == (0, 3, 16, 16)
    out, bad = decode_jpeg_batch([b"", b"junk"], 16, skip_bad=True)
    assert sorted(bad) == [0, 1] and int(out.count_nonzero()) == 0
