"""The evaluator records' contract: ranked classes [N, min(TOP_K, C)] whose first column is each evaluator's
top-1 prediction, and topk_hits over them."""

import pytest
import torch

from evaluators.knn import knn_predict
from evaluators.linear import linear_probe
from evaluators.registry import EVALUATOR_REGISTRY, TOP_K, topk_hits


def _data(classes: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, 6, generator=g) * 2
    bank_y = torch.arange(classes).repeat(6)
    query_y = torch.arange(classes).repeat(2)
    return (centres[bank_y] + torch.randn(len(bank_y), 6, generator=g), bank_y,
            centres[query_y] + torch.randn(len(query_y), 6, generator=g), query_y)


@pytest.mark.parametrize("classes", [3, 9])
def test_every_record_ranks_and_keeps_its_top1(classes):
    bank_x, bank_y, query_x, query_y = _data(classes)
    knn = EVALUATOR_REGISTRY["knn"]
    ranked = knn.build(bank_x, bank_y, query_x, seed=0, **knn.options({"k": 7}))
    assert ranked.shape == (len(query_y), min(TOP_K, classes)) and ranked.dtype == torch.int64
    assert torch.equal(ranked[:, 0], knn_predict(bank_x, bank_y, query_x, k=7, temperature=0.07))
    linear = EVALUATOR_REGISTRY["linear"]
    ranked = linear.build(bank_x, bank_y, query_x, seed=4, **linear.options({"epochs": 5}))
    assert ranked.shape == (len(query_y), min(TOP_K, classes))
    assert torch.equal(ranked[:, 0], linear_probe(bank_x, bank_y, query_x, epochs=5, lr=0.1, seed=4))
    if classes <= TOP_K:  # every class ranked: top-5 is 1.0 by construction
        assert topk_hits(ranked, query_y)[1].all()


def test_topk_hits_on_hand_built_rankings():
    ranked = torch.tensor([[2, 0, 1], [1, 2, 0], [0, 1, 2], [2, 1, 0]])
    truth = torch.tensor([2, 0, 1, 3])  # right at 1; at 3; at 2; absent
    top1, topk = topk_hits(ranked, truth)
    assert top1.tolist() == [True, False, False, False]
    assert topk.tolist() == [True, True, True, False]
    with pytest.raises(ValueError, match=r"ranked must have shape \[3, k >= 1\]"):
        topk_hits(ranked, truth[:3])
