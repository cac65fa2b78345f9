"""Encoders: shapes and out_dim at small and ImageNet sizes, parameter counts against torchvision's own models,
stage outputs, gradients, the norm factory, the size-dependent defaults and the errors naming options."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from trainers.backbones import BACKBONES, build_backbone, mobilenet_v2, resnet34, vit_tiny
from trainers.backbones.resnet import BasicBlock, Bottleneck, residual_norm, resnet18, resnet50
from trainers.backbones.vit import default_patch_size


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
    assert all(torch.count_nonzero(residual_norm(b).weight) == 0 for b in blocks)
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
    assert set(BACKBONES) == {"resnet18", "resnet34", "resnet50", "mobilenet_v2", "vit_tiny", "slimmable_resnet18",
                              "slimmable_resnet50", "slimmable_mobilenet_v2", "slimmable_vit_tiny"}
    with pytest.raises(ValueError, match="unknown backbone 'vit'"):
        build_backbone("vit", image_size=32)
    with pytest.raises(ValueError, match="width"):
        build_backbone("resnet18", image_size=32, width=0)
    with pytest.raises(ValueError, match="image_size"):
        build_backbone("resnet18", image_size=0)
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        resnet18(width=8)(torch.randn(2, 1, 16, 16))


# name, options, image side, out_dim: every backbone at 32 and 64 px.
SMALL_CASES = [
    ("resnet18", {"width": 8}, 32, 64),
    ("resnet18", {"width": 8}, 64, 64),
    ("resnet34", {"width": 8}, 32, 64),
    ("resnet34", {"width": 8, "cifar_stem": False}, 64, 64),
    ("resnet50", {"width": 4}, 32, 128),
    ("mobilenet_v2", {"width_mult": 0.25}, 32, 1280),
    ("mobilenet_v2", {"width_mult": 0.5, "cifar_stem": False}, 64, 1280),
    ("mobilenet_v2", {"width_mult": 1.5}, 32, 1920),
    ("vit_tiny", {}, 32, 192),
    ("vit_tiny", {}, 64, 192),
    ("vit_tiny", {"patch_size": 16}, 64, 192),
]


@pytest.mark.parametrize(("name", "options", "size", "out_dim"), SMALL_CASES)
def test_every_backbone_pools_to_out_dim(name: str, options: dict, size: int, out_dim: int) -> None:
    torch.manual_seed(0)
    net = build_backbone(name, image_size=size, **options)
    assert net.out_dim == out_dim
    feats = net(torch.randn(2, 3, size, size))
    assert feats.shape == (2, out_dim) and feats.dtype == torch.float32
    assert torch.isfinite(feats).all()


def test_vit_tiny_at_224_px_uses_patch_16() -> None:
    net = build_backbone("vit_tiny", image_size=224)
    assert net.patch_size == 16 and net.grid == 14 and net.out_dim == 192
    assert net(torch.randn(1, 3, 224, 224)).shape == (1, 192)
    assert [default_patch_size(s) for s in (32, 48, 64, 96, 128, 224, 256)] == [4, 4, 8, 8, 8, 16, 16]


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize(("ours", "theirs"), [
    (lambda: resnet18(width=64, cifar_stem=False), torchvision.models.resnet18),
    (lambda: resnet34(width=64, cifar_stem=False), torchvision.models.resnet34),
    (lambda: resnet50(width=64, cifar_stem=False), torchvision.models.resnet50),
])
def test_resnets_at_width_64_are_torchvisions_trunk(ours, theirs) -> None:
    torch.manual_seed(0)
    net, reference = ours().eval(), theirs().eval()
    reference.fc = nn.Identity()
    assert _params(net) == _params(reference)
    # Same layers in the same order: torchvision's weights load by position and give the same features.
    ours_state, their_state = net.state_dict(), reference.state_dict()
    assert [v.shape for v in ours_state.values()] == [v.shape for v in their_state.values()]
    net.load_state_dict(dict(zip(ours_state, their_state.values())))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(net(x), reference(x), atol=1e-5)


def test_resnet34_parameter_count() -> None:
    assert _params(resnet34()) == 21_284_672  # torchvision's 21,797,672 less the 513,000 of its fc


def test_mobilenet_v2_is_torchvisions_features() -> None:
    for width_mult in (1.0, 0.5):
        reference = torchvision.models.mobilenet_v2(width_mult=width_mult).features
        for cifar_stem in (False, True):
            net = mobilenet_v2(width_mult=width_mult, cifar_stem=cifar_stem)
            assert _params(net) == _params(reference)
            assert [k for k in net.state_dict()] == [f"features.{k}" for k in reference.state_dict()]
    assert _params(mobilenet_v2()) == 2_223_872


def test_mobilenet_v2_small_stem_keeps_resolution() -> None:
    x = torch.randn(2, 3, 32, 32)
    small, large = build_backbone("mobilenet_v2", image_size=32), build_backbone("mobilenet_v2", image_size=96)
    assert small.cifar_stem and not large.cifar_stem
    assert small.features(x).shape[-1] == 4 and large.features(x).shape[-1] == 1


def test_vit_tiny_is_torchvisions_vision_transformer() -> None:
    from torchvision.models.vision_transformer import VisionTransformer

    for size, patch in ((224, 16), (32, 4), (64, 8)):
        net = vit_tiny(image_size=size)
        assert net.patch_size == patch
        reference = VisionTransformer(size, patch, num_layers=12, num_heads=3, hidden_dim=192, mlp_dim=768)
        assert _params(net) == _params(reference) - _params(reference.heads)
    assert 5.5e6 < _params(vit_tiny(image_size=224)) < 5.6e6


def test_vit_matches_torchvision_forward_at_its_size_and_takes_other_sizes() -> None:
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    net = vit_tiny(image_size=32).eval()
    reference = VisionTransformer(32, 4, num_layers=12, num_heads=3, hidden_dim=192, mlp_dim=768).eval()
    reference.heads = nn.Identity()
    net.load_state_dict(reference.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(net(x), reference(x), atol=1e-5)
        # Another multiple of the patch: the position grid is interpolated (torchvision's model refuses it).
        assert net(torch.randn(2, 3, 48, 48)).shape == (2, 192)
    with pytest.raises(ValueError, match="multiples of the patch size 4"):
        net(torch.randn(2, 3, 30, 30))


@pytest.mark.parametrize(("name", "options", "size", "expected"), [
    ("resnet18", {"width": 8}, 32, [(8, 32), (16, 16), (32, 8), (64, 4)]),
    ("resnet34", {"width": 8}, 64, [(8, 64), (16, 32), (32, 16), (64, 8)]),
    ("resnet50", {"width": 4, "cifar_stem": False}, 64, [(16, 16), (32, 8), (64, 4), (128, 2)]),
    ("mobilenet_v2", {"width_mult": 1.0, "cifar_stem": False}, 64, [(24, 16), (32, 8), (96, 4), (1280, 2)]),
    ("mobilenet_v2", {"width_mult": 1.0}, 32, [(24, 32), (32, 16), (96, 8), (1280, 4)]),
    ("vit_tiny", {}, 32, [(192, 8)] * 4),
    ("vit_tiny", {"patch_size": 16}, 64, [(192, 4)] * 4),
])
def test_forward_stages_shapes(name: str, options: dict, size: int, expected: list[tuple[int, int]]) -> None:
    torch.manual_seed(0)
    net = build_backbone(name, image_size=size, **options).eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        maps = net.forward_stages(x)
        pooled = net(x)
    assert [(m.shape[0], m.shape[1], m.shape[2], m.shape[3]) for m in maps] == [(2, c, s, s) for c, s in expected]
    assert list(net.stage_dims) == [c for c, _ in expected] and net.stage_dims[-1] == net.out_dim
    if name != "vit_tiny":  # the CNNs pool their last stage; the ViT pools its class token instead
        assert torch.allclose(maps[-1].mean(dim=(2, 3)), pooled, atol=1e-5)


@pytest.mark.parametrize(("name", "options"), [
    ("resnet34", {"width": 8}), ("mobilenet_v2", {"width_mult": 0.25}), ("vit_tiny", {}),
])
def test_gradients_reach_the_first_layer(name: str, options: dict) -> None:
    torch.manual_seed(0)
    net = build_backbone(name, image_size=32, **options)
    net(torch.randn(4, 3, 32, 32)).pow(2).sum().backward()
    first = next(net.parameters())
    assert first.grad is not None and first.grad.abs().sum() > 0
    assert all(p.grad is not None for p in net.parameters())


def test_norm_layer_factory_builds_every_norm() -> None:
    made: list[int] = []

    def group_norm(channels: int) -> nn.Module:
        made.append(channels)
        return nn.GroupNorm(1, channels)

    for name, options in (("resnet34", {"width": 8}), ("mobilenet_v2", {"width_mult": 0.25})):
        made.clear()
        net = build_backbone(name, image_size=32, norm_layer=group_norm, **options)
        assert not any(isinstance(m, nn.BatchNorm2d) for m in net.modules())
        assert len(made) == sum(isinstance(m, nn.GroupNorm) for m in net.modules()) > 0
        assert net(torch.randn(2, 3, 32, 32)).shape == (2, net.out_dim)
    vit = build_backbone("vit_tiny", image_size=32, norm_layer=lambda dim: nn.LayerNorm(dim, eps=1e-5))
    assert all(m.eps == 1e-5 for m in vit.modules() if isinstance(m, nn.LayerNorm))


def test_bad_backbone_options_name_the_option() -> None:
    with pytest.raises(ValueError, match=r"vit_tiny: patch_size: 12 does not divide the image side 32 px"):
        build_backbone("vit_tiny", image_size=32, patch_size=12)
    with pytest.raises(ValueError, match=r"patch_size: 4 does not divide the image side 30 px; 4 is the default"):
        build_backbone("vit_tiny", image_size=30)
    with pytest.raises(ValueError, match="vit_tiny: width: unknown option"):
        build_backbone("vit_tiny", image_size=32, width=8)
    with pytest.raises(ValueError, match="mobilenet_v2: width_mult: Input should be greater than or equal to 0.25"):
        build_backbone("mobilenet_v2", image_size=32, width_mult=0.1)
    with pytest.raises(ValueError, match="mobilenet_v2: width_mult: Input should be a valid number"):
        build_backbone("mobilenet_v2", image_size=32, width_mult="1")
