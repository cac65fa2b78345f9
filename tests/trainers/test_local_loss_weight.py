"""`views.local.loss_weight`: the local-view terms' share of the SwAV, DINO and symmetric MoCo-v2 losses.

With the natural share (local terms / all terms) each loss is today's plain mean; another weight gives
(1 - w) * mean(global terms) + w * mean(local terms), checked against terms computed by hand here.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from tests.trainers.method_helpers import SMALL_OPTIONS, forward, tiny_backbone, view_set
from trainers.methods import DINO, MoCoV2, SwAV, dino_loss, swapped_prediction
from trainers.methods.base import weigh_view_terms
from trainers.methods.moco_v2 import moco_infonce_loss

G, L, B, K = 2, 3, 4, 5
NATURAL = L / (G - 1 + L)  # G global views each paired with G - 1 other global and L local views


def _randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _split(terms: dict[tuple[int, int], torch.Tensor], student: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of the hand-made terms whose student (index `student` of the pair) is global, and of the local ones."""
    global_ = torch.stack([t for pair, t in terms.items() if pair[student] < G]).mean(dim=0)
    local = torch.stack([t for pair, t in terms.items() if pair[student] >= G]).mean(dim=0)
    return global_, local


def test_weigh_view_terms_by_hand() -> None:
    terms = [torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0]), torch.tensor([10.0, 20.0])]
    local = [False, False, True]
    assert weigh_view_terms(terms, local).tolist() == pytest.approx([14 / 3, 26 / 3])
    assert weigh_view_terms(terms, local, 1 / 3).tolist() == pytest.approx([14 / 3, 26 / 3])
    assert weigh_view_terms(terms, local, 0.6).tolist() == pytest.approx([0.4 * 2 + 0.6 * 10, 0.4 * 3 + 0.6 * 20])
    with pytest.raises(ValueError, match="needs both global and local terms"):
        weigh_view_terms(terms[:2], [False, False], 0.5)
    with pytest.raises(ValueError, match="one local flag per term"):
        weigh_view_terms(terms, [False], 0.5)


def test_dino_loss_weighting() -> None:
    student = [_randn(B, K, seed=i) for i in range(G + L)]
    teacher = [_randn(B, K, seed=10 + i) for i in range(G)]
    center = _randn(K, seed=20)
    ts, tt = 0.1, 0.04
    # H(i, j) by hand for teacher view i and student view j != i.
    terms = {(i, j): -(F.softmax((teacher[i] - center) / tt, dim=1) * F.log_softmax(student[j] / ts, dim=1)).sum(1)
             for i in range(G) for j in range(G + L) if j != i}
    global_, local = _split(terms, student=1)
    plain = dino_loss(student, teacher, center, ts, tt, reduction="none")
    assert torch.allclose(dino_loss(student, teacher, center, ts, tt, "none", local_weight=NATURAL), plain)
    weighted = dino_loss(student, teacher, center, ts, tt, "none", local_weight=0.6)
    assert torch.allclose(weighted, 0.4 * global_ + 0.6 * local)
    assert not torch.allclose(weighted, plain)
    assert dino_loss(student, teacher, center, ts, tt, local_weight=0.6).item() == pytest.approx(
        weighted.mean().item())


def test_swav_swapped_prediction_weighting() -> None:
    scores = [_randn(B, K, seed=i) for i in range(G + L)]
    codes = [F.softmax(_randn(B, K, seed=30 + i), dim=1) for i in range(G)]
    t = 0.1
    terms = {(i, v): -(codes[i] * F.log_softmax(scores[v] / t, dim=1)).sum(1)
             for i in range(G) for v in range(G + L) if v != i}
    global_, local = _split(terms, student=1)
    plain = swapped_prediction(scores, codes, t, "none")
    assert torch.allclose(swapped_prediction(scores, codes, t, "none", NATURAL, global_views=G), plain)
    weighted = swapped_prediction(scores, codes, t, "none", 0.6, global_views=G)
    assert torch.allclose(weighted, 0.4 * global_ + 0.6 * local) and not torch.allclose(weighted, plain)
    with pytest.raises(ValueError, match="local_weight needs global_views"):
        swapped_prediction(scores, codes, t, "none", 0.6)


def test_moco_infonce_weighting_in_the_symmetric_step() -> None:
    torch.manual_seed(0)
    method = MoCoV2(tiny_backbone(), **{**SMALL_OPTIONS["moco_v2"], "symmetric": True})
    views = view_set(b=B, global_count=G, local_count=L)
    natural = forward(method, replace(views, local_weight=NATURAL))
    plain = forward(method, views)
    assert torch.allclose(natural.per_sample, plain.per_sample, atol=1e-6)
    weighted = forward(method, replace(views, local_weight=0.6))
    # The hand-made terms: every view's query against the key of every other global view.
    with torch.no_grad():
        keys = [method.key(v) for v in views.global_]
        queries = [method.query(v) for v in views.all]
        terms = {(a, b): moco_infonce_loss(queries[a], keys[b], method.queue, method.temperature, "none")
                 for a in range(G + L) for b in range(G) if a != b}
    global_, local = _split(terms, student=0)
    assert torch.allclose(weighted.per_sample, 0.4 * global_ + 0.6 * local, atol=1e-6)
    assert not torch.allclose(weighted.per_sample, plain.per_sample, atol=1e-4)


@pytest.mark.parametrize("cls", [SwAV, DINO])
def test_multi_crop_methods_read_the_weight_from_the_views(cls) -> None:
    torch.manual_seed(0)
    method = cls(tiny_backbone(), **SMALL_OPTIONS[cls.name])
    views = view_set(b=B, global_count=G, local_count=L)
    state = {k: v.clone() for k, v in method.state_dict().items()}  # DINO moves its centre every step
    plain = forward(method, views).per_sample
    method.load_state_dict(state)
    natural = forward(method, replace(views, local_weight=NATURAL)).per_sample
    method.load_state_dict(state)
    weighted = forward(method, replace(views, local_weight=0.9)).per_sample
    assert torch.allclose(natural, plain, atol=1e-6)
    assert not torch.allclose(weighted, plain, atol=1e-4)
