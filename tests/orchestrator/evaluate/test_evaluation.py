"""evaluate_backbone: per-task top-1 and top-5 accuracies, and a task with no query rows reported as unknown instead of
a crash."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
from torch import nn

from evaluators.continual import AccuracyMatrix, continual_metrics
from orchestrator.data.ingest import SplitArrays
from orchestrator.evaluate.evaluation import evaluate_backbone
from orchestrator.plan.streams import ChunkSpec, StreamPlan
from trainers.views.augment import IMAGENET_MEAN, IMAGENET_STD

# One flat colour per class: a mean-pooling "backbone" maps each class to its own direction, so kNN is exact.
COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]


def _split(labels: list[int]) -> SplitArrays:
    images = torch.tensor([COLOURS[c] for c in labels], dtype=torch.uint8)[:, :, None, None].expand(-1, -1, 8, 8)
    return SplitArrays(images=images.contiguous(), labels=np.array(labels, dtype=np.int64),
                       domains=np.zeros(len(labels), dtype=np.int64), keys=[str(i) for i in range(len(labels))])


def test_a_task_without_query_rows_is_unknown_and_named(caplog) -> None:
    # three class-incremental tasks; the query split has no row of class 3, the only class of task 2
    chunks = [ChunkSpec(0, (0, 1), (0,), 10), ChunkSpec(1, (2,), (0,), 5), ChunkSpec(2, (3,), (0,), 5)]
    plan = StreamPlan("random_class", 0, chunks, "digest")
    bank = _split([c for c in range(4) for _ in range(5)])
    queries = _split([0, 0, 1, 2, 2, 2])
    eval_spec = {"batch_size": 8, "every_chunk": ["knn"], "knn": {"k": 3, "temperature": 0.07}}
    backbone = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
    with caplog.at_level(logging.WARNING, logger="orchestrator.evaluate.evaluation"):
        result = evaluate_backbone(backbone, bank, queries, plan, eval_spec)
    assert result["knn_top1"] == 1.0
    assert result["knn_task_acc"][:2] == [1.0, 1.0] and math.isnan(result["knn_task_acc"][2])
    (record,) = [r for r in caplog.records if r.name == "orchestrator.evaluate.evaluation"]
    assert "task 2 (chunk 2: classes [3])" in record.getMessage()

    # the driver's path: a row per chunk into the matrix, then the metrics; the unknown task is kept apart
    matrix = AccuracyMatrix(3)
    for chunk in range(3):
        matrix.record_row(chunk, result["knn_task_acc"])
    assert matrix.completed_rows == 3 and matrix.unknown_entries() == [(0, 2), (1, 2), (2, 2)]
    metrics = continual_metrics(matrix, baseline=result["knn_task_acc"])
    assert metrics["bwt"] == pytest.approx(0.0) and metrics["forgetting"] == pytest.approx(0.0)
    assert math.isnan(metrics["avg_acc"]) and math.isnan(metrics["fwt"])
    assert matrix.missing_for("avg_acc") == [(2, 2)] and matrix.missing_for("fwt") == [(1, 2)]


class _Colour(nn.Module):
    """Mean colour of the image back in 0..255 (undoing the ImageNet normalisation, rounded so the features are
    exactly the colours): cosine similarities between classes are then known by hand."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        return torch.round((images * std + mean).mean(dim=(2, 3)) * 255)


def _coloured(colours: list[tuple[int, int, int]], labels: list[int]) -> SplitArrays:
    images = torch.tensor(colours, dtype=torch.uint8)[:, :, None, None].expand(-1, -1, 4, 4)
    return SplitArrays(images=images.contiguous(), labels=np.array(labels, dtype=np.int64),
                       domains=np.zeros(len(labels), dtype=np.int64), keys=[str(i) for i in range(len(labels))])


def test_top1_and_top5_overall_and_per_task() -> None:
    # 7 classes, one colour each, 5 bank rows per class; tasks: classes (0, 1, 2), (3, 4), (5, 6)
    red, green, blue = (255, 0, 0), (0, 255, 0), (0, 0, 255)
    yellow, magenta, cyan, white = (255, 255, 0), (255, 0, 255), (0, 255, 255), (255, 255, 255)
    palette = [red, green, blue, yellow, magenta, cyan, white]
    chunks = [ChunkSpec(0, (0, 1, 2), (0,), 15), ChunkSpec(1, (3, 4), (0,), 10), ChunkSpec(2, (5, 6), (0,), 10)]
    plan = StreamPlan("random_class", 0, chunks, "digest")
    bank = _coloured([palette[c] for c in range(7) for _ in range(5)], [c for c in range(7) for _ in range(5)])
    # By hand, k=20 on a red query: 5 red rows (cos 1), 5 yellow + 5 magenta (cos 0.707), 5 white (0.577) vote,
    # so its ranking is [0, 3, 4, 6, 1] (yellow before magenta: equal scores, smaller id; green: no vote, id 1).
    queries = _coloured([red, red, red, white, green], [0, 3, 5, 6, 1])
    eval_spec = {"batch_size": 4, "every_chunk": ["knn", "linear"], "knn": {"k": 20, "temperature": 0.07},
                 "linear": {"epochs": 30}}
    result = evaluate_backbone(_Colour(), bank, queries, plan, eval_spec)
    # query 0 right; query 1 (label 3) wrong at top-1, right at top-5; query 2 (label 5) wrong at both;
    # queries 3 and 4 right (their own colour is nearest)
    assert result["knn_top1"] == pytest.approx(3 / 5) and result["knn_top5"] == pytest.approx(4 / 5)
    assert result["knn_task_acc"] == [1.0, 0.0, 0.5]
    assert result["knn_task_acc_top5"] == [1.0, 1.0, 0.5]
    for name in ("knn", "linear"):
        assert set(result) >= {f"{name}_top1", f"{name}_top5", f"{name}_task_acc", f"{name}_task_acc_top5"}
        assert result[f"{name}_top5"] >= result[f"{name}_top1"]
        assert all(t5 >= t1 for t1, t5 in zip(result[f"{name}_task_acc"], result[f"{name}_task_acc_top5"]))


def test_top5_is_one_when_the_bank_has_at_most_five_classes() -> None:
    chunks = [ChunkSpec(0, (0, 1), (0,), 10), ChunkSpec(1, (2, 3), (0,), 10)]
    plan = StreamPlan("random_class", 0, chunks, "digest")
    bank = _split([c for c in range(4) for _ in range(5)])
    queries = _split([0, 1, 2, 3, 3])
    eval_spec = {"batch_size": 8, "every_chunk": ["knn"], "knn": {"k": 1, "temperature": 0.07}}
    # every query labelled with a wrong class: top-1 is 0, top-5 still 1 (all 4 classes are ranked)
    wrong = SplitArrays(images=queries.images, labels=(queries.labels + 1) % 4, domains=queries.domains,
                        keys=queries.keys)
    result = evaluate_backbone(nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()), bank, wrong, plan, eval_spec)
    assert result["knn_top1"] == 0.0 and result["knn_task_acc"] == [0.0, 0.0]
    assert result["knn_top5"] == 1.0 and result["knn_task_acc_top5"] == [1.0, 1.0]
