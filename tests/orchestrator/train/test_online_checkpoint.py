"""An online checkpoint's replay memory (`orchestrator.train.online_checkpoint`) on 2 real gloo ranks, without Ray: each
rank writes its own share once (no gather), encoded where smaller; only the newest checkpoint keeps the shares (the
older ones their state.pt), and a restart restores every rank's very rows (or deals their union out
to another world size). Ray Train's merge of the workers' folders is done here by copying each rank's folder."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from types import SimpleNamespace

import torch

from orchestrator.train.checkpoints import CheckpointFs
from orchestrator.train.online_checkpoint import MEMORY_FILE, MemoryCheckpointer, restore_online
from tests.trainers.ddp_harness import run_ddp
from tests.trainers.test_online_loop import line, online_cfg
from trainers.engine.checkpoint import load_state
from trainers.engine.types import Batch

SIZE = 12  # memory rows over both ranks
LINE = "simclr-sequential"


def smooth_rows(start: int, n: int) -> Batch:
    """Rows whose pixels are smooth (as photos are), so that PNG stores them smaller than the decoded rows."""
    g = torch.Generator().manual_seed(start)
    coarse = torch.randint(0, 256, (n, 3, 4, 4), generator=g).float()
    images = torch.nn.functional.interpolate(coarse, size=64, mode="bilinear").round().to(torch.uint8)
    return Batch.from_images(images, index=torch.arange(start, start + n))


def _config(root: str) -> dict:
    return {"tasks": [SimpleNamespace(line=SimpleNamespace(id=LINE))], "storage_uri": root, "run_name": "run",
            "checkpoint_fs": CheckpointFs({})}


def _save(checkpointer: MemoryCheckpointer, online, run: Path, name: str) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        sizes = checkpointer.save(folder, online, {"line_index": 0, "line_id": LINE, "stream_ended": False})
        if sizes.pop("wrote"):  # what ray.train.report does with every worker's folder: merged into one
            shutil.copytree(folder, run / name, dirs_exist_ok=True)
    checkpointer.saved(name)
    return sizes


def _worker(rank: int, world: int) -> dict:
    root = os.environ["STREAMSSL_TEST_ROOT"]
    run = Path(root, "run")
    online = online_cfg(memory_size=SIZE)
    trainer = line()
    from trainers.online.loop import OnlineTrainer

    first = OnlineTrainer(trainer, online)
    checkpointer = MemoryCheckpointer(CheckpointFs({}), f"{root}/run", rank, world)
    sizes = []
    for k, name in enumerate(["step-0000002", "step-0000003", "step-0000004"]):
        first.memory.add(smooth_rows(1000 * k + 100 * rank, 8))  # each rank its own rows
        sizes.append(_save(checkpointer, first, run, f"{LINE}.chunk-000.{name}"))

    path, state = restore_online(_config(root), None, rank, world, SIZE)
    resumed = OnlineTrainer(line(), online)
    resumed.load_state_dict(state)
    return {"sizes": sizes, "restored_from": path, "rows": dict(first.memory.rows),
            "restored": dict(resumed.memory.rows), "seen": (first.memory.seen, resumed.memory.seen),
            "generator": torch.equal(first.memory.generator.get_state(), resumed.memory.generator.get_state())}


def test_each_rank_writes_its_memory_once_the_newest_checkpoint_alone_keeps_it_and_a_restart_restores_it(
        tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("STREAMSSL_TEST_ROOT", str(tmp_path))
    ranks = run_ddp(_worker)
    shares = [MEMORY_FILE.format(rank=r) for r in range(2)]
    listing = {p.name: sorted(f.name for f in p.iterdir()) for p in (tmp_path / "run").iterdir()}
    # Only the newest checkpoint keeps the memory; the older ones keep their state.pt alone (their folders stay:
    # Ray Train's run snapshot lists them, and a resumed driver's controller refuses a run whose folders are gone).
    assert listing == {f"{LINE}.chunk-000.step-0000002": ["state.pt"], f"{LINE}.chunk-000.step-0000003": ["state.pt"],
                       f"{LINE}.chunk-000.step-0000004": sorted(["state.pt", *shares])}
    newest = tmp_path / "run" / f"{LINE}.chunk-000.step-0000004"
    state = load_state(newest)
    assert state["online"]["memory"] == []  # no rows in rank 0's state: each share is in its rank's file, once
    assert [(m["file"], tuple(m["placement"]), m["rows"]) for m in state["memory_files"]] == [
        (shares[0], (0, 2), 6), (shares[1], (1, 2), 6)]
    for rank, r in enumerate(ranks):
        share = torch.load(newest / shares[rank], weights_only=False)
        assert torch.equal(share["rows"]["index"], r["rows"]["index"])  # this rank's rows, and only those
        assert (share["rows"]["index"] // 100 % 10 == rank).all()
        assert r["restored_from"] == str(newest)
        for field in ("images", "labels", "index", "domain"):  # the very rows back
            assert torch.equal(r["restored"][field], r["rows"][field]), field
        assert r["seen"] == (24, 24) and r["generator"]
    sizes = ranks[0]["sizes"][-1]
    raw = sum(r["rows"]["images"].numel() for r in ranks)
    assert sizes["buffer_bytes"] >= raw and sizes["memory_file_bytes"] < 0.75 * raw  # PNG, smaller than the rows
    assert sizes["checkpoint_bytes"] == sum(f.stat().st_size for f in newest.iterdir())
    assert sizes["state_bytes"] == (newest / "state.pt").stat().st_size

    # Another world size: one process takes the union of both shares (read from both files).
    path, state = restore_online(_config(str(tmp_path)), None, 0, 1, SIZE)
    union = sorted(state["online"]["memory"][0]["rows"]["index"].tolist() +
                   state["online"]["memory"][1]["rows"]["index"].tolist())
    assert union == sorted(torch.cat([r["rows"]["index"] for r in ranks]).tolist())
