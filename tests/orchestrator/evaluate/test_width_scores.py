"""width_scores: a slimmable backbone scored at every width of eval.widths with the every-chunk protocols (kNN the
same number as evaluators.slimmable.evaluate_widths gives), params and MACs per width, under MLflow-valid names;
the backbone comes back as it was."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from mlflow.utils.validation import _validate_metric_name

from evaluators.slimmable import DEFAULT_WIDTHS, evaluate_widths
from orchestrator.data.ingest import SplitArrays
from orchestrator.evaluate.evaluation import calibration_sample, width_metric, width_scores
from trainers.backbones import build_backbone

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _split(n: int, seed: int) -> SplitArrays:
    """Two classes told apart by brightness: dark and bright noise images."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    base = torch.where(labels[:, None, None, None] == 1, 170, 40)
    images = (base + torch.randint(0, 60, (n, 3, 8, 8), generator=g)).to(torch.uint8)
    return SplitArrays(images=images, labels=labels.numpy().astype(np.int64), domains=np.zeros(n, dtype=np.int64),
                       keys=[str(i) for i in range(n)])


def _net():
    torch.manual_seed(0)
    return build_backbone("slimmable_resnet18", image_size=8, width=4).eval()


def test_width_metric_names_are_valid_mlflow_keys() -> None:
    names = [width_metric(m, w) for w in DEFAULT_WIDTHS for m in ("knn_top1", "linear_top1", "params", "macs")]
    assert names[:4] == ["knn_top1_w1.0", "linear_top1_w1.0", "params_w1.0", "macs_w1.0"]
    assert "knn_top1_w0.25" in names and len(set(names)) == len(names)
    for name in names:
        _validate_metric_name(name)  # raises on a character MLflow refuses
    with pytest.raises(Exception, match="Names may only contain"):
        _validate_metric_name("knn_top1@w0.5")  # why evaluators.slimmable's `@` is not used as is


def test_every_width_scored_as_evaluate_widths_scores_it_and_the_backbone_restored() -> None:
    net, bank, queries = _net(), _split(24, 1), _split(12, 2)
    eval_spec = {"batch_size": 8, "every_chunk": ["knn", "linear"], "knn": {"k": 5, "temperature": 0.1},
                 "linear": {"epochs": 5}, "widths": [1.0, 0.5, 0.25]}
    buffers = {k: v.clone() for k, v in net.named_buffers()}
    scores = width_scores(net, bank, queries, eval_spec, seed=3)
    assert sorted(scores) == sorted(width_metric(m, w) for w in (1.0, 0.5, 0.25)
                                    for m in ("knn_top1", "linear_top1", "params", "macs"))
    assert all(torch.equal(buffers[k], v) for k, v in net.named_buffers())
    assert net.current_width == 1.0 and not net.training

    reference = evaluate_widths(net, calibration_sample(bank, 3), lambda: bank.batches(8), lambda: queries.batches(8),
                                widths=(1.0, 0.5, 0.25), k=5, temperature=0.1, calibration_batch=8)
    for width in (1.0, 0.5, 0.25):
        for metric in ("knn_top1", "params", "macs"):
            assert scores[width_metric(metric, width)] == reference[f"{metric}@w{width}"], (metric, width)
        assert 0.0 <= scores[width_metric("linear_top1", width)] <= 1.0
    assert scores["params_w0.25"] < scores["params_w0.5"] < scores["params_w1.0"]
    assert scores["macs_w0.25"] < scores["macs_w0.5"] < scores["macs_w1.0"]
    assert scores["knn_top1_w1.0"] > 0.9  # brightness separates the classes


def test_no_widths_given_means_the_evaluators_default_widths() -> None:
    net, bank = _net(), _split(6, 1)
    scores = width_scores(net, bank, bank, {"batch_size": 8, "every_chunk": ["knn"], "knn": {"k": 3}})
    assert [k for k in scores if k.startswith("knn_top1")] == [width_metric("knn_top1", w) for w in DEFAULT_WIDTHS]


def test_the_calibration_sample_is_seeded_and_needs_two_rows() -> None:
    bank = _split(40, 1)
    assert torch.equal(calibration_sample(bank, 7, rows=10), calibration_sample(bank, 7, rows=10))
    assert not torch.equal(calibration_sample(bank, 7, rows=10), calibration_sample(bank, 8, rows=10))
    assert calibration_sample(bank, 0).shape[0] == 40  # a bank smaller than the sample: every row
    with pytest.raises(ValueError, match="at least 2 bank rows"):
        calibration_sample(_split(1, 1), 0)
