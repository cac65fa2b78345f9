"""bench.gpu_suite: the one prepared GPU call measures every method x backbone and the anchors, within a budget.

Run here at its tiny CPU size (32 px, batch 4, 1 warm-up and 1 timed step a loop; the end-to-end cells 2 steps);
no timing is asserted, only that every cell ran, its figures are positive and finite, and that a budget too small
for the matrix skips cells and says so.
"""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

from bench import end_to_end, gpu_suite
from bench.step_throughput import ANCHORS
from trainers.registry import BACKBONE_REGISTRY, METHOD_REGISTRY, backbone_suits

EVERY_CELL = {(b, m) for b in BACKBONE_REGISTRY.names for m in METHOD_REGISTRY.names if backbone_suits(m, b)}


def positive_finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 shared cores: spinning OpenMP threads make tiny steps 10x slower
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_the_tiny_suite_measures_every_method_x_backbone_every_anchor_and_the_input_path(
        tmp_path, ray_local, one_thread) -> None:
    doc = gpu_suite.main(["--tiny", "--out", str(tmp_path), "--budget-s", "1800"])  # no budget skips on a busy host
    saved = json.loads((tmp_path / "gpu_suite.json").read_text())
    assert saved["complete"] is True and saved["within_budget"] is True and saved["wall_s"] == doc["wall_s"]
    assert saved["settings"]["size"] == 32 and saved["settings"]["batch"] == 4 and saved["settings"]["steps"] == 1

    steps = saved["steps"]
    assert {(c["backbone"], c["method"]) for c in steps} == EVERY_CELL and len(steps) == len(EVERY_CELL)
    for cell in steps:
        assert cell["status"] == "ok", cell
        assert positive_finite(cell["median_ratio"]), cell
        assert positive_finite(cell["median_samples_per_s"]["engine"]) and positive_finite(
            cell["median_samples_per_s"]["bare"])
        assert cell["same_first_loss"] is True, cell  # the bare loop did the engine's work
        key = "anchor_steps" if cell["anchor"] else "steps"
        assert len(cell["step_seconds"]["engine"][0]) == saved["settings"][key]
    assert {(c["backbone"], c["method"]) for c in steps if c["anchor"]} == set(ANCHORS)
    assert set(saved["anchors"]) == {f"{b} {m}" for b, m in ANCHORS}
    assert all(positive_finite(r) for r in saved["anchors"].values()), saved["anchors"]

    e2e = saved["end_to_end"]
    assert e2e["status"] == "ok"
    cells = e2e["cells"]
    assert {c["method"] for c in cells} == set(METHOD_REGISTRY.names)
    assert {c["backbone"] for c in cells} == set(BACKBONE_REGISTRY.names)
    for cell in cells:
        assert cell["status"] == "ok", cell
        assert cell["results"]["streamssl"]["cold"]["samples"] == 2 * 4  # 2 steps of 4 rows from Ray Data
        assert positive_finite(cell["results"]["streamssl"]["median_ratio_vs_bare"]), cell
    assert json.loads((tmp_path / "end_to_end.json").read_text())["cells"] == cells


def test_a_budget_too_small_for_the_matrix_skips_cells_and_says_so(tmp_path) -> None:
    doc = gpu_suite.main(["--tiny", "--no-e2e", "--out", str(tmp_path), "--budget-s", "0.001"])
    saved = json.loads((tmp_path / "gpu_suite.json").read_text())
    assert saved["complete"] is False and doc["complete"] is False
    assert len(saved["steps"]) == len(EVERY_CELL)
    assert all(c["status"] == "skipped" and c["note"].startswith("budget") for c in saved["steps"])
    assert saved["end_to_end"]["status"] == "skipped"


def test_the_estimate_scales_the_median_measured_time_per_step_of_the_same_backbone() -> None:
    done = [{"status": "ok", "backbone": "resnet18", "cell_seconds": 6.0, "loop_steps": 12},
            {"status": "ok", "backbone": "resnet50", "cell_seconds": 30.0, "loop_steps": 12}]
    cell = {"backbone": "resnet18", "warmup": 2, "steps": 4, "reps": 2}
    assert gpu_suite.estimate_s(cell, done) == pytest.approx(0.5 * 2 * (2 + 8))
    assert gpu_suite.estimate_s({**cell, "backbone": "vit_tiny"}, done) == pytest.approx(1.5 * 2 * (2 + 8))
    assert gpu_suite.estimate_s(cell, []) == 0.0


def test_end_to_end_all_measures_every_method_and_every_backbone() -> None:
    args = SimpleNamespace(method=list(METHOD_REGISTRY.names), backbone=list(BACKBONE_REGISTRY.names), cells="cross")
    cells = end_to_end.cells_for(args)
    assert {m for _, m in cells} == set(METHOD_REGISTRY.names) and {b for b, _ in cells} == set(BACKBONE_REGISTRY.names)
    assert len(cells) == len(METHOD_REGISTRY) + len(BACKBONE_REGISTRY) - 1
    assert ('slimmable_resnet18', 'us3l') in cells  # the first backbone (resnet18) cannot train US3L
    assert len(end_to_end.cells_for(SimpleNamespace(**{**vars(args), "cells": "product"}))) == len(EVERY_CELL)
