"""What a chunk cost: wall time, device-hours, the data a line keeps and its model state."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from orchestrator.data.shards import read_index
from orchestrator.plan.planner import build_plan
from orchestrator.spec.experiment import ResourcesSpec, validate_spec
from orchestrator.train.accounting import chunk_resources, data_kept, device_kind, strategy_bytes
from tests.specs import tiny_spec
from trainers.engine.checkpoint import folder_bytes, save_state, tensor_bytes


def test_device_hours_count_gpus_when_workers_hold_them_and_cpu_cores_otherwise() -> None:
    event = {"started": 100.0, "ended": 100.0 + 1800.0, "world_size": 4, "checkpoint_bytes": 5000,
             "buffer_bytes": 1200, "buffer_rows": 10, "strategy_state_bytes": 300}
    cpu = ResourcesSpec(workers=4, cpus_per_worker=0.5)
    gpu = ResourcesSpec(workers=4, cpus_per_worker=8, gpus_per_worker=1)
    # A replay line: its buffer is the data it keeps, inside the checkpoint (not added to it).
    assert chunk_resources(event, cpu) == {"wall_seconds": 1800.0, "device_hours": 1.0, "checkpoint_bytes": 5000.0,
                                           "buffer_bytes": 1200.0, "buffer_rows": 10.0, "strategy_state_bytes": 300.0,
                                           "data_kept_rows": 10.0, "data_kept_bytes": 1200.0,
                                           "model_state_bytes": 3800.0, "stored_bytes": 5000.0}
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


def _replay(rows: int) -> dict:
    empty = {"images": torch.zeros(0, 3, 4, 4, dtype=torch.uint8), "index": torch.zeros(0, dtype=torch.int64)}
    return {"buffer": {"images": torch.zeros(rows, 3, 4, 4, dtype=torch.uint8), "index": torch.zeros(rows, dtype=torch.int64)},
            "staged": empty, "staged_seen": 0, "rows_seen": rows, "generator": torch.zeros(16, dtype=torch.uint8),
            "placement": (0, 2)}


def test_strategy_state_splits_buffer_rows_from_mas_state() -> None:
    mas = {"omega": {"w": torch.zeros(5, dtype=torch.float32)}, "anchor": {"w": torch.zeros(5, dtype=torch.float32)},
           "chunks": 2}
    ranks = [{"replay": _replay(10), "mas": mas}, {"replay": _replay(9), "mas": mas}]
    assert strategy_bytes(ranks) == {"buffer_rows": 19, "buffer_bytes": 19 * (48 + 8),
                                     "strategy_state_bytes": 2 * (16 + 40)}  # generators, and Omega + theta* a rank
    assert strategy_bytes([{"sequential": {}}]) == {"buffer_rows": 0, "buffer_bytes": 0, "strategy_state_bytes": 0}


def test_joint_keeps_every_chunk_so_far_sequential_nothing_replay_its_buffer(synthetic_url: str) -> None:
    """On a real 3-chunk plan of the synthetic set: the answer counted from the shards themselves."""
    spec = validate_spec(tiny_spec("accounting", synthetic_url, stream={"kind": "random_class", "chunks": 3},
                                   lines={"method": ["simclr"], "strategy": ["sequential", "sequential+replay", "joint"]},
                                   strategy={"replay": {"size": 100}}))
    plan = build_plan(spec)
    shards = sorted(Path(synthetic_url).glob("train-*.parquet"))
    per_row = sum(f.stat().st_size for f in shards) / sum(pq.ParquetFile(f).metadata.num_rows for f in shards)
    labels = read_index(synthetic_url, "train").column("label").to_pylist()
    chunk_rows = [sum(label in plan.stream.chunks[c].classes for label in labels) for c in range(3)]
    assert sum(chunk_rows) == len(labels) == 1200 and all(rows > 0 for rows in chunk_rows)
    resources = ResourcesSpec(workers=2, cpus_per_worker=1)
    kept: dict[str, list[dict]] = {}
    for job in plan.jobs:
        replay = "replay" in job.line.strategy
        event = {"started": 0.0, "ended": 10.0, "world_size": 2, "checkpoint_bytes": 50_000 + 1000 * replay,
                 **(strategy_bytes([{"replay": _replay(50)}, {"replay": _replay(50)}]) if replay else
                    strategy_bytes([{}, {}]))}
        kept.setdefault(job.line.strategy, []).append(chunk_resources(event, resources, data_kept(plan, job)))
    joint = kept["joint"]
    assert [m["data_kept_rows"] for m in joint] == [sum(chunk_rows[:t + 1]) for t in range(3)]  # grows per chunk
    assert [m["data_kept_bytes"] for m in joint] == pytest.approx([sum(chunk_rows[:t + 1]) * per_row for t in range(3)])
    assert joint[0]["data_kept_bytes"] < joint[1]["data_kept_bytes"] < joint[2]["data_kept_bytes"]
    assert [m["stored_bytes"] for m in joint] == pytest.approx([m["data_kept_bytes"] + 50_000 for m in joint])
    assert all(m["data_kept_rows"] == m["data_kept_bytes"] == 0 and m["stored_bytes"] == m["model_state_bytes"] == 50_000
               for m in kept["sequential"])
    for m in kept["sequential+replay"]:  # the buffer's 100 rows as held, inside the 51000-byte checkpoint
        assert (m["data_kept_rows"], m["data_kept_bytes"]) == (100, 100 * 56)
        assert (m["model_state_bytes"], m["stored_bytes"]) == (51_000 - 5600, 51_000)
