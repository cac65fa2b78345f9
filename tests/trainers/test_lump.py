"""LUMP: exact mixup of augmented stream and buffer views from the second chunk on, Beta(alpha, alpha) weights, a
bounded buffer of every past chunk, SL mixup of labels, exact mid-chunk resume, and exact DDP shards."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import stats
from torch import nn

from tests.trainers.ddp_harness import run_ddp
from tests.trainers.engine.test_loop import Interrupted, config
from trainers.backbones import build_backbone
from trainers.engine.checkpoint import load_state, save_state
from trainers.engine.loop import LineTrainer
from trainers.engine.types import Batch, LabelMix, StepContext, ViewSet
from trainers.methods.supervised import Supervised
from trainers.strategies import ChunkEnd, Lump, LumpConfig, build_strategy
from trainers.views.plan import make_view_set, view_plan

PLAN = view_plan(global_count=2, global_size=16, local_count=2, local_size=8)


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def images(n: int, seed: int, size: int = 16) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def rows(pixels: torch.Tensor, start: int) -> Batch:
    """`pixels` as rows start, start+1, ...; labels index % 4."""
    index = torch.arange(start, start + len(pixels))
    return Batch(pixels, labels=index % 4, index=index, domain=torch.zeros(len(pixels), dtype=torch.int64))


def stream_chunk(lump: Lump, chunk: int, pixels: torch.Tensor, start: int, batch: int = 16) -> None:
    ctx = StepContext(step=0, total_steps=None, chunk=chunk, epoch=0)
    for s in range(0, len(pixels), batch):
        lump.after_step(rows(pixels[s:s + batch], start + s), ctx)
    lump.on_chunk_end(ChunkEnd(method=None, chunk=chunk, batches=lambda: [], device=torch.device("cpu")))


class Recording:
    """An `augment` that remembers which images it was asked for and the views it made."""

    def __init__(self, generator: torch.Generator) -> None:
        self.augment = partial(make_view_set, plan=PLAN, generator=generator)
        self.calls: list[tuple[torch.Tensor, ViewSet]] = []

    def __call__(self, pixels: torch.Tensor) -> ViewSet:
        views = self.augment(pixels)
        self.calls.append((pixels, views))
        return views


def test_mixed_views_are_convex_combinations_of_the_two_augmented_views() -> None:
    lump = Lump(size=40, alpha=1.0)
    past = images(100, seed=1)
    stream_chunk(lump, 0, past, start=0)
    generator = torch.Generator().manual_seed(5)
    augment = Recording(generator)
    for step in range(5):
        batch = rows(images(8, seed=100 + step), start=1000 + 8 * step)
        views = make_view_set(batch.images, PLAN, generator=generator)
        mixed, out = lump.prepare_views(views, batch, StepContext(step=step, total_steps=None, chunk=1), augment)
        partner_pixels, partner = augment.calls[-1]
        # The partners are buffer rows (pixels and labels), one per stream row, augmented with the stream's plan.
        slot = [int(torch.nonzero((lump.buffer["images"] == p).flatten(1).all(1))[0]) for p in partner_pixels]
        assert torch.equal(out.mix.labels, lump.buffer["labels"][slot]) and len(partner_pixels) == len(batch)
        assert [v.shape for v in partner.all] == [v.shape for v in views.all] == [v.shape for v in mixed.all]
        # lambda from the element where the two views differ most, then every element of every view checked.
        a, b, m = views.global_[0].flatten(), partner.global_[0].flatten(), mixed.global_[0].flatten()
        k = int((a - b).abs().argmax())
        weight = float((m[k] - b[k]) / (a[k] - b[k]))
        assert 0 < weight < 1 and weight == pytest.approx(out.mix.weight, abs=1e-5)
        assert weight == pytest.approx(lump.mix_weight(step), abs=1e-5)
        assert len(mixed.global_) == 2 and len(mixed.local) == 2
        for x, y, z in zip(views.all, partner.all, mixed.all, strict=True):
            torch.testing.assert_close(z, weight * x + (1 - weight) * y, atol=1e-5, rtol=0)
        assert out.index.tolist() == batch.index.tolist() and torch.equal(out.images, batch.images)


def test_the_first_chunk_is_untouched() -> None:
    lump = Lump(size=40)
    batch = rows(images(8, seed=3), start=0)
    views = make_view_set(batch.images, PLAN, generator=torch.Generator().manual_seed(0))
    augment = Recording(torch.Generator())
    mixed, out = lump.prepare_views(views, batch, StepContext(step=0, total_steps=None, chunk=0), augment)
    assert mixed is views and out is batch and out.mix is None and augment.calls == []
    # A whole line: chunk 0 of sequential+lump trains exactly as sequential (weights equal bit for bit).
    plain, lumped = (LineTrainer(config(strategy=s, strategy_options={"lump": {"size": 16}}))
                     for s in ("sequential", "sequential+lump"))
    for trainer in (plain, lumped):
        trainer.train_chunk(0, labelled(images(32, seed=1), 0), 4)
    for (name, x), y in zip(plain.method.state_dict().items(), lumped.method.state_dict().values()):
        assert torch.equal(x, y), name
    assert len(lumped.strategy.strategies[1]) == 16


def test_the_buffer_stays_within_its_bound_and_holds_every_past_chunk() -> None:
    lump = Lump(size=60, alpha=0.5)
    augment = Recording(torch.Generator().manual_seed(0))
    for chunk, n in enumerate((200, 30, 300, 100)):
        start = 10_000 * chunk
        pixels = images(n, seed=chunk)
        ctx = StepContext(step=chunk, total_steps=None, chunk=chunk)
        for s in range(0, n, 16):
            batch = rows(pixels[s:s + 16], start + s)
            lump.prepare_views(make_view_set(batch.images, PLAN), batch, ctx, augment)
            lump.after_step(batch, ctx)
            assert len(lump) <= 60 and len(lump.staged["index"]) <= 60
        if chunk:  # the mixing partners came from past chunks only, never the present one
            drawn = torch.cat([p for p, _ in augment.calls])
            assert not any(torch.equal(d, p) for d in drawn[-16:] for p in pixels)
        lump.on_chunk_end(ChunkEnd(method=None, chunk=chunk, batches=lambda: [], device=torch.device("cpu")))
        assert len(lump) == 60 and len(set(lump.buffer["index"].tolist())) == 60
        assert sorted(set(lump.buffer["chunk"].tolist())) == list(range(chunk + 1))
        assert torch.equal(lump.buffer["index"] // 10_000, lump.buffer["chunk"])  # rows kept their chunk tag
    shares = np.bincount(lump.buffer["chunk"].numpy())  # reservoir: shares in proportion to the rows, 630 seen
    assert shares.sum() == 60 and abs(shares[2] - 60 * 300 / 630) <= 3


@pytest.mark.parametrize("alpha", [0.1, 1.0, 2.0])
def test_lambda_follows_beta_alpha_alpha(alpha: float) -> None:
    lump = Lump(alpha=alpha, seed=7)
    weights = np.array([lump.mix_weight(step) for step in range(4000)])
    assert ((weights >= 0) & (weights <= 1)).all()
    assert stats.kstest(weights, stats.beta(alpha, alpha).cdf).pvalue > 1e-3
    wrong = 0.5 if alpha == 0.1 else alpha * 4  # the test can tell a different alpha apart
    assert stats.kstest(weights, stats.beta(wrong, wrong).cdf).pvalue < 1e-6
    assert weights[:50].tolist() == [Lump(alpha=alpha, seed=7).mix_weight(s) for s in range(50)]
    assert weights[:50].tolist() != [Lump(alpha=alpha, seed=8).mix_weight(s) for s in range(50)]


def test_the_default_alpha_is_the_papers_0_4() -> None:
    """Every config of the paper's code (github.com/divyam3897/UCL, configs/*.yaml) sets train.alpha 0.4."""
    assert LumpConfig().alpha == 0.4
    weights = np.array([Lump(seed=7).mix_weight(step) for step in range(4000)])
    assert stats.kstest(weights, stats.beta(0.4, 0.4).cdf).pvalue > 1e-3
    assert stats.kstest(weights, stats.beta(0.1, 0.1).cdf).pvalue < 1e-6  # not the 0.1 it was


