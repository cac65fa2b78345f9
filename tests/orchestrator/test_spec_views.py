"""The spec's `views` section: global and local view sets, presets, and view plans a method cannot consume."""

from __future__ import annotations

import pytest

from orchestrator.errors import SpecError
from orchestrator.spec import validate_spec
from tests.orchestrator.test_spec import minimal


def test_view_plan_has_global_and_local_views_with_presets() -> None:
    from orchestrator.runner import spec_view_plan

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
    from orchestrator.planner import check_labels
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
    from orchestrator.runner import spec_view_plan

    raw = {**minimal(), "lines": {"method": ["simclr", "byol"], "strategy": ["sequential"]},
           "views": {"local": {"count": 3, "size": 16, "methods": ["byol"]}}}
    spec = validate_spec(raw)
    assert len(spec_view_plan(spec, "byol").local) == 3 and spec_view_plan(spec, "simclr").local == ()
    raw["views"]["local"]["methods"] = ["dino"]
    with pytest.raises(SpecError, match=r"views.local.methods: \['dino'\] not among lines.method"):
        validate_spec(raw)
