"""ResNet encoders: shapes for both stems and depths, the width knob, parameter counts, channels_last."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from trainers.backbones import BACKBONES, build_backbone
from trainers.backbones.resnet import BasicBlock, Bottleneck, resnet18, resnet50


def _param_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize(
    ("name", "width", "cifar_stem", "size", "out_dim"),
    [
        ("resnet18", 8, True, 16, 64),
        ("resnet18", 16, False, 64, 128),
        ("resnet50", 4, True, 16, 128),
        ("resnet50", 8, False, 64, 256),
    ],
)
def test_output_shape_and_out_dim(name: str, width: int, cifar_stem: bool, size: int, out_dim: int) -> None:
    torch.manual_seed(0)
    net = build_backbone(name, image_size=size, width=width, cifar_stem=cifar_stem)
    assert net.out_dim == out_dim
    feats = net(torch.randn(3, 3, size, size))
    assert feats.shape == (3, out_dim)
    assert feats.dtype == torch.float32
    assert torch.isfinite(feats).all()


def test_stem_follows_image_size_when_not_given() -> None:
    small = build_backbone("resnet18", image_size=32, width=8)
    large = build_backbone("resnet18", image_size=96, width=8)
    assert small.cifar_stem and not large.cifar_stem
    assert small.stem[0].kernel_size == (3, 3) and small.stem[0].stride == (1, 1)
    assert not any(isinstance(m, nn.MaxPool2d) for m in small.stem)
    assert large.stem[0].kernel_size == (7, 7) and large.stem[0].stride == (2, 2)
    assert any(isinstance(m, nn.MaxPool2d) for m in large.stem)
    # The CIFAR stem keeps resolution: a 32 px input reaches layer4 at 4 px; the ImageNet stem at 1 px.
    x = torch.randn(2, 3, 32, 32)
    for net, side in ((small, 4), (large, 1)):
        h = net.layer3(net.layer2(net.layer1(net.stem(x))))
        assert net.layer4(h).shape[-1] == side
    explicit = build_backbone("resnet18", image_size=32, width=8, cifar_stem=False)
    assert not explicit.cifar_stem


def test_parameter_counts_match_the_paper_networks() -> None:
    # torchvision's resnet18 / resnet50 without the 1000-way fc: 11,689,512 - 513,000 and 25,557,032 - 2,049,000.
    assert _param_count(resnet18(width=64, cifar_stem=False)) == 11_176_512
    assert _param_count(resnet50(width=64, cifar_stem=False)) == 23_508_032


def test_width_scales_channels() -> None:
    narrow, wide = resnet18(width=16), resnet18(width=32)
    assert (narrow.out_dim, wide.out_dim) == (128, 256)
    # Conv weights scale with width^2; BN parameters with width, the stem's conv with width only.
    assert 3.9 < _param_count(wide) / _param_count(narrow) < 4.0


def test_residual_branches_start_at_zero() -> None:
    net = resnet50(width=4, cifar_stem=True)
    blocks = [m for m in net.modules() if isinstance(m, (BasicBlock, Bottleneck))]
    assert len(blocks) == 16
    assert all(torch.count_nonzero(b.last_bn.weight) == 0 for b in blocks)
    block = resnet18(width=8).layer1[0]
    x = torch.randn(2, 8, 6, 6)
    assert torch.allclose(block(x), torch.relu(x))


def test_channels_last_input_gives_same_features() -> None:
    torch.manual_seed(0)
    net = build_backbone("resnet18", image_size=16, width=8).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        ref = net(x)
        out = net.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last))
    assert out.shape == (2, 64)
    assert torch.allclose(out, ref, atol=1e-5)


def test_gradients_reach_the_stem() -> None:
    net = build_backbone("resnet18", image_size=16, width=8)
    net(torch.randn(4, 3, 16, 16)).pow(2).sum().backward()
    assert net.stem[0].weight.grad is not None
    assert net.stem[0].weight.grad.abs().sum() > 0


def test_bad_arguments_raise_naming_them() -> None:
    assert set(BACKBONES) == {"resnet18", "resnet50"}
    with pytest.raises(ValueError, match="unknown backbone 'vit'"):
        build_backbone("vit", image_size=32)
    with pytest.raises(ValueError, match="width"):
        build_backbone("resnet18", image_size=32, width=0)
    with pytest.raises(ValueError, match="image_size"):
        build_backbone("resnet18", image_size=0)
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        resnet18(width=8)(torch.randn(2, 1, 16, 16))
