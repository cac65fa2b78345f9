"""evaluate_widths: per-width BN recalibration + kNN top-1, params and MACs, keyed by width; the backbone restored."""

from __future__ import annotations

import pytest
import torch

from evaluators.features import extract_features
from evaluators.knn import knn_accuracy
from evaluators.slimmable import DEFAULT_WIDTHS, evaluate_widths, width_features, width_key
from trainers.backbones import build_backbone
from trainers.backbones.slimmable import recalibrate_bn, width_cost
from trainers.views.augment import normalize

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two classes told apart by brightness: dark and bright noise images."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    base = torch.where(labels[:, None, None, None] == 1, 170, 40)
    images = (base + torch.randint(0, 60, (n, 3, 8, 8), generator=g)).to(torch.uint8)
    return images, labels


def _net():
    torch.manual_seed(0)
    return build_backbone("slimmable_resnet18", image_size=8, width=4).eval()


def test_width_keys() -> None:
    assert [width_key("knn_top1", w) for w in (1.0, 0.9, 0.5, 0.25)] == [
        "knn_top1@w1.0", "knn_top1@w0.9", "knn_top1@w0.5", "knn_top1@w0.25"]
    assert DEFAULT_WIDTHS == (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.25)


def test_every_width_gets_its_own_statistics_knn_params_and_macs() -> None:
    net = _net()
    train, test = [_data(16, 1)], [_data(12, 2)]
    calibration = _data(32, 3)[0]
    buffers = {k: v.clone() for k, v in net.named_buffers()}
    metrics = evaluate_widths(net, calibration, train, test, widths=(1.0, 0.5, 0.25), k=5)
    assert list(metrics) == [width_key(m, w) for w in (1.0, 0.5, 0.25) for m in ("knn_top1", "params", "macs")]
    # The backbone comes back as it was: statistics, width, mode.
    assert all(torch.equal(buffers[k], v) for k, v in net.named_buffers())
    assert net.current_width == 1.0 and not net.training

    # Each width's number is what calibrating at that width and running the kNN gives.
    for width in (1.0, 0.5, 0.25):
        recalibrate_bn(net, width, calibration.split(256), forward=lambda m, x: m(normalize(x)))
        bank, bank_y = extract_features(net, train)
        query, query_y = extract_features(net, test)
        assert bank.shape[1] == 8 * max(1, round(4 * width))
        assert metrics[width_key("knn_top1", width)] == knn_accuracy(bank, bank_y, query, query_y, k=5)
        cost = width_cost(net, width, 8)
        assert metrics[width_key("params", width)] == cost["params"]
        assert metrics[width_key("macs", width)] == cost["macs"]
    assert metrics["params@w0.25"] < metrics["params@w0.5"] < metrics["params@w1.0"]
    assert metrics["knn_top1@w1.0"] > 0.9  # brightness separates the classes at full width


def test_calibration_uses_the_width_it_evaluates() -> None:
    net = _net()
    calibration = _data(32, 3)[0]
    [(wide, _)] = width_features(net, 1.0, calibration, [[_data(8, 1)]])
    stem_mean_wide = net.stem[1].running_mean.clone()
    [(narrow, _)] = width_features(net, 0.5, calibration, [[_data(8, 1)]])
    assert wide.shape == (8, 32) and narrow.shape == (8, 16)
    # Calibrating at 0.5 resets the statistics: the channels 0.5 does not run are back at their initial values.
    assert torch.equal(net.stem[1].running_mean[2:], torch.zeros(2)) and stem_mean_wide[2:].abs().sum() > 0


def test_bad_input_is_named() -> None:
    net = _net()
    data = [_data(8, 1)]
    with pytest.raises(ValueError, match=r"width must be a number in \[0.25, 1.0\], got 0.1"):
        evaluate_widths(net, _data(8, 3)[0], data, data, widths=(1.0, 0.1))
    with pytest.raises(ValueError, match="widths must be distinct"):
        evaluate_widths(net, _data(8, 3)[0], data, data, widths=(0.5, 0.5))
    with pytest.raises(ValueError, match="slimmable backbone"):
        evaluate_widths(build_backbone("resnet18", image_size=8, width=4), _data(8, 3)[0], data, data)
    with pytest.raises(ValueError, match="calibration images must be uint8"):
        evaluate_widths(net, torch.zeros(8, 3, 8, 8), data, data)


def test_the_default_sweep_covers_one_to_a_quarter() -> None:
    metrics = evaluate_widths(_net(), _data(16, 3)[0], [_data(8, 1)], [_data(8, 2)], k=3)
    assert [key for key in metrics if key.startswith("knn_top1@")] == [
        f"knn_top1@w{w}" for w in ("1.0", "0.9", "0.8", "0.7", "0.6", "0.5", "0.4", "0.3", "0.25")]
    assert all(0.0 <= metrics[f"knn_top1@w{w}"] <= 1.0 for w in ("1.0", "0.25"))
    macs = [metrics[k] for k in metrics if k.startswith("macs@")]
    assert macs == sorted(macs, reverse=True) and macs[-1] < macs[0]
