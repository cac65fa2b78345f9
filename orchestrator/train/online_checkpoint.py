"""An online line's checkpoint: the training state in `state.pt` (rank 0) and each rank's replay-memory share in
its own file beside it (`memory-rank-00001.pt`), written by that rank alone: nothing is gathered, and Ray Train
merges the workers' folders into the one checkpoint folder.

    checkpointer = MemoryCheckpointer(config["checkpoint_fs"], run_url, rank, world)
    sizes = checkpointer.save(folder, online, extra)      # every rank together, before ray.train.report
    ray.train.report(..., checkpoint=Checkpoint.from_directory(folder) if sizes["wrote"] else None)
    checkpointer.saved(dir_name)                         # every rank together, after the report: prunes the older
    path, state = restore_online(config, latest, rank, world, memory_size)   # after a restart

A share's images are stored PNG-encoded (lossless, so a resume restores the very rows) where that is smaller than
the decoded uint8 row, else as the row; rows already encoded for an earlier checkpoint are not encoded again. The
file's size and sha256 go into rank 0's `state.pt` (`memory_files`), so a checkpoint is complete only when its
state verifies and every share it names is there whole.

Only the newest checkpoint holds the memory: once a newer checkpoint is on storage (every rank past its report and a
barrier), each rank deletes its share from the one before. Every checkpoint keeps its `state.pt` (the model, small
beside the memory): a segment's is what the lineage's segment run and LoggedModel point at and evaluation reads, and
Ray Train's run snapshot lists every folder it was given, so a resumed driver's controller refuses a run whose
in-segment folders were deleted. So a run holds one memory; a checkpoint without its shares is not resumed from. A restart
restores from the newest complete checkpoint, reading `state.pt` and only the shares it needs (its own when the
world and memory size are unchanged; all of them when the memory is dealt out again), and then deletes the shares
older checkpoints may still hold (a kill between a report and the pruning).
"""

from __future__ import annotations

import hashlib
import io
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image

from orchestrator.train.checkpoints import checkpoint_order
from trainers.engine.checkpoint import STATE_FILE, CheckpointError, load_state, save_state

MEMORY_FILE = "memory-rank-{rank:05d}.pt"
MEMORY_FORMAT = 1


def _png(image: torch.Tensor) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(buffer, "PNG", compress_level=1)
    return buffer.getvalue()


def _unpng(data: bytes) -> torch.Tensor:
    with Image.open(io.BytesIO(data)) as img:
        return torch.from_numpy(np.array(img)).permute(2, 0, 1)


def encode_images(images: torch.Tensor, index: torch.Tensor, cache: dict[int, tuple[int, bytes | None]],
                  threads: int = 1) -> tuple[list[bytes | None], torch.Tensor]:
    """Rows [N, 3, H, W] uint8 -> (per row its PNG bytes, or None where PNG is not smaller; the None rows stacked).

    `cache` (slot -> (row id, bytes)) carries the encodings of an earlier call: a slot that still holds the same row
    is not encoded again (the reservoir replaces few rows between two checkpoints once it is full)."""
    n = len(images)
    if n == 0 or images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        return [None] * n, images
    row_bytes = images[0].numel()
    ids = index.tolist()
    todo = [i for i in range(n) if cache.get(i, (None, None))[0] != ids[i]]
    with ThreadPoolExecutor(max(1, threads)) as pool:  # zlib leaves the GIL while it compresses
        for i, data in zip(todo, pool.map(lambda i: _png(images[i]), todo)):
            cache[i] = (ids[i], data if len(data) < row_bytes else None)
    for slot in [s for s in cache if s >= n]:
        del cache[slot]
    encoded = [cache[i][1] for i in range(n)]
    plain = [i for i, data in enumerate(encoded) if data is None]
    return encoded, images[plain]


