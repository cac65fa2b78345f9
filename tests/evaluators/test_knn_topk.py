"""knn_topk: the classes ranked by the kNN vote, against an explicit loop, with the tie rules of knn_predict."""

import math

import pytest
import torch

from evaluators.knn import knn_predict, knn_topk


def brute_force_ranking(train_feats, train_labels, test_feats, k, temperature, num_classes=None):
    """Python floats: cosine similarity, k best (lower index first on ties), exp(s/T) votes summed per class,
    then every class ordered by (-score, class id)."""
    labels = [int(y) for y in train_labels]
    num_classes = num_classes or max(labels) + 1

    def unit(v):
        v = list(map(float, v))
        norm = math.sqrt(sum(x * x for x in v))
        return [x / norm for x in v]

    train = [unit(v) for v in train_feats]
    ranked = []
    for row in test_feats:
        t = unit(row)
        sims = [sum(a * b for a, b in zip(t, v)) for v in train]
        order = sorted(range(len(train)), key=lambda i: (-sims[i], i))[: min(k, len(train))]
        scores = [0.0] * num_classes
        for i in order:
            scores[labels[i]] += math.exp(sims[i] / temperature)
        ranked.append(sorted(range(num_classes), key=lambda c: (-scores[c], c)))
    return ranked


@pytest.mark.parametrize(
    "seed, k, temperature, top, chunk_size",
    [(0, 1, 0.07, 5, None), (1, 5, 0.07, 5, 3), (2, 20, 0.5, 3, 1), (3, 7, 0.1, 8, 100), (4, 50, 0.1, 5, 7)],
)
def test_matches_brute_force_ranking_and_starts_with_knn_predict(seed, k, temperature, top, chunk_size):
    g = torch.Generator().manual_seed(seed)
    train = torch.randn(40, 6, generator=g)
    labels = torch.randint(0, 8, (40,), generator=g)
    test = torch.randn(25, 6, generator=g)
    ranked = knn_topk(train, labels, test, top=top, k=k, temperature=temperature, chunk_size=chunk_size)
    assert ranked.dtype == torch.int64 and ranked.shape == (25, min(top, 8))
    assert ranked.tolist() == [r[:top] for r in brute_force_ranking(train, labels, test, k, temperature)]
    assert torch.equal(ranked[:, 0], knn_predict(train, labels, test, k=k, temperature=temperature))
    # no class twice in a row's ranking
    assert all(len(set(row)) == len(row) for row in ranked.tolist())


def test_label_outvoted_at_top1_is_still_in_the_top5():
    # Directions in 3-D, one class each (classes 0 and 1 have several rows): the query points along class 0.
    train = torch.tensor([[1.0, 0.0, 0.0]] * 3 + [[1.0, 1.0, 0.0]] * 2 + [[0.0, 1.0, 0.0], [0.0, 0.0, 1.0],
                         [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0], [0.0, 0.0, -1.0]])
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 3, 4, 5, 6])
    query = torch.tensor([[1.0, 0.0, 0.0]])
    # k=5: the three class-0 rows (cos 1) and the two class-1 rows (cos 0.707) vote; classes 2..6 get no vote
    # and follow in class-id order.
    ranked = knn_topk(train, labels, query, top=5, k=5, temperature=0.1)
    assert ranked.tolist() == [[0, 1, 2, 3, 4]]
    truth = torch.tensor([1])
    assert (ranked[:, 0] == truth).tolist() == [False]  # top-1 wrong
    assert (ranked == truth[:, None]).any(dim=1).tolist() == [True]  # top-5 right
    assert not (ranked == 5).any()  # an unvoted class past rank 5 is out


def test_tied_class_scores_rank_the_smaller_class_id_first_at_every_rank():
    query = torch.tensor([[1.0, 0.0]])
    train = torch.tensor([[1.0, 0.0]] * 4)  # four equal neighbours: every class sums the same weight
    for labels in ([3, 1, 2, 0], [0, 2, 1, 3], [2, 3, 0, 1]):
        assert knn_topk(train, torch.tensor(labels), query, top=5, k=4).tolist() == [[0, 1, 2, 3]]
    # two tied pairs: 2 votes each for classes 4 and 1, 1 vote each for 3 and 0
    labels = torch.tensor([4, 1, 4, 1, 3, 0])
    train = torch.tensor([[1.0, 0.0]] * 6)
    assert knn_topk(train, labels, query, top=5, k=6).tolist() == [[1, 4, 0, 3, 2]]
    assert knn_topk(train, labels, query, top=2, k=6).tolist() == [[1, 4]]


def test_width_is_min_of_top_and_label_space_and_chunking_is_invisible():
    g = torch.Generator().manual_seed(5)
    train, labels = torch.randn(30, 4, generator=g), torch.randint(0, 3, (30,), generator=g)
    test = torch.randn(17, 4, generator=g)
    assert knn_topk(train, labels, test, top=5, k=10).shape == (17, 3)  # 3 classes: all ranked
    wide = knn_topk(train, labels, test, top=5, k=30, num_classes=9)  # k=30: every row votes, every seen class scores
    assert wide.shape == (17, 5) and torch.equal(wide[:, :3].sort(dim=1).values, torch.arange(3).expand(17, 3))
    assert wide[:, 3:].tolist() == [[3, 4]] * 17  # unseen classes follow in id order
    reference = knn_topk(train, labels, test, top=5, k=10, num_classes=9)
    for chunk_size in (1, 4, 17, 1000):
        assert torch.equal(knn_topk(train, labels, test, top=5, k=10, num_classes=9, chunk_size=chunk_size),
                           reference)
    empty = knn_topk(train, labels, torch.zeros(0, 4), top=5)
    assert empty.shape == (0, 3) and empty.dtype == torch.int64


@pytest.mark.parametrize("top", [0, -1, 2.0, True])
def test_invalid_top_is_named(top):
    with pytest.raises(ValueError, match="top must be an integer >= 1"):
        knn_topk(torch.randn(4, 3), torch.tensor([0, 1, 0, 1]), torch.randn(2, 3), top=top)


def test_invalid_arguments_are_checked_as_in_knn_predict():
    with pytest.raises(ValueError, match="k must be"):
        knn_topk(torch.randn(4, 3), torch.tensor([0, 1, 0, 1]), torch.randn(2, 3), k=0)
    with pytest.raises(ValueError, match=r"test_feats must have shape \[N_test, 3\]"):
        knn_topk(torch.randn(4, 3), torch.tensor([0, 1, 0, 1]), torch.randn(2, 4))
