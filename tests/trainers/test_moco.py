"""MoCo-v2 and MoCo-v2+: InfoNCE against the paper's formula, the queue (FIFO, wrap-around, normalised, no grad),
DDP (loss-level equivalence, identical queues holding every rank's keys), v2+'s momentum schedule, learning."""

from __future__ import annotations

import copy
import math
import time

import pytest
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from tests.trainers.ddp_harness import rows, run_ddp
from tests.trainers.learning_helpers import short_pretraining
from tests.trainers.method_helpers import context, forward, step, tiny_backbone, view_set
from trainers.engine.step import train_step
from trainers.engine.types import Batch, ViewSet
from trainers.methods import METHODS, MoCoV2, MoCoV2Plus, moco_infonce_loss
from trainers.methods.moco_v2 import enqueue_keys, enqueue_view
from trainers.registry import METHOD_REGISTRY


def _tensors(b: int = 4, d: int = 5, k: int = 7, seed: int = 0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q, key = torch.randn(b, d, generator=g, dtype=dtype), torch.randn(b, d, generator=g, dtype=dtype)
    queue = F.normalize(torch.randn(k, d, generator=g, dtype=dtype), dim=1)
    return q, key, queue


def _paper_infonce(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, t: float) -> list[float]:
    """MoCo eq. 1 with explicit loops: -log exp(q.k+/t) / (exp(q.k+/t) + sum_j exp(q.n_j/t)), q and k unit."""

    def unit(v: list[float]) -> list[float]:
        n = math.sqrt(sum(a * a for a in v))
        return [a / n for a in v]

    def dot(u: list[float], v: list[float]) -> float:
        return sum(a * b for a, b in zip(u, v))

    out = []
    for i in range(q.shape[0]):
        qi, ki = unit(q[i].tolist()), unit(k[i].tolist())
        pos = math.exp(dot(qi, ki) / t)
        neg = sum(math.exp(dot(qi, n) / t) for n in queue.tolist())
        out.append(-math.log(pos / (pos + neg)))
    return out


# ---------------------------------------------------------------------------------------------------- the loss
@pytest.mark.parametrize("temperature", [0.07, 0.2, 1.0])
def test_infonce_matches_the_paper_formula(temperature: float) -> None:
    q, k, queue = _tensors()
    expected = _paper_infonce(q, k, queue, temperature)
    terms = moco_infonce_loss(q, k, queue, temperature, reduction="none")
    assert terms.dtype == torch.float64 and terms.shape == (4,)
    assert terms.tolist() == pytest.approx(expected, rel=1e-10)
    assert moco_infonce_loss(q, k, queue, temperature).item() == pytest.approx(sum(expected) / 4, rel=1e-10)
    # Also as the paper's pseudo-code: logits [q.k+, q.queue] / t, cross entropy with target 0.
    qn, kn = F.normalize(q, dim=1), F.normalize(k, dim=1)
    logits = torch.cat([(qn * kn).sum(1, keepdim=True), qn @ queue.T], dim=1) / temperature
    assert torch.allclose(terms, F.cross_entropy(logits, torch.zeros(4, dtype=torch.long), reduction="none"))


def test_per_sample_terms_average_to_the_loss_and_scale_does_not_matter() -> None:
    q, k, queue = (x.float() for x in _tensors(b=7, d=3, k=11, seed=1))
    terms = moco_infonce_loss(q, k, queue, 0.2, reduction="none")
    assert terms.shape == (7,) and torch.allclose(terms.mean(), moco_infonce_loss(q, k, queue, 0.2))
    assert torch.allclose(moco_infonce_loss(3 * q, 0.5 * k, queue, 0.2), moco_infonce_loss(q, k, queue, 0.2))
    # A query that matches its key and is far from every negative costs almost nothing.
    unit = torch.tensor([[1.0, 0.0, 0.0]])
    assert moco_infonce_loss(unit, 2 * unit, -unit.expand(5, 3), 0.05).item() < 1e-6


def test_no_gradient_reaches_the_keys_or_the_queue() -> None:
    q, k, queue = (x.clone().requires_grad_() for x in _tensors())
    moco_infonce_loss(q, k, queue, 0.2).backward()
    assert q.grad is not None and q.grad.abs().sum() > 0
    assert k.grad is None and queue.grad is None


def test_loss_is_float32_under_bfloat16_autocast() -> None:
    q, k, queue = _tensors(b=4, d=8, k=16, seed=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = moco_infonce_loss(q.float(), k.float(), queue.float(), 0.2)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(moco_infonce_loss(q, k, queue, 0.2).item(), rel=1e-5)
    assert moco_infonce_loss(q.bfloat16(), k.bfloat16(), queue.bfloat16(), 0.2).dtype == torch.float32


def test_loss_errors_name_the_problem() -> None:
    q, k, queue = _tensors()
    with pytest.raises(ValueError, match=r"equal shapes.*\(4, 5\) and \(3, 5\)"):
        moco_infonce_loss(q, k[:3], queue)
    with pytest.raises(ValueError, match=r"\[B, D\]"):
        moco_infonce_loss(q[0], k[0], queue)
    with pytest.raises(ValueError, match=r"queue must be \[K, 5\]"):
        moco_infonce_loss(q, k, queue[:, :4])
    with pytest.raises(ValueError, match="queue"):
        moco_infonce_loss(q, k, queue[:0])
    with pytest.raises(ValueError, match="non-empty"):
        moco_infonce_loss(q[:0], k[:0], queue)
    for bad in (0.0, -0.1, math.inf):
        with pytest.raises(ValueError, match="temperature"):
            moco_infonce_loss(q, k, queue, temperature=bad)
    with pytest.raises(ValueError, match="reduction"):
        moco_infonce_loss(q, k, queue, reduction="sum")


# ---------------------------------------------------------------------------------------------------- the queue
def test_enqueue_is_a_fifo_that_wraps_around() -> None:
    size, d = 10, 3
    queue, ptr = torch.zeros(size, d), torch.zeros(1, dtype=torch.long)
    reference = [None] * size  # an independent ring buffer: slot, then advance
    slot, label = 0, 0
    for n in (4, 4, 4, 3, 13, 1):  # 4 + 4 crosses the end at 10; 13 > size keeps only the last 10
        keys = torch.arange(label, label + n, dtype=torch.float32)[:, None].expand(n, d).clone()
        for i in range(n):
            reference[slot] = label + i
            slot = (slot + 1) % size
        label += n
        enqueue_keys(queue, ptr, keys)
        assert ptr.item() == slot
        assert queue[:, 0].tolist() == [float(v) if v is not None else 0.0 for v in reference]
    # After the batch of 13 the ring holds exactly the 10 most recent keys.
    assert sorted(queue[:, 0].tolist()) == [float(v) for v in range(label - 10, label)]
    with pytest.raises(ValueError, match=r"keys must be \[N, 3\]"):
        enqueue_keys(queue, ptr, torch.zeros(2, 4))


def _method(cls=MoCoV2, **options) -> MoCoV2:
    torch.manual_seed(0)
    small = {"proj_hidden": 32, "proj_out": 8, "queue_size": 12, **options}
    if cls is MoCoV2Plus:
        small.setdefault("pred_hidden", 16)
    return cls(tiny_backbone(), **small)


def test_queue_starts_normalised_and_is_a_buffer_in_the_state_dict() -> None:
    method = _method()
    assert method.queue.shape == (12, 8) and method.queue_ptr.tolist() == [0]
    assert torch.allclose(method.queue.norm(dim=1), torch.ones(12))
    names = dict(method.named_buffers())
    assert "queue" in names and "queue_ptr" in names
    assert {"queue", "queue_ptr"} <= method.state_dict().keys()
    assert not method.queue.requires_grad


def test_an_engine_step_enqueues_the_normalised_keys_of_view_2_without_grad() -> None:
    method = _method()
    optimizer = torch.optim.SGD(method.param_groups(0.0), lr=0.05)
    views = view_set(b=8)
    target = (copy.deepcopy(method.target_backbone), copy.deepcopy(method.target_projector))
    before = method.queue.clone()
    step(method, optimizer, views, ctx=context(0, 10))
    with torch.no_grad():  # the key encoder as it was during the step (train-mode BN: same batch, same output)
        expected = F.normalize(target[1](target[0](views.global_[1])), dim=1)
    assert method.queue_ptr.tolist() == [8]
    assert torch.allclose(method.queue[:8], expected, atol=1e-6)
    assert torch.equal(method.queue[8:], before[8:])
    assert torch.allclose(method.queue.norm(dim=1), torch.ones(12))
    # A second step of 8 wraps: rows 8..11 then 0..3; the pointer at 16 mod 12 = 4.
    step(method, optimizer, view_set(b=8, seed=1), ctx=context(1, 10))
    assert method.queue_ptr.tolist() == [4]
    assert not torch.allclose(method.queue[:4], expected[:4])
    assert torch.allclose(method.queue[4:8], expected[4:], atol=1e-6)


def test_forward_alone_leaves_the_queue_and_an_eval_forward_enqueues_nothing() -> None:
    method = _method()
    before = method.queue.clone()
    out = forward(method, view_set(b=6))
    assert torch.equal(method.queue, before)  # the enqueue is in on_step_end, after the optimizer step
    method.on_step_end(context())
    assert method.queue_ptr.tolist() == [6]
    method.eval()
    forward(method, view_set(b=6))
    method.on_step_end(context())
    assert method.queue_ptr.tolist() == [6]
    assert out.loss.shape == () and out.per_sample.shape == (6,)


# ---------------------------------------------------------------------------------------------------- the method
def test_registry_and_constructor_validation() -> None:
    assert METHODS["moco_v2"] is MoCoV2 and METHODS["moco_v2_plus"] is MoCoV2Plus
    for name in ("moco_v2", "moco_v2_plus"):
        record = METHOD_REGISTRY[name]
        assert record.min_global_views == 2 and not record.needs_labels and not record.needs_local_views
    v2, plus = METHOD_REGISTRY["moco_v2"].defaults(), METHOD_REGISTRY["moco_v2_plus"].defaults()
    assert v2 == {"proj_hidden": 2048, "proj_out": 128, "proj_bn": False, "temperature": 0.2, "queue_size": 65536,
                  "base_momentum": 0.999, "final_momentum": 0.999, "symmetric": False}
    assert plus == {**v2, "proj_hidden": 4096, "proj_out": 256, "proj_bn": True, "pred_hidden": 4096,
                    "base_momentum": 0.99, "final_momentum": 1.0, "symmetric": True}
    for name, bad in (("temperature", 0.0), ("queue_size", 0), ("proj_out", 0), ("base_momentum", 1.5),
                      ("symmetric", "yes"), ("proj_hidden", 2.5)):
        with pytest.raises(ValueError, match=name):
            MoCoV2(tiny_backbone(), **{name: bad})
    with pytest.raises(ValueError, match="final_momentum"):
        MoCoV2(tiny_backbone(), base_momentum=0.999, final_momentum=0.99)
    with pytest.raises(ValueError, match="pred_hidden"):
        MoCoV2(tiny_backbone(), pred_hidden=16)  # MoCo-v2 has no predictor
    with pytest.raises(ValueError, match="pred_hidden"):
        MoCoV2Plus(tiny_backbone(), pred_hidden=0)


def test_heads_follow_the_papers() -> None:
    v2, plus = _method(), _method(MoCoV2Plus)
    assert not any(isinstance(m, torch.nn.BatchNorm1d) for m in v2.projector)  # Linear-ReLU-Linear
    assert v2.projector[0].bias is not None
    assert any(isinstance(m, torch.nn.BatchNorm1d) for m in plus.projector)
    assert plus.predictor[-1].out_features == 8 and not hasattr(v2, "predictor")
    assert not hasattr(plus, "target_predictor")  # the key encoder has no predictor
    for m in (v2, plus):
        assert not any(p.requires_grad for p in [*m.target_backbone.parameters(), *m.target_projector.parameters()])


def test_asymmetric_step_is_query_view_1_against_key_view_2() -> None:
    method = _method()
    views = view_set(b=6)
    out = forward(method, views)
    with torch.no_grad():
        q = method.projector(method.backbone(views.global_[0]))
        k = method.target_projector(method.target_backbone(views.global_[1]))
    expected = moco_infonce_loss(q, k, method.queue, 0.2, "none")
    assert torch.allclose(out.per_sample, expected, atol=1e-6)
    assert torch.allclose(out.per_sample.mean(), out.loss)
    out.loss.backward()
    assert method.backbone.stem[0].weight.grad is not None
    assert all(p.grad is None for p in method.target_backbone.parameters())
    with pytest.raises(ValueError, match="at least 2 global views"):
        forward(method, ViewSet(views.global_[:1]))
    with pytest.raises(ValueError, match="exactly 2 global views"):
        forward(method, view_set(b=6, global_count=3))
    with pytest.raises(ValueError, match="global view 1"):
        forward(method, ViewSet([views.global_[0], views.global_[1][:4]]))


@pytest.mark.parametrize("cls", [MoCoV2, MoCoV2Plus])
def test_symmetric_step_averages_both_directions(cls) -> None:
    method = _method(cls, symmetric=True)
    views = view_set(b=6)
    out = forward(method, views, ctx=context(step=3))
    with torch.no_grad():
        q = [method.query(v) for v in views.global_]
        k = [method.key(v) for v in views.global_]
    expected = (moco_infonce_loss(q[0], k[1], method.queue, 0.2, "none")
                + moco_infonce_loss(q[1], k[0], method.queue, 0.2, "none")) / 2
    assert torch.allclose(out.per_sample, expected, atol=1e-6)
    # The enqueued keys are those of the view drawn for the step.
    method.on_step_end(context(step=3))
    assert torch.allclose(method.queue[:6], F.normalize(k[enqueue_view(3, 2)], dim=1), atol=1e-6)
    # More views: every view is a query against every other global view's key.
    out3 = forward(method, view_set(b=6, global_count=3, local_count=1))
    assert out3.per_sample.shape == (6,)


def test_enqueue_view_is_a_reproducible_fair_draw() -> None:
    draws = [enqueue_view(s, 2) for s in range(400)]
    assert draws == [enqueue_view(s, 2) for s in range(400)]
    assert 150 < sum(draws) < 250 and set(draws) == {0, 1}
    assert set(enqueue_view(s, 3) for s in range(100)) == {0, 1, 2}


def test_momentum_of_v2_is_constant_and_v2_plus_rises_on_a_cosine_through_the_engine() -> None:
    v2 = _method()
    assert [v2.momentum_at(p) for p in (0.0, 0.5, 1.0)] == pytest.approx([0.999] * 3)
    plus = _method(MoCoV2Plus)
    optimizer = torch.optim.SGD(plus.param_groups(0.0), lr=0.01)
    for s in (0, 25, 50, 100):
        out = step(plus, optimizer, view_set(b=4, seed=s), ctx=context(s, 100))
        expected = 1 - 0.01 * (math.cos(math.pi * s / 100) + 1) / 2
        assert plus.momentum_at(s / 100) == pytest.approx(expected)
        assert out.terms["momentum"].item() == pytest.approx(expected)
    # At progress 1 the key encoder no longer moves.
    frozen = [p.clone() for p in plus.target_backbone.parameters()]
    step(plus, optimizer, view_set(b=4, seed=7), ctx=context(100, 100))
    assert all(torch.equal(a, b) for a, b in zip(frozen, plus.target_backbone.parameters()))


# ---------------------------------------------------------------------------------------------------- DDP
def _ddp_tensors():
    g = torch.Generator().manual_seed(11)
    return torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g), \
        F.normalize(torch.randn(9, 4, generator=g), dim=1)


def _ddp_worker(rank: int, world: int) -> dict:
    # (1) The loss with leaf queries and keys: each rank its half of the batch, the same queue.
    q_all, k_all, queue = _ddp_tensors()
    q = rows(q_all, rank, world).clone().requires_grad_()
    k = rows(k_all, rank, world).clone().requires_grad_()
    per_sample = moco_infonce_loss(q, k, queue, 0.3, "none")
    per_sample.mean().backward()
    result = {"per_sample": per_sample.detach(), "loss": per_sample.mean().detach(), "grad_q": q.grad,
              "grad_k": k.grad}
    # (2) Engine steps under DDP: the queue gets the keys of every rank, in rank order, identically everywhere.
    torch.manual_seed(0)  # every rank builds the same model (as the loop does from its seed)
    method = MoCoV2(tiny_backbone(), proj_hidden=16, proj_out=8, queue_size=10)
    model = DistributedDataParallel(method)
    optimizer = torch.optim.SGD(method.param_groups(0.0), lr=0.05)
    keys, queues, ptrs = [], [], []
    for s in range(2):  # 2 x (2 ranks x 4) = 16 keys into 10 slots: the second step wraps around
        views = view_set(b=4, seed=10 * s + rank)
        target = (copy.deepcopy(method.target_backbone), copy.deepcopy(method.target_projector))
        batch = Batch.from_images(torch.zeros(4, 3, 4, 4, dtype=torch.uint8))
        train_step(model, method, optimizer, views, batch, context(s, 10, rank=rank, world_size=world))
        with torch.no_grad():
            keys.append(F.normalize(target[1](target[0](views.global_[1])), dim=1))
        queues.append(method.queue.clone())
        ptrs.append(method.queue_ptr.item())
    return {**result, "keys": keys, "queues": queues, "ptrs": ptrs}


def test_ddp_loss_gradients_and_queue_match_one_process() -> None:
    world = 2
    ranks = run_ddp(_ddp_worker, world)
    q_all, k_all, queue = _ddp_tensors()
    q_all.requires_grad_()
    full = moco_infonce_loss(q_all, k_all, queue, 0.3, "none")
    full.mean().backward()
    assert torch.allclose(torch.cat([r["per_sample"] for r in ranks]), full.detach(), atol=1e-6)
    assert torch.allclose(torch.stack([r["loss"] for r in ranks]).mean(), full.mean().detach(), atol=1e-6)
    # Each rank's gradient is world x that of the global mean; DDP's averaging gives the one-process gradient.
    assert torch.allclose(torch.cat([r["grad_q"] for r in ranks]) / world, q_all.grad, atol=1e-6)
    assert all(r["grad_k"] is None for r in ranks)  # keys get no gradient

    # Queues: identical on both ranks after every step, holding rank 0's then rank 1's keys.
    for s in range(2):
        assert torch.equal(ranks[0]["queues"][s], ranks[1]["queues"][s])
        assert ranks[0]["ptrs"][s] == ranks[1]["ptrs"][s] == (8 * (s + 1)) % 10
    gathered0 = torch.cat([ranks[0]["keys"][0], ranks[1]["keys"][0]])  # step 0: slots 0..7
    assert not torch.allclose(ranks[0]["keys"][0], ranks[1]["keys"][0])
    assert torch.allclose(ranks[0]["queues"][0][:8], gathered0, atol=1e-6)
    gathered1 = torch.cat([ranks[0]["keys"][1], ranks[1]["keys"][1]])  # step 1: slots 8, 9, then 0..5
    after = ranks[0]["queues"][1]
    assert torch.allclose(after[8:10], gathered1[:2], atol=1e-6)
    assert torch.allclose(after[0:6], gathered1[2:], atol=1e-6)
    assert torch.allclose(after[6:8], gathered0[6:8], atol=1e-6)  # not yet overwritten


# ---------------------------------------------------------------------------------------------------- learning
EPOCHS = 6
# Measured on this machine (1000 synthetic images, 12 classes, chance 0.083, batch 128, queue 1024, SGD lr 0.5,
# temperature 0.2, small heads below; MoCo-v2's momentum 0.99 instead of 0.999: in 42 steps a 0.999 key encoder
# barely leaves its random init), wall time under a load average of ~10 on 2 cores:
#   moco_v2       6 epochs: kNN 0.085 -> 0.237 (167 s); 10 epochs: 0.085 -> 0.235 (974 s at load ~20)
#   moco_v2_plus  6 epochs: kNN 0.085 -> 0.220 (382 s); 10 epochs: 0.085 -> 0.222 (1459 s at load ~20)
@pytest.mark.parametrize("name, options", [
    ("moco_v2", {"proj_hidden": 256, "proj_out": 64, "queue_size": 1024, "base_momentum": 0.99,
                 "final_momentum": 0.99}),
    ("moco_v2_plus", {"proj_hidden": 256, "proj_out": 64, "pred_hidden": 256, "queue_size": 1024}),
])
@pytest.mark.slow  # a real pre-training of tens of steps and two kNN evaluations: out of the unit loop
def test_short_pretraining_learns(tmp_path, name, options) -> None:
    start = time.perf_counter()
    random_init, trained, _ = short_pretraining(tmp_path, name, options, lr=0.5, epochs=EPOCHS)
    print(f"{name}: kNN {random_init:.3f} -> {trained:.3f} in {time.perf_counter() - start:.0f} s")
    assert trained > random_init + 0.08, (random_init, trained)
