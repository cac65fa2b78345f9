"""sharpness / interpolation_curve on a tiny ResNet-18 and 16 px colour-coded images: the bound, the search's
candidates (recomputed independently), bit-for-bit restoration, determinism, the straight-line curve, errors."""

import copy
import inspect
import math

import pytest
import torch
from torch import nn

from evaluators.features import extract_features
from evaluators.interpolation import InterpolationCurve, interpolate_state, interpolation_curve
from evaluators.knn import knn_accuracy
from evaluators.sharpness import SharpnessConfig, sharpness
from trainers.backbones import build_backbone

K = 5  # neighbours: the bank has 6 rows per class
COLOURS = torch.tensor([[200, 60, 60], [60, 200, 60], [60, 60, 200], [200, 200, 60]], dtype=torch.float32)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Many tiny forward passes: intra-op threads only add synchronisation on a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _batches(n_per_class, seed, side=16, noise=70.0, batch=8):
    """Class c is colour COLOURS[c] plus heavy per-pixel noise: kNN is well above chance (0.25) but not perfect."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(len(COLOURS)).repeat_interleave(n_per_class)
    base = COLOURS[labels].view(-1, 3, 1, 1).expand(-1, 3, side, side)
    images = (base + noise * torch.randn(len(labels), 3, side, side, generator=g)).clamp(0, 255).to(torch.uint8)
    return [(images[i : i + batch], labels[i : i + batch]) for i in range(0, len(labels), batch)]


BANK = _batches(6, seed=0)
QUERY = _batches(4, seed=1)


def bank_fn():
    yield from BANK  # a generator: only usable once, so sharpness must call the function for every read


def query_fn():
    yield from QUERY


def _backbone(seed=0):
    torch.manual_seed(seed)
    net = build_backbone("resnet18", image_size=16, width=4)
    net.train()
    with torch.no_grad():  # move BatchNorm's running statistics away from their init, so eval mode matters
        net(torch.randn(16, 3, 16, 16, generator=torch.Generator().manual_seed(seed + 100)))
    return net


def _direct_accuracy(net):
    bank_x, bank_y = extract_features(net, bank_fn())
    query_x, query_y = extract_features(net, query_fn())
    return knn_accuracy(bank_x, bank_y, query_x, query_y, k=K)


def _bits(state):
    """Every tensor as raw integers, so -0.0 vs 0.0 or a NaN payload would also count as a change."""
    out = {}
    for key, t in state.items():
        t = t.detach().clone()
        out[key] = t.view(torch.int32) if t.dtype == torch.float32 else t
    return out


@pytest.fixture(scope="module")
def searched():
    """One search with ascent and one with random directions only, same seed (shared by several tests)."""
    net = _backbone()
    full = sharpness(net, bank_fn, query_fn, epsilons=(1e-6, 0.3), search_steps=3, restarts=2, seed=7, knn_k=K)
    random_only = sharpness(net, bank_fn, query_fn, epsilons=(1e-6, 0.3), search_steps=0, restarts=2, seed=7,
                            knn_k=K)
    return net, full, random_only


def test_base_accuracy_is_the_direct_knn_accuracy_and_above_chance(searched):
    net, full, _ = searched
    assert full.base_accuracy == _direct_accuracy(net)
    assert full.base_accuracy >= 0.5  # 4 classes: chance is 0.25
    params = [p for p in net.parameters() if p.is_floating_point()]
    assert full.param_norm == pytest.approx(math.sqrt(sum(float(p.detach().double().pow(2).sum()) for p in params)))


def test_tiny_epsilon_leaves_accuracy_unchanged(searched):
    _, full, _ = searched
    point = full.point(1e-6)
    assert point.relative_drop == 0.0 and point.worst_accuracy == full.base_accuracy
    assert point.worst_source == "unperturbed" and point.norm_ratio == 0.0
    assert point.num_candidates == 3 + 2
    assert all(c.accuracy == full.base_accuracy for c in point.candidates)
    assert all(0 < c.norm_ratio <= 1e-6 + 1e-6 for c in point.candidates)


def test_candidates_stay_in_the_ball_and_random_ones_on_its_surface(searched):
    _, full, _ = searched
    point = full.point(0.3)
    assert [(c.source, c.index) for c in point.candidates] == [
        ("ascent", 1), ("ascent", 2), ("ascent", 3), ("random", 0), ("random", 1)
    ]
    assert all(c.norm_ratio <= 0.3 + 1e-6 for c in point.candidates)
    assert point.norm_ratio <= 0.3 + 1e-6
    # z_1 = step_size * r * g / ||g||: half the radius with the default step_size 0.5.
    assert point.candidates[0].norm_ratio == pytest.approx(0.15, abs=1e-6)
    for c in point.candidates[3:]:
        assert c.norm_ratio == pytest.approx(0.3, abs=1e-6)


def test_full_radius_steps_are_projected_back_onto_the_ball():
    """step_size 1: z_1 lies on the surface and z_1 + r * g/||g|| leaves the ball unless g points back inwards
    by more than 120 degrees, so every later iterate must have been rescaled to norm r."""
    result = sharpness(_backbone(), bank_fn, query_fn, epsilons=(0.2,), search_steps=3, restarts=1, step_size=1.0,
                       knn_k=K)
    ascent = [c for c in result.points[0].candidates if c.source == "ascent"]
    assert len(ascent) == 3
    for c in ascent:
        assert c.norm_ratio == pytest.approx(0.2, abs=1e-6)
        assert c.norm_ratio <= 0.2 + 1e-6


def test_search_reports_at_least_the_damage_of_each_of_its_candidates(searched):
    _, full, random_only = searched
    point, alone = full.point(0.3), random_only.point(0.3)
    # The random directions do not depend on the ascent: same seed, same candidates.
    assert [c.to_dict() for c in alone.candidates] == [c.to_dict() for c in point.candidates if c.source == "random"]
    assert point.worst_accuracy == min([full.base_accuracy] + [c.accuracy for c in point.candidates])
    assert point.relative_drop >= alone.relative_drop
    assert point.relative_drop == pytest.approx((full.base_accuracy - point.worst_accuracy) / full.base_accuracy)
    assert point.relative_drop > 0  # eps = 0.3 does damage here, so the comparison above is not 0 >= 0
    worst = [c for c in point.candidates if (c.source, c.index) == (point.worst_source, point.worst_index)]
    assert len(worst) == 1 and worst[0].accuracy == point.worst_accuracy and worst[0].norm_ratio == point.norm_ratio


def test_random_candidate_matches_an_independent_perturbation(searched):
    """Restart 0 = the first Gaussian draw of torch.Generator().manual_seed(seed), one tensor per float
    parameter in order, scaled to norm eps * ||theta||; its kNN accuracy recomputed on a copy of the backbone."""
    net, full, _ = searched
    copy_net = copy.deepcopy(net)
    params = [p for p in copy_net.parameters() if p.is_floating_point()]
    g = torch.Generator().manual_seed(7)
    draws = [torch.randn(p.shape, generator=g) for p in params]
    draw_norm = math.sqrt(sum(float(d.double().pow(2).sum()) for d in draws))
    with torch.no_grad():
        for p, d in zip(params, draws):
            p.add_(d * (0.3 * full.param_norm / draw_norm))
    candidate = next(c for c in full.point(0.3).candidates if (c.source, c.index) == ("random", 0))
    assert candidate.accuracy == _direct_accuracy(copy_net)


def test_backbone_restored_bit_for_bit_with_modes_flags_and_grads():
    net = _backbone()
    net.eval()
    net.layer1.train()  # a caller's mixed modes
    net.stem[0].weight.requires_grad_(False)
    net.layer4[1].conv2.weight.grad = torch.full_like(net.layer4[1].conv2.weight, 0.25)
    before = _bits(net.state_dict())
    modes = [m.training for m in net.modules()]
    sharpness(net, bank_fn, query_fn, epsilons=(0.5,), search_steps=2, restarts=1, seed=0, knn_k=K)
    after = _bits(net.state_dict())
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [m.training for m in net.modules()] == modes
    assert not net.stem[0].weight.requires_grad and net.layer1[0].conv1.weight.requires_grad
    assert torch.equal(net.layer4[1].conv2.weight.grad, torch.full_like(net.layer4[1].conv2.weight, 0.25))
    assert all(p.grad is None for name, p in net.named_parameters() if name != "layer4.1.conv2.weight")


def test_backbone_restored_when_a_batch_is_rejected_mid_search():
    net = _backbone()
    before = _bits(net.state_dict())
    calls = []

    def query_breaks_on_third_read():
        calls.append(1)
        if len(calls) == 3:
            return [(QUERY[0][0].float(), QUERY[0][1])]  # float images: extract_features rejects them
        return QUERY

    with pytest.raises(ValueError, match="uint8"):
        sharpness(net, bank_fn, query_breaks_on_third_read, epsilons=(0.5,), search_steps=3, restarts=1, knn_k=K)
    assert len(calls) == 3
    after = _bits(net.state_dict())
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert net.training and all(p.requires_grad for p in net.parameters())


class _Recorder(nn.Module):
    """Tiny CNN that logs BatchNorm's mode at every forward, with and without gradients."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Sequential(nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.log = []

    def forward(self, x):
        self.log.append((self.bn.training, torch.is_grad_enabled()))
        return self.head(self.bn(self.conv(x)))


