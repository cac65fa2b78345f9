"""The spec's `views` section: global and local view sets, presets, and view plans a method cannot consume."""

from __future__ import annotations

import pytest

from orchestrator.errors import SpecError
from orchestrator.spec.experiment import validate_spec
from tests.orchestrator.spec.test_spec import minimal


def test_view_plan_has_global_and_local_views_with_presets() -> None:
    from orchestrator.train.runner import spec_view_plan

    raw = {**minimal(), "data": {"url": "memory://x", "image_size": 64},
           "views": {"preset": "byol", "global": {"count": 2, "scale": [0.2, 1.0]},
                     "local": {"count": 4, "size": 24, "scale": [0.05, 0.2]}}}
    plan = spec_view_plan(validate_spec(raw))
    assert [c.size for c in plan.global_] == [64, 64] and [c.size for c in plan.local] == [24] * 4
    assert plan.global_[0].scale == (0.2, 1.0) and plan.local[0].scale == (0.05, 0.2)
    # BYOL's asymmetric pair: the first view always blurred and never solarized, the second rarely blurred.
    assert (plan.global_[0].blur_p, plan.global_[0].solarize_p) == (1.0, 0.0)
    assert (plan.global_[1].blur_p, plan.global_[1].solarize_p) == (0.1, 0.2)
    # An explicit setting overrides the preset for every view of its set.
    raw["views"]["global"]["solarize_p"] = 0.5
    plan = spec_view_plan(validate_spec(raw))
    assert [c.solarize_p for c in plan.global_] == [0.5, 0.5]
    symmetric = spec_view_plan(validate_spec(minimal()))
    first = symmetric.global_[0]
    assert (first.scale, first.flip_p, first.jitter_p, first.brightness, first.contrast, first.saturation, first.hue,
            first.gray_p, first.blur_p, first.solarize_p) == ((0.08, 1.0), 0.5, 0.8, 0.4, 0.4, 0.2, 0.1, 0.2, 0.5, 0.2)
    assert symmetric.local == ()
    # Local views default to 3/7 of the global side (96 at 224).
    raw = {**minimal(), "data": {"url": "memory://x", "image_size": 224}, "views": {"local": {"count": 2}}}
    assert spec_view_plan(validate_spec(raw)).local_size == 96


@pytest.mark.parametrize("views, path, says", [
    ({"local": {"count": 2, "size": 64}}, "views.local.size", "must not be larger than the global ones"),
    ({"local": {"count": 2, "scale": [0.5, 0.2]}}, "views.local.scale", "0 < low <= high <= 1"),
    ({"global": {"blur_p": 1.5}}, "views.global.blur_p", "less than or equal to 1"),
    ({"preset": "simclr_v1"}, "views.preset", "symmetric"),
    ({"global": {"count": 1}}, "views.global.count", "simclr compares 2 views"),
])
def test_view_plans_a_method_cannot_consume_are_spec_errors(views: dict, path: str, says: str) -> None:
    raw = {**minimal(), "data": {"url": "memory://x", "image_size": 32}, "views": views}
    with pytest.raises(SpecError) as info:
        validate_spec(raw)
    assert path in str(info.value) and says in str(info.value), str(info.value)


def test_methods_that_need_local_views_or_labels_are_checked_before_ray(synthetic_url: str) -> None:
    from orchestrator.plan.planner import check_labels
    from trainers.registry import METHOD_REGISTRY

    for record in METHOD_REGISTRY.values():
        if record.needs_local_views:
            raw = {**minimal(), "lines": {"method": [record.name], "strategy": ["sequential"]}}
            with pytest.raises(SpecError, match="views.local.count must be >= 1"):
                validate_spec(raw)
        if record.needs_labels:
            spec = validate_spec({**minimal(), "lines": {"method": [record.name], "strategy": ["sequential"]}})
            import numpy as np

            with pytest.raises(SpecError, match=f"lines.method: {record.name} trains on labels, but 2 of 3 rows"):
                check_labels(spec, np.array([3, -1, -1]))


def test_local_views_can_go_to_some_methods_only() -> None:
    from orchestrator.train.runner import spec_view_plan

    raw = {**minimal(), "lines": {"method": ["simclr", "byol"], "strategy": ["sequential"]},
           "views": {"local": {"count": 3, "size": 16, "methods": ["byol"]}}}
    spec = validate_spec(raw)
    assert len(spec_view_plan(spec, "byol").local) == 3 and spec_view_plan(spec, "simclr").local == ()
    raw["views"]["local"]["methods"] = ["dino"]
    with pytest.raises(SpecError, match=r"views.local.methods: \['dino'\] not among lines.method"):
        validate_spec(raw)


def _multi_crop(method: str = "dino", **local) -> dict:
    return {**minimal(), "data": {"url": "memory://x", "image_size": 64},
            "lines": {"method": [method], "strategy": ["sequential"]},
            "views": {"global": {"scale": [0.3, 1.0]},
                      "local": {"count": 6, "size": 32, "scale": [0.05, 0.3], **local}}}


