"""LinearProbe.rank: classes by decreasing logit, smaller id first on ties, column 0 = predict."""

import pytest
import torch

from evaluators.linear import LinearProbe, fit_linear_probe, linear_probe


def _probe(weight, bias):
    weight = torch.tensor(weight)
    return LinearProbe(mean=torch.zeros(weight.shape[1]), std=torch.ones(weight.shape[1]), weight=weight,
                       bias=torch.tensor(bias))


def test_ranks_by_logit_with_ties_to_the_smaller_class_id():
    # 6 classes on 2-D features; logits of x = (1, 0) are w[:, 0] + b = [0.5, 2.0, 1.0, 2.0, -1.0, 1.0]
    probe = _probe([[0.5, 0.0], [2.0, 0.0], [1.0, 0.0], [2.0, 0.0], [-1.0, 0.0], [0.0, 0.0]],
                   [0.0, 0.0, 0.0, 0.0, 0.0, 1.0])
    x = torch.tensor([[1.0, 0.0]])
    assert probe.logits(x).tolist() == [[0.5, 2.0, 1.0, 2.0, -1.0, 1.0]]
    assert probe.rank(x, top=5).tolist() == [[1, 3, 2, 5, 0]]
    assert probe.rank(x, top=10).tolist() == [[1, 3, 2, 5, 0, 4]]  # width min(top, C)
    assert probe.predict(x).tolist() == [1]
    # top-1 wrong, top-5 right for label 0; class 4 (lowest logit) is outside the top 5
    ranked, truth = probe.rank(x, top=5), torch.tensor([0])
    assert not (ranked[:, 0] == truth).any() and (ranked == truth[:, None]).any()
    assert not (probe.rank(x, top=5) == 4).any()


def test_column_zero_is_predict_on_a_fitted_probe():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(8, 5, generator=g) * 2
    y = torch.arange(8).repeat(20)
    x = centres[y] + torch.randn(160, 5, generator=g)
    test_y = torch.arange(8).repeat(5)
    test_x = centres[test_y] + torch.randn(40, 5, generator=g)
    probe = fit_linear_probe(x, y, epochs=20, seed=3)
    ranked = probe.rank(test_x)
    assert ranked.shape == (40, 5) and ranked.dtype == torch.int64
    assert torch.equal(ranked[:, 0], probe.predict(test_x))
    assert torch.equal(ranked[:, 0], linear_probe(x, y, test_x, epochs=20, seed=3))
    top1 = (ranked[:, 0] == test_y).float().mean()
    top5 = (ranked == test_y[:, None]).any(dim=1).float().mean()
    assert top5 >= top1 and top5 > 0.9  # 8 blobs at 2 sigma: the true class is almost always among the best 5


@pytest.mark.parametrize("top", [0, 1.5, False])
def test_invalid_top_is_named(top):
    with pytest.raises(ValueError, match="top must be an integer >= 1"):
        _probe([[1.0], [0.0]], [0.0, 0.0]).rank(torch.ones(1, 1), top=top)
