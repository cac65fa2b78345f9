"""Label-fraction fine-tuning on tiny synthetic images: accuracy well above chance, the backbone moves (and does
not when frozen), top-5 >= top-1, determinism, the subset wrapper, and input errors."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from evaluators.finetune import FinetuneConfig, FinetuneResult, finetune, label_fraction_finetune

NUM_CLASSES = 6
# One colour per class: its channel means (0-255) differ by ~60 levels, under per-pixel noise of std ~40.
_TINTS = torch.tensor([[190, 70, 70], [70, 190, 70], [70, 70, 190], [160, 160, 70], [160, 70, 160], [70, 160, 160]])


def _images(per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(NUM_CLASSES).repeat_interleave(per_class)
    noise = 40.0 * torch.randn(labels.numel(), 3, 8, 8, generator=g)
    images = (_TINTS[labels].float()[:, :, None, None] + noise).clamp(0, 255).to(torch.uint8)
    order = torch.randperm(labels.numel(), generator=g)
    return images[order], labels[order]


class TinyConv(nn.Module):
    """A two-conv encoder with BatchNorm, pooled to 16 features."""

    out_dim = 16

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )

    def forward(self, x):
        return self.net(x)


FAST = dict(epochs=12, batch_size=24, lr=0.1, crop_min_scale=0.5)


@pytest.fixture(scope="module")
def data():
    train_x, train_y = _images(20, seed=0)
    val_x, val_y = _images(10, seed=1)
    return train_x, train_y, val_x, val_y


def test_finetune_learns_and_moves_the_backbone(data):
    backbone = TinyConv()
    before = copy.deepcopy(backbone.state_dict())
    result = finetune(backbone, *data, seed=0, **FAST)
    assert isinstance(result, FinetuneResult)
    assert result.top1 >= 0.8  # chance is 1/6
    assert 1.0 >= result.top5 >= result.top1
    assert result.top5 > result.top1 or result.top1 == 1.0
    assert (result.epochs, result.steps, result.train_rows, result.val_rows) == (12, 12 * 5, 120, 60)
    assert result.num_classes == NUM_CLASSES and result.final_loss < 1.0
    moved = [name for name, value in backbone.state_dict().items() if not torch.equal(value, before[name])]
    assert "net.0.weight" in moved and "net.3.weight" in moved
    assert not backbone.training


def test_frozen_backbone_is_untouched_and_fine_tuning_beats_it(data):
    backbone = TinyConv()
    before = copy.deepcopy(backbone.state_dict())
    frozen = finetune(backbone, *data, seed=0, backbone_lr_scale=0.0, **FAST)
    for name, value in backbone.state_dict().items():  # weights and BN statistics, bit for bit
        assert torch.equal(value, before[name]), name
    assert all(p.requires_grad for p in backbone.parameters())  # restored
    assert 1.0 >= frozen.top5 > frozen.top1 > 1 / NUM_CLASSES  # a weaker head: top-5 catches what top-1 misses
    tuned = finetune(TinyConv(), *data, seed=0, **FAST)
    assert tuned.top1 > frozen.top1


def test_deterministic_for_a_seed(data):
    first, second = TinyConv(), TinyConv()
    rng_before = torch.get_rng_state()
    a = finetune(first, *data, seed=3, **FAST)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the global RNG is not drawn from
    b = finetune(second, *data, seed=3, **FAST)
    assert a == b
    c = finetune(TinyConv(), *data, seed=4, **FAST)
    assert c.final_loss != a.final_loss


def test_smaller_backbone_lr_moves_the_backbone_less(data):
    start = TinyConv()
    full, small = copy.deepcopy(start), copy.deepcopy(start)
    finetune(full, *data, seed=0, **FAST)
    finetune(small, *data, seed=0, backbone_lr_scale=0.1, **FAST)
    w0 = start.net[0].weight
    assert (small.net[0].weight - w0).norm() < (full.net[0].weight - w0).norm()


def test_label_fraction_wrapper_trains_on_the_balanced_subset(data):
    config = FinetuneConfig(label_fraction=0.5, **FAST)
    result, subset = label_fraction_finetune(TinyConv(), *data, config, seed=0)
    assert subset.class_counts == {c: 10 for c in range(NUM_CLASSES)}
    assert result.train_rows == subset.size == 60
    assert result.num_classes == NUM_CLASSES
    assert result.top1 > 1 / NUM_CLASSES


def test_bad_input_is_refused(data):
    train_x, train_y, val_x, val_y = data
    with pytest.raises(ValueError, match="train_images must be a uint8"):
        finetune(TinyConv(), train_x.float(), train_y, val_x, val_y)
    with pytest.raises(ValueError, match=r"val_labels must be an integer tensor \[60\]"):
        finetune(TinyConv(), train_x, train_y, val_x, val_y[:5])
    bad = train_y.clone()
    bad[7] = -1
    with pytest.raises(ValueError, match="row 7 has -1"):
        finetune(TinyConv(), train_x, bad, val_x, val_y)
    with pytest.raises(ValueError, match="feature width is unknown"):
        finetune(nn.Sequential(TinyConv().net), train_x, train_y, val_x, val_y)
    with pytest.raises(ValueError, match="batch_size"):
        finetune(TinyConv(), train_x, train_y, val_x, val_y, batch_size=1)
    with pytest.raises(ValueError, match="backbone_lr_scale"):
        finetune(TinyConv(), train_x, train_y, val_x, val_y, backbone_lr_scale=-1.0)
    with pytest.raises(ValueError, match="num_classes"):
        finetune(TinyConv(), train_x, train_y, val_x, val_y, num_classes=3)
    with pytest.raises(ValueError, match="at least 2 training rows"):
        finetune(TinyConv(), train_x[:1], train_y[:1], val_x, val_y)
