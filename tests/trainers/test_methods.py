"""The method protocol, checked for every registered method: one engine step, exact resume, view needs.

Each method's own tests (test_<name>.py) check its loss against the paper's formula and its DDP semantics;
these check what the engine relies on, for all of them at once, so a new method is covered by registering it
(and adding its small options to `method_helpers.SMALL_OPTIONS`).
"""

from __future__ import annotations

import pytest
import torch

from tests.trainers.method_helpers import SMALL_OPTIONS, context, step, tiny_backbone, tiny_backbone_name, view_set
from trainers.engine.checkpoint import load_state, save_state
from trainers.engine.loop import LineTrainer, LoopConfig
from trainers.engine.types import Batch
from trainers.registry import METHOD_REGISTRY
from trainers.views.plan import view_plan

RECORDS = list(METHOD_REGISTRY.values())


def _views_for(record, b: int = 8, seed: int = 0):
    return view_set(b=b, global_count=max(2, record.min_global_views), local_count=2 if record.needs_local_views
                    else 0, seed=seed)


def _labels(b: int) -> torch.Tensor:
    return torch.arange(b) % 4


def test_every_method_has_small_test_options() -> None:
    assert set(SMALL_OPTIONS) == set(METHOD_REGISTRY.names)


@pytest.mark.parametrize("record", RECORDS, ids=lambda r: r.name)
def test_one_engine_step_trains_the_online_network_and_moves_targets_by_ema(record) -> None:
    torch.manual_seed(0)
    method = record.build(tiny_backbone(method=record.name), **SMALL_OPTIONS[record.name])
    optimizer = torch.optim.SGD(method.param_groups(1e-4), lr=0.05, momentum=0.9)
    online_before = [p.detach().clone() for p in method.backbone.parameters()]
    pairs = method.momentum_pairs()
    targets_before = [p.detach().clone() for _, t in pairs for p in t.parameters()]
    out = step(method, optimizer, _views_for(record), labels=_labels(8), ctx=context(0, 10))
    assert out.loss.dim() == 0 and torch.isfinite(out.loss)
    assert out.per_sample.shape == (8,) and torch.isfinite(out.per_sample).all()
    assert any(not torch.equal(a, b) for a, b in zip(online_before, method.backbone.parameters()))
    for _, target in pairs:
        assert all(p.grad is None and not p.requires_grad for p in target.parameters())
    if pairs:  # the EMA moved each target part of the way (momentum < 1 at progress 0)
        after = [p.detach() for _, t in pairs for p in t.parameters()]
        assert any(not torch.equal(a, b) for a, b in zip(targets_before, after))
        assert out.terms["momentum"].item() == pytest.approx(method.momentum_at(0.0))


@pytest.mark.parametrize("record", [r for r in RECORDS if r.needs_local_views or r.min_global_views > 1],
                         ids=lambda r: r.name)
def test_a_method_refuses_views_it_cannot_consume(record) -> None:
    torch.manual_seed(0)
    method = record.build(tiny_backbone(method=record.name), **SMALL_OPTIONS[record.name])
    optimizer = torch.optim.SGD(method.param_groups(0.0), lr=0.01)
    too_few = view_set(global_count=1) if record.min_global_views > 1 else view_set(global_count=2)
    with pytest.raises(ValueError, match="views"):
        step(method, optimizer, too_few, labels=_labels(8))


def _config(record, **overrides) -> LoopConfig:
    plan = view_plan(global_count=max(2, record.min_global_views), global_size=16,
                     local_count=2 if record.needs_local_views else 0, local_size=8, global_options={"blur_p": 0.0})
    base = dict(method=record.name, backbone=tiny_backbone_name(record.name), strategy="sequential", image_size=16, views=plan, backbone_width=4, lr=0.05,
                epochs_per_chunk=1, batch_size=8, seed=1, method_options=SMALL_OPTIONS[record.name],
                checkpoint_every_steps=3, line_steps=12)
    base.update(overrides)
    return LoopConfig(**base)


