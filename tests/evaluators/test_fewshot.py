"""Few-shot episodes: sampling rules (eligibility, disjoint rows, determinism), the prototype rule by hand, the
logistic fit against a float64 LBFGS reference, chance and near-perfect accuracy, the interval, and errors."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from evaluators.fewshot import FewShotConfig, FewShotResult, few_shot_accuracy, sample_episodes


@pytest.fixture(autouse=True)
def _one_intra_op_thread():
    """The episodes' tensors are tiny: on a shared 2-core machine intra-op threads only add wake-up latency
    (a [30, 5, 5] softmax takes ~8 ms with 2 threads under load, ~10 us with one). Results do not depend on it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _blobs(num_classes, per_class, dim, spread, seed):
    """Rows around orthogonal class directions (one-hot means of norm 4) with Gaussian noise of std `spread`."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    feats = 4.0 * F.one_hot(labels, dim).float() + spread * torch.randn(len(labels), dim, generator=g)
    return feats, labels


def _noise(num_classes, per_class, dim, seed):
    """Features independent of the labels."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    return torch.randn(len(labels), dim, generator=g), labels


@pytest.mark.parametrize("classifier", ["prototype", "logistic"])
@pytest.mark.parametrize("shot", [1, 5])
def test_well_separated_blobs_are_classified_almost_perfectly(classifier, shot):
    feats, labels = _blobs(num_classes=10, per_class=25, dim=16, spread=0.3, seed=0)
    result = few_shot_accuracy(feats, labels, way=5, shot=shot, query=10, episodes=100, classifier=classifier)
    assert result.mean >= 0.99
    assert result.accuracies.min() >= 0.9


@pytest.mark.parametrize("classifier", ["prototype", "logistic"])
def test_noise_features_give_chance_accuracy(classifier):
    feats, labels = _noise(num_classes=20, per_class=40, dim=32, seed=1)
    result = few_shot_accuracy(feats, labels, way=5, shot=5, query=10, episodes=300, classifier=classifier, seed=3)
    # The interval is tight enough to mean something, and 1/way lies within two half-widths of the mean (the
    # episodes share rows, so they are not quite independent draws: one half-width would be a 5% coin toss).
    assert result.ci95 < 0.02
    assert abs(result.mean - 1 / 5) <= 2 * result.ci95


def test_ci95_is_the_normal_half_width_of_the_episode_accuracies():
    feats, labels = _noise(num_classes=8, per_class=12, dim=8, seed=2)
    result = few_shot_accuracy(feats, labels, way=4, shot=2, query=5, episodes=40, seed=7)
    acc = result.accuracies
    assert isinstance(result, FewShotResult) and acc.shape == (40,) and acc.dtype == np.float64
    assert not acc.flags.writeable
    # every episode accuracy is a whole number of correct queries out of way * query = 20
    np.testing.assert_allclose(acc * 20, np.round(acc * 20), atol=1e-9)
    mean = sum(acc.tolist()) / 40
    std = math.sqrt(sum((a - mean) ** 2 for a in acc.tolist()) / 39)
    assert result.mean == pytest.approx(mean, abs=1e-12)
    assert result.ci95 == pytest.approx(1.96 * std / math.sqrt(40), abs=1e-12)
    assert result.ci95 > 0
    single = few_shot_accuracy(feats, labels, way=4, shot=2, query=5, episodes=1, seed=7)
    assert single.ci95 == 0.0 and single.mean == single.accuracies[0] == acc[0]
    assert (result.episodes, result.way, result.shot, result.query, result.classifier) == (40, 4, 2, 5, "prototype")
    assert result.to_dict()["accuracies"] == acc.tolist()