def test_supervised_mixes_the_labels_as_the_images() -> None:
    torch.manual_seed(0)
    method = Supervised(build_backbone("resnet18", image_size=16, width=4), num_classes=4)
    batch = rows(images(6, seed=2), start=0)
    views = make_view_set(batch.images, PLAN, generator=torch.Generator().manual_seed(1))
    partner = torch.tensor([3, 2, 1, 0, 3, 2])
    mixed = Batch(batch.images, batch.labels, batch.index, batch.domain, mix=LabelMix(partner, 0.3))
    ctx = StepContext(step=0, total_steps=None)
    method.eval()  # BN from running statistics: the forward passes below see the same function
    out = method.training_step(views, mixed, ctx)
    expected = torch.stack([0.3 * F.cross_entropy(logits, batch.labels, reduction="none")
                            + 0.7 * F.cross_entropy(logits, partner, reduction="none")
                            for logits in (method.classifier(method.backbone(v)) for v in views.global_)]).mean(0)
    torch.testing.assert_close(out.per_sample, expected)
    torch.testing.assert_close(out.loss, expected.mean())
    plain = method.training_step(views, batch, ctx).loss
    assert abs(out.loss.item() - plain.item()) > 1e-3  # the partners' labels changed the loss
    with pytest.raises(ValueError, match="lack labels"):
        method.training_step(views, Batch(batch.images, batch.labels, batch.index, batch.domain,
                                          mix=LabelMix(torch.full((6,), -1), 0.3)), ctx)


