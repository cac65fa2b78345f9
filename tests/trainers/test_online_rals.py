"""RALS: the top-k rule, SimCLR's and Barlow Twins' selection units, the anchor, BN statistics, the log."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from tests.trainers.method_helpers import SMALL_OPTIONS, context
from trainers.engine.step import train_step
from trainers.engine.types import Batch, StepOutput, ViewSet
from trainers.methods import BarlowTwins, SimCLR, barlow_twins_loss
from trainers.online.rals import (
    RALS,
    SelectionLog,
    barlow_part_losses,
    candidate_scores,
    frozen_bn_stats,
    join_parts,
    rank_part_rows,
    select_top_increase,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class MLPBackbone(nn.Module):
    """A BN MLP on 8 px views: a real method on it costs milliseconds."""

    out_dim = 16

    def __init__(self, size: int = 8) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(3 * size * size, 16), nn.BatchNorm1d(16), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _views(n: int, seed: int = 0, size: int = 8) -> ViewSet:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, size, size, generator=g)
    return ViewSet([x + 0.3 * torch.randn(x.shape, generator=g), x + 0.3 * torch.randn(x.shape, generator=g)])


def _batch(n: int) -> Batch:
    return Batch.from_images(torch.zeros(n, 3, 4, 4, dtype=torch.uint8))


def _method(cls, seed: int = 0):
    torch.manual_seed(seed)
    return cls(MLPBackbone(), **SMALL_OPTIONS[cls.name])


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------ the top-k rule
def test_top_increase_hand_built_with_ties_broken_at_random():
    current = torch.tensor([1.0, 3.0, 2.0, 5.0, 0.0, 4.0])
    anchor = torch.tensor([0.0, 1.0, 0.0, 5.0, 0.0, 1.0])  # increases 1, 2, 2, 0, 0, 3
    g = torch.Generator().manual_seed(0)
    assert select_top_increase(current, anchor, 1, g).tolist() == [5]
    assert select_top_increase(current, anchor, 3, g).tolist() == [1, 2, 5]
    # 1 and 2 tie at 2 for the second place, 3 and 4 at 0 for the fifth: each half the time, not the lower index.
    pairs = [tuple(select_top_increase(current, anchor, 2, g).tolist()) for _ in range(400)]
    assert set(pairs) == {(1, 5), (2, 5)} and 160 < pairs.count((1, 5)) < 240
    fifths = [tuple(select_top_increase(current, anchor, 5, g).tolist()) for _ in range(400)]
    assert set(fifths) == {(0, 1, 2, 3, 5), (0, 1, 2, 4, 5)} and 160 < fifths.count((0, 1, 2, 3, 5)) < 240
    # All tied (model == anchor): a uniform sample, every entry chosen k/n of the time.
    counts = torch.zeros(5)
    for _ in range(1000):
        counts[select_top_increase(torch.zeros(5), torch.zeros(5), 2, g)] += 1
    assert ((counts / 1000 - 0.4).abs() < 0.06).all(), counts
    # Seeded: the same generator state, the same choice.
    a = select_top_increase(torch.zeros(9), torch.zeros(9), 4, torch.Generator().manual_seed(5))
    assert torch.equal(a, select_top_increase(torch.zeros(9), torch.zeros(9), 4, torch.Generator().manual_seed(5)))
    for k in (0, 7, 2.0, True):
        with pytest.raises(ValueError, match="k must be"):
            select_top_increase(current, anchor, k)
    with pytest.raises(ValueError, match="equal shapes"):
        select_top_increase(current, anchor[:5], 2)


def test_never_a_fallen_sample_when_enough_rose():
    g = torch.Generator().manual_seed(0)
    checked = 0
    for _ in range(300):
        n = int(torch.randint(2, 60, (1,), generator=g))
        k = int(torch.randint(1, n + 1, (1,), generator=g))
        current = torch.randn(n, generator=g)
        # Rounded values make ties common.
        anchor = (current + torch.randn(n, generator=g)).mul(2).round().div(2)
        increase = current - anchor
        rows = select_top_increase(current, anchor, k)
        assert rows.tolist() == sorted(set(rows.tolist())) and len(rows) == k
        others = torch.ones(n, dtype=torch.bool)
        others[rows] = False
        if others.any():
            assert increase[rows].min() >= increase[others].max()
        if int((increase > 0).sum()) >= k:
            checked += 1
            assert (increase[rows] >= 0).all()
    assert checked > 50


# ------------------------------------------------------------------ SimCLR: l_ij + l_ji
def _nt_xent_by_hand(z1: torch.Tensor, z2: torch.Tensor, t: float) -> list[float]:
    """Each image's l(i, i+B) + l(i+B, i), with explicit loops over the 2B x 2B similarities."""
    b = z1.shape[0]
    rows = torch.cat([z1, z2]).tolist()
    norms = [math.sqrt(sum(x * x for x in r)) for r in rows]
    sim = [[sum(x * y for x, y in zip(rows[i], rows[j])) / (norms[i] * norms[j]) for j in range(2 * b)]
           for i in range(2 * b)]

    def term(i: int, pos: int) -> float:
        denom = sum(math.exp(sim[i][k] / t) for k in range(2 * b) if k != i)
        return -math.log(math.exp(sim[i][pos] / t) / denom)

    return [term(i, i + b) + term(i + b, i) for i in range(b)]


