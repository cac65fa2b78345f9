"""Slimmable backbones: slices, exact width 1.0, BN recalibration, params and MACs per width, registry records."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from trainers.backbones import build_backbone
from trainers.backbones.mobilenet import mobilenet_v2
from trainers.backbones.resnet import resnet18, resnet50
from trainers.backbones.slimmable import (
    active_channels,
    feature_dim,
    recalibrate_bn,
    set_width,
    slimmable_mobilenet_v2,
    slimmable_resnet18,
    slimmable_resnet50,
    slimmable_vit_tiny,
    slimmify,
    width_cost,
)
from trainers.backbones.vit import vit_tiny
from trainers.registry import BACKBONE_REGISTRY, check_backbone_for_method

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _x(b: int = 4, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _params(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def _macs(net: nn.Module, size: int) -> int:
    net.eval()
    with FlopCounterMode(display=False) as counter:
        net(torch.zeros(1, 3, size, size))
    return counter.get_total_flops() // 2


def test_active_channels_rounds_and_keeps_at_least_one() -> None:
    assert active_channels(64, 1.0) == 64
    assert active_channels(64, 0.25) == 16
    assert active_channels(10, 0.25) == 3  # 2.5 rounds up
    assert active_channels(3, 0.25) == 1
    with pytest.raises(ValueError, match=r"width must be a number in \[0.25, 1.0\], got 0.2"):
        set_width(nn.Linear(2, 2), 0.2)


@pytest.mark.parametrize("builder, plain", [(slimmable_resnet18, resnet18), (slimmable_resnet50, resnet50)])
def test_resnet_at_width_one_is_exactly_the_plain_network(builder, plain) -> None:
    torch.manual_seed(0)
    slim = builder(width=8, cifar_stem=True)
    full = plain(width=8, cifar_stem=True)
    full.load_state_dict(slim.state_dict())  # same parameter names: the plain network's modules
    for module in (slim, full):
        for m in module.modules():  # non-trivial residual scales so every branch shows in the output
            if isinstance(m, nn.BatchNorm2d):
                nn.init.uniform_(m.weight, 0.5, 1.5)
    full.load_state_dict(slim.state_dict())
    x = _x()
    assert torch.equal(slim(x, width=1.0), full(x))
    slim.eval(), full.eval()
    assert torch.equal(slim(x, width=1.0), full(x))


@pytest.mark.parametrize("width, narrow", [(0.25, 2), (0.5, 4), (0.75, 6), (1.0, 8)])
def test_resnet_slices_match_a_plain_resnet_of_that_width(width: float, narrow: int) -> None:
    """At width w the slimmable ResNet (8 channels) has the shapes, parameter count and MACs of a plain ResNet of
    8w channels; its weights are the first channels of the full ones."""
    torch.manual_seed(0)
    slim = slimmable_resnet18(width=8, cifar_stem=True)
    small = resnet18(width=narrow, cifar_stem=True)
    set_width(slim, width)
    assert slim(_x()).shape == (4, 8 * narrow) == (4, feature_dim(slim, width))
    assert [m.shape[1] for m in slim.forward_stages(_x())] == [narrow, 2 * narrow, 4 * narrow, 8 * narrow]
    cost = width_cost(slim, width, 16)
    assert cost == {"params": _params(small), "macs": _macs(small, 16)}
    # The sliced network computes what a plain network holding the sliced weights computes.
    sliced = {k: v[tuple(slice(0, s) for s in small.state_dict()[k].shape)] if v.dim() else v
              for k, v in slim.state_dict().items()}
    small.load_state_dict(sliced)
    slim.eval(), small.eval()
    assert torch.allclose(slim(_x()), small(_x()), atol=1e-5)


def test_mobilenet_v2_slims_channels_but_keeps_its_last_layer() -> None:
    torch.manual_seed(0)
    slim = slimmable_mobilenet_v2(cifar_stem=True)
    full = mobilenet_v2(cifar_stem=True)
    full.load_state_dict(slim.state_dict())
    x = _x(size=8)
    assert torch.equal(slim(x, width=1.0), full(x))
    assert slim(x, width=0.25).shape == (4, 1280) and feature_dim(slim, 0.25) == 1280
    costs = [width_cost(slim, w, 8) for w in (0.25, 0.5, 1.0)]
    assert costs[2] == {"params": _params(full), "macs": _macs(full, 8)}
    assert costs[0]["params"] < costs[1]["params"] < costs[2]["params"]
    assert costs[0]["macs"] < costs[1]["macs"] < costs[2]["macs"]
    # Depthwise layers run as many channels as they receive: the first block's 3x3 depthwise conv at width 0.5.
    set_width(slim, 0.5)
    seen = {}
    hook = slim.features[1].conv[0][0].register_forward_hook(lambda m, i, o: seen.update(shape=o.shape))
    slim(x)
    hook.remove()
    assert seen["shape"][1] == active_channels(32, 0.5)


def test_vit_slims_heads_and_mlp_not_the_embedding() -> None:
    torch.manual_seed(0)
    slim = slimmable_vit_tiny(image_size=16)
    full = vit_tiny(image_size=16)
    full.load_state_dict(slim.state_dict())
    x = _x()
    assert torch.equal(slim(x, width=1.0), full(x))
    assert slim(x, width=0.25).shape == (4, 192) and feature_dim(slim, 0.25) == 192
    attention = slim.encoder.layers[0].self_attention
    assert [attention.active_heads() for _ in [set_width(slim, w) for w in (0.25,)]] == [1]
    set_width(slim, 0.5)
    assert attention.active_heads() == 2
    # Parameters at width 0.5: 2 of 3 heads (q, k, v rows and output columns) and 384 of 768 MLP units per block.
    full_count = width_cost(slim, 1.0, 16)["params"]
    assert full_count == _params(full)
    per_block_cut = (3 * 64 * 192 + 3 * 64) + 192 * 64 + (384 * 192 + 384) + 192 * 384
    assert width_cost(slim, 0.5, 16)["params"] == full_count - 12 * per_block_cut
    assert width_cost(slim, 0.5, 16)["macs"] < width_cost(slim, 1.0, 16)["macs"]


def test_one_set_of_weights_and_gradients_reach_only_the_used_slices() -> None:
    torch.manual_seed(0)
    slim = slimmable_resnet18(width=8, cifar_stem=True)
    before = _params(slim)
    slim(_x(), width=0.5).sum().backward()
    assert _params(slim) == before  # slicing adds no parameters
    grad = slim.stem[0].weight.grad  # 8 filters, 4 of them used at width 0.5
    assert (grad[:4].flatten(1).abs().sum(1) > 0).all() and grad[4:].abs().sum() == 0
    grad = slim.layer2[0].downsample[0].weight.grad  # 8 -> 16 channels; at width 0.5: 4 -> 8
    assert grad[:8, :4].abs().sum() > 0 and grad[8:].abs().sum() == 0 and grad[:, 4:].abs().sum() == 0


def test_recalibration_changes_only_running_statistics() -> None:
    torch.manual_seed(0)
    slim = slimmable_resnet18(width=8, cifar_stem=True)
    slim.eval()
    params = {k: v.clone() for k, v in slim.named_parameters()}
    buffers = {k: v.clone() for k, v in slim.named_buffers()}
    batches = [_x(8, seed=s) for s in range(3)]
    assert recalibrate_bn(slim, 0.5, batches) == 3
    assert all(torch.equal(params[k], v) for k, v in slim.named_parameters())
    changed = {k for k, v in slim.named_buffers() if not torch.equal(buffers[k], v)}
    assert changed and all(k.rsplit(".", 1)[1] in ("running_mean", "running_var", "num_batches_tracked")
                           for k in changed)
    assert not slim.training and all(not m.training for m in slim.modules())  # modes restored
    assert all(m.momentum == 0.1 for m in slim.modules() if isinstance(m, nn.BatchNorm2d))
    # The statistics are the cumulative average over the batches at that width: the stem BN's mean equals the
    # mean of the per-batch means of its (16-channel, width-0.5: 4-channel) input.
    stem_conv, stem_bn = slim.stem[0], slim.stem[1]
    with torch.no_grad():
        means = [stem_conv(x).mean(dim=(0, 2, 3)) for x in batches]
    assert torch.allclose(stem_bn.running_mean[:4], torch.stack(means).mean(0), atol=1e-5)
    assert torch.equal(stem_bn.running_mean[4:], torch.zeros(4))  # reset, unused at width 0.5


def test_slimmify_refuses_norms_that_cannot_slim() -> None:
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4))
    with pytest.raises(ValueError, match="1: GroupNorm cannot slim"):
        slimmify(net)


def test_registry_records_and_the_method_pairing_check() -> None:
    slim = [r.name for r in BACKBONE_REGISTRY.values() if r.slimmable]
    assert slim == ["slimmable_resnet18", "slimmable_resnet50", "slimmable_mobilenet_v2", "slimmable_vit_tiny"]
    net = build_backbone("slimmable_resnet18", image_size=16, width=8)
    assert net(_x(), width=0.25).shape == (4, 16)
    with pytest.raises(ValueError, match="slimmable_resnet18: width: unknown option|slimmable_vit_tiny: width"):
        build_backbone("slimmable_vit_tiny", image_size=16, width=8)
    check_backbone_for_method("simclr", "slimmable_resnet18")  # a plain method may train a slimmable network
    check_backbone_for_method("simclr", "resnet18")