def test_lump_composes_with_sequential_only_and_refuses_a_mixed_batch() -> None:
    with pytest.raises(ValueError, match="lump needs the base sequential, not joint"):
        build_strategy("joint+lump")
    lump = Lump(size=10)
    stream_chunk(lump, 0, images(20, seed=0), start=0)
    batch = rows(images(4, seed=1), start=100)
    batch = Batch(batch.images, batch.labels, batch.index, batch.domain, mix=LabelMix(batch.labels, 0.5))
    with pytest.raises(ValueError, match="mixed already"):
        lump.prepare_views(make_view_set(batch.images, PLAN), batch, StepContext(step=0, total_steps=None),
                           partial(make_view_set, plan=PLAN))
    with pytest.raises(ValueError, match="cannot be joined"):
        batch.cat(batch)


def labelled(pixels: torch.Tensor, offset: int, batch: int = 8):
    """`batches(epoch, skip)` over `pixels` (rows offset, offset+1, ...; labels index % 4), a fixed order per epoch."""
    def batches(epoch: int, skip: int):
        order = torch.randperm(len(pixels), generator=torch.Generator().manual_seed(epoch))
        starts = list(range(0, len(pixels) - batch + 1, batch))[skip:]
        for i in starts:
            ids = order[i:i + batch]
            yield Batch(pixels[ids], (ids + offset) % 4, ids + offset, torch.zeros(batch, dtype=torch.int64))
    return batches


class Recorder(nn.Module):
    """The model the loop calls (as DDP would wrap it): notes each step's mixing weight, then runs the method."""

    def __init__(self, method: nn.Module) -> None:
        super().__init__()
        self.method = method
        self.weights: list[tuple[int, int, float | None]] = []

    def forward(self, views: ViewSet, batch: Batch, ctx: StepContext):
        self.weights.append((ctx.chunk, ctx.step, None if batch.mix is None else batch.mix.weight))
        return self.method(views, batch, ctx)


