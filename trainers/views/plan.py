"""View plans: how many global and local (multi-crop) views each image gets, their sizes, crops and augmentations.

    plan = view_plan(global_count=2, global_size=224, local_count=6, local_size=96, preset="symmetric")
    views = make_view_set(images_uint8, plan, generator)    # ViewSet(global_=[2 x [B,3,224,224]], local=[6 x 96 px])

Every view is produced batched on the images' device (`trainers.views.augment.make_views`). A preset gives each view its
augmentation probabilities; explicit settings override them for every view of a set.

Overlap: with `min_iou` / `max_iou` the global crops are drawn first and each local crop is resampled until its
largest IoU over its image's global crops lies in the band (`trainers.views.crop_overlap`); the ViewSet counts the
crops that never got there. `local_loss_weight` rides on the ViewSet to the methods that weigh local terms.

Presets:
    symmetric: every view the same: crop scale (0.08, 1), flip 0.5, colour jitter 0.8 with (0.4, 0.4, 0.2, 0.1),
        grayscale 0.2, blur 0.5 with sigma in (0.1, 2.0), solarize 0.2 (the set the critical-factors study of
        MoCo-v2+ uses for both views).
    byol: BYOL's asymmetric pair (Grill et al., 2020, table 6): the first view of each pair always blurred and
        never solarized, the second blurred with 0.1 and solarized with 0.2; jitter and grayscale as above.
        Views beyond two alternate between the two settings.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from trainers.engine.types import ViewSet
from trainers.views.augment import AugmentConfig, make_views, sample_crop_boxes
from trainers.views.crop_overlap import sample_overlapping_boxes

PRESETS = ("symmetric", "byol")
# Probabilities that differ between the two views of BYOL's pair; everything else is the symmetric set.
_BYOL_PAIR = ({"blur_p": 1.0, "solarize_p": 0.0}, {"blur_p": 0.1, "solarize_p": 0.2})
DEFAULT_LOCAL_SCALE = (0.05, 0.14)
DEFAULT_GLOBAL_SCALE = (0.08, 1.0)


def default_local_size(global_size: int) -> int:
    """96 px beside 224 px global views: 3/7 of the global side (at least 8)."""
    return max(8, round(global_size * 3 / 7))


@dataclass(frozen=True)
class ViewPlan:
    """One `AugmentConfig` per global view and per local view, and what ties the local views to the global ones.

    Attributes:
        min_iou, max_iou: the band each local crop's largest IoU over its image's global crops must lie in
            (None: open side); see `trainers.views.crop_overlap` for why the largest.
        local_loss_weight: the share of the loss from terms whose student / query view is a local crop (the
            global terms get the rest); None keeps each method's plain mean over its terms.
    """

    global_: tuple[AugmentConfig, ...]
    local: tuple[AugmentConfig, ...] = ()
    min_iou: float | None = None
    max_iou: float | None = None
    local_loss_weight: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "global_", tuple(self.global_))
        object.__setattr__(self, "local", tuple(self.local))
        if not self.global_:
            raise ValueError("a view plan needs at least one global view")
        for name in ("min_iou", "max_iou", "local_loss_weight"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value!r}")
            if value is not None and not self.local:
                raise ValueError(f"{name} is set but the plan has no local views")
        if self.min_iou is not None and self.max_iou is not None and self.min_iou > self.max_iou:
            raise ValueError(f"min_iou ({self.min_iou}) must be <= max_iou ({self.max_iou})")
        for kind, group in (("global", self.global_), ("local", self.local)):
            if len({c.size for c in group}) > 1:
                raise ValueError(f"{kind} views must share one size, got {sorted({c.size for c in group})}")
        if self.local and self.local[0].size > self.global_[0].size:
            raise ValueError(f"local views ({self.local[0].size} px) must not be larger than the global ones "
                             f"({self.global_[0].size} px)")

    @property
    def global_size(self) -> int:
        return self.global_[0].size

    @property
    def local_size(self) -> int | None:
        return self.local[0].size if self.local else None

    @property
    def bounds_overlap(self) -> bool:
        return self.min_iou is not None or self.max_iou is not None


def preset_settings(preset: str, view: int) -> dict[str, float]:
    """The augmentation probabilities preset `preset` gives the `view`-th view of a set."""
    if preset not in PRESETS:
        raise ValueError(f"view preset must be one of {PRESETS}, got {preset!r}")
    if preset == "byol":
        return dict(_BYOL_PAIR[view % 2])
    return {}


def _group(count: int, size: int, scale: tuple[float, float], preset: str,
           overrides: Mapping[str, Any]) -> tuple[AugmentConfig, ...]:
    extra = {k: (tuple(v) if isinstance(v, list) else v) for k, v in overrides.items() if v is not None}
    return tuple(AugmentConfig(size=size, scale=tuple(scale), **{**preset_settings(preset, i), **extra})
                 for i in range(count))


def view_plan(
    global_count: int = 2,
    global_size: int = 32,
    global_scale: tuple[float, float] = DEFAULT_GLOBAL_SCALE,
    local_count: int = 0,
    local_size: int | None = None,
    local_scale: tuple[float, float] = DEFAULT_LOCAL_SCALE,
    preset: str = "symmetric",
    global_options: Mapping[str, Any] | None = None,
    local_options: Mapping[str, Any] | None = None,
    min_iou: float | None = None,
    max_iou: float | None = None,
    local_loss_weight: float | None = None,
) -> ViewPlan:
    """A ViewPlan from counts, sizes and scales; `*_options` (AugmentConfig fields) override the preset; the
    overlap band and the local loss weight apply only when there are local views (a line without them drops
    them, as `views.local.methods` may ask)."""
    if global_count < 1 or local_count < 0:
        raise ValueError(f"need global_count >= 1 and local_count >= 0, got {global_count} and {local_count}")
    local_size = local_size or default_local_size(global_size)
    # Local crops always get the symmetric probabilities: the asymmetric pair is defined for global views.
    local = _group(local_count, local_size, local_scale, "symmetric", local_options or {})
    ties = dict(min_iou=min_iou, max_iou=max_iou, local_loss_weight=local_loss_weight) if local else {}
    return ViewPlan(_group(global_count, global_size, global_scale, preset, global_options or {}), local, **ties)


def make_view_set(images: Tensor, plan: ViewPlan, generator: torch.Generator | None = None) -> ViewSet:
    """The views of uint8 `[B, 3, H, W]` images under `plan`, on the images' device."""
    if not plan.bounds_overlap:
        global_ = make_views(images, plan.global_, generator=generator)
        local = make_views(images, plan.local, generator=generator) if plan.local else []
        return ViewSet(global_, local, local_weight=plan.local_loss_weight)
    # The local crops depend on where the global ones are, so every box is drawn before any view is made.
    global_boxes, local_boxes, fallbacks = crop_boxes(plan, images.shape[0], *images.shape[2:], generator=generator,
                                                      device=images.device)
    global_ = make_views(images, plan.global_, generator=generator, boxes=global_boxes)
    local = make_views(images, plan.local, generator=generator, boxes=local_boxes)
    return ViewSet(global_, local, local_weight=plan.local_loss_weight, overlap_fallbacks=fallbacks)


