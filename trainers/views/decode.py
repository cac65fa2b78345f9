"""Batched image decoding for the consumer side of a pipeline: encoded bytes in, one uint8 batch out. Plain PyTorch.

    from trainers.views.decode import decode_jpeg_batch
    images = decode_jpeg_batch(list_of_jpeg_bytes, size=224, device="cuda")   # uint8 [B, 3, 224, 224] on the GPU

JPEGs go through one `torchvision.io.decode_jpeg` call over the whole list (nvjpeg's batched decode on CUDA,
libjpeg-turbo on CPU), in RGB mode so grayscale and CMYK JPEGs come out with 3 channels. Each image is then resized
so its shorter side is `size` (bilinear, antialiased) and centre-cropped to `size` x `size`, with the same geometry
as `orchestrator.data.ingest.decode_image` (the CPU path): images of one shape are resized together in one call.

Anything `decode_jpeg` rejects (PNG and other formats, JPEG variants a decoder does not handle) is decoded with
PIL instead. Bytes nothing can decode (empty, corrupt, truncated) raise `ImageDecodeError` naming the index, or,
with `skip_bad=True`, are all reported at once so a caller can patch every bad row after a single pass:

    images, bad = decode_jpeg_batch(items, size=224, skip_bad=True)   # bad: {index: reason}; those rows are zeros
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

# torchvision 0.29 deprecates its image codecs in favour of TorchCodec and warns on every call; the codecs still
# work, and this module is the one place that uses them.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                        category=DeprecationWarning)

JPEG_MAGIC = b"\xff\xd8"


class ImageDecodeError(ValueError):
    """An item of the batch could not be decoded by any decoder; `index` is its position in the input list."""

    def __init__(self, index: int, reason: str):
        super().__init__(f"image {index} of the batch cannot be decoded: {reason}")
        self.index = index
        self.reason = reason


def _as_byte_tensor(item: Any, index: int) -> Tensor:
    """One encoded image as a 1-D uint8 CPU tensor (what decode_jpeg takes, whatever the target device)."""
    if isinstance(item, Tensor):
        if item.dtype != torch.uint8 or item.dim() != 1:
            raise TypeError(f"item {index}: expected a 1-D uint8 tensor of encoded bytes, got "
                            f"{item.dtype} of shape {tuple(item.shape)}")
        return item.cpu()
    if isinstance(item, np.ndarray):
        if item.dtype != np.uint8 or item.ndim != 1:
            raise TypeError(f"item {index}: expected a 1-D uint8 array of encoded bytes, got "
                            f"{item.dtype} of shape {item.shape}")
        return torch.from_numpy(np.array(item, copy=True))
    if isinstance(item, (bytes, bytearray, memoryview)):
        # A copy: torch.frombuffer on immutable bytes would hand out a tensor over read-only memory.
        return torch.frombuffer(bytearray(item), dtype=torch.uint8) if len(item) else torch.empty(0, dtype=torch.uint8)
    raise TypeError(f"item {index}: expected bytes, a uint8 numpy array or a uint8 tensor, got {type(item).__name__}")


def _is_jpeg(data: Tensor) -> bool:
    return data.numel() >= 4 and bytes(data[:2].tolist()) == JPEG_MAGIC


def _to_rgb(image: Tensor) -> Tensor:
    """[C, H, W] with C in {1, 3, 4} -> [3, H, W] (decode_jpeg's RGB mode gives 3; guard decoders that do not)."""
    if image.shape[0] == 3:
        return image
    if image.shape[0] == 1:
        return image.expand(3, -1, -1)
    if image.shape[0] == 4:
        return image[:3]
    raise ValueError(f"decoded image has {image.shape[0]} channels")


def _decode_pil(data: Tensor, index: int, device: torch.device) -> Tensor:
    from PIL import Image

    if data.numel() == 0:
        raise ImageDecodeError(index, "no bytes")
    try:
        with Image.open(io.BytesIO(data.numpy().tobytes())) as img:
            array = np.asarray(img.convert("RGB"), dtype=np.uint8)
    # Decoders raise many types for bad bytes (OSError, UnidentifiedImageError, SyntaxError, ValueError, ...).
    except Exception as exc:  # noqa: BLE001
        raise ImageDecodeError(index, f"{type(exc).__name__}: {exc}") from exc
    return torch.from_numpy(array.copy()).permute(2, 0, 1).to(device)


def _decode_jpegs(data: list[Tensor], device: torch.device) -> list[Tensor | None]:
    """decode_jpeg over the list in one call; when that call fails, item by item (None where an item fails)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    if not data:
        return []
    try:
        return list(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
    except (RuntimeError, ValueError):
        pass  # one bad item fails the whole call: isolate it
    out: list[Tensor | None] = []
    for item in data:
        try:
            out.append(decode_jpeg(item, mode=ImageReadMode.RGB, device=device))
        except (RuntimeError, ValueError):
            out.append(None)
    return out


def resized_shape(height: int, width: int, size: int) -> tuple[int, int]:
    """(new height, new width) with the shorter side `size`, rounded like orchestrator.data.ingest.decode_image."""
    scale = size / min(height, width)
    return max(size, round(height * scale)), max(size, round(width * scale))


def _resize_crop(images: Tensor, size: int) -> Tensor:
    """uint8 [N, 3, H, W] (one shape) -> uint8 [N, 3, size, size]: shorter side to `size`, centre crop."""
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    h, w = images.shape[-2:]
    if (h, w) == (size, size):
        return images
    nh, nw = resized_shape(h, w, size)
    if (nh, nw) != (h, w):
        images = TF.resize(images, [nh, nw], interpolation=InterpolationMode.BILINEAR, antialias=True)
    top, left = (nh - size) // 2, (nw - size) // 2
    return images[..., top : top + size, left : left + size]


def decode_jpeg_batch(
    items: Sequence[bytes | bytearray | memoryview | np.ndarray | Tensor],
    size: int,
    device: str | torch.device = "cpu",
    *,
    skip_bad: bool = False,
) -> Tensor | tuple[Tensor, dict[int, str]]:
    """Decode encoded images (JPEG fast path, anything PIL reads otherwise) into one uint8 batch.

    Args:
        items: encoded images: bytes-like, 1-D uint8 numpy arrays or 1-D uint8 tensors (any device).
        size: output side; each image's shorter side is resized to it, then the centre is cropped.
        device: where to decode and where the batch lives ("cuda" decodes JPEGs with nvjpeg).
        skip_bad: instead of raising on the first undecodable item, decode all the others and return
            `(batch, bad)`, `bad` mapping the index of every undecodable item to the reason; those rows are zeros.

    Returns:
        uint8 `[B, 3, size, size]`, contiguous, on `device`, in the order of `items` (with `skip_bad`, the
        pair above; B is always `len(items)`).

    Raises:
        ImageDecodeError: an item no decoder accepts (message and `.index` name its position); not with
            `skip_bad`.
        TypeError: an item of an unsupported type (a caller's bug, raised in both modes).
    """
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be a positive int, got {size!r}")
    device = torch.device(device)
    data = [_as_byte_tensor(item, i) for i, item in enumerate(items)]
    out = torch.empty((len(data), 3, size, size), dtype=torch.uint8, device=device)
    bad: dict[int, str] = {}
    if not data:
        return (out, bad) if skip_bad else out

    decoded: list[Tensor | None] = [None] * len(data)
    jpeg_index = [i for i, d in enumerate(data) if _is_jpeg(d)]
    for i, image in zip(jpeg_index, _decode_jpegs([data[i] for i in jpeg_index], device)):
        decoded[i] = image
    for i, image in enumerate(decoded):
        if image is None:  # not a JPEG, or a JPEG decode_jpeg refused
            try:
                decoded[i] = _decode_pil(data[i], i, device)
            except ImageDecodeError as exc:
                if not skip_bad:
                    raise
                bad[i] = exc.reason
    if bad:
        out[torch.tensor(sorted(bad), device=device)] = 0  # defined content for rows the caller will patch

    # Resize the images of each shape together (one call per distinct shape; a data set of one shape -> one call).
    by_shape: dict[tuple[int, int], list[int]] = {}
    for i, image in enumerate(decoded):
        if image is not None:
            by_shape.setdefault(tuple(image.shape[-2:]), []).append(i)
    for indices in by_shape.values():
        group = torch.stack([_to_rgb(decoded[i]) for i in indices])
        resized = _resize_crop(group, size)
        if len(indices) == len(data):
            out.copy_(resized)
        else:
            out[torch.tensor(indices, device=device)] = resized
    return (out, bad) if skip_bad else out


__all__ = ["ImageDecodeError", "decode_jpeg_batch", "resized_shape"]
