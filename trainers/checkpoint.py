"""Training state on disk: one `state.pt` per checkpoint folder, written atomically.

    save_state(folder, state)      # temp file + os.replace: a kill mid-save leaves the old file or none
    state = load_state(folder)     # raises CheckpointError naming the folder when absent or unreadable

The orchestrator hands the folder to Ray Train, which uploads it to the storage URL.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

STATE_FILE = "state.pt"
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    pass


def save_state(folder: str | Path, state: dict[str, Any]) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    payload = {"format_version": FORMAT_VERSION, **state}
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".state-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(payload, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, folder / STATE_FILE)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return folder / STATE_FILE


def load_state(folder: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(folder) / STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"checkpoint {folder}: no {STATE_FILE} (incomplete or not a streamssl checkpoint)")
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:  # truncated or foreign file
        raise CheckpointError(f"checkpoint {path}: unreadable ({exc})") from exc
    if state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {path}: format_version {state.get('format_version')} but this streamssl reads {FORMAT_VERSION}"
        )
    return state