@pytest.mark.parametrize("method,strategy", [("simclr", "sequential+lump"), ("supervised", "sequential+replay+lump")])
def test_a_lump_line_resumes_inside_a_chunk_bit_for_bit(tmp_path, method: str, strategy: str) -> None:
    """Chunk 1 interrupted after an in-chunk checkpoint (during its first epoch, while rows are staged) and
    resumed: weights and buffer equal an uninterrupted line's; every step of chunk 1 trained on mixed views."""
    chunks = [images(32, 1), images(32, 2)]
    options = {"lump": {"size": 20, "alpha": 0.5}, "replay": {"size": 10}}
    method_options = {"num_classes": 4} if method == "supervised" else {"proj_hidden": 32, "proj_out": 16}
    make = lambda **kw: LineTrainer(config(method=method, strategy=strategy, strategy_options=options,  # noqa: E731
                                           method_options=method_options, checkpoint_every_steps=3), **kw)
    reference = make(wrap_model=Recorder)
    for c in (0, 1):
        reference.train_chunk(c, labelled(chunks[c], 1000 * c), 4, on_checkpoint=lambda: None)
    lump = reference.strategy.strategies[-1]
    assert len(lump) == 20 and sorted(set(lump.buffer["chunk"].tolist())) == [0, 1]
    steps = reference.model.weights
    assert [w for c, _, w in steps if c == 0] == [None] * 8
    assert [w for c, _, w in steps if c == 1] == [lump.mix_weight(s) for c, s, _ in steps if c == 1]

    interrupted = make()
    interrupted.train_chunk(0, labelled(chunks[0], 0), 4, on_checkpoint=lambda: None)

    def checkpoint_then_die() -> None:
        save_state(tmp_path, interrupted.state_dict())
        if interrupted.position["step"] == 3:
            raise Interrupted

    with pytest.raises(Interrupted):
        interrupted.train_chunk(1, labelled(chunks[1], 1000), 4, on_checkpoint=checkpoint_then_die)
    resumed = make()
    resumed.load_state_dict(load_state(tmp_path))
    resumed.train_chunk(1, labelled(chunks[1], 1000), 4)
    for (name, a), b in zip(reference.method.state_dict().items(), resumed.method.state_dict().values()):
        assert torch.equal(a, b), name
    again = resumed.strategy.strategies[-1]
    for field in ("index", "images", "chunk"):
        assert torch.equal(again.buffer[field], lump.buffer[field]), field


def _ddp_line(rank: int, world: int) -> dict:
    from torch.nn.parallel import DistributedDataParallel

    trainer = LineTrainer(config(strategy="sequential+lump", strategy_options={"lump": {"size": 20}},
                                 epochs_per_chunk=1),
                          wrap_model=lambda m: DistributedDataParallel(Recorder(m)), rank=rank)
    for chunk in (0, 1):  # each rank its own rows: rank r of chunk c has ids 1000 c + 100 r + 0..31
        trainer.train_chunk(chunk, labelled(images(32, seed=10 * chunk + rank), 1000 * chunk + 100 * rank), 4)
    lump = trainer.strategy.strategies[1]
    return {"buffer": dict(lump.buffer), "capacity": lump.capacity, "weights": trainer.model.module.weights,
            "states": trainer.rank_states()["strategy"]}


def test_the_buffer_shards_over_two_ddp_ranks_exactly() -> None:
    ranks = run_ddp(_ddp_line)
    assert [r["capacity"] for r in ranks] == [10, 10] and [len(r["buffer"]["index"]) for r in ranks] == [10, 10]
    union = torch.cat([r["buffer"]["index"] for r in ranks])
    assert len(set(union.tolist())) == 20  # no row held twice
    for rank, r in enumerate(ranks):
        buffer = r["buffer"]
        assert ((buffer["index"] % 1000) // 100 == rank).all()  # a rank keeps only rows it trained on
        for row, pixels, chunk in zip(buffer["index"].tolist(), buffer["images"], buffer["chunk"].tolist()):
            assert chunk == row // 1000 and torch.equal(pixels, images(32, seed=10 * chunk + rank)[row % 100])
    assert sorted(set(torch.cat([r["buffer"]["chunk"] for r in ranks]).tolist())) == [0, 1]
    # One lambda per global step: both ranks mixed every step of chunk 1 with the same weight, none in chunk 0.
    assert ranks[0]["weights"] == ranks[1]["weights"] and len(ranks[0]["weights"]) == 8
    assert [w is None for _, _, w in ranks[0]["weights"]] == [True] * 4 + [False] * 4
    # The gathered checkpoint state: the same world takes back its shards, one worker takes the whole union.
    states = [state["lump"] for state in ranks[0]["states"]]
    back = Lump(size=20)
    back.load_state_dict(states, rank=1, world_size=2)
    assert torch.equal(back.buffer["index"], ranks[1]["buffer"]["index"])
    alone = Lump(size=20)
    alone.load_state_dict(states, rank=0, world_size=1)
    assert sorted(alone.buffer["index"].tolist()) == sorted(union.tolist()) and alone.capacity == 20
