"""extract_features: shapes/dtypes, normalisation applied, eval mode during and restored after, determinism."""

import pytest
import torch
from torch import nn

from evaluators.features import extract_features
from trainers.views.augment import IMAGENET_MEAN, IMAGENET_STD


def _backbone() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )


def _batches(sizes=(4, 3, 5), side=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    out, start = [], 0
    for b in sizes:
        images = torch.randint(0, 256, (b, 3, side, side), dtype=torch.uint8, generator=g)
        out.append((images, torch.arange(start, start + b, dtype=torch.int32)))
        start += b
    return out


def _reference(backbone, batches):
    """Independent expectation: eval-mode forward on (x / 255 - mean) / std, written out here."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    images = torch.cat([b[0] for b in batches]).float() / 255.0
    backbone.eval()
    with torch.no_grad():
        return backbone((images - mean) / std)


def test_shapes_dtypes_and_values_match_eval_forward_on_normalised_images():
    backbone, batches = _backbone(), _batches()
    backbone(torch.randn(16, 3, 8, 8))  # move BN running stats away from their init so eval mode matters
    feats, labels = extract_features(backbone, batches)
    assert feats.shape == (12, 6) and feats.dtype == torch.float32 and feats.device.type == "cpu"
    assert labels.dtype == torch.int64 and labels.tolist() == list(range(12))
    assert not feats.requires_grad
    torch.testing.assert_close(feats, _reference(backbone, batches), rtol=1e-5, atol=1e-6)


def test_deterministic_despite_dropout_and_batchnorm():
    backbone, batches = _backbone(), _batches()
    first, _ = extract_features(backbone, batches)
    second, _ = extract_features(backbone, batches)
    assert torch.equal(first, second)
    # batch composition must not matter either: BN uses running statistics in eval mode
    regrouped = [(torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches]))]
    single, _ = extract_features(backbone, regrouped)
    torch.testing.assert_close(single, first, rtol=1e-5, atol=1e-6)


def test_restores_every_submodule_mode_and_leaves_bn_stats_untouched():
    backbone = _backbone().train()
    backbone[1].eval()  # a caller's frozen BN must stay frozen, the rest must go back to train
    stats = backbone[1].running_mean.clone()
    extract_features(backbone, _batches())
    assert backbone.training and backbone[0].training and backbone[3].training
    assert not backbone[1].training
    assert torch.equal(backbone[1].running_mean, stats)

    backbone.eval()
    extract_features(backbone, _batches())
    assert not any(m.training for m in backbone.modules())


def test_mode_restored_when_a_batch_is_rejected():
    backbone = _backbone().train()
    batches = _batches()
    batches[1] = (batches[1][0].float(), batches[1][1])
    with pytest.raises(ValueError, match="batch 1: images must be a uint8"):
        extract_features(backbone, batches)
    assert all(m.training for m in backbone.modules())


def test_bfloat16_autocast_returns_float32_close_to_full_precision():
    backbone, batches = _backbone(), _batches()
    full, _ = extract_features(backbone, batches)
    half, _ = extract_features(backbone, batches, amp_dtype=torch.bfloat16)
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, full, rtol=0.05, atol=0.05)


def test_accepts_a_generator_of_batches():
    backbone = _backbone()
    feats, labels = extract_features(backbone, (b for b in _batches(sizes=(2, 2))))
    assert feats.shape == (4, 6) and labels.tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize(
    "batch, message",
    [
        ((torch.zeros(2, 1, 8, 8, dtype=torch.uint8), torch.zeros(2, dtype=torch.int64)), r"\[B,3,H,W\]"),
        ((torch.zeros(2, 3, 8, 8, dtype=torch.uint8), torch.zeros(3, dtype=torch.int64)), "labels have shape"),
        ((torch.zeros(2, 3, 8, 8, dtype=torch.uint8), torch.zeros(2)), "integer tensor"),
    ],
)
def test_bad_batches_raise_naming_the_batch(batch, message):
    with pytest.raises(ValueError, match=message) as info:
        extract_features(_backbone(), [batch])
    assert "batch 0" in str(info.value)


def test_empty_batches_and_non_2d_output_raise():
    with pytest.raises(ValueError, match="batches is empty"):
        extract_features(_backbone(), [])
    spatial = nn.Conv2d(3, 4, 3)
    with pytest.raises(ValueError, match=r"backbone returned shape \(4, 4, 6, 6\)"):
        extract_features(spatial, _batches(sizes=(4,)))


def test_non_finite_features_raise():
    class Broken(nn.Module):
        def forward(self, x):
            return torch.full((x.shape[0], 2), float("nan"))

    with pytest.raises(ValueError, match="non-finite"):
        extract_features(Broken(), _batches(sizes=(2,)))


def test_backbone_on_another_device_is_rejected():
    with pytest.raises(ValueError, match="backbone is on cpu but device='meta'"):
        extract_features(_backbone(), _batches(sizes=(2,)), device="meta")