def test_every_forward_uses_running_statistics_including_the_gradient_passes():
    net = _Recorder().train()
    sharpness(net, bank_fn, query_fn, epsilons=(0.2,), search_steps=2, restarts=1, knn_k=K)
    assert any(grad for _, grad in net.log)  # the ascent did take gradients
    assert not any(training for training, _ in net.log)
    assert net.training  # the caller's mode is back
    # bank reads: base + 3 candidates (features) + 2 gradient passes; 3 batches each
    assert len(net.log) == (1 + 3 + 2) * len(BANK) + (1 + 3) * len(QUERY)


def test_search_is_deterministic_for_a_seed():
    kwargs = dict(epsilons=(0.3,), search_steps=2, restarts=2, knn_k=K)
    first = sharpness(_backbone(), bank_fn, query_fn, seed=3, **kwargs).to_dict()
    second = sharpness(_backbone(), bank_fn, query_fn, seed=3, **kwargs).to_dict()
    assert first == second


def test_interpolation_endpoints_are_the_direct_accuracies():
    net_a, net_b = _backbone(0), _backbone(1)
    state_a, state_b = net_a.state_dict(), net_b.state_dict()
    curve = interpolation_curve(state_a, state_b, lambda: build_backbone("resnet18", image_size=16, width=4),
                                bank_fn, query_fn, points=3, knn_k=K)
    assert isinstance(curve, InterpolationCurve)
    assert curve.alphas == (0.0, 0.5, 1.0)
    assert len(curve.accuracies) == 3
    assert curve.accuracies[0] == _direct_accuracy(net_a)
    assert curve.accuracies[2] == _direct_accuracy(net_b)
    line = [(1 - a) * curve.accuracies[0] + a * curve.accuracies[2] for a in curve.alphas]
    assert curve.barrier == pytest.approx(max(l - acc for l, acc in zip(line, curve.accuracies)))
    assert curve.barrier >= 0