@pytest.mark.parametrize("classifier", ["prototype", "logistic"])
def test_same_seed_repeats_episodes_and_another_seed_does_not(classifier):
    feats, labels = _noise(num_classes=10, per_class=10, dim=8, seed=4)
    kwargs = dict(way=5, shot=1, query=3, episodes=30, classifier=classifier)
    first = few_shot_accuracy(feats, labels, seed=11, **kwargs)
    again = few_shot_accuracy(feats, labels, seed=11, **kwargs)
    other = few_shot_accuracy(feats, labels, seed=12, **kwargs)
    assert np.array_equal(first.accuracies, again.accuracies)
    assert not np.array_equal(first.accuracies, other.accuracies)
    a, b = sample_episodes(labels, seed=11, way=5, shot=1, query=3, episodes=30), sample_episodes(
        labels, seed=12, way=5, shot=1, query=3, episodes=30
    )
    assert all(np.array_equal(x, y) for x, y in zip(a, sample_episodes(labels, seed=11, way=5, shot=1, query=3,
                                                                      episodes=30)))
    assert not np.array_equal(a.support, b.support)


def test_sampled_episodes_follow_the_rules_on_one_pool():
    # classes 0..5 with 3..8 rows, shuffled; shot + query = 6, so only classes 3, 4 and 5 are eligible
    g = torch.Generator().manual_seed(5)
    labels = torch.cat([torch.full((3 + c,), c) for c in range(6)])[torch.randperm(33, generator=g)]
    ep = sample_episodes(labels, way=3, shot=2, query=4, episodes=50, seed=0)
    assert ep.classes.shape == (50, 3) and ep.support.shape == (50, 3, 2) and ep.query.shape == (50, 3, 4)
    y = labels.numpy()
    for classes, support, query in zip(*ep):
        assert classes.tolist() == [3, 4, 5]
        assert (y[support] == classes[:, None]).all() and (y[query] == classes[:, None]).all()
        rows = np.concatenate([support.ravel(), query.ravel()])
        assert len(set(rows.tolist())) == rows.size  # no row twice: support and query disjoint
    # class 5 has 8 rows for 6 places: over 50 episodes the draws differ
    assert len({tuple(sorted(s[2].tolist() + q[2].tolist())) for s, q in zip(ep.support, ep.query)}) > 1


def test_two_pools_take_support_and_query_rows_from_their_own_pool():
    support_labels = torch.tensor([0, 0, 1, 1, 2, 2, 3])  # class 3: one support row only
    # classes 0-2 sit at rows 7-12 of the query pool, past the support pool's end; 4 and 9 have no support rows
    query_labels = torch.tensor([3, 3, 4, 4, 9, 9, 9, 2, 1, 0, 1, 0, 2])
    ep = sample_episodes(support_labels, query_labels, way=3, shot=2, query=2, episodes=20, seed=1)
    for classes, support, query in zip(*ep):
        assert classes.tolist() == [0, 1, 2]
        assert (support_labels.numpy()[support] == classes[:, None]).all()
        assert (query_labels.numpy()[query] == classes[:, None]).all()
    assert ep.query.min() >= 7 and ep.support.max() < 6


def test_no_query_row_leaks_into_the_support_set():
    # Every row is its own one-hot vector: without a leak a query is orthogonal to every prototype, all classes
    # tie at cosine 0 and the episode's smallest class wins, so exactly 1/way of the queries are right. A query
    # that is also a support row has cosine > 0 with its own prototype and is classified correctly, which lifts
    # the episode above 1/way whenever the leak is outside the smallest class. Classes have exactly shot + query
    # rows, so every row of a chosen class is used.
    labels = torch.arange(8).repeat_interleave(5)
    feats = torch.eye(40)
    result = few_shot_accuracy(feats, labels, way=5, shot=2, query=3, episodes=200, seed=0)
    np.testing.assert_allclose(result.accuracies, 0.2, rtol=0, atol=1e-12)
    # passing the very same tensors as the query pool counts as one pool, not two independent draws
    twice = few_shot_accuracy(feats, labels, feats, labels, way=5, shot=2, query=3, episodes=200, seed=0)
    np.testing.assert_allclose(twice.accuracies, 0.2, rtol=0, atol=1e-12)
    # the same data as two separate pools does overlap: the check above is able to see a leak
    copies = few_shot_accuracy(feats, labels, feats.clone(), labels.clone(), way=5, shot=2, query=3, episodes=200)
    assert copies.mean > 0.4  # expected (3 + 4 * 3 * 2/5) / 15 = 0.52


