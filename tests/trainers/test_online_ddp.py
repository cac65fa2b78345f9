"""The online loop on 3 gloo ranks (real torch.distributed): the memory draw and RALS's rows are dealt evenly, so
the first steps that use the memory complete with equal shapes on every rank; counts that do not divide by the
world size are refused naming the field; Barlow Twins' parts are chosen across the ranks, the same on all."""

from __future__ import annotations

import warnings

import torch
from torch.nn.parallel import DistributedDataParallel

from tests.trainers.ddp_harness import run_ddp
from trainers.online.config import OnlineConfig

WORLD = 3
PER_RANK = 3  # stream rows per rank (batch_size 9)


def _cfg(**overrides) -> OnlineConfig:
    return OnlineConfig.parse("online", **{"batch_size": 9, "steps_per_batch": 2, "schedule": "constant",
                                           "max_lr": 0.05, "memory_size": 12, "memory_batch": 6, "rals": True,
                                           "rals_k": 6, "rals_part_size": 4, **overrides})


def _learn(method: str, rank: int) -> dict:
    from tests.trainers.test_online_loop import line
    from trainers.engine.types import Batch
    from trainers.online.loop import OnlineTrainer

    options = {"proj_hidden": 16, "proj_out": 8}
    trainer = line(method=method, method_options=options, wrap_model=DistributedDataParallel, rank=rank)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        online = OnlineTrainer(trainer, _cfg())
    sizes, candidates, selections = [], [], []
    bare, rals = online.trainer.method, online.rals
    forward, select = bare.forward, rals.select

    def spy_forward(views, batch, ctx):
        sizes.append(len(batch))
        return forward(views, batch, ctx)

    def spy_select(method_, views, batch, ctx, new_rows):
        candidates.append(len(batch))
        sel = select(method_, views, batch, ctx, new_rows)
        selections.append({"rows": sel.rows, "units": sel.current.rows, "increase": sel.current.values
                           - sel.anchor.values, "new_fraction": sel.new_fraction})
        return sel

    bare.forward, rals.select = spy_forward, spy_select
    g = torch.Generator().manual_seed(rank)
    reports = []
    for k in range(2):
        images = torch.randint(0, 256, (PER_RANK, 3, 16, 16), dtype=torch.uint8, generator=g)
        reports.append(online.learn(Batch.from_images(images, index=torch.arange(PER_RANK) + 100 * k)).as_dict())
    return {"sizes": sizes, "candidates": candidates, "selections": selections, "reports": reports,
            "warnings": [str(w.message) for w in caught]}


def _worker(rank: int, world: int) -> dict:
    from tests.trainers.test_online_loop import line
    from trainers.online.loop import OnlineTrainer

    refused = []
    for bad in ({"memory_batch": 8}, {"rals_k": 10}):  # 3/3/2 and 4/3/3 before: gathers of unequal shapes
        try:
            OnlineTrainer(line(), _cfg(**bad))
        except ValueError as exc:
            refused.append(str(exc))
    return {"refused": refused, **{m: _learn(m, rank) for m in ("simclr", "barlow_twins")}}


def test_memory_and_rals_on_three_ranks_deal_evenly_and_choose_barlow_parts_globally() -> None:
    ranks = run_ddp(_worker, world=WORLD)
    for r in ranks:
        assert len(r["refused"]) == 2
        assert r["refused"][0].startswith("online.memory_batch (8) must be divisible by the workers (3)")
        assert "use 6 or 9" in r["refused"][0]
        assert r["refused"][1].startswith("online.rals_k (10) must be divisible by the workers (3)")
    for method in ("simclr", "barlow_twins"):
        runs = [r[method] for r in ranks]
        for run in runs:
            assert [rep["steps"] for rep in run["reports"]] == [2, 2]  # 2 batches x 2 steps, no hang
            # Batch 0: the 3 stream rows a rank (9 > k = 6 over the ranks); batch 1: + 2 memory rows (6 / 3).
            assert run["candidates"] == [3, 3, 5, 5]
            assert run["sizes"] == [2, 2, 2, 2]  # k / world rows trained on every rank at every step
        # new_fraction is over all ranks: every rank reports the same.
        assert len({tuple(rep["new_fraction"] for rep in run["reports"]) for run in runs}) == 1
    barlow = [r["barlow_twins"] for r in ranks]
    # 4 does not divide by 3: a part takes 1 row of each rank (3 rows), said once.
    assert any("online.rals_part_size (4)" in w and "3 rows in all" in w for w in barlow[0]["warnings"])
    for step in range(4):
        sels = [run["selections"][step] for run in barlow]
        units, increase = sels[0]["units"], sels[0]["increase"]
        for sel in sels[1:]:  # every rank scored the same global parts the same
            assert torch.equal(sel["units"], units) and torch.equal(sel["increase"], increase)
        assert units.shape[1] == WORLD  # a part: one row of every rank
        n = len(units)  # candidates per rank: 1 row of each rank per part, every row in a part
        assert sorted(units.flatten().tolist()) == list(range(WORLD * n))
        # The chosen parts (k // 3 = 2 of them) are the top-2 by increase over all ranks' parts, and every
        # rank trains on its own rows of exactly those parts.
        chosen = [u for u in range(len(units))
                  if all(int(units[u, r]) - r * n in sels[r]["rows"].tolist() for r in range(WORLD))]
        assert len(chosen) == 2
        others = [u for u in range(len(units)) if u not in chosen]
        assert increase[chosen].min() >= increase[others].max()
        for r in range(WORLD):
            assert sorted(sels[r]["rows"].tolist()) == sorted(int(units[u, r]) - r * n for u in chosen)
