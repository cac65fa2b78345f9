"""The spec's `views` section: global and local (multi-crop) view sets and the augmentation preset.

Split from `orchestrator.spec.experiment` (which imports these into `Spec`); turned into the workers' ViewPlan by
`orchestrator.train.runner.spec_view_plan`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import Field, field_validator

from orchestrator.spec.section import Section
from trainers.registry import METHOD_REGISTRY
from trainers.views.crop_overlap import best_iou_bound, least_iou_bound


class _AugmentSpec(Section):
    """Augmentation settings of a view set; None takes the value the preset gives each view."""

    flip_p: float | None = Field(None, ge=0, le=1, description="horizontal flip probability (preset: 0.5)")
    jitter_p: float | None = Field(None, ge=0, le=1, description="colour jitter probability (preset: 0.8)")
    brightness: float | None = Field(None, ge=0, description="jitter brightness strength (preset: 0.4)")
    contrast: float | None = Field(None, ge=0, description="jitter contrast strength (preset: 0.4)")
    saturation: float | None = Field(None, ge=0, description="jitter saturation strength (preset: 0.2)")
    hue: float | None = Field(None, ge=0, le=0.5, description="jitter hue strength, in turns (preset: 0.1)")
    gray_p: float | None = Field(None, ge=0, le=1, description="grayscale probability (preset: 0.2)")
    blur_p: float | None = Field(None, ge=0, le=1, description="gaussian blur probability (symmetric: 0.5; byol: "
                                                                 "1.0 and 0.1)")
    solarize_p: float | None = Field(None, ge=0, le=1, description="solarize probability (symmetric: 0.2; byol: "
                                                                     "0.0 and 0.2)")

    @field_validator("scale", check_fields=False)
    @classmethod
    def _scale_range(cls, value: tuple[float, float]) -> tuple[float, float]:
        low, high = value
        if not 0 < low <= high <= 1:
            raise ValueError(f"scale must satisfy 0 < low <= high <= 1, got {list(value)}")
        return value

    def augment_options(self) -> dict[str, Any]:
        return self.model_dump(include=set(_AugmentSpec.model_fields), exclude_none=True)


class ViewSpec(_AugmentSpec):
    count: int = Field(2, ge=1, le=16, description="global views per image")
    size: int | None = Field(None, ge=8, description="output side; default data.image_size")
    scale: tuple[float, float] = Field((0.08, 1.0), description="random resized crop area range")


class LocalViewSpec(_AugmentSpec):
    count: int = Field(0, ge=0, le=16, description="local (multi-crop) views per image; SwAV and DINO need some")
    size: int | None = Field(None, ge=8, description="output side; default 3/7 of the global size (96 at 224)")
    scale: tuple[float, float] = Field((0.05, 0.14), description="random resized crop area range")
    methods: list[str] | None = Field(
        None, description="the methods whose lines get the local views (default: every line); lets one spec train "
                          "multi-crop methods (SwAV, DINO) beside two-view ones",
    )
    min_iou: float | None = Field(
        None, ge=0, le=1,
        description="each local crop's largest IoU over its image's global crops is at least this (some global "
                    "view shares enough of it to be a positive); crops are resampled until it holds; None: any",
    )
    max_iou: float | None = Field(
        None, ge=0, le=1,
        description="each local crop's largest IoU over its image's global crops is at most this (no global view "
                    "nearly duplicates it); None: any",
    )
    loss_weight: float | None = Field(
        None, ge=0, le=1,
        description="share of the loss from terms whose student/query view is a local crop, the global terms "
                    "getting 1 - loss_weight (SwAV, DINO, symmetric MoCo-v2); None: the method's plain mean over "
                    "its terms (with 2 global and L local views a local share of L / (L + 1), 6/7 at L = 6)",
    )


class ViewsSpec(Section):
    preset: Literal["symmetric", "byol"] = Field(
        "symmetric", description="augmentation preset: symmetric (every view alike: crop, flip 0.5, jitter 0.8, "
                                 "gray 0.2, blur 0.5, solarize 0.2) or byol (BYOL's asymmetric pair)",
    )
    global_: ViewSpec = Field(default_factory=ViewSpec, alias="global", description="global views (all methods)")
    local: LocalViewSpec = Field(default_factory=LocalViewSpec, description="local multi-crop views")


def view_problem(views: ViewsSpec, local_counts: Mapping[str, int], method_options: Mapping[str, Mapping[str, Any]],
                 sizes: tuple[int, int]) -> str | None:
    """The first thing wrong with `views` for the lines' methods, as `dotted.path: message`, or None.

    `local_counts` gives each line method's local views (`Spec.local_views_for`), `method_options` its options,
    `sizes` the global and local view sides the spec resolves.
    """
    local, g = views.local, views.global_
    unknown = sorted(set(local.methods or ()) - set(local_counts))
    if unknown:
        return f"views.local.methods: {unknown} not among lines.method {list(local_counts)}"
    if local.count and sizes[1] > sizes[0]:
        return f"views.local.size: local views ({sizes[1]} px) must not be larger than the global ones ({sizes[0]} px)"
    if local.min_iou is not None and local.max_iou is not None and local.min_iou > local.max_iou:
        return f"views.local.min_iou: {local.min_iou} must be <= views.local.max_iou ({local.max_iou})"
    best = best_iou_bound(tuple(local.scale), tuple(g.scale))
    if local.min_iou is not None and local.min_iou > best:
        return (f"views.local.min_iou: {local.min_iou} cannot be reached: a local crop of area fraction in "
                f"{list(local.scale)} and a global one in {list(g.scale)} have IoU at most {best:.3g} (min(a, g) / "
                "max(a, g)); lower it or bring the scales closer")
    least = least_iou_bound(tuple(local.scale), tuple(g.scale))
    if local.max_iou is not None and local.max_iou < least:
        return (f"views.local.max_iou: {local.max_iou} cannot be met: crops of area fraction at least "
                f"{local.scale[0]} (local) and {g.scale[0]} (global) overlap with IoU at least {least:.3g} "
                "(a + g - 1)")
    for name in ("min_iou", "max_iou", "loss_weight"):
        if getattr(local, name) is not None and not local.count:
            return f"views.local.{name}: set, but views.local.count is 0 (there are no local views)"
    if local.loss_weight is not None:
        for method, count in local_counts.items():
            if not count:
                continue
            if not METHOD_REGISTRY[method].weights_local_views:
                weighing = [r.name for r in METHOD_REGISTRY.values() if r.weights_local_views]
                return (f"views.local.loss_weight: {method} does not weigh its local-view terms (only {weighing} "
                        "do); leave it unset or give the local views to those methods (views.local.methods)")
            if method_options.get(method, {}).get("symmetric") is False:
                return (f"views.local.loss_weight: {method} with symmetric false takes no local views; set "
                        f"methods.{method}.symmetric: true")
    return None


__all__ = ["LocalViewSpec", "ViewSpec", "ViewsSpec", "view_problem"]
