"""A process SIGKILLed while it saves checkpoints never leaves one that loads as something it was not."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from trainers.engine.checkpoint import CheckpointError, load_state

SAVER = """
import sys, torch
from trainers.engine.checkpoint import save_state
folder, start = sys.argv[1], int(sys.argv[2])
i = start
print("ready", flush=True)
while True:
    # ~40 MB per save, so a random kill often lands inside torch.save or the digest.
    save_state(folder, {"i": i, "w": torch.full((10_000_000,), float(i))})
    i += 1
"""


@pytest.mark.slow  # 8 saver processes, each importing torch, killed at random moments: a fault test, not a unit test
def test_kill_during_save_leaves_the_previous_checkpoint_or_a_complete_new_one(tmp_path: Path) -> None:
    folder = tmp_path / "ckpt"
    rng = random.Random(0)
    seen: list[int] = []
    start = 0
    for _ in range(8):
        proc = subprocess.Popen([sys.executable, "-c", SAVER, str(folder), str(start)], stdout=subprocess.PIPE,
                                cwd=Path(__file__).resolve().parents[3])
        assert proc.stdout.readline().strip() == b"ready"
        time.sleep(rng.uniform(0.2, 1.5))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        try:
            state = load_state(folder)
        except CheckpointError:
            # Only acceptable before the first save ever completed.
            assert not seen, "a complete checkpoint existed, yet the folder no longer loads"
            continue
        i = state["i"]
        assert torch.all(state["w"] == float(i)), "loaded a state mixing two saves"
        assert not seen or i >= seen[-1]
        seen.append(i)
        start = i + 1
    assert seen, "no save ever completed"
