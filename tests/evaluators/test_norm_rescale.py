"""NormRescale: directions kept, norms set to the anchor's / the constant / scaled, BN and biases untouched, the
selection options, and errors naming the layers."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from evaluators.norm_rescale import NormRescaleConfig, norm_rescale, selected_weights


def _net(seed: int, width: int = 8) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
        nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 5),
    )


def _randomise_bn(net: nn.Module) -> None:
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)


WEIGHTS = ["0.weight", "3.weight", "8.weight"]


def _norm(t: torch.Tensor) -> float:
    return torch.linalg.vector_norm(t.double()).item()


def test_default_selection_is_conv_and_linear_weights():
    assert list(selected_weights(_net(0))) == WEIGHTS
    assert list(selected_weights(_net(0), include_norms=True)) == ["0.weight", "1.weight", "3.weight", "4.weight",
                                                                   "8.weight"]
    assert list(selected_weights(_net(0), include_biases=True)) == ["0.weight", "0.bias", "3.weight", "8.weight",
                                                                    "8.bias"]
    assert list(selected_weights(_net(0), exclude=["8.*"])) == ["0.weight", "3.weight"]


def test_anchor_mode_sets_each_norm_to_the_anchors_and_keeps_directions():
    model, anchor = _net(0), _net(1)
    _randomise_bn(model)
    with torch.no_grad():  # LARS-like: norms far from the anchor's
        for name in WEIGHTS:
            dict(model.named_parameters())[name].mul_(7.0)
    before = copy.deepcopy(model.state_dict())
    result = norm_rescale(model, mode="anchor", anchor=anchor)

    after, anchor_state = model.state_dict(), anchor.state_dict()
    assert [c.name for c in result.layers] == WEIGHTS
    for change in result.layers:
        name = change.name
        assert _norm(after[name]) == pytest.approx(_norm(anchor_state[name]), rel=1e-6)
        assert change.after == pytest.approx(_norm(anchor_state[name]), rel=1e-6)
        assert change.before == pytest.approx(_norm(before[name]), rel=1e-12)
        cosine = F.cosine_similarity(before[name].flatten().double(), after[name].flatten().double(), dim=0)
        assert cosine.item() == pytest.approx(1.0, abs=1e-6)
    for name in after:  # BN scales/shifts/statistics and biases untouched, bit for bit
        if name not in WEIGHTS:
            assert torch.equal(after[name], before[name]), name


def test_anchor_given_as_state_dict_matches_module_anchor():
    a, b, anchor = _net(0), _net(0), _net(1)
    norm_rescale(a, anchor=anchor)
    norm_rescale(b, anchor=anchor.state_dict())
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name


def test_constant_mode_sets_every_norm():
    model = _net(0)
    before = copy.deepcopy(model.state_dict())
    result = norm_rescale(model, mode="constant", target_norm=3.5)
    for name in WEIGHTS:
        assert _norm(model.state_dict()[name]) == pytest.approx(3.5, rel=1e-6)
        cosine = F.cosine_similarity(before[name].flatten().double(), model.state_dict()[name].flatten().double(), 0)
        assert cosine.item() == pytest.approx(1.0, abs=1e-6)
    assert result.metrics()["norm_after/3.weight"] == pytest.approx(3.5, rel=1e-6)
    assert result.to_dict()["layers"]["0.weight"]["before"] == pytest.approx(_norm(before["0.weight"]))


def test_scale_mode_multiplies_every_weight():
    model = _net(0)
    before = copy.deepcopy(model.state_dict())
    norm_rescale(model, mode="scale", factor=0.25)
    for name in WEIGHTS:
        torch.testing.assert_close(model.state_dict()[name], before[name] * 0.25, rtol=1e-6, atol=0)
    torch.testing.assert_close(model.state_dict()["0.bias"], before["0.bias"], rtol=0, atol=0)


def test_mismatched_anchor_names_the_layers():
    model = _net(0)
    anchor = _net(1, width=16).state_dict()
    del anchor["8.weight"]
    with pytest.raises(ValueError) as info:
        norm_rescale(model, anchor=anchor)
    message = str(info.value)
    assert "1 missing from the anchor: 8.weight" in message
    assert "2 with another shape: 0.weight (8, 3, 3, 3) vs anchor (16, 3, 3, 3), 3.weight (8, 8, 3, 3) vs anchor" \
        in message
    untouched = _net(0).state_dict()
    for name, value in model.state_dict().items():  # nothing was changed before the error
        assert torch.equal(value, untouched[name])


def test_exclude_lets_a_head_the_anchor_lacks_stay():
    model, anchor = _net(0), _net(1).state_dict()
    del anchor["8.weight"]
    head = model[8].weight.detach().clone()
    result = norm_rescale(model, anchor=anchor, exclude=["8.*"])
    assert [c.name for c in result.layers] == ["0.weight", "3.weight"]
    assert torch.equal(model[8].weight, head)


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="needs an anchor"):
        norm_rescale(_net(0), mode="anchor")
    with pytest.raises(ValueError, match="mode=constant needs target_norm"):
        norm_rescale(_net(0), mode="constant")
    with pytest.raises(ValueError, match="mode=scale needs factor"):
        norm_rescale(_net(0), mode="scale")
    with pytest.raises(ValueError, match="mode"):
        norm_rescale(_net(0), mode="rescale")
    with pytest.raises(ValueError, match="target_norm"):
        norm_rescale(_net(0), mode="constant", target_norm=-1.0)
    with pytest.raises(ValueError, match="no tensor selected"):
        norm_rescale(_net(0), mode="constant", target_norm=1.0, exclude=["*"])
    zero = _net(0)
    with torch.no_grad():
        zero[3].weight.zero_()
    with pytest.raises(ValueError, match="3.weight has norm 0"):
        norm_rescale(zero, mode="constant", target_norm=1.0)
    with pytest.raises(ValueError, match="unknown option"):
        NormRescaleConfig.parse("norm_rescale", mode="scale", factor=2.0, layers="all")


def test_resnet_backbone_against_a_supervised_like_anchor():
    from trainers.backbones import build_backbone

    torch.manual_seed(0)
    model = build_backbone("resnet18", image_size=32, width=8)
    torch.manual_seed(1)
    anchor = build_backbone("resnet18", image_size=32, width=8)
    chosen = set(selected_weights(model))
    bn_before = {n: t.clone() for n, t in model.state_dict().items() if n not in chosen}  # BN, biases, buffers
    assert any("bn" in n for n in bn_before)
    result = norm_rescale(model, anchor=anchor)
    assert len(result.layers) == len(selected_weights(model)) >= 20
    anchor_state = anchor.state_dict()
    for change in result.layers:
        assert change.after == pytest.approx(_norm(anchor_state[change.name]), rel=1e-6)
    for name, value in bn_before.items():
        assert torch.equal(model.state_dict()[name], value), name
