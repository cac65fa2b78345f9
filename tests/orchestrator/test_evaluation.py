"""evaluate_backbone: per-task accuracies, and a task with no query rows reported as unknown instead of a crash."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
from torch import nn

from evaluators.continual import AccuracyMatrix, continual_metrics
from orchestrator.evaluation import evaluate_backbone
from orchestrator.ingest import SplitArrays
from orchestrator.streams import ChunkSpec, StreamPlan

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
    with caplog.at_level(logging.WARNING, logger="orchestrator.evaluation"):
        result = evaluate_backbone(backbone, bank, queries, plan, eval_spec)
    assert result["knn_top1"] == 1.0
    assert result["knn_task_acc"][:2] == [1.0, 1.0] and math.isnan(result["knn_task_acc"][2])
    (record,) = [r for r in caplog.records if r.name == "orchestrator.evaluation"]
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
