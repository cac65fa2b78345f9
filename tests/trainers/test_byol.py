"""BYOL: the loss against the paper's formula, the EMA target and its schedule, training on a tiny batch."""

from __future__ import annotations

import math

import pytest
import torch

from tests.trainers.method_helpers import context, forward, step, view_set
from trainers.backbones import build_backbone
from trainers.engine.step import ema_update
from trainers.engine.types import ViewSet
from trainers.methods import BYOL, METHODS, byol_loss


def _pairs(b: int = 4, d: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, d, generator=g, dtype=torch.float64), torch.randn(b, d, generator=g, dtype=torch.float64)


def test_byol_loss_matches_the_paper_formula() -> None:
    p, z = _pairs()
    expected = []
    for i in range(p.shape[0]):
        # BYOL eq. 2: || p / ||p|| - z / ||z|| ||^2, written out coordinate by coordinate.
        np_, nz = math.sqrt(sum(v * v for v in p[i].tolist())), math.sqrt(sum(v * v for v in z[i].tolist()))
        expected.append(sum((a / np_ - b / nz) ** 2 for a, b in zip(p[i].tolist(), z[i].tolist())))
    terms = byol_loss(p, z, reduction="none")
    assert terms.shape == (4,)
    assert terms.tolist() == pytest.approx(expected, rel=1e-10)
    assert byol_loss(p, z).item() == pytest.approx(sum(expected) / 4, rel=1e-10)
    # Invariants: 0 for aligned vectors, 4 for opposite ones, symmetric, blind to scale.
    assert byol_loss(p, 2 * p).item() == pytest.approx(0.0, abs=1e-12)
    assert byol_loss(p, -p).item() == pytest.approx(4.0)
    assert torch.allclose(byol_loss(p, z, "none"), byol_loss(z, 3 * p, "none"))


def test_byol_loss_errors() -> None:
    p, z = _pairs()
    with pytest.raises(ValueError, match=r"equal shapes.*\(4, 6\) and \(4, 5\)"):
        byol_loss(p, z[:, :5])
    with pytest.raises(ValueError, match="reduction"):
        byol_loss(p, z, reduction="sum")


def _backbone() -> torch.nn.Module:
    return build_backbone("resnet18", image_size=16, width=4)


def _method(**hparams) -> BYOL:
    torch.manual_seed(0)
    return BYOL(_backbone(), **{"proj_hidden": 32, "proj_out": 8, "pred_hidden": 16, **hparams})


def _views(b: int = 8, count: int = 2) -> ViewSet:
    return view_set(b=b, global_count=count)


def test_registry_and_constructor_validation() -> None:
    assert METHODS["byol"] is BYOL
    for name, bad in (("base_momentum", 1.5), ("base_momentum", -0.1), ("final_momentum", 2.0), ("proj_out", 0),
                      ("pred_hidden", -1), ("proj_hidden", 1.5)):
        with pytest.raises(ValueError, match=name):
            BYOL(_backbone(), **{name: bad})
    with pytest.raises(ValueError, match="final_momentum"):
        BYOL(_backbone(), base_momentum=0.99, final_momentum=0.9)


def test_target_starts_as_a_frozen_copy_and_is_in_the_state_dict() -> None:
    method = _method()
    online = {**method.backbone.state_dict(), **{f"p.{k}": v for k, v in method.projector.state_dict().items()}}
    target = {**method.target_backbone.state_dict(),
              **{f"p.{k}": v for k, v in method.target_projector.state_dict().items()}}
    assert online.keys() == target.keys() and all(torch.equal(online[k], target[k]) for k in online)
    assert not any(p.requires_grad for p in method.target_backbone.parameters())
    assert not any(p.requires_grad for p in method.target_projector.parameters())
    keys = method.state_dict().keys()
    assert any(k.startswith("target_backbone.") for k in keys) and any(k.startswith("target_projector.") for k in keys)
    # The target is a copy, not an alias.
    assert method.target_backbone.stem[0].weight.data_ptr() != method.backbone.stem[0].weight.data_ptr()


