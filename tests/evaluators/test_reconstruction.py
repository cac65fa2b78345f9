"""Feature reconstruction: features that keep the image reconstruct it better than features that destroy it, the
error is finite and deterministic, the backbone is left as it was, the grid, and input errors."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from evaluators.reconstruction import FeatureDecoder, ReconstructionResult, reconstruction_error

BUDGET = dict(epochs=10, batch_size=16, hidden=32, lr=3e-3, samples=4)


def _images(n: int, seed: int) -> torch.Tensor:
    """Smooth 8x8 images: a random 2x2 colour field, bilinearly upsampled."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 2, 2, generator=g)
    return (F.interpolate(low, size=8, mode="bilinear", align_corners=False) * 255).round().to(torch.uint8)


class Flatten(nn.Module):
    """Keeps everything: the normalised pixels themselves, behind a BatchNorm and a learnable scale."""

    out_dim = 192

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(3)
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, x):
        return (self.bn(x) * self.scale).flatten(1)


class Constant(nn.Module):
    """Destroys everything: the same features for every image."""

    out_dim = 16

    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(torch.linspace(-1, 1, 16))

    def forward(self, x):
        return self.bias.expand(x.shape[0], -1)


@pytest.fixture(scope="module")
def data():
    return _images(48, seed=0), _images(16, seed=1)


def test_information_keeping_features_reconstruct_better(data):
    keep = reconstruction_error(Flatten(), *data, seed=0, **BUDGET)
    lose = reconstruction_error(Constant(), *data, seed=0, **BUDGET)
    assert isinstance(keep, ReconstructionResult)
    assert np.isfinite([keep.mse, lose.mse, keep.train_mse]).all()
    assert keep.baseline_mse == lose.baseline_mse > 0  # the same data's mean-image error
    assert keep.mse < 0.5 * lose.mse
    assert keep.relative_mse < 0.5
    assert lose.relative_mse > 0.9  # constant features can at best learn the mean image
    assert (keep.epochs, keep.steps, keep.train_rows, keep.eval_rows) == (10, 30, 48, 16)


def test_deterministic_and_backbone_unchanged(data):
    backbone = Flatten()
    backbone.train()
    with torch.no_grad():
        backbone.bn.running_mean.fill_(0.3)
    before = copy.deepcopy(backbone.state_dict())
    rng_before = torch.get_rng_state()
    a = reconstruction_error(backbone, *data, seed=5, **BUDGET)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the decoder's init does not draw from the global RNG
    b = reconstruction_error(backbone, *data, seed=5, **BUDGET)
    assert a.to_dict() == b.to_dict()
    assert np.array_equal(a.grid, b.grid)
    for name, value in backbone.state_dict().items():  # eval mode for the features: BN statistics untouched
        assert torch.equal(value, before[name]), name
    assert backbone.training and backbone.bn.training


def test_grid_holds_originals_above_reconstructions(data):
    train, evaluation = data
    result = reconstruction_error(Flatten(), train, evaluation, seed=0, **BUDGET)
    grid = result.grid
    assert grid.dtype == np.uint8 and not grid.flags.writeable
    assert grid.shape == (2 + 2 * (8 + 2), 2 + 4 * (8 + 2), 3)  # 2 rows x 4 tiles of 8 px, 2 px padding
    first = grid[2:10, 2:10].transpose(2, 0, 1)  # the first tile is the first eval image, exactly
    assert np.array_equal(first, evaluation[0].numpy())
    below = grid[12:20, 2:10].transpose(2, 0, 1).astype(float)
    assert np.abs(below - evaluation[0].numpy()).mean() < 40  # its reconstruction resembles it
    none = reconstruction_error(Flatten(), train, evaluation, seed=0, **{**BUDGET, "samples": 0})
    assert none.grid.shape == (0, 0, 3)


@pytest.mark.parametrize(("height", "width"), [(8, 8), (12, 20), (32, 32)])
def test_decoder_output_size(height, width):
    decoder = FeatureDecoder(10, height, width, hidden=32)
    out = decoder(torch.randn(2, 10))
    assert out.shape == (2, 3, height, width)
    assert out.min() >= 0 and out.max() <= 1


def test_bad_input_is_refused(data):
    train, evaluation = data
    with pytest.raises(ValueError, match="train_images must be a uint8"):
        reconstruction_error(Flatten(), train.float(), evaluation)
    with pytest.raises(ValueError, match="same H, W"):
        reconstruction_error(Flatten(), train, evaluation[:, :, :4])
    with pytest.raises(ValueError, match="at least 2 training images"):
        reconstruction_error(Flatten(), train[:1], evaluation)
    with pytest.raises(ValueError, match="epochs"):
        reconstruction_error(Flatten(), train, evaluation, epochs=0)
    with pytest.raises(ValueError, match="eval_images is empty"):
        reconstruction_error(Flatten(), train, evaluation[:0])
