"""SimCLR: NT-Xent against the paper's formula, its invariants and errors, training, cross-worker negatives."""

from __future__ import annotations

import math
import socket
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from tests.trainers.ddp_harness import start_ranks
from tests.trainers.method_helpers import context, forward, step, view_set
from trainers.backbones import build_backbone
from trainers.engine.types import ViewSet
from trainers.methods import METHODS, SimCLR, nt_xent_loss


def _projections(b: int = 4, d: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, d, generator=g, dtype=torch.float64), torch.randn(b, d, generator=g, dtype=torch.float64)


def _paper_nt_xent(z1: torch.Tensor, z2: torch.Tensor, t: float) -> tuple[float, list[float]]:
    """SimCLR eq. 1 and algorithm 1, written with explicit loops.

    Samples are interleaved as in the paper: 2k is view 1 of image k, 2k + 1 its view 2;
    L = 1 / 2N sum_k [l(2k, 2k+1) + l(2k+1, 2k)].
    """
    zs = []
    for k in range(z1.shape[0]):
        zs += [z1[k].tolist(), z2[k].tolist()]

    def sim(u: list[float], v: list[float]) -> float:
        dot = sum(a * b for a, b in zip(u, v))
        return dot / (math.sqrt(sum(a * a for a in u)) * math.sqrt(sum(b * b for b in v)))

    def ell(i: int, j: int) -> float:
        denominator = sum(math.exp(sim(zs[i], zs[k]) / t) for k in range(len(zs)) if k != i)
        return -math.log(math.exp(sim(zs[i], zs[j]) / t) / denominator)

    per_image = [(ell(2 * k, 2 * k + 1) + ell(2 * k + 1, 2 * k)) / 2 for k in range(z1.shape[0])]
    return sum(per_image) / len(per_image), per_image


@pytest.mark.parametrize("temperature", [0.1, 0.5, 2.0])
def test_nt_xent_matches_the_paper_formula(temperature: float) -> None:
    z1, z2 = _projections(b=4, d=5)
    loss = nt_xent_loss(z1, z2, temperature)
    expected, per_image = _paper_nt_xent(z1, z2, temperature)
    assert loss.dtype == torch.float64
    assert loss.item() == pytest.approx(expected, rel=1e-10)
    terms = nt_xent_loss(z1, z2, temperature, reduction="none")
    assert terms.tolist() == pytest.approx(per_image, rel=1e-10)


def test_per_sample_terms_average_to_the_loss() -> None:
    z1, z2 = (z.float() for z in _projections(b=7, d=3, seed=1))
    terms = nt_xent_loss(z1, z2, 0.2, reduction="none")
    assert terms.shape == (7,)
    assert torch.allclose(terms.mean(), nt_xent_loss(z1, z2, 0.2))


def test_symmetric_in_the_views_and_blind_to_scale() -> None:
    z1, z2 = _projections(b=5, d=4, seed=2)
    assert torch.allclose(nt_xent_loss(z1, z2, 0.3, "none"), nt_xent_loss(z2, z1, 0.3, "none"))
    # Projections are L2-normalised first, so rescaling them changes nothing.
    assert torch.allclose(nt_xent_loss(3 * z1, 0.5 * z2, 0.3), nt_xent_loss(z1, z2, 0.3))


def test_aligned_views_lose_less_than_random_ones() -> None:
    z1, z2 = _projections(b=8, d=16, seed=3)
    assert nt_xent_loss(z1, z1 + 0.01 * z2, 0.1) < 0.05 < nt_xent_loss(z1, z2, 0.1)


def test_half_precision_inputs_are_computed_in_float32() -> None:
    z1, z2 = _projections(b=4, d=8, seed=4)
    loss = nt_xent_loss(z1.half(), z2.half(), 0.1)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(nt_xent_loss(z1, z2, 0.1).item(), rel=1e-2)
    # Autocast would run the similarity matmul in bfloat16; the loss switches it off.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = nt_xent_loss(z1.float(), z2.float(), 0.1)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(nt_xent_loss(z1, z2, 0.1).item(), rel=1e-5)


def test_nt_xent_errors_name_the_problem() -> None:
    z1, z2 = _projections()
    with pytest.raises(ValueError, match=r"equal shapes.*\(4, 5\) and \(3, 5\)"):
        nt_xent_loss(z1, z2[:3])
    with pytest.raises(ValueError, match=r"\[B, D\]"):
        nt_xent_loss(z1[0], z2[0])
    for bad in (0.0, -0.1, math.inf):
        with pytest.raises(ValueError, match="temperature"):
            nt_xent_loss(z1, z2, temperature=bad)
    with pytest.raises(ValueError, match="reduction"):
        nt_xent_loss(z1, z2, reduction="sum")