def test_momentum_schedule_endpoints() -> None:
    method = _method(base_momentum=0.99)
    assert method.momentum_at(0.0) == pytest.approx(0.99)
    assert method.momentum_at(0.5) == pytest.approx(0.995)
    assert method.momentum_at(1.0) == pytest.approx(1.0)
    assert method.momentum_at(0.25) == pytest.approx(1 - 0.01 * (math.cos(math.pi / 4) + 1) / 2)
    assert _method(base_momentum=0.9, final_momentum=0.95).momentum_at(1.0) == pytest.approx(0.95)
    for bad in (-0.1, 1.1):
        with pytest.raises(ValueError, match="progress"):
            method.momentum_at(bad)


def test_ema_update_moves_the_target_by_the_expected_amount() -> None:
    method = _method(base_momentum=0.9)
    with torch.no_grad():  # make online and target differ
        for p in [*method.backbone.parameters(), *method.projector.parameters()]:
            p.add_(torch.randn_like(p))
    online = [p.detach().clone() for p in [*method.backbone.parameters(), *method.projector.parameters()]]
    target = [p.detach().clone() for p in [*method.target_backbone.parameters(), *method.target_projector.parameters()]]

    m = 1.0 - 0.1 * (math.cos(math.pi * 0.3) + 1) / 2
    assert method.momentum_at(0.3) == pytest.approx(m)
    ema_update(method.momentum_pairs(), method.momentum_at(0.3))
    target_params = [*method.target_backbone.parameters(), *method.target_projector.parameters()]
    after = [p.detach().clone() for p in target_params]
    assert len(after) == len(online) > 0
    for t0, o, t1 in zip(target, online, after):
        assert torch.allclose(t1, m * t0 + (1 - m) * o, atol=1e-6)
    # The online network is untouched by the update.
    online_now = [*method.backbone.parameters(), *method.projector.parameters()]
    assert all(torch.equal(o, p) for o, p in zip(online, online_now))
    # At the end of the run the momentum is 1: the target no longer moves.
    ema_update(method.momentum_pairs(), method.momentum_at(1.0))
    assert all(torch.equal(t, p) for t, p in zip(after, target_params))


def test_forward_is_the_symmetrised_loss_and_trains_only_the_online_network() -> None:
    method = _method()
    views = _views(b=6)
    out = forward(method, views)
    assert out.loss.shape == () and out.per_sample.shape == (6,)
    assert torch.allclose(out.per_sample.mean(), out.loss)
    with torch.no_grad():  # train-mode BN: the same batch gives the same outputs
        p = [method.predictor(method.projector(method.backbone(v))) for v in views.global_]
        z = [method.target_projector(method.target_backbone(v)) for v in views.global_]
    expected = (byol_loss(p[0], z[1], "none") + byol_loss(p[1], z[0], "none")) / 2
    assert torch.allclose(out.per_sample.detach(), expected, atol=1e-6)
    out.loss.backward()
    assert method.predictor[0].weight.grad is not None and method.backbone.stem[0].weight.grad is not None
    assert all(p.grad is None for p in method.target_backbone.parameters())
    with pytest.raises(ValueError, match="at least 2 global views"):
        forward(method, ViewSet(views.global_[:1]))


def test_loss_falls_on_a_fixed_batch() -> None:
    method = _method(base_momentum=0.99)
    optimizer = torch.optim.Adam([p for p in method.parameters() if p.requires_grad], lr=3e-3)
    views = _views(b=16)
    losses = []
    for i in range(20):
        losses.append(step(method, optimizer, views, ctx=context(i, 20)).loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_loss_is_float32_under_bfloat16_autocast() -> None:
    p, z = _pairs(b=3, d=8, seed=5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = byol_loss(p.bfloat16(), z.bfloat16())
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(byol_loss(p, z).item(), rel=2e-2)
