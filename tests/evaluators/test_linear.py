"""linear_probe: separable data is learnt, random labels stay at chance, standardisation, determinism, errors."""

import pytest
import torch

from evaluators.linear import LinearProbe, fit_linear_probe, linear_accuracy, linear_probe


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Hundreds of tiny optimizer steps: intra-op threads only add synchronisation, which on a shared 2-core
    machine costs seconds per probe."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _blobs(n_per_class, num_classes=4, dim=16, seed=0, spread=1.0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(123)) * 4.0
    labels = torch.arange(num_classes).repeat_interleave(n_per_class)
    feats = centres[labels] + spread * torch.randn(len(labels), dim, generator=g)
    return feats, labels


def _halfspace(n, dim=20, seed=0):
    """Separable through the origin with no margin, features on very different scales."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(dim, generator=torch.Generator().manual_seed(321))
    z = torch.randn(n, dim, generator=g)
    scales = torch.logspace(-2, 2, dim)
    return z * scales, (z @ w > 0).long()


def test_separable_blobs_reach_near_perfect_test_accuracy():
    train_x, train_y = _blobs(50, seed=0)
    test_x, test_y = _blobs(50, seed=1)
    preds = linear_probe(train_x, train_y, test_x, epochs=50)
    assert preds.dtype == torch.int64 and preds.shape == (200,)
    assert (preds == test_y).double().mean().item() > 0.95


def test_separable_halfspace_with_badly_scaled_features_is_fitted():
    train_x, train_y = _halfspace(1000, seed=0)
    test_x, test_y = _halfspace(1000, seed=1)
    probe = fit_linear_probe(train_x, train_y, epochs=100, lr=0.05)
    assert (probe.predict(train_x) == train_y).double().mean().item() > 0.98
    assert (probe.predict(test_x) == test_y).double().mean().item() > 0.95


def test_random_labels_give_chance_accuracy_on_held_out_rows():
    g = torch.Generator().manual_seed(2)
    train_x, train_y = torch.randn(400, 32, generator=g), torch.randint(0, 4, (400,), generator=g)
    test_x, test_y = torch.randn(800, 32, generator=g), torch.randint(0, 4, (800,), generator=g)
    acc = linear_accuracy(train_x, train_y, test_x, test_y, epochs=30)
    assert 0.18 < acc < 0.32


def test_same_seed_same_predictions_and_full_batch_also_learns():
    train_x, train_y = _blobs(30, seed=3, spread=4.0)
    test_x, _ = _blobs(30, seed=4, spread=4.0)
    a = linear_probe(train_x, train_y, test_x, epochs=10, seed=7)
    b = linear_probe(train_x, train_y, test_x, epochs=10, seed=7)
    assert torch.equal(a, b)
    test_x, test_y = _blobs(50, seed=1)
    full = linear_probe(*_blobs(50, seed=0), test_x, epochs=300, batch_size=None)
    assert (full == test_y).double().mean().item() > 0.95


def test_standardisation_makes_probe_invariant_to_feature_scale_and_offset():
    train_x, train_y = _blobs(40, seed=5, spread=3.0)
    test_x, _ = _blobs(40, seed=6, spread=3.0)
    scale = torch.logspace(-3, 3, train_x.shape[1])
    shift = torch.linspace(-50, 50, train_x.shape[1])
    base = fit_linear_probe(train_x, train_y, epochs=20)
    moved = fit_linear_probe(train_x * scale + shift, train_y, epochs=20)
    torch.testing.assert_close(moved.logits(test_x * scale + shift), base.logits(test_x), rtol=1e-3, atol=1e-3)
    assert torch.allclose(moved.mean, train_x.mean(0) * scale + shift, rtol=1e-4, atol=1e-3)


def test_constant_feature_is_harmless():
    train_x, train_y = _blobs(30, seed=8)
    train_x[:, 0] = 3.7
    test_x, test_y = _blobs(30, seed=9)
    test_x[:, 0] = 1000.0  # differs from the train constant: must not blow up the prediction
    probe = fit_linear_probe(train_x, train_y, epochs=30)
    assert probe.std[0].item() == 1.0 and probe.weight[:, 0].abs().max().item() == 0.0
    assert (probe.predict(test_x) == test_y).double().mean().item() > 0.95


def test_weight_decay_shrinks_weights():
    train_x, train_y = _blobs(30, seed=10)
    loose = fit_linear_probe(train_x, train_y, epochs=100, lr=0.1, weight_decay=0.0)
    tight = fit_linear_probe(train_x, train_y, epochs=100, lr=0.1, weight_decay=1.0)
    assert tight.weight.norm() < 0.5 * loose.weight.norm()


def test_num_classes_larger_than_seen_labels():
    train_x, train_y = _blobs(20, num_classes=3, seed=11)
    probe = fit_linear_probe(train_x, train_y, epochs=10, num_classes=6)
    assert isinstance(probe, LinearProbe) and probe.num_classes == 6 and probe.weight.shape == (6, 16)
    assert probe.predict(train_x).max().item() < 3  # unseen classes are pushed down, never predicted


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(epochs=0), "epochs"),
        (dict(lr=0.0), "lr"),
        (dict(weight_decay=-1e-4), "weight_decay"),
        (dict(batch_size=0), "batch_size"),
        (dict(num_classes=1), r"num_classes must be .* = 2"),
        (dict(train_feats=torch.zeros(0, 3)), "train_feats is empty"),
        (dict(train_feats=torch.zeros(4, 3, 1)), "train_feats must have shape"),
        (dict(train_labels=torch.tensor([0, 1, 0])), r"train_labels must have shape \[4\]"),
        (dict(train_labels=torch.tensor([0.0, 1.0, 0.0, 1.0])), "integer tensor"),
        (dict(train_labels=torch.tensor([0, -1, 0, 1])), "train_labels must be >= 0"),
        (dict(test_feats=torch.zeros(2, 5)), r"feats must have shape \[N, 3\]"),
    ],
)
def test_invalid_arguments_raise_naming_them(kwargs, message):
    args = dict(train_feats=torch.randn(4, 3), train_labels=torch.tensor([0, 1, 0, 1]), test_feats=torch.randn(2, 3))
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        linear_probe(**args, **({} if "epochs" in kwargs else {"epochs": 1}))
