"""Local crops whose overlap with their image's global crops lies in a band of IoU, by batched resampling.

    boxes = [sample_crop_boxes(b, h, w, g.scale, g.ratio, generator=gen) for g in plan.global_]
    local, fallbacks = sample_overlapping_boxes(b, h, w, (0.05, 0.3), (3 / 4, 4 / 3), torch.stack(boxes),
                                                min_iou=0.1, max_iou=None, generator=gen)

The constraint is on the local crop's *largest* IoU over its image's global crops: `min_iou` asks that some
global crop (a teacher view in DINO, a key in MoCo, an assigned view in SwAV) share enough of the local crop's
content for the pair to be a positive; `max_iou` that none of them nearly duplicates it (IoU at most `max_iou`
with every global crop), so the local view still adds a different part of the image. Bounding the largest
IoU expresses both with one number per crop; bounding the smallest would force a local crop to overlap every
global crop, which two far-apart global crops can make impossible.

Sampling: every still-failing image draws `candidates` crop boxes at once (the whole batch in one call), keeps
the first that satisfies the bounds, and the images left failing draw again, for at most `rounds` rounds. An
image that never succeeds takes the candidate nearest to the band it has seen, and is counted.
"""

from __future__ import annotations

import torch
from torch import Tensor

from trainers.views.augment import sample_crop_boxes

OVERLAP_CANDIDATES = 8
OVERLAP_ROUNDS = 10


def box_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU of boxes `(x1, y1, x2, y2)` `[..., 4]`, broadcast between `a` and `b` -> `[...]`."""
    width = (torch.minimum(a[..., 2], b[..., 2]) - torch.maximum(a[..., 0], b[..., 0])).clamp(min=0)
    height = (torch.minimum(a[..., 3], b[..., 3]) - torch.maximum(a[..., 1], b[..., 1])).clamp(min=0)
    inter = width * height
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    return inter / (area_a + area_b - inter)


def largest_iou(local: Tensor, global_boxes: Tensor) -> Tensor:
    """Each local box's largest IoU over its image's global boxes: `local` `[B, ..., 4]`, `global_boxes`
    `[G, B, 4]` -> `[B, ...]`."""
    extra = local.dim() - 2  # candidate dimensions between the batch and the coordinates
    g = global_boxes.view(global_boxes.shape[0], global_boxes.shape[1], *([1] * extra), 4)
    return box_iou(local.unsqueeze(0), g).amax(dim=0)


def distance_to_band(iou: Tensor, min_iou: float | None, max_iou: float | None) -> Tensor:
    """How far `iou` lies outside [min_iou, max_iou] (0 inside; None is an open side)."""
    gap = torch.zeros_like(iou)
    if min_iou is not None:
        gap = torch.maximum(gap, min_iou - iou)
    if max_iou is not None:
        gap = torch.maximum(gap, iou - max_iou)
    return gap


def best_iou_bound(local_scale: tuple[float, float], global_scale: tuple[float, float]) -> float:
    """An upper bound on the IoU of a local crop with a global crop, from their area ranges (fractions of the
    image): IoU = I / (a + g - I) <= min(a, g) / max(a, g) since I <= min(a, g), so the best pair is the closest
    areas: 1 when the ranges meet, else the ratio of the nearest ends. Aspect ratios only lower the IoU (equal
    aspects nest exactly), so the bound is safe whatever the ratio ranges are."""
    (la, lb), (ga, gb) = local_scale, global_scale
    if lb < ga:
        return lb / ga
    if gb < la:
        return gb / la
    return 1.0


def least_iou_bound(local_scale: tuple[float, float], global_scale: tuple[float, float]) -> float:
    """A lower bound on the IoU of a local crop with any global crop: both lie in the image (area 1), so
    I >= a + g - 1 and the union is at most 1, hence IoU >= a + g - 1 (0 when the crops can be disjoint)."""
    return max(0.0, local_scale[0] + global_scale[0] - 1.0)


def sample_overlapping_boxes(
    n: int,
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    global_boxes: Tensor,
    min_iou: float | None = None,
    max_iou: float | None = None,
    *,
    candidates: int = OVERLAP_CANDIDATES,
    rounds: int = OVERLAP_ROUNDS,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor]:
    """`n` RandomResizedCrop boxes (see `sample_crop_boxes`) whose largest IoU with `global_boxes` `[G, n, 4]`
    (each image's global crops) lies in [min_iou, max_iou].

    Returns:
        float32 boxes `[n, 4]`, and an int64 scalar: how many images got no box inside the band within `rounds`
        rounds (each of those takes its nearest candidate).
    """
    if global_boxes.dim() != 3 or global_boxes.shape[1:] != (n, 4):
        raise ValueError(f"global_boxes must be [G, {n}, 4] (each image's global crops), got "
                         f"{tuple(global_boxes.shape)}")
    if candidates < 1 or rounds < 1:
        raise ValueError(f"candidates and rounds must be >= 1, got {candidates} and {rounds}")
    device = global_boxes.device if device is None else device
    global_boxes = global_boxes.to(device)
    if min_iou is None and max_iou is None:
        boxes = sample_crop_boxes(n, height, width, scale, ratio, generator=generator, device=device)
        return boxes, torch.zeros((), dtype=torch.long, device=device)
    boxes = torch.zeros(n, 4, device=device)
    gap = torch.full((n,), float("inf"), device=device)
    pending = torch.arange(n, device=device)
    for _ in range(rounds):
        drawn = sample_crop_boxes(len(pending) * candidates, height, width, scale, ratio, generator=generator,
                                  device=device).view(len(pending), candidates, 4)
        iou = largest_iou(drawn, global_boxes[:, pending])
        miss = distance_to_band(iou, min_iou, max_iou)  # [pending, candidates]
        # argmin returns the first minimal index: the first candidate inside the band when there is one.
        nearest = miss.argmin(dim=1)
        nearest_gap = miss.gather(1, nearest[:, None]).squeeze(1)
        better = nearest_gap < gap[pending]
        chosen = drawn[torch.arange(len(pending), device=device), nearest]
        boxes[pending] = torch.where(better[:, None], chosen, boxes[pending])
        gap[pending] = torch.minimum(nearest_gap, gap[pending])
        pending = pending[gap[pending] > 0]
        if len(pending) == 0:  # one small sync a round: stop as soon as every image has its crop
            break
    return boxes, (gap > 0).sum()


__all__ = ["OVERLAP_CANDIDATES", "OVERLAP_ROUNDS", "best_iou_bound", "box_iou", "distance_to_band",
           "largest_iou", "least_iou_bound", "sample_overlapping_boxes"]
