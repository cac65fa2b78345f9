"""COCO-style average precision of boxes and instance masks, computed by pycocotools on in-memory annotations.

Usage::

    from evaluators.detection_ap import detection_ap
    # per image, torchvision's detection format (what Faster/Mask R-CNN return in eval mode, and what they train on)
    preds = [{"boxes": FloatTensor[N, 4] xyxy, "labels": Int64Tensor[N], "scores": FloatTensor[N],
              "masks": uint8/bool [N, H, W] or float [N, 1, H, W] probabilities (segm only)}, ...]
    targets = [{"boxes": ..., "labels": ..., "masks": ... (segm only), "iscrowd": optional [N]}, ...]
    detection_ap(preds, targets, iou_type="bbox")   # {"ap": .., "ap50": .., "ap75": ..}
    detection_ap(preds, targets, iou_type="segm")   # the same from mask IoU

Why pycocotools: it is the reference implementation the detection and segmentation numbers of the papers come from
(the COCO and VOC-as-COCO tables of MoCo, BYOL, DINO ... are produced by it through detectron2 or torchvision's
references), and torchmetrics' ``MeanAveragePrecision`` itself delegates to pycocotools or faster_coco_eval.

What the numbers are (COCO's rules, kept as they are so they compare with published tables):

* ``ap``: precision averaged over 101 recall points (0, 0.01, ..., 1; at each point the highest precision at that
  recall or above: the precision envelope), over the 10 IoU thresholds 0.50:0.05:0.95, then over classes;
  ``ap50`` and ``ap75`` at one threshold. At most ``max_detections`` per image count (highest scores first).
* A class counts only where the ground truth has an object of it: predictions of a class absent from every target
  are left out, not scored as false positives (COCO's convention). Images without predictions, and images without
  ground truth (whose predictions are false positives of the classes present elsewhere), are fine.
* ``iscrowd`` objects in a target are regions that neither reward nor punish a detection (COCO's crowd rule; VOC's
  ``difficult`` objects can be passed this way to be ignored, with the difference that crowd IoU divides by the
  detection's own area).
* Masks: a float mask (Mask R-CNN's ``[N, 1, H, W]`` probabilities) is binarised at 0.5, as torchvision's references do.

Raises ValueError when the lists differ in length, a tensor has the wrong shape, or the targets hold no object at all
(AP is undefined there).
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import Tensor

__all__ = ["detection_ap", "encode_masks"]


def encode_masks(masks: Tensor) -> list[dict]:
    """Binary masks ``[N, H, W]`` (or float ``[N, 1, H, W]``, thresholded at 0.5) as COCO compressed RLEs."""
    if masks.ndim == 4 and masks.shape[1] == 1:
        masks = masks[:, 0]
    if masks.ndim != 3:
        raise ValueError(f"masks must be [N, H, W] or [N, 1, H, W], got shape {tuple(masks.shape)}")
    binary = (masks > 0.5) if masks.is_floating_point() else (masks != 0)
    array = np.asfortranarray(binary.detach().cpu().numpy().astype(np.uint8).transpose(1, 2, 0))
    return mask_utils.encode(array) if len(masks) else []


def _as_numpy(value: Tensor | np.ndarray | Sequence, dtype: type, what: str) -> np.ndarray:
    if isinstance(value, Tensor):
        value = value.detach().cpu().numpy()
    try:
        return np.asarray(value, dtype=dtype)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what}: {exc}") from None


def _objects(entry: Mapping[str, Tensor], where: str, iou_type: str, scored: bool) -> list[dict]:
    """One image's objects as COCO annotation dicts (without ids), checked for shape."""
    boxes = _as_numpy(entry["boxes"], np.float64, f"{where} boxes")
    if boxes.size % 4:
        raise ValueError(f"{where}: boxes must be [N, 4] xyxy, got shape {boxes.shape}")
    boxes = boxes.reshape(-1, 4)
    labels = _as_numpy(entry["labels"], np.int64, f"{where} labels").reshape(-1)
    n = len(boxes)
    if len(labels) != n:
        raise ValueError(f"{where}: {n} boxes but {len(labels)} labels")
    scores = _as_numpy(entry["scores"], np.float64, f"{where} scores").reshape(-1) if scored else np.ones(n)
    if len(scores) != n:
        raise ValueError(f"{where}: {n} boxes but {len(scores)} scores")
    crowd = entry.get("iscrowd") if not scored else None
    crowd = np.zeros(n, dtype=np.int64) if crowd is None else _as_numpy(crowd, np.int64, f"{where} iscrowd").reshape(-1)
    if len(crowd) != n:
        raise ValueError(f"{where}: {n} boxes but {len(crowd)} iscrowd flags")
    rles: list[dict] | None = None
    if iou_type == "segm":
        if "masks" not in entry:
            raise ValueError(f"{where}: iou_type 'segm' needs 'masks'")
        rles = encode_masks(torch.as_tensor(entry["masks"]))
        if len(rles) != n:
            raise ValueError(f"{where}: {n} boxes but {len(rles)} masks")
    out = []
    for i in range(n):
        x0, y0, x1, y1 = boxes[i]
        if rles is not None:  # mask IoU: area and box are the mask's
            rle = rles[i]
            ann = {"segmentation": rle, "area": float(mask_utils.area(rle)), "bbox": mask_utils.toBbox(rle).tolist()}
        else:
            w, h = max(x1 - x0, 0.0), max(y1 - y0, 0.0)
            ann = {"bbox": [float(x0), float(y0), float(w), float(h)], "area": float(w * h)}
        ann.update(category_id=int(labels[i]), iscrowd=int(crowd[i]), score=float(scores[i]))
        out.append(ann)
    return out