class _Stub(nn.Module):
    """Views are [B, D, 1, 1] embeddings: backbone flattens, projector is the identity."""

    def __init__(self, name: str, **attrs) -> None:
        super().__init__()
        self.name = name
        self.backbone, self.projector = nn.Flatten(), nn.Identity()
        for key, value in attrs.items():
            setattr(self, key, value)


def test_simclr_unit_is_l_ij_plus_l_ji():
    g = torch.Generator().manual_seed(1)
    z1 = torch.randn(5, 3, generator=g, dtype=torch.float64)
    z2 = z1 + 0.5 * torch.randn(5, 3, generator=g, dtype=torch.float64)
    views = ViewSet([z1.view(5, 3, 1, 1), z2.view(5, 3, 1, 1)])
    scores = candidate_scores(_Stub("simclr", temperature=0.5), views, _batch(5), context())
    assert scores.rows.tolist() == [[i] for i in range(5)]
    torch.testing.assert_close(scores.values.double(), torch.tensor(_nt_xent_by_hand(z1, z2, 0.5),
                                                                    dtype=torch.float64), rtol=1e-5, atol=1e-6)
    # On the real method: twice its per_sample, so the same ranking.
    method, views = _method(SimCLR), _views(12)
    per_sample = method(views, _batch(12), context()).per_sample
    torch.testing.assert_close(candidate_scores(method, views, _batch(12), context()).values, 2 * per_sample)


