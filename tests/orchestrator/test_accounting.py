"""What a chunk cost: wall time, device-hours and the bytes its checkpoint stores."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from orchestrator.accounting import chunk_resources, device_kind
from orchestrator.spec import ResourcesSpec
from trainers.checkpoint import folder_bytes, save_state, tensor_bytes


def test_device_hours_count_gpus_when_workers_hold_them_and_cpu_cores_otherwise() -> None:
    event = {"started": 100.0, "ended": 100.0 + 1800.0, "world_size": 4, "checkpoint_bytes": 5000,
             "buffer_bytes": 1200}
    cpu = ResourcesSpec(workers=4, cpus_per_worker=0.5)
    gpu = ResourcesSpec(workers=4, cpus_per_worker=8, gpus_per_worker=1)
    assert chunk_resources(event, cpu) == {"wall_seconds": 1800.0, "device_hours": 1.0, "checkpoint_bytes": 5000.0,
                                           "buffer_bytes": 1200.0, "stored_bytes": 5000.0}
    assert chunk_resources(event, gpu)["device_hours"] == pytest.approx(2.0)  # 0.5 h x 4 GPUs
    assert (device_kind(cpu), device_kind(gpu)) == ("cpu", "gpu")


def test_an_event_resent_from_a_checkpoint_has_times_but_no_sizes() -> None:
    metrics = chunk_resources({"started": 0.0, "ended": 36.0}, ResourcesSpec(workers=1, cpus_per_worker=1))
    assert metrics == {"wall_seconds": 36.0, "device_hours": 0.01}


def test_state_bytes_sum_every_tensor_and_a_folder_its_files(tmp_path: Path) -> None:
    shards = [{"replay": {"buffer": {"images": torch.zeros(10, 3, 4, 4, dtype=torch.uint8),
                                     "index": torch.zeros(10, dtype=torch.int64)}}},
              {"replay": {"buffer": {"images": torch.zeros(9, 3, 4, 4, dtype=torch.uint8),
                                     "index": torch.zeros(9, dtype=torch.int64)}, "seen": 7}, "note": "x"}]
    assert tensor_bytes(shards) == (10 + 9) * 48 + (10 + 9) * 8
    path = save_state(tmp_path / "ckpt", {"shards": shards})
    (tmp_path / "ckpt" / "sub").mkdir()
    (tmp_path / "ckpt" / "sub" / "extra.json").write_text("{}")
    assert folder_bytes(tmp_path / "ckpt") == path.stat().st_size + 2