def crop_boxes(plan: ViewPlan, b: int, h: int, w: int, generator: torch.Generator | None = None,
               device: torch.device | str | None = None) -> tuple[list[Tensor], list[Tensor], Tensor]:
    """Crop boxes `[b, 4]` of every global and every local view of `b` images of `h` x `w` under `plan`, the
    local ones inside the plan's IoU band (`sample_overlapping_boxes`), and how many local crops missed it."""
    global_boxes = [sample_crop_boxes(b, h, w, c.scale, c.ratio, generator=generator, device=device)
                    for c in plan.global_]
    stacked = torch.stack(global_boxes)
    if len({(c.scale, c.ratio) for c in plan.local}) == 1:
        # The usual case: every local view of the batch in one draw (rows view-major), so a batch costs at most
        # one resampling loop and its few host syncs, not one per local view.
        c, n = plan.local[0], len(plan.local)
        boxes, fallbacks = sample_overlapping_boxes(b * n, h, w, c.scale, c.ratio, stacked.repeat(1, n, 1),
                                                    plan.min_iou, plan.max_iou, generator=generator, device=device)
        return global_boxes, list(boxes.split(b)), fallbacks
    local_boxes, fallbacks = [], torch.zeros((), dtype=torch.long, device=stacked.device)
    for c in plan.local:
        boxes, missed = sample_overlapping_boxes(b, h, w, c.scale, c.ratio, stacked, plan.min_iou, plan.max_iou,
                                                 generator=generator, device=device)
        local_boxes.append(boxes)
        fallbacks = fallbacks + missed
    return global_boxes, local_boxes, fallbacks


def with_size(plan: ViewPlan, global_size: int) -> ViewPlan:
    """The plan with its global views at `global_size` (benchmarks sweep sizes)."""
    return replace(plan, global_=tuple(replace(c, size=global_size) for c in plan.global_))


__all__ = ["PRESETS", "ViewPlan", "crop_boxes", "default_local_size", "make_view_set", "preset_settings", "view_plan",
           "with_size"]