def test_interpolate_state_averages_floats_and_keeps_integer_buffers_of_a():
    state_a, state_b = _backbone(0).state_dict(), _backbone(1).state_dict()
    state_b["stem.1.num_batches_tracked"] = torch.tensor(9)
    mid = interpolate_state(state_a, state_b, 0.5)
    torch.testing.assert_close(mid["layer2.0.conv1.weight"],
                               (state_a["layer2.0.conv1.weight"] + state_b["layer2.0.conv1.weight"]) / 2,
                               rtol=0, atol=0)
    running_var = (state_a["stem.1.running_var"] + state_b["stem.1.running_var"]) / 2  # a float buffer
    torch.testing.assert_close(mid["stem.1.running_var"], running_var, rtol=0, atol=0)
    assert mid["stem.1.num_batches_tracked"].item() == state_a["stem.1.num_batches_tracked"].item() == 1
    assert mid["stem.1.num_batches_tracked"].dtype == torch.int64
    for alpha, expected in ((0.0, state_a), (1.0, state_b)):
        ends = interpolate_state(state_a, state_b, alpha)
        assert torch.equal(ends["layer4.1.conv2.weight"], expected["layer4.1.conv2.weight"])
    assert not torch.equal(state_a["layer4.1.conv2.weight"], state_b["layer4.1.conv2.weight"])


