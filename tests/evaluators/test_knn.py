"""knn_predict against an explicit-loop implementation of the weighted vote (Wu et al. 2018), plus edge rules."""

import math

import pytest
import torch

from evaluators.knn import knn_accuracy, knn_predict


def brute_force_knn(train_feats, train_labels, test_feats, k, temperature):
    """Loops over python floats: cosine similarity, k best (lower index first on ties), exp(s/T) votes,
    smallest class id among equal scores."""
    train = [list(map(float, row)) for row in train_feats]
    labels = [int(y) for y in train_labels]
    num_classes = max(labels) + 1

    def unit(v):
        norm = math.sqrt(sum(x * x for x in v))
        return [x / norm for x in v]

    train = [unit(v) for v in train]
    preds = []
    for row in test_feats:
        t = unit(list(map(float, row)))
        sims = [sum(a * b for a, b in zip(t, v)) for v in train]
        order = sorted(range(len(train)), key=lambda i: (-sims[i], i))[: min(k, len(train))]
        scores = [0.0] * num_classes
        for i in order:
            scores[labels[i]] += math.exp(sims[i] / temperature)
        best = 0
        for c in range(1, num_classes):
            if scores[c] > scores[best]:
                best = c
        preds.append(best)
    return preds


@pytest.mark.parametrize(
    "seed, k, temperature, chunk_size",
    [(0, 1, 0.07, None), (1, 5, 0.07, 3), (2, 20, 0.5, 1), (3, 7, 0.02, 100), (4, 50, 0.1, 7)],
)
def test_matches_brute_force_on_random_data(seed, k, temperature, chunk_size):
    g = torch.Generator().manual_seed(seed)
    train = torch.randn(40, 6, generator=g)
    labels = torch.randint(0, 4, (40,), generator=g)
    test = torch.randn(25, 6, generator=g)
    preds = knn_predict(train, labels, test, k=k, temperature=temperature, chunk_size=chunk_size)
    assert preds.dtype == torch.int64 and preds.shape == (25,)
    assert preds.tolist() == brute_force_knn(train, labels, test, k, temperature)


def test_chunking_does_not_change_predictions():
    g = torch.Generator().manual_seed(5)
    train, labels = torch.randn(64, 8, generator=g), torch.randint(0, 5, (64,), generator=g)
    test = torch.randn(33, 8, generator=g)
    reference = knn_predict(train, labels, test, k=10)
    for chunk_size in (1, 2, 32, 33, 1000):
        assert torch.equal(knn_predict(train, labels, test, k=10, chunk_size=chunk_size), reference)


def test_features_are_compared_by_cosine_not_distance():
    train = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    labels = torch.tensor([0, 1])
    # Euclidean nearest of (100, 1) would be (0, 1); by direction it is (1, 0).
    assert knn_predict(train, labels, torch.tensor([[100.0, 1.0]]), k=1).tolist() == [0]
    scaled = knn_predict(train * 7.0, labels, torch.tensor([[100.0, 1.0]]) * 0.01, k=1)
    assert scaled.tolist() == [0]


def test_tie_at_kth_neighbour_takes_lower_training_index():
    # Test rows are one-hot, so every similarity is a single normalised coordinate: ties are exact.
    test = torch.tensor([[1.0, 0.0, 0.0]])
    train = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    assert knn_predict(train, torch.tensor([0, 1, 1]), test, k=1).tolist() == [0]
    assert knn_predict(train, torch.tensor([1, 0, 1]), test, k=1).tolist() == [1]
    # many duplicates around the boundary, k in the middle of the tied block
    train = torch.tensor([[1.0, 0.0, 0.0]] * 3 + [[2.0, 0.0, 0.0]] * 4 + [[0.0, 0.0, 1.0]])
    labels = torch.tensor([2, 2, 1, 1, 1, 0, 0, 3])
    # the 7 rows are all at similarity 1; k takes the lowest indices among them
    for k, expected in [(1, 2), (3, 2), (4, 1), (6, 1), (7, 1)]:
        assert knn_predict(train, labels, test, k=k).tolist() == [expected], k
        assert brute_force_knn(train, labels, test, k, 0.07) == [expected], k


