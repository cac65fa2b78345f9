"""Training state on disk: one self-verifying `state.pt` per checkpoint folder, written atomically.

    save_state(folder, state)      # temp file + fsync + os.replace: a kill mid-save leaves the old file or none
    state = load_state(folder)     # raises CheckpointError naming the folder when absent, partial or unreadable

The file is torch.save's bytes followed by a footer (magic, sha256 and length of those bytes). The orchestrator
hands the folder to Ray Train, which uploads it to the storage URL; an upload cut short by a kill can leave a prefix
of the file there, and the footer is what tells it from a complete checkpoint, so a resume never loads it. Keeping
digest and payload in one file keeps the local overwrite a single atomic rename.
"""

from __future__ import annotations

import hashlib
import io
import os
import struct
import tempfile
from pathlib import Path
from typing import Any

import torch

STATE_FILE = "state.pt"
FORMAT_VERSION = 1
_MAGIC = b"SSLCKPT1"
_FOOTER = struct.Struct(f"<{len(_MAGIC)}s32sQ")  # magic, sha256 of the payload, payload length


class CheckpointError(RuntimeError):
    pass


def save_state(folder: str | Path, state: dict[str, Any]) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save({"format_version": FORMAT_VERSION, **state}, buffer)
    payload = buffer.getbuffer()
    footer = _FOOTER.pack(_MAGIC, hashlib.sha256(payload).digest(), len(payload))
    target = folder / STATE_FILE
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".state-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(payload)
            fh.write(footer)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def tensor_bytes(value: Any) -> int:
    """Bytes held by the tensors in a nested state (dicts, lists, tuples): what a replay buffer costs to store."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(tensor_bytes(v) for v in value)
    return 0


def folder_bytes(folder: str | Path) -> int:
    """Total size of the files under `folder` (a checkpoint as it is uploaded)."""
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())


def _verified_payload(path: Path) -> memoryview:
    data = path.read_bytes()
    if len(data) < _FOOTER.size:
        raise CheckpointError(f"checkpoint {path}: {len(data)} bytes, too short to be complete (partial upload?)")
    magic, sha, length = _FOOTER.unpack_from(data, len(data) - _FOOTER.size)
    if magic != _MAGIC:
        raise CheckpointError(f"checkpoint {path}: no streamssl footer (partial upload, or not a streamssl checkpoint)")
    payload = memoryview(data)[: len(data) - _FOOTER.size]
    if length != len(payload) or hashlib.sha256(payload).digest() != sha:
        raise CheckpointError(f"checkpoint {path}: payload does not match its sha256 (corrupted)")
    return payload


def verify_state(folder: str | Path) -> None:
    """Raise CheckpointError unless `folder` holds a complete, untouched checkpoint."""
    path = Path(folder) / STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"checkpoint {folder}: no {STATE_FILE} (incomplete or not a streamssl checkpoint)")
    _verified_payload(path)


def load_state(folder: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(folder) / STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"checkpoint {folder}: no {STATE_FILE} (incomplete or not a streamssl checkpoint)")
    payload = _verified_payload(path)
    try:
        state = torch.load(io.BytesIO(payload), map_location=map_location, weights_only=False)
    except Exception as exc:  # a foreign file that happens to carry a valid footer
        raise CheckpointError(f"checkpoint {path}: unreadable ({exc})") from exc
    if state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {path}: format_version {state.get('format_version')} but this streamssl reads {FORMAT_VERSION}"
        )
    return state


def load_backbone(state: dict[str, Any], width: float | None = None) -> torch.nn.Module:
    """The trained encoder of a checkpoint's state (as `load_state` returns it), in eval mode, on the CPU.

    Evaluation and transfer need only the backbone: it is built from the state's own config (name, image size,
    options) and given the `backbone.*` weights of the method; heads, targets and optimizer state are ignored.
    `width` is reserved for slimmable backbones (evaluated at one of their widths); others take None.
    """
    if width is not None:
        raise ValueError(f"width {width!r} given, but this checkpoint's backbone is not slimmable")
    backbone = _architecture(state)
    weights = state.get("method")
    if weights is None:
        raise CheckpointError("checkpoint state has no 'method': not a training checkpoint")
    prefix = "backbone."
    own = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
    if not own:
        raise CheckpointError("checkpoint state has no backbone weights (keys backbone.*)")
    backbone.load_state_dict(own)
    return backbone.eval()


def random_backbone(state: dict[str, Any], seed: int) -> torch.nn.Module:
    """The checkpoint's backbone architecture with fresh weights drawn from `seed` (the global RNG is left as it was),
    in eval mode on the CPU: the from-scratch baseline a transfer of the trained backbone is compared against."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _architecture(state).eval()


def _architecture(state: dict[str, Any]) -> torch.nn.Module:
    """A freshly initialised backbone built from a checkpoint state's own config (name, image size, options)."""
    from trainers.backbones import build_backbone
    from trainers.engine.loop import LoopConfig

    config = state.get("config") if isinstance(state, dict) else None
    if config is None:
        raise CheckpointError("checkpoint state has no 'config': not a training checkpoint")
    cfg = LoopConfig(**config) if isinstance(config, dict) else config
    return build_backbone(cfg.backbone, cfg.image_size, **cfg.resolved_backbone_options())