def _batches(n_batches: int = 6, b: int = 8):
    g = torch.Generator().manual_seed(5)
    data = [Batch.from_images(torch.randint(0, 256, (b, 3, 16, 16), dtype=torch.uint8, generator=g),
                              labels=torch.arange(b) % 4) for _ in range(n_batches)]
    return lambda epoch, skip: iter(data[skip:])


class _Stop(Exception):
    pass


@pytest.mark.parametrize("record", RECORDS, ids=lambda r: r.name)
def test_resume_continues_bit_for_bit(tmp_path, record) -> None:
    """3 steps, checkpoint, a fresh trainer resumes and trains 3 more: equal to 6 steps straight (weights, targets,
    loss buffers, optimizer state), because the state holds everything the next step reads."""
    straight = LineTrainer(_config(record))
    straight.train_chunk(0, _batches(), 6, on_checkpoint=lambda: None)

    first = LineTrainer(_config(record))

    def save_and_stop() -> None:
        save_state(tmp_path, first.state_dict())
        raise _Stop

    with pytest.raises(_Stop):
        first.train_chunk(0, _batches(), 6, on_checkpoint=save_and_stop)
    resumed = LineTrainer(_config(record))
    resumed.load_state_dict(load_state(tmp_path))
    assert resumed.position["step"] == 3
    resumed.train_chunk(0, _batches(), 6, on_checkpoint=lambda: None)
    expected, got = straight.method.state_dict(), resumed.method.state_dict()
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name


def test_load_backbone_gives_the_trained_encoder_and_random_backbone_its_architecture(tmp_path) -> None:
    from dataclasses import asdict

    from trainers.engine.checkpoint import load_backbone, random_backbone

    record = METHOD_REGISTRY["byol"]
    cfg = _config(record, views=view_plan(global_count=2, global_size=16, local_count=2, local_size=8))
    assert LoopConfig(**asdict(cfg)) == cfg  # the config a checkpoint stores reads back as the same config
    trainer = LineTrainer(cfg)
    trainer.train_chunk(0, _batches(2), 2)
    save_state(tmp_path, trainer.state_dict())
    backbone = load_backbone(load_state(tmp_path))
    assert not backbone.training
    x = torch.randn(2, 3, 16, 16)
    trainer.backbone.eval()
    assert torch.equal(backbone(x), trainer.backbone(x))
    with pytest.raises(Exception, match="not a training checkpoint"):
        load_backbone({"position": {}})

    # The from-scratch baseline: the same architecture, weights drawn from the seed, the global RNG untouched.
    state = load_state(tmp_path)
    rng = torch.get_rng_state()
    fresh, again, other = random_backbone(state, 3), random_backbone(state, 3), random_backbone(state, 4)
    assert torch.equal(torch.get_rng_state(), rng) and not fresh.training
    assert fresh.state_dict().keys() == backbone.state_dict().keys()
    weights = [k for k, v in fresh.state_dict().items() if v.is_floating_point() and v.dim() > 1]
    assert weights and all(torch.equal(fresh.state_dict()[k], again.state_dict()[k]) for k in weights)
    assert not any(torch.equal(fresh.state_dict()[k], backbone.state_dict()[k]) for k in weights)
    assert not torch.equal(fresh.state_dict()[weights[0]], other.state_dict()[weights[0]])


@pytest.mark.parametrize("record", RECORDS, ids=lambda r: r.name)
def test_a_record_and_its_class_agree_on_what_the_method_needs(record) -> None:
    # The spec checks the record; a method class that declares its needs must say the same.
    for need, default in (("needs_labels", False), ("needs_local_views", False), ("min_global_views", None)):
        declared = getattr(record.build, need, default)
        if declared is not None:
            assert getattr(record, need) == declared, (record.name, need)
    assert record.config is record.build.Config and record.build.name == record.name