def _backbone() -> torch.nn.Module:
    return build_backbone("resnet18", image_size=16, width=4)


def _views(b: int = 8, count: int = 2, seed: int = 0) -> ViewSet:
    return view_set(b=b, global_count=count, seed=seed)


def test_registry_and_constructor_validation() -> None:
    assert METHODS["simclr"] is SimCLR
    with pytest.raises(ValueError, match="temperature"):
        SimCLR(_backbone(), temperature=0.0)
    with pytest.raises(ValueError, match="proj_hidden"):
        SimCLR(_backbone(), proj_hidden=0)
    with pytest.raises(ValueError, match="proj_out"):
        SimCLR(_backbone(), proj_out=2.5)
    with pytest.raises(ValueError, match="out_dim"):
        SimCLR(torch.nn.Linear(3, 3))


def test_forward_outputs_and_view_checks() -> None:
    torch.manual_seed(0)
    method = SimCLR(_backbone(), proj_hidden=32, proj_out=8, temperature=0.5)
    assert method.projector[-1].out_features == 8
    views = _views(b=6)
    out = forward(method, views)
    assert out.loss.shape == () and out.per_sample.shape == (6,)
    assert torch.allclose(out.per_sample.mean(), out.loss)
    assert method.momentum_pairs() == []  # no target network
    with pytest.raises(ValueError, match="at least 2 global views"):
        forward(method, ViewSet(views.global_[:1]))
    with pytest.raises(ValueError, match="global view 1"):
        forward(method, ViewSet([views.global_[0], views.global_[1][:4]]))


def test_more_than_two_views_average_over_pairs() -> None:
    torch.manual_seed(0)
    method = SimCLR(_backbone(), proj_hidden=32, proj_out=8, temperature=0.5)
    views = _views(b=6, count=3)
    out = forward(method, views)
    z = [method.projector(method.backbone(v)) for v in views.global_]  # train-mode BN: same batch, same outputs
    pairs = [nt_xent_loss(z[a], z[b], 0.5, "none") for a, b in ((0, 1), (0, 2), (1, 2))]
    assert torch.allclose(out.per_sample, sum(pairs) / 3, atol=1e-6)


def test_loss_falls_on_a_fixed_batch() -> None:
    torch.manual_seed(0)
    method = SimCLR(_backbone(), proj_hidden=64, proj_out=16, temperature=0.5)
    optimizer = torch.optim.Adam(method.parameters(), lr=3e-3)
    views = _views(b=16)
    losses = []
    for i in range(20):
        losses.append(step(method, optimizer, views, ctx=context(i, 20)).loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    return torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)


def _gather_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=timedelta(seconds=60)
    )
    try:
        z1, z2 = _ddp_batch()
        b = z1.shape[0] // world
        a = z1[rank * b : (rank + 1) * b].clone().requires_grad_()
        c = z2[rank * b : (rank + 1) * b].clone().requires_grad_()
        per_sample = nt_xent_loss(a, c, 0.3, reduction="none")
        loss = per_sample.mean()
        loss.backward()
        torch.save({"loss": loss.detach(), "per_sample": per_sample.detach(), "g1": a.grad, "g2": c.grad},
                   Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_negatives_are_gathered_across_workers(tmp_path: Path) -> None:
    world = 2
    start_ranks(_gather_worker, (world, _free_port(), str(tmp_path)), nprocs=world)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]

    z1, z2 = (z.requires_grad_() for z in _ddp_batch())
    full = nt_xent_loss(z1, z2, 0.3, reduction="none")
    full.mean().backward()
    # Each worker's loss is the mean over its own anchors, computed against the whole batch's negatives.
    assert torch.allclose(torch.cat([r["per_sample"] for r in ranks]), full.detach(), atol=1e-6)
    assert torch.allclose(torch.stack([r["loss"] for r in ranks]).mean(), full.mean().detach(), atol=1e-6)
    # Gradients flow back through the gather: worker r receives d(sum of all workers' losses)/dz_r,
    # which is world * d(global mean)/dz_r; DDP's averaging then yields the global-mean gradient.
    assert torch.allclose(torch.cat([r["g1"] for r in ranks]), world * z1.grad, atol=1e-6)
    assert torch.allclose(torch.cat([r["g2"] for r in ranks]), world * z2.grad, atol=1e-6)
    # Without the gather each worker would only see its own 3 images: a different, smaller loss.
    local = nt_xent_loss(z1[:3].detach(), z2[:3].detach(), 0.3)
    assert not torch.allclose(local, ranks[0]["loss"])