def decode_images(encoded: list[bytes | None], plain: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    out = torch.empty((len(encoded), *shape), dtype=torch.uint8)
    rest = iter(plain)
    for i, data in enumerate(encoded):
        out[i] = _unpng(data) if data is not None else next(rest)
    return out


def write_share(folder: str | Path, memory: Any, rank: int, cache: dict, threads: int = 1) -> dict[str, Any]:
    """This rank's memory share as `memory-rank-RRRRR.pt` in `folder`; returns what `state.pt` records of it."""
    state = memory.state_dict()
    rows = state["rows"]
    encoded, plain = encode_images(rows["images"], rows["index"], cache, threads)
    payload = {"format": MEMORY_FORMAT, "placement": state["placement"], "size": state["size"],
               "seen": state["seen"], "generator": state["generator"],
               "rows": {k: v for k, v in rows.items() if k != "images"},  # written at once: no copies needed
               "images": {"shape": tuple(rows["images"].shape[1:]), "encoded": encoded, "plain": plain}}
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    data = buffer.getvalue()
    name = MEMORY_FILE.format(rank=rank)
    Path(folder, name).write_bytes(data)
    return {"file": name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(), "placement": state["placement"],
            "size": state["size"], "seen": state["seen"], "rows": len(rows["index"]),
            "raw_bytes": sum(t.numel() * t.element_size() for t in rows.values())}


def read_share(data: bytes, meta: dict[str, Any], where: str) -> dict[str, Any]:
    """A share file's bytes -> the state `ReplayMemory.load_state_dict` takes; checked against its record."""
    if len(data) != meta["bytes"] or hashlib.sha256(data).hexdigest() != meta["sha256"]:
        raise CheckpointError(f"checkpoint {where}: memory share {meta['file']} does not match its record "
                              f"({len(data)} bytes, {meta['bytes']} recorded): partial upload or corrupted")
    payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)
    images = payload["images"]
    rows = {**payload["rows"], "images": decode_images(images["encoded"], images["plain"], images["shape"])}
    return {"rows": rows, "seen": payload["seen"], "size": payload["size"], "generator": payload["generator"],
            "placement": tuple(payload["placement"])}


class MemoryCheckpointer:
    """One per line on every rank: writes the checkpoint's parts and prunes the memory of the one before."""

    def __init__(self, checkpoint_fs: Callable, run_url: str, rank: int, world: int, previous: str | None = None,
                 threads: int = 1) -> None:
        self.fs, self.run_path = checkpoint_fs(run_url)
        self.rank, self.world, self.threads = rank, world, threads
        self.previous = previous.rstrip("/").rsplit("/", 1)[-1] if previous else None  # folder name
        self.cache: dict[int, tuple[int, bytes | None]] = {}

    def save(self, folder: str, online: Any, extra: dict[str, Any]) -> dict[str, Any]:
        """Every rank: its share into `folder`; rank 0 also `state.pt`. Returns (on rank 0) the checkpoint's sizes:
        checkpoint_bytes (all its files), memory_file_bytes (the shares, encoded), buffer_bytes (the shares' rows
        as held in memory, decoded), state_bytes (what stays once a newer checkpoint prunes the shares), memory_rows
        (the rows of every share)."""
        import torch.distributed as dist

        meta = write_share(folder, online.memory, self.rank, self.cache, self.threads) \
            if online.memory is not None else None
        trainer_ranks = online.trainer.rank_states()  # generators and strategy state: small, a collective
        gathered = [(online.generator.get_state(), meta)]
        if self.world > 1:
            gathered = [None] * self.world
            dist.all_gather_object(gathered, (online.generator.get_state(), meta))
        sizes: dict[str, Any] = {"wrote": meta is not None or self.rank == 0}
        if self.rank == 0:
            state = {**online.state_dict(), **trainer_ranks}
            state["online"] = {**state["online"], "memory": [], "generators": [g for g, _ in gathered]}
            files = [m for _, m in gathered if m is not None]
            path = save_state(folder, {**state, **extra, "memory_files": files})
            state_bytes = path.stat().st_size
            memory_bytes = sum(m["bytes"] for m in files)
            sizes.update(checkpoint_bytes=state_bytes + memory_bytes, memory_file_bytes=memory_bytes,
                         buffer_bytes=sum(m["raw_bytes"] for m in files), state_bytes=state_bytes,
                         memory_rows=sum(m["rows"] for m in files))
        return sizes

    def saved(self, dir_name: str) -> None:
        """After every rank reported `dir_name`: it is on storage whole, so the previous checkpoint's share of this
        rank goes. The folder itself stays, in-segment ones too: Ray Train's run snapshot lists every checkpoint it
        was given, and a controller started on the same run (a resumed driver) refuses a run whose folders are gone.
        What stays of an older checkpoint is its small state.pt."""
        import torch.distributed as dist

        if self.world > 1:
            dist.barrier()
        previous, self.previous = self.previous, dir_name
        if previous is None or previous == dir_name:
            return
        _delete(self.fs, f"{self.run_path}/{previous}/{MEMORY_FILE.format(rank=self.rank)}")