def test_tied_class_scores_predict_smaller_class_id():
    test = torch.tensor([[1.0, 0.0]])
    train = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    assert knn_predict(train, torch.tensor([3, 1]), test, k=2).tolist() == [1]
    assert knn_predict(train, torch.tensor([1, 3]), test, k=2).tolist() == [1]


def test_k_larger_than_train_set_means_all_rows_vote():
    g = torch.Generator().manual_seed(7)
    train, labels = torch.randn(9, 4, generator=g), torch.randint(0, 3, (9,), generator=g)
    test = torch.randn(20, 4, generator=g)
    everyone = knn_predict(train, labels, test, k=9, temperature=0.3)
    assert torch.equal(knn_predict(train, labels, test, k=1000, temperature=0.3), everyone)
    assert everyone.tolist() == brute_force_knn(train, labels, test, 9, 0.3)
    # with a huge temperature every vote weighs ~1: the majority class wins for every test row
    majority = torch.bincount(labels).argmax().item()
    assert set(knn_predict(train, labels, test, k=1000, temperature=1e6).tolist()) == {majority}


def test_tiny_temperature_is_nearest_neighbour_without_overflow():
    g = torch.Generator().manual_seed(8)
    train, labels = torch.randn(30, 5, generator=g), torch.randint(0, 4, (30,), generator=g)
    test = torch.randn(15, 5, generator=g)
    # exp(1 / 1e-4) overflows float32; the vote must still behave as 1-NN
    assert torch.equal(
        knn_predict(train, labels, test, k=30, temperature=1e-4), knn_predict(train, labels, test, k=1)
    )


def test_num_classes_extends_label_space_and_empty_test_set():
    train = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    preds = knn_predict(train, torch.tensor([0, 1]), torch.tensor([[0.0, 2.0]]), k=1, num_classes=10)
    assert preds.tolist() == [1]
    empty = knn_predict(train, torch.tensor([0, 1]), torch.zeros(0, 2))
    assert empty.shape == (0,) and empty.dtype == torch.int64


def test_knn_accuracy_on_clusters():
    g = torch.Generator().manual_seed(9)
    centres = torch.eye(4) * 10
    train_y = torch.arange(4).repeat(10)
    test_y = torch.arange(4).repeat_interleave(5)
    train = centres[train_y] + torch.randn(40, 4, generator=g)
    test = centres[test_y] + torch.randn(20, 4, generator=g)
    assert knn_accuracy(train, train_y, test, test_y, k=5) == 1.0
    wrong = (test_y + 1) % 4
    assert knn_accuracy(train, train_y, test, wrong, k=5) == 0.0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(k=0), "k must be"),
        (dict(k=2.5), "k must be"),
        (dict(temperature=0.0), "temperature"),
        (dict(chunk_size=0), "chunk_size"),
        (dict(train_feats=torch.zeros(0, 3)), "train_feats is empty"),
        (dict(train_feats=torch.zeros(4)), "train_feats must have shape"),
        (dict(test_feats=torch.zeros(2, 4)), r"test_feats must have shape \[N_test, 3\]"),
        (dict(train_labels=torch.zeros(3, dtype=torch.int64)), r"train_labels must have shape \[4\]"),
        (dict(train_labels=torch.tensor([0, 1, -1, 0])), "train_labels must be >= 0"),
        (dict(train_labels=torch.zeros(4)), "integer tensor"),
        (dict(num_classes=1), r"num_classes must be .* = 2"),
        (dict(train_feats=torch.tensor([[float("nan"), 0, 0]] * 4)), "train_feats contains NaN"),
    ],
)
def test_invalid_arguments_raise_naming_them(kwargs, message):
    args = dict(
        train_feats=torch.randn(4, 3), train_labels=torch.tensor([0, 1, 0, 1]), test_feats=torch.randn(2, 3)
    )
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        knn_predict(**args)


def test_knn_accuracy_validates_test_labels():
    with pytest.raises(ValueError, match=r"test_labels must have shape \[2\]"):
        knn_accuracy(torch.randn(4, 3), torch.tensor([0, 1, 0, 1]), torch.randn(2, 3), torch.tensor([0]))
    with pytest.raises(ValueError, match="test_feats is empty"):
        no_rows = torch.zeros(0, dtype=torch.int64)
        knn_accuracy(torch.randn(4, 3), torch.tensor([0, 1, 0, 1]), torch.zeros(0, 3), no_rows)