# ------------------------------------------------------------------ Barlow Twins: parts
def test_barlow_part_scores_are_each_parts_own_loss_and_whole_parts_are_selected():
    g = torch.Generator().manual_seed(2)
    z1 = torch.randn(64, 8, generator=g)
    z2 = z1 + 0.5 * torch.randn(64, 8, generator=g)
    stub = _Stub("barlow_twins", config=SimpleNamespace(lambd=0.05, scale_loss=0.5))
    stub.projector = nn.Linear(8, 8)
    views = ViewSet([z1.view(64, 8, 1, 1), z2.view(64, 8, 1, 1)])
    scores = candidate_scores(stub, views, _batch(64), context(), part_size=16,
                              generator=torch.Generator().manual_seed(0))
    assert scores.rows.shape == (4, 16)
    assert sorted(scores.rows.flatten().tolist()) == list(range(64))  # a permutation, cut into 4 parts
    assert scores.rows.flatten().tolist() != list(range(64))  # permuted: parts mix stream and memory rows
    with torch.no_grad():
        p1, p2 = stub.projector(z1), stub.projector(z2)
    expected = torch.stack([barlow_twins_loss(p1[r], p2[r], 0.05, scale=0.5) for r in scores.rows])
    torch.testing.assert_close(scores.values, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(barlow_part_losses(z1, z2, scores.rows, 0.05),
                               torch.stack([barlow_twins_loss(z1[r], z2[r], 0.05) for r in scores.rows]),
                               rtol=1e-4, atol=1e-5)

    rals = RALS(k=40, part_size=16, generator=torch.Generator().manual_seed(3))  # 40 // 16 = 2 parts
    rals.reset_anchor(stub)
    with torch.no_grad():
        stub.projector.weight.add_(0.3 * torch.randn(8, 8, generator=g))
    sel = rals.select(stub, views, _batch(64), context(), new_rows=16)
    parts = [set(r.tolist()) for r in sel.current.rows]
    chosen = [p for p in parts if p <= set(sel.rows.tolist())]
    assert len(chosen) == 2 and set().union(*chosen) == set(sel.rows.tolist()) and len(sel.rows) == 32
    increase = sel.current.values - sel.anchor.values
    picked = torch.tensor([p in chosen for p in parts])
    assert increase[picked].min() >= increase[~picked].max()
    assert sel.new_fraction == pytest.approx(float((sel.rows < 16).float().mean()))


# ------------------------------------------------------------------ the anchor and BN statistics
def test_anchor_is_fixed_while_training_and_reset_copies():
    method = _method(SimCLR)
    optimizer = torch.optim.SGD(method.parameters(), lr=0.5)
    rals = RALS(k=8)
    rals.reset_anchor(method)
    snapshot = _state(rals.anchor)
    assert _same(snapshot, _state(method))
    for step in range(3):
        views, batch = _views(12, seed=step), _batch(12)
        before = _state(method)
        sel = rals.select(method, views, batch, context(step), new_rows=4)
        assert _same(before, _state(method))  # scoring moved no BN statistics (nor anything else)
        assert _same(snapshot, _state(rals.anchor))
        train_step(method, method, optimizer, views.map(lambda v: v[sel.rows]), batch.select(sel.rows),
                   context(step))
    assert _same(snapshot, _state(rals.anchor))  # the anchor did not train
    assert not _same(snapshot, _state(method))
    pointers = [p.data_ptr() for p in rals.anchor.parameters()]
    rals.reset_anchor(method)
    assert _same(_state(rals.anchor), _state(method))
    assert [p.data_ptr() for p in rals.anchor.parameters()] == pointers  # copied into, not re-allocated
    assert not any(p.requires_grad for p in rals.anchor.parameters())


def test_frozen_bn_stats_restores_running_statistics():
    method = _method(BarlowTwins).train()
    before = _state(method)
    with torch.no_grad(), frozen_bn_stats(method):
        method(_views(16), _batch(16), context())
        assert not _same(before, _state(method))  # the pass did move them
    assert _same(before, _state(method))


# ------------------------------------------------------------------ end to end
@pytest.mark.parametrize("cls", [SimCLR, BarlowTwins])
def test_after_a_step_selected_rows_rose_most(cls):
    method = _method(cls)
    optimizer = torch.optim.SGD(method.parameters(), lr=0.5)
    rals = RALS(k=16, part_size=8, generator=torch.Generator().manual_seed(0))
    rals.reset_anchor(method)
    train_step(method, method, optimizer, _views(32, seed=5), _batch(32), context())
    views = _views(32, seed=6)
    sel = rals.select(method, views, _batch(32), context(1), new_rows=8)
    assert len(sel.rows) == 16 and sel.seconds > 0
    increase = sel.current.values - sel.anchor.values
    chosen = torch.zeros(len(increase), dtype=torch.bool)
    chosen[[i for i, r in enumerate(sel.current.rows.tolist()) if set(r) <= set(sel.rows.tolist())]] = True
    assert chosen.sum() == 16 // sel.current.rows.shape[1]
    assert increase[chosen].min() >= increase[~chosen].max()
    assert (increase != 0).any()  # the step changed the scores: the test ranks something
    train_step(method, method, optimizer, views.map(lambda v: v[sel.rows]), _batch(32).select(sel.rows),
               context(1))


# ------------------------------------------------------------------ new_fraction, the fallback, the log
class _Scored(nn.Module):
    """A method RALS knows no units for: its per_sample is a parameter; its step bumps a buffer (a queue)."""

    name = "scored"

    def __init__(self, values: list[float]) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor(values))
        self.register_buffer("queue", torch.zeros(3))

    def training_step(self, views, batch, ctx) -> StepOutput:
        self.queue.add_(1)
        return StepOutput(self.w.sum(), self.w.detach().clone())


def test_new_fraction_and_per_sample_fallback():
    method = _Scored([0.0] * 8)
    rals = RALS(k=4)
    rals.reset_anchor(method)
    with torch.no_grad():
        method.w.copy_(torch.tensor([5.0, 0.0, 4.0, 0.0, -1.0, 3.0, 2.0, 0.0]))
    sel = rals.select(method, _views(8), _batch(8), context(), new_rows=3)
    assert sel.rows.tolist() == [0, 2, 5, 6]
    assert sel.new_fraction == 0.5  # rows 0 and 2 of the 3 stream rows
    assert method.queue.tolist() == [0.0, 0.0, 0.0] and rals.anchor.queue.tolist() == [0.0, 0.0, 0.0]
    assert rals.select(method, _views(8), _batch(8), context(), new_rows=0).new_fraction == 0.0
    assert rals.select(method, _views(8), _batch(8), context(), new_rows=8).new_fraction == 1.0
    with pytest.raises(ValueError, match="new_rows"):
        rals.select(method, _views(8), _batch(8), context(), new_rows=9)
    with pytest.raises(RuntimeError, match="reset_anchor"):
        RALS(k=4).select(method, _views(8), _batch(8), context(), new_rows=3)


