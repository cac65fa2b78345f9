"""Local crops bounded in IoU against their image's global crops: scales, sizes, the band, resampling, fallbacks."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from trainers.engine.types import ViewSet
from trainers.views.augment import sample_crop_boxes
from trainers.views.crop_overlap import (
    best_iou_bound,
    box_iou,
    largest_iou,
    least_iou_bound,
    sample_overlapping_boxes,
)
from trainers.views.plan import ViewPlan, crop_boxes, make_view_set, view_plan

H = W = 64
RATIO = (3 / 4, 4 / 3)


def _global_boxes(n: int, count: int = 2, scale=(0.3, 1.0), seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.stack([sample_crop_boxes(n, H, W, scale, RATIO, generator=g) for _ in range(count)])


def _area_fraction(boxes: torch.Tensor) -> torch.Tensor:
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) / (H * W)


def test_box_iou_against_hand_computed_boxes() -> None:
    a = torch.tensor([0.0, 0.0, 2.0, 2.0])
    assert box_iou(a, torch.tensor([1.0, 1.0, 3.0, 3.0])).item() == pytest.approx(1 / 7)  # 1 / (4 + 4 - 1)
    assert box_iou(a, torch.tensor([0.0, 0.0, 1.0, 2.0])).item() == pytest.approx(0.5)
    assert box_iou(a, torch.tensor([5.0, 5.0, 6.0, 6.0])).item() == 0.0
    # largest over the global crops: the second global box contains the local one exactly
    local = torch.tensor([[[0.0, 0.0, 1.0, 1.0]]])  # [B=1, C=1, 4]
    globals_ = torch.tensor([[[2.0, 2.0, 3.0, 3.0]], [[0.0, 0.0, 2.0, 1.0]]])  # [G=2, B=1, 4]
    assert largest_iou(local, globals_).item() == pytest.approx(0.5)


def test_iou_bounds_from_the_scale_ranges() -> None:
    assert best_iou_bound((0.05, 0.14), (0.14, 1.0)) == 1.0  # the ranges meet: nested equal crops
    assert best_iou_bound((0.05, 0.3), (0.4, 1.0)) == pytest.approx(0.3 / 0.4)
    assert least_iou_bound((0.05, 0.3), (0.3, 1.0)) == 0.0
    assert least_iou_bound((0.6, 0.9), (0.7, 1.0)) == pytest.approx(0.3)
    # No sampled pair beats the upper bound, and none goes below the lower one.
    n = 4000
    globals_ = _global_boxes(n, count=1, scale=(0.7, 1.0))
    g = torch.Generator().manual_seed(1)
    local = sample_crop_boxes(n, H, W, (0.05, 0.5), RATIO, generator=g)
    iou = largest_iou(local[:, None], globals_).squeeze(1)
    assert iou.max().item() <= best_iou_bound((0.05, 0.5), (0.7, 1.0)) + 1e-6
    local = sample_crop_boxes(n, H, W, (0.6, 0.9), RATIO, generator=g)
    assert largest_iou(local[:, None], globals_).min().item() >= least_iou_bound((0.6, 0.9), (0.7, 1.0)) - 1e-6


@pytest.mark.parametrize("min_iou, max_iou", [(0.25, None), (None, 0.2), (0.1, 0.2), (0.3, 0.5)])
def test_every_local_crop_lies_in_the_band_and_in_its_scale_range(min_iou, max_iou) -> None:
    n, scale = 256, (0.05, 0.3)
    globals_ = _global_boxes(n)
    g = torch.Generator().manual_seed(2)
    boxes, fallbacks = sample_overlapping_boxes(n, H, W, scale, RATIO, globals_, min_iou, max_iou, generator=g)
    assert boxes.shape == (n, 4) and fallbacks.dtype == torch.long and fallbacks.item() == 0
    area = _area_fraction(boxes)
    assert area.min().item() >= scale[0] - 1e-5 and area.max().item() <= scale[1] + 1e-5
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= W + 1e-4).all() and (boxes[:, 3] <= H + 1e-4).all()
    iou = largest_iou(boxes[:, None], globals_).squeeze(1)
    if min_iou is not None:
        assert iou.min().item() >= min_iou
    if max_iou is not None:
        assert iou.max().item() <= max_iou


def test_resampling_turns_a_often_violated_bound_into_all_satisfying_crops() -> None:
    n, scale, min_iou = 512, (0.05, 0.3), 0.3
    globals_ = _global_boxes(n)
    g = torch.Generator().manual_seed(3)
    unconstrained = sample_crop_boxes(n, H, W, scale, RATIO, generator=g)
    violated = (largest_iou(unconstrained[:, None], globals_).squeeze(1) < min_iou).float().mean().item()
    assert violated > 0.4  # plain RandomResizedCrop misses the band for many images
    boxes, fallbacks = sample_overlapping_boxes(n, H, W, scale, RATIO, globals_, min_iou, generator=g)
    assert fallbacks.item() == 0
    assert (largest_iou(boxes[:, None], globals_).squeeze(1) >= min_iou).all()


def test_a_band_out_of_reach_falls_back_to_the_nearest_candidate_and_counts_it() -> None:
    n = 64
    globals_ = _global_boxes(n, scale=(0.9, 1.0))
    g = torch.Generator().manual_seed(4)
    # Local crops of at most 10% against global ones of at least 90%: IoU <= 0.1 / 0.9 < 0.5 for every image.
    boxes, fallbacks = sample_overlapping_boxes(n, H, W, (0.05, 0.1), RATIO, globals_, min_iou=0.5, rounds=2,
                                                generator=g)
    assert fallbacks.item() == n
    iou = largest_iou(boxes[:, None], globals_).squeeze(1)
    # The nearest candidate of 2 rounds x 8: better than a typical unconstrained crop.
    plain = largest_iou(sample_crop_boxes(n, H, W, (0.05, 0.1), RATIO, generator=g)[:, None], globals_).squeeze(1)
    assert iou.mean().item() > plain.mean().item()


def test_sampler_rejects_global_boxes_of_the_wrong_shape() -> None:
    with pytest.raises(ValueError, match=r"global_boxes must be \[G, 8, 4\]"):
        sample_overlapping_boxes(8, H, W, (0.05, 0.3), RATIO, torch.zeros(2, 4, 4), min_iou=0.1)


def test_view_set_under_an_iou_band_has_the_planned_sizes_and_counts_its_fallbacks() -> None:
    images = torch.randint(0, 256, (16, 3, H, W), dtype=torch.uint8, generator=torch.Generator().manual_seed(5))
    plan = view_plan(global_count=2, global_size=32, global_scale=(0.3, 1.0), local_count=4, local_size=16,
                     local_scale=(0.05, 0.3), min_iou=0.2, max_iou=0.6, local_loss_weight=0.6)
    views = make_view_set(images, plan, torch.Generator().manual_seed(6))
    assert [tuple(v.shape) for v in views.global_] == [(16, 3, 32, 32)] * 2
    assert [tuple(v.shape) for v in views.local] == [(16, 3, 16, 16)] * 4
    assert views.overlap_fallbacks.item() == 0 and views.local_weight == 0.6
    # Same seed, same views; an unbounded plan counts nothing and keeps its old draws.
    again = make_view_set(images, plan, torch.Generator().manual_seed(6))
    assert all(torch.equal(a, b) for a, b in zip(views.all, again.all))
    plain = make_view_set(images, view_plan(2, 32, (0.3, 1.0), 4, 16, (0.05, 0.3)), torch.Generator().manual_seed(6))
    assert plain.overlap_fallbacks is None and plain.local_weight is None
    assert isinstance(plain.map(lambda v: v * 2), ViewSet) and views.map(lambda v: v).local_weight == 0.6


@pytest.mark.parametrize("same_scales", [True, False])
def test_each_local_view_is_banded_against_its_own_images_global_crops(same_scales: bool) -> None:
    n = 128
    plan = view_plan(2, 32, (0.3, 1.0), 4, 16, (0.05, 0.3), min_iou=0.15, max_iou=0.7)
    if not same_scales:  # one local view with another scale range: drawn view by view
        plan = replace(plan, local=(*plan.local[:3], replace(plan.local[3], scale=(0.1, 0.3))))
    global_boxes, local_boxes, fallbacks = crop_boxes(plan, n, H, W, torch.Generator().manual_seed(8))
    assert len(global_boxes) == 2 and len(local_boxes) == 4 and fallbacks.item() == 0
    for config, boxes in zip(plan.local, local_boxes):
        iou = largest_iou(boxes[:, None], torch.stack(global_boxes)).squeeze(1)
        assert iou.min().item() >= 0.15 and iou.max().item() <= 0.7
        area = _area_fraction(boxes)
        assert area.min().item() >= config.scale[0] - 1e-5 and area.max().item() <= config.scale[1] + 1e-5
    for config, boxes in zip(plan.global_, global_boxes):
        assert _area_fraction(boxes).min().item() >= config.scale[0] - 1e-5


def test_view_plan_checks_its_overlap_and_weight() -> None:
    plan = view_plan(2, 32, local_count=2, local_size=16)
    with pytest.raises(ValueError, match=r"min_iou \(0.5\) must be <= max_iou \(0.2\)"):
        ViewPlan(plan.global_, plan.local, min_iou=0.5, max_iou=0.2)
    with pytest.raises(ValueError, match="local_loss_weight must be in"):
        ViewPlan(plan.global_, plan.local, local_loss_weight=1.5)
    with pytest.raises(ValueError, match="min_iou is set but the plan has no local views"):
        ViewPlan(plan.global_, (), min_iou=0.1)
    # A line without local views (views.local.methods) drops the band and the weight.
    assert view_plan(2, 32, local_count=0, min_iou=0.1, local_loss_weight=0.5).min_iou is None


@pytest.mark.parametrize("min_iou, missed", [(0.05, False), (0.9, True)])
def test_the_chunk_report_counts_the_crops_left_outside_the_band(min_iou: float, missed: bool) -> None:
    from dataclasses import asdict

    from trainers.engine.loop import LineTrainer, LoopConfig

    # Local crops of at most 10% cannot reach IoU 0.9 with global crops of at least half the image.
    plan = view_plan(2, 16, (0.5, 1.0), 2, 8, (0.05, 0.1), min_iou=min_iou, global_options={"blur_p": 0.0})
    cfg = LoopConfig(method="simclr", strategy="sequential", image_size=16, views=plan, backbone_width=4,
                     batch_size=4, method_options={"proj_hidden": 16, "proj_out": 8})
    assert LoopConfig(**asdict(cfg)).views == plan  # read back from a checkpoint's config: the band survives
    images = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(7))
    report = LineTrainer(cfg).train_chunk(0, lambda epoch, skip: [images, images], steps_per_epoch=2)
    assert report.steps == 2
    assert (report.overlap_fallbacks == 2 * 2 * 4) if missed else (report.overlap_fallbacks == 0)