def test_overlap_band_and_local_loss_weight_reach_the_view_plan() -> None:
    from orchestrator.train.runner import spec_view_plan

    spec = validate_spec(_multi_crop(min_iou=0.1, max_iou=0.8, loss_weight=0.6))
    plan = spec_view_plan(spec, "dino")
    assert (plan.min_iou, plan.max_iou, plan.local_loss_weight) == (0.1, 0.8, 0.6)
    unset = spec_view_plan(validate_spec(_multi_crop()), "dino")
    assert (unset.min_iou, unset.max_iou, unset.local_loss_weight) == (None, None, None)
    # A line whose method gets no local views (views.local.methods) gets neither band nor weight.
    raw = _multi_crop(min_iou=0.1, methods=["dino"])
    raw["lines"]["method"] = ["dino", "simclr"]
    assert spec_view_plan(validate_spec(raw), "simclr").min_iou is None


@pytest.mark.parametrize("local, path, says", [
    ({"min_iou": 0.6, "max_iou": 0.4}, "views.local.min_iou", "must be <= views.local.max_iou (0.4)"),
    ({"min_iou": -0.1}, "views.local.min_iou", "greater than or equal to 0"),
    ({"max_iou": 1.2}, "views.local.max_iou", "less than or equal to 1"),
    ({"loss_weight": 1.5}, "views.local.loss_weight", "less than or equal to 1"),
    # local crops of at most 5% against global ones of at least 30%: IoU <= 0.05 / 0.3
    ({"scale": [0.01, 0.05], "min_iou": 0.2}, "views.local.min_iou", "IoU at most 0.167"),
    ({"scale": [0.8, 0.9], "max_iou": 0.05}, "views.local.max_iou", "IoU at least 0.1"),
    ({"count": 0, "min_iou": 0.1}, "views.local.min_iou", "views.local.count is 0"),
])
def test_infeasible_or_invalid_overlap_and_weight_are_spec_errors(local: dict, path: str, says: str) -> None:
    raw = _multi_crop(method="simclr", **local)
    with pytest.raises(SpecError) as info:
        validate_spec(raw)
    assert f"{path}: " in str(info.value) and says in str(info.value), str(info.value)


def test_loss_weight_needs_local_views_and_a_method_that_weighs_them() -> None:
    with pytest.raises(SpecError, match=r"views.local.loss_weight: set, but views.local.count is 0"):
        validate_spec({**_multi_crop(method="simclr", loss_weight=0.6, count=0)})
    with pytest.raises(SpecError, match=r"views.local.loss_weight: simclr does not weigh its local-view terms"):
        validate_spec(_multi_crop(method="simclr", loss_weight=0.6))
    with pytest.raises(SpecError, match=r"views.local.loss_weight: moco_v2 with symmetric false takes no local"):
        validate_spec(_multi_crop(method="moco_v2", loss_weight=0.6))
    for method in ("swav", "dino"):
        assert validate_spec(_multi_crop(method=method, loss_weight=0.6)).views.local.loss_weight == 0.6
    raw = {**_multi_crop(method="moco_v2", loss_weight=0.6), "methods": {"moco_v2": {"symmetric": True}}}
    assert validate_spec(raw).views.local.loss_weight == 0.6
    # Local views only for dino: simclr's lines never see the weight.
    raw = _multi_crop(loss_weight=0.6, methods=["dino"])
    raw["lines"]["method"] = ["dino", "simclr"]
    assert validate_spec(raw).views.local.loss_weight == 0.6


def test_a_vit_patch_must_divide_the_local_views_too() -> None:
    raw = {**_multi_crop(), "backbone": {"name": "vit_tiny", "patch_size": 8}}
    raw["views"]["local"]["size"] = 28
    with pytest.raises(SpecError, match=r"backbone.patch_size: 8 does not divide the image side 28 px .*"
                                        r"views.local.size 28"):
        validate_spec(raw)
    raw["views"]["local"]["size"] = 24
    assert validate_spec(raw).local_view_size == 24


def test_an_unset_overlap_band_keeps_the_plan_identity_and_a_set_one_changes_it() -> None:
    from orchestrator.spec.params import flatten, identity_digest

    base = {**minimal(), "data": {"url": "memory://x", "image_size": 64}, "views": {"local": {"count": 2, "size": 24}}}
    plain = validate_spec(base)
    spelled = validate_spec({**base, "views": {"local": {"count": 2, "size": 24, "min_iou": None, "loss_weight": None}}})
    banded = validate_spec({**base, "views": {"local": {"count": 2, "size": 24, "min_iou": 0.01}}})
    assert identity_digest(plain) == identity_digest(spelled) != identity_digest(banded)
    # The params keep the keys either way, so runs with and without a band line up in MLflow's compare view.
    assert flatten(plain)["views.local.min_iou"] == "None" and flatten(banded)["views.local.min_iou"] == "0.01"