def _unit(degrees, norm=1.0):
    rad = math.radians(degrees)
    return [norm * math.cos(rad), norm * math.sin(rad)]


def test_prototype_rule_on_a_hand_computed_case():
    # Support: class 0 = (10, 0), (0, 1): unit rows (1, 0), (0, 1), prototype at 45 degrees (the raw mean
    # (5, 0.5) would point at 5.7 degrees); class 1 = two rows at atan(0.2) = 11.3 degrees. The boundary is at
    # 28.2 degrees: queries at 35 and 60 degrees go to class 0 (right), 20 to class 1 (right), 40 to class 0
    # (wrong): 3 of 4. Raw means would score 2 of 4, Euclidean distance to raw means 1 of 4.
    support = torch.tensor([[10.0, 0.0], [0.0, 1.0], [1.0, 0.2], [2.0, 0.4]])
    support_labels = torch.tensor([0, 0, 1, 1])
    queries = torch.tensor([_unit(35, 3.0), _unit(60, 0.5), _unit(20, 0.1), _unit(40, 7.0)])
    query_labels = torch.tensor([0, 0, 1, 1])
    result = few_shot_accuracy(support, support_labels, queries, query_labels, way=2, shot=2, query=2, episodes=3)
    np.testing.assert_allclose(result.accuracies, [0.75, 0.75, 0.75], rtol=0, atol=1e-12)
    assert result.ci95 == 0.0