def test_config_defaults_match_the_function_and_yaml_lists_are_accepted():
    defaults = SharpnessConfig().model_dump()
    signature = inspect.signature(sharpness).parameters
    assert {name: signature[name].default for name in defaults} == defaults
    assert SharpnessConfig.parse("eval.sharpness", epsilons=[0.05, 1]).epsilons == (0.05, 1.0)
    with pytest.raises(ValueError, match="epsilons"):
        SharpnessConfig.parse("eval.sharpness", epsilons=[0.1, "0.2"])  # strict: no string coercion
    with pytest.raises(ValueError, match="restarts"):
        SharpnessConfig.parse("eval.sharpness", restarts=0)
    with pytest.raises(ValueError, match="unknown option"):
        SharpnessConfig.parse("eval.sharpness", epsilon=0.1)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(epsilons=(0.0,)), "epsilons"),
        (dict(epsilons=(1.5,)), "epsilons"),
        (dict(epsilons=(float("nan"),)), "epsilons"),
        (dict(epsilons=()), "epsilons"),
        (dict(epsilons=(0.1, 0.1)), "epsilons must be distinct"),
        (dict(restarts=0), "restarts"),
        (dict(search_steps=-1), "search_steps"),
        (dict(step_size=0.0), "step_size"),
        (dict(knn_k=0), "knn_k"),
        (dict(accuracy="linear"), "accuracy"),
        (dict(seed=1.5), "seed"),
    ],
)
def test_sharpness_rejects_bad_options(kwargs, match):
    net = _Recorder()
    with pytest.raises(ValueError, match=match):
        sharpness(net, bank_fn, query_fn, **kwargs)
    assert net.log == []  # rejected before any forward


def test_sharpness_rejects_a_non_callable_bank_and_a_zero_backbone():
    with pytest.raises(ValueError, match="bank_batches_fn"):
        sharpness(_Recorder(), BANK, query_fn)
    zero = _Recorder()
    with torch.no_grad():
        for p in zero.parameters():
            p.zero_()
    with pytest.raises(ValueError, match="all zero"):
        sharpness(zero, bank_fn, query_fn)


def test_interpolation_rejects_mismatched_states_and_too_few_points():
    state_a = _Recorder().state_dict()
    make = _Recorder
    missing = {k: v for k, v in state_a.items() if k != "bn.running_mean"}
    with pytest.raises(ValueError, match="'bn.running_mean' is in backbone_a_state but not in backbone_b_state"):
        interpolation_curve(state_a, missing, make, bank_fn, query_fn)
    extra = dict(state_a, extra=torch.zeros(1))
    with pytest.raises(ValueError, match="'extra' is in backbone_b_state"):
        interpolation_curve(state_a, extra, make, bank_fn, query_fn)
    reshaped = dict(state_a, **{"conv.bias": torch.zeros(4)})
    with pytest.raises(ValueError, match=r"'conv.bias' has shape \(8,\) in backbone_a_state but \(4,\)"):
        interpolation_curve(state_a, reshaped, make, bank_fn, query_fn)
    with pytest.raises(ValueError, match="points must be an integer >= 2"):
        interpolation_curve(state_a, state_a, make, bank_fn, query_fn, points=1)
    with pytest.raises(ValueError, match="do not fit"):
        interpolation_curve(state_a, state_a, lambda: nn.Linear(2, 2), bank_fn, query_fn, points=2)
    with pytest.raises(ValueError, match="alpha"):
        interpolate_state(state_a, state_a, float("inf"))