def _coco(images: list[dict], categories: list[int], annotations: list[dict]) -> COCO:
    coco = COCO()
    coco.dataset = {"images": images, "categories": [{"id": c} for c in categories], "annotations": annotations}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        coco.createIndex()
    return coco


def _mean_defined(precision: np.ndarray) -> float:
    """Mean of the entries pycocotools filled in (-1 marks a class without ground truth)."""
    defined = precision[precision > -1]
    return float(defined.mean()) if defined.size else float("nan")


def detection_ap(
    predictions: Sequence[Mapping[str, Tensor]],
    targets: Sequence[Mapping[str, Tensor]],
    iou_type: Literal["bbox", "segm"] = "bbox",
    *,
    max_detections: int = 100,
) -> dict[str, float]:
    """COCO AP, AP50 and AP75 of `predictions` against `targets` (one dict each per image, same order).

    Returns ``{"ap", "ap50", "ap75"}`` as floats in [0, 1]. See the module docstring for the rules.
    """
    if iou_type not in ("bbox", "segm"):
        raise ValueError(f"iou_type must be 'bbox' or 'segm', got {iou_type!r}")
    if len(predictions) != len(targets):
        raise ValueError(f"{len(predictions)} predictions but {len(targets)} targets: one dict each per image")
    if max_detections < 1:
        raise ValueError(f"max_detections must be >= 1, got {max_detections}")
    images, gts, dts = [], [], []
    for i, (pred, target) in enumerate(zip(predictions, targets)):
        image_id = i + 1
        height, width = _image_size(pred, target, iou_type)
        images.append({"id": image_id, "height": height, "width": width})
        for ann in _objects(target, f"target {i}", iou_type, scored=False):
            ann.pop("score")
            gts.append({**ann, "image_id": image_id, "id": len(gts) + 1})  # ids from 1: pycocotools reads 0 as "none"
        for ann in _objects(pred, f"prediction {i}", iou_type, scored=True):
            dts.append({**ann, "image_id": image_id, "id": len(dts) + 1})
    if not gts:
        raise ValueError("the targets hold no object: AP is undefined")
    categories = sorted({a["category_id"] for a in gts} | {a["category_id"] for a in dts})
    coco_gt, coco_dt = _coco(images, categories, gts), _coco(images, categories, dts)
    evaluator = COCOeval(coco_gt, coco_dt, iouType=iou_type)
    evaluator.params.maxDets = [1, 10, max_detections]
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator.evaluate()
        evaluator.accumulate()
    # precision: [IoU threshold, recall point, class, area range, max dets]; area range 0 = all, max dets -1 = ours
    precision = evaluator.eval["precision"][:, :, :, 0, -1]
    thresholds = evaluator.params.iouThrs
    at = {name: int(np.argmin(np.abs(thresholds - t))) for name, t in (("ap50", 0.5), ("ap75", 0.75))}
    return {
        "ap": _mean_defined(precision),
        "ap50": _mean_defined(precision[at["ap50"]]),
        "ap75": _mean_defined(precision[at["ap75"]]),
    }


def _image_size(pred: Mapping[str, Tensor], target: Mapping[str, Tensor], iou_type: str) -> tuple[int, int]:
    """(height, width) from the masks for segm (and they must agree); boxes alone need no size."""
    if iou_type != "segm":
        return 0, 0
    sizes = {tuple(torch.as_tensor(d["masks"]).shape[-2:]) for d in (pred, target) if "masks" in d}
    if len(sizes) > 1:
        raise ValueError(f"prediction and target masks differ in size: {sorted(sizes)}")
    return sizes.pop() if sizes else (0, 0)