def _delete(fs: Any, path: str) -> None:
    try:
        fs.delete_file(path)
    except (FileNotFoundError, OSError):
        pass  # gone already (a restart's sweep, or no share on that rank)


def _read(fs: Any, path: str) -> bytes:
    with fs.open_input_stream(path) as f:
        return f.read()


def _load_state_file(fs: Any, checkpoint: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        try:
            Path(tmp, STATE_FILE).write_bytes(_read(fs, f"{checkpoint}/{STATE_FILE}"))
        except (FileNotFoundError, OSError) as exc:
            raise CheckpointError(f"checkpoint {checkpoint}: no readable {STATE_FILE} ({exc})") from None
        return load_state(tmp)


def _complete(fs: Any, checkpoint: str, state: dict[str, Any]) -> bool:
    import pyarrow.fs as pafs

    for meta in state.get("memory_files", []):
        info = fs.get_file_info(f"{checkpoint}/{meta['file']}")
        if info.type != pafs.FileType.File or info.size != meta["bytes"]:
            return False
    return True


def restore_online(config: dict[str, Any], latest: Any, rank: int, world: int,
                   memory_size: int | None) -> tuple[str | None, dict[str, Any] | None]:
    """The newest complete online checkpoint of this run (state verified, every memory share whole), with
    `state["online"]["memory"]` the shares this rank needs for `ReplayMemory.load_state_dict`."""
    import pyarrow.fs as pafs
    import torch.distributed as dist

    line_ids = [task.line.id for task in config["tasks"]]
    run_url = f"{config['storage_uri'].rstrip('/')}/{config['run_name']}"
    fs, run_path = config["checkpoint_fs"](run_url)

    def order(path: str):
        return checkpoint_order(path.rstrip("/").rsplit("/", 1)[-1], line_ids)

    chosen: list[Any] = [None]
    state = None
    if rank == 0:
        candidates = [latest.path.rstrip("/")] if latest is not None else []
        try:
            infos = fs.get_file_info(pafs.FileSelector(run_path, allow_not_found=True))
            candidates += [info.path for info in infos if info.type == pafs.FileType.Directory]
        except OSError:
            pass  # storage listing failed: fall back to Ray's own latest
        ranked = sorted({c for c in candidates if order(c)}, key=order, reverse=True)
        for path in ranked:
            try:
                state = _load_state_file(fs, path)
            except Exception:  # noqa: BLE001 - partial upload or unreadable: an older one will do
                continue
            if _complete(fs, path, state):
                chosen[0] = path
                break
            state = None
        if chosen[0] is not None:  # shares older checkpoints still hold (a kill before their pruning) go
            for path in ranked:
                if order(path) < order(chosen[0]):
                    for info in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True)):
                        if info.base_name.startswith("memory-rank-"):
                            _delete(fs, info.path)
    if world > 1:
        dist.broadcast_object_list(chosen, src=0)
    if chosen[0] is None:
        return None, None
    if state is None:
        state = _load_state_file(fs, chosen[0])
    files = state.get("memory_files", [])
    same = len(files) == world and all(tuple(m["placement"]) == (r, world) and m["size"] == memory_size
                                       for r, m in enumerate(files))
    shares = []
    for r, meta in enumerate(files):
        if same and r != rank:  # only its placement is needed: this rank takes its own share back
            shares.append({"placement": tuple(meta["placement"]), "size": meta["size"], "seen": meta["seen"]})
        else:
            shares.append(read_share(_read(fs, f"{chosen[0]}/{meta['file']}"), meta, chosen[0]))
    if files:
        state["online"] = {**state["online"], "memory": shares}
    return chosen[0], state


__all__ = ["MemoryCheckpointer", "restore_online", "write_share", "read_share", "encode_images", "decode_images"]