def _lbfgs_reference_accuracy(support, query):
    """sklearn's LogisticRegression(C=1) objective, fit per episode in float64 with LBFGS in the full width."""
    way, shot, dim = support.shape
    x = support.reshape(-1, dim).double()
    y = torch.arange(way).repeat_interleave(shot)
    weight = torch.zeros(way, dim, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(way, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], max_iter=500, tolerance_grad=1e-10, tolerance_change=1e-14,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x @ weight.T + bias, y, reduction="sum") + 0.5 * (weight**2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    logits = query.reshape(-1, dim).double() @ weight.detach().T + bias.detach()
    return (logits.argmax(1) == torch.arange(way).repeat_interleave(query.shape[1])).double().mean().item()


def test_logistic_matches_a_reference_fit_on_the_same_episodes():
    # Overlapping classes (means of norm 1, unit noise), so predictions depend on the fitted weights.
    g = torch.Generator().manual_seed(6)
    labels = torch.arange(10).repeat_interleave(30)
    feats = torch.randn(10, 24, generator=g)[labels] * 0.35 + torch.randn(300, 24, generator=g)
    kwargs = dict(way=5, shot=5, query=15, episodes=8, seed=2)
    result = few_shot_accuracy(feats, labels, classifier="logistic", **kwargs)
    ep = sample_episodes(labels, **kwargs)
    unit = F.normalize(feats, dim=1)
    expected = [_lbfgs_reference_accuracy(unit[s], unit[q]) for s, q in zip(ep.support, ep.query)]
    np.testing.assert_allclose(result.accuracies, expected, rtol=0, atol=1e-12)
    assert 0.3 < result.mean < 0.9  # neither chance nor trivial: the comparison has room to disagree
    prototype = few_shot_accuracy(feats, labels, classifier="prototype", **kwargs)
    assert not np.array_equal(prototype.accuracies, result.accuracies)


def test_too_few_eligible_classes_says_how_many_qualify():
    labels = torch.tensor([0] * 6 + [1] * 6 + [2] * 5 + [3])
    feats = torch.randn(18, 4)
    with pytest.raises(ValueError, match=r"way=3 needs 3 classes with >= shot \+ query = 6 rows; only 2 of the 4"):
        few_shot_accuracy(feats, labels, way=3, shot=2, query=4)
    query_labels = torch.tensor([0, 0, 1, 2, 2, 3, 3])  # support: 0, 1, 2 have 2 rows; query: 0, 2, 3 have 2
    with pytest.raises(ValueError, match=r">= shot = 2 support rows and >= query = 2 query rows; only 2 of the 4"):
        few_shot_accuracy(feats, labels, torch.randn(7, 4), query_labels, way=3, shot=2, query=2)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(support_feats=torch.randn(12)), r"support_feats must have shape \[N, D\]"),
        (dict(support_feats=torch.randn(12, 3, 1)), r"support_feats must have shape \[N, D\]"),
        (dict(support_feats=torch.zeros(0, 3), support_labels=torch.zeros(0, dtype=torch.int64)),
         "support_feats is empty"),
        (dict(support_feats=torch.ones(12, 3, dtype=torch.int64)), "support_feats must be a float tensor"),
        (dict(support_feats=torch.full((12, 3), float("nan"))), "support_feats contains NaN"),
        (dict(support_labels=torch.zeros(11, dtype=torch.int64)), r"support_labels must have shape \[12\]"),
        (dict(support_labels=torch.zeros(12)), "support_labels must be an integer tensor"),
        (dict(query_feats=torch.randn(6, 4), query_labels=torch.zeros(6, dtype=torch.int64)),
         r"query_feats must have shape \[N_q, 3\]"),
        (dict(query_feats=torch.randn(6, 3), query_labels=torch.zeros(5, dtype=torch.int64)),
         r"query_labels must have shape \[6\]"),
        (dict(query_feats=torch.randn(6, 3)), "query_labels is None"),
        (dict(query_labels=torch.zeros(6, dtype=torch.int64)), "query_feats is None"),
        (dict(way=1), "way must be an integer >= 2"),
        (dict(way=2.0), "way must be an integer >= 2"),
        (dict(shot=0), "shot must be an integer >= 1"),
        (dict(query=0), "query must be an integer >= 1"),
        (dict(episodes=0), "episodes must be an integer >= 1"),
        (dict(episodes=True), "episodes must be an integer >= 1"),
        (dict(seed=-1), "seed must be an integer >= 0"),
        (dict(classifier="svm"), r"classifier must be one of \['prototype', 'logistic'\]"),
    ],
)
def test_invalid_arguments_raise_naming_them(kwargs, message):
    args = dict(support_feats=torch.randn(12, 3), support_labels=torch.arange(3).repeat_interleave(4),
                way=2, shot=1, query=1, episodes=2)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        few_shot_accuracy(**args)


def test_config_defaults_bounds_and_use():
    config = FewShotConfig()
    assert config.model_dump() == dict(way=5, shot=5, query=15, episodes=600, classifier="prototype")
    assert all(field.description for field in FewShotConfig.model_fields.values())
    for bad, option in [(dict(way=1), "way"), (dict(shot=0), "shot"), (dict(query=0), "query"),
                        (dict(episodes=0), "episodes"), (dict(classifier="svm"), "classifier"),
                        (dict(shot="5"), "shot"), (dict(ways=5), "ways: unknown option")]:
        with pytest.raises(ValueError, match=f"eval.fewshot: .*{option}"):
            FewShotConfig.parse("eval.fewshot", **bad)
    options = FewShotConfig.parse("eval.fewshot", way=3, shot=1, query=2, episodes=4, classifier="logistic")
    feats, labels = _blobs(num_classes=4, per_class=4, dim=8, spread=0.1, seed=0)
    result = few_shot_accuracy(feats, labels, seed=0, **options.model_dump())
    assert (result.way, result.shot, result.query, result.episodes, result.classifier) == (3, 1, 2, 4, "logistic")
    assert result.accuracies.shape == (4,)