def test_selection_log_running_mean_over_last_100_batches():
    log = SelectionLog()
    assert log.last is None and log.running_mean is None
    means = []
    for i in range(150):
        fractions = [i / 150, (i + 2) / 150]
        means.append(log.add_batch(fractions))
        assert log.last == pytest.approx((i + 1) / 150)
    assert len(log) == 100
    assert log.running_mean == pytest.approx(sum(means[-100:]) / 100)
    with pytest.raises(ValueError):
        log.add_batch([])


# ------------------------------------------------------------------ the first step of a batch: model == anchor
def test_first_step_with_model_equal_to_anchor_selects_uniformly_not_the_stream_rows():
    # 8 stream rows + 16 memory rows, k = 16: the study's 128 + 256 -> 256 in small. Every increase is exactly 0
    # here; a lowest-index tie-break took rows arange(16) every time (new fraction 8/16 = 0.5).
    method = _method(SimCLR)
    rals = RALS(k=16, generator=torch.Generator().manual_seed(0))
    rals.reset_anchor(method)
    views, batch = _views(24, seed=3), _batch(24)
    counts, fractions = torch.zeros(24), []
    for _ in range(150):
        sel = rals.select(method, views, batch, context(), new_rows=8)
        assert (sel.current.values == sel.anchor.values).all()  # a tie everywhere
        counts[sel.rows] += 1
        fractions.append(sel.new_fraction)
    mean = sum(fractions) / len(fractions)
    assert abs(mean - 8 / 24) < 0.03, mean  # the stream's share of the candidates, not 0.5
    assert ((counts / 150 - 16 / 24).abs() < 0.15).all(), counts  # every candidate about k / n of the time
    assert len(set(fractions)) > 1  # the draws differ from step to step
    # Barlow Twins' parts: the same at part level (the permutation and the tie-break).
    method = _method(BarlowTwins)
    rals = RALS(k=8, part_size=4, generator=torch.Generator().manual_seed(1))
    rals.reset_anchor(method)
    fractions = [rals.select(method, views, batch, context(), new_rows=8).new_fraction for _ in range(150)]
    assert abs(sum(fractions) / len(fractions) - 8 / 24) < 0.04


def test_selection_profile_is_the_mean_per_local_step_and_survives_a_state_round_trip():
    log = SelectionLog(window=2)
    assert log.profile == []
    log.add_batch([0.6, 0.4, 0.2])
    log.add_batch([0.4, 0.2])  # a batch cut after 2 steps adds to steps 0 and 1 only
    log.add_batch([0.2, 0.3, 0.4, 0.5])
    assert log.profile == pytest.approx([0.4, 0.3, 0.3, 0.5])  # over every batch, not the last `window`
    assert log.running_mean == pytest.approx((0.3 + 0.35) / 2)
    restored = SelectionLog()
    restored.load_state_dict(log.state_dict())
    assert restored.profile == log.profile and restored.running_mean == log.running_mean
    old = SelectionLog()
    old.load_state_dict({"window": 100, "batches": [0.5]})  # a checkpoint from before the profile
    assert old.profile == [] and old.running_mean == 0.5


def test_global_parts_join_every_ranks_rows_and_score_as_one_process_would():
    # Three ranks' candidates (n = 6 each), a part = 2 rows of each rank: as join_parts builds them for the
    # gathered projections, each part's score is the Barlow Twins loss of exactly those 6 rows.
    g = torch.Generator().manual_seed(4)
    world, n, s = 3, 6, rank_part_rows(6, 3)
    assert s == 2 and rank_part_rows(16, 3) == 5 and rank_part_rows(16, 32) == 1
    local = [torch.randperm(n, generator=g)[:n // s * s].view(n // s, s) for _ in range(world)]
    parts = join_parts(local, n)
    assert parts.shape == (3, 6)
    for u in range(3):
        for r in range(world):
            assert parts[u, r * s:(r + 1) * s].tolist() == (local[r][u] + r * n).tolist()
    z1 = torch.randn(world * n, 8, generator=g)
    z2 = z1 + 0.3 * torch.randn(world * n, 8, generator=g)
    torch.testing.assert_close(barlow_part_losses(z1, z2, parts, 0.05),
                               torch.stack([barlow_twins_loss(z1[p], z2[p], 0.05) for p in parts]),
                               rtol=1e-4, atol=1e-5)
    # The top parts by increase, and each rank's own rows of them: the same count on every rank.
    increase = torch.tensor([0.3, -0.1, 0.7])
    chosen = select_top_increase(increase, torch.zeros(3), 2)
    assert chosen.tolist() == [0, 2]
    mine = [local[r][chosen].flatten() for r in range(world)]
    assert {len(m) for m in mine} == {4}
    with pytest.raises(ValueError, match="same parts"):
        join_parts([local[0], local[1][:1]], n)
