"""COCO AP of boxes and masks on hand-built predictions, against values computed by hand in the comments.

Reminders for the hand computations (COCO's rules): 10 IoU thresholds 0.50, 0.55, ..., 0.95; at each, precision is
read at 101 recall points r = 0, 0.01, ..., 1 from the precision envelope (the best precision at recall >= r, 0 where
that recall is never reached); AP is the mean over the points, then over thresholds, then over classes.
"""

from __future__ import annotations

import pytest
import torch

from evaluators.detection_ap import detection_ap


def _target(boxes, labels, **extra):
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(labels, dtype=torch.int64), **extra}


def _pred(boxes, labels, scores, **extra):
    return {**_target(boxes, labels), "scores": torch.tensor(scores, dtype=torch.float32), **extra}


def test_perfect_predictions_score_one() -> None:
    targets = [_target([[0, 0, 10, 10], [20, 20, 40, 35]], [1, 2]), _target([[5, 5, 30, 30]], [1])]
    preds = [_pred([[0, 0, 10, 10], [20, 20, 40, 35]], [1, 2], [0.9, 0.8]), _pred([[5, 5, 30, 30]], [1], [0.7])]
    assert detection_ap(preds, targets) == {"ap": pytest.approx(1.0), "ap50": pytest.approx(1.0),
                                            "ap75": pytest.approx(1.0)}


def test_a_shifted_box_counts_at_the_thresholds_its_iou_passes() -> None:
    # GT [0,0,10,10], prediction shifted 2 px right: intersection 8*10 = 80, union 120, IoU 2/3.
    # It matches at 0.50, 0.55, 0.60, 0.65 (AP 1 each: one detection, recall 1 at precision 1) and at none of the
    # six thresholds from 0.70 up (AP 0): AP = 4/10, AP50 = 1, AP75 = 0.
    result = detection_ap([_pred([[2, 0, 12, 10]], [1], [0.9])], [_target([[0, 0, 10, 10]], [1])])
    assert result == {"ap": pytest.approx(0.4), "ap50": pytest.approx(1.0), "ap75": pytest.approx(0.0)}


def test_a_missing_detection_halves_recall() -> None:
    # Two GT objects, one found: recall reaches 0.5 at precision 1, never more. Recall points 0, 0.01, ..., 0.50
    # (51 of 101) read precision 1, the other 50 read 0: AP = 51/101 at every threshold.
    targets = [_target([[0, 0, 10, 10], [20, 20, 30, 30]], [1, 1])]
    result = detection_ap([_pred([[0, 0, 10, 10]], [1], [0.9])], targets)
    assert result == {"ap": pytest.approx(51 / 101), "ap50": pytest.approx(51 / 101), "ap75": pytest.approx(51 / 101)}


def test_an_image_without_predictions_costs_recall_like_a_missed_object() -> None:
    # The same counts as above, with the missed object in a second image that has no prediction at all.
    targets = [_target([[0, 0, 10, 10]], [1]), _target([[20, 20, 30, 30]], [1])]
    preds = [_pred([[0, 0, 10, 10]], [1], [0.9]), _pred([], [], [])]
    assert detection_ap(preds, targets)["ap"] == pytest.approx(51 / 101)


def test_a_false_positive_scored_below_the_true_one_changes_nothing() -> None:
    # Ranked: TP (0.9) then FP (0.5). Recall 1 is reached at precision 1 before the FP: AP = 1.
    preds = [_pred([[0, 0, 10, 10], [40, 40, 50, 50]], [1, 1], [0.9, 0.5])]
    assert detection_ap(preds, [_target([[0, 0, 10, 10]], [1])])["ap"] == pytest.approx(1.0)


def test_a_false_positive_scored_above_the_true_one_halves_precision() -> None:
    # Ranked: FP (0.9) then TP (0.5): precision [0, 1/2] at recall [0, 1]; the envelope is 1/2 at every recall
    # point, so AP = 0.5 at every threshold.
    preds = [_pred([[40, 40, 50, 50], [0, 0, 10, 10]], [1, 1], [0.9, 0.5])]
    result = detection_ap(preds, [_target([[0, 0, 10, 10]], [1])])
    assert result == {"ap": pytest.approx(0.5), "ap50": pytest.approx(0.5), "ap75": pytest.approx(0.5)}


def test_a_false_positive_between_two_true_ones_follows_the_precision_envelope() -> None:
    # Two GT. Ranked: TP (0.9), FP (0.8), TP (0.7): recall [1/2, 1/2, 1], precision [1, 1/2, 2/3].
    # Envelope (best precision at this recall or beyond): [1, 2/3, 2/3]. Recall points 0..0.50 (51) read 1;
    # 0.51..1.00 (50) read 2/3. AP = (51 + 50 * 2/3) / 101 = 253/303 at every threshold.
    targets = [_target([[0, 0, 10, 10], [20, 20, 30, 30]], [1, 1])]
    preds = [_pred([[0, 0, 10, 10], [40, 40, 50, 50], [20, 20, 30, 30]], [1, 1, 1], [0.9, 0.8, 0.7])]
    assert detection_ap(preds, targets)["ap"] == pytest.approx(253 / 303)


def test_a_prediction_in_an_image_without_ground_truth_is_a_false_positive() -> None:
    # Image 1 has no object; its detection (0.9) outranks the true one (0.5): AP 0.5 as in the case above.
    targets = [_target([[0, 0, 10, 10]], [1]), _target([], [])]
    preds = [_pred([[0, 0, 10, 10]], [1], [0.5]), _pred([[0, 0, 10, 10]], [1], [0.9])]
    assert detection_ap(preds, targets)["ap"] == pytest.approx(0.5)


def test_a_class_absent_from_the_ground_truth_is_not_scored() -> None:
    # Class 7 has no GT object anywhere: COCO leaves it out of the class mean rather than scoring it 0.
    preds = [_pred([[0, 0, 10, 10], [20, 20, 30, 30]], [1, 7], [0.5, 0.9])]
    assert detection_ap(preds, [_target([[0, 0, 10, 10]], [1])])["ap"] == pytest.approx(1.0)


def test_classes_are_averaged() -> None:
    # Class 1 found (AP 1), class 2 missed (AP 0): AP = 0.5.
    targets = [_target([[0, 0, 10, 10], [20, 20, 30, 30]], [1, 2])]
    assert detection_ap([_pred([[0, 0, 10, 10]], [1], [0.9])], targets)["ap"] == pytest.approx(0.5)


def test_a_crowd_region_neither_rewards_nor_punishes() -> None:
    # The crowd object is not to be found (recall stays 1 with one TP), and a detection on it is not a FP.
    targets = [_target([[0, 0, 10, 10], [20, 20, 40, 40]], [1, 1], iscrowd=torch.tensor([0, 1]))]
    preds = [_pred([[22, 22, 38, 38], [0, 0, 10, 10]], [1, 1], [0.9, 0.5])]
    assert detection_ap(preds, targets)["ap"] == pytest.approx(1.0)


def _square(size: int, top: int, left: int, side: int = 10) -> torch.Tensor:
    mask = torch.zeros(size, size, dtype=torch.bool)
    mask[top:top + side, left:left + side] = True
    return mask


def test_mask_ap_one_perfect_one_half_overlapping() -> None:
    # Image 0, class 1: the predicted mask is the GT's (IoU 1, AP 1 at every threshold).
    # Image 1, class 2: GT square rows/cols 10..19; prediction shifted 5 columns right: intersection 50 px, union
    # 150 px, IoU 1/3 < 0.5, no match at any threshold (AP 0). Class mean: AP = AP50 = AP75 = 0.5.
    gt0, gt1 = _square(32, 2, 2), _square(32, 10, 10)
    targets = [_target([[2, 2, 12, 12]], [1], masks=gt0[None]), _target([[10, 10, 20, 20]], [2], masks=gt1[None])]
    preds = [_pred([[2, 2, 12, 12]], [1], [0.9], masks=gt0[None].to(torch.uint8)),
             _pred([[15, 10, 25, 20]], [2], [0.9], masks=_square(32, 10, 15)[None].to(torch.uint8))]
    result = detection_ap(preds, targets, iou_type="segm")
    assert result == {"ap": pytest.approx(0.5), "ap50": pytest.approx(0.5), "ap75": pytest.approx(0.5)}


def test_mask_ap_reads_mask_iou_not_box_iou() -> None:
    # Class 2's predicted mask keeps the GT square's outline (so the same box) but lacks 38 of its 100 inner
    # pixels: mask IoU 62/100 = 0.62, matching at 0.50, 0.55, 0.60 only: class AP 3/10, AP50 1, AP75 0.
    # Class 1 is perfect. Mask AP = (1 + 0.3)/2 = 0.65, AP50 = 1, AP75 = (1 + 0)/2 = 0.5; box AP = 1.
    gt0, gt1 = _square(32, 2, 2), _square(32, 10, 10)
    holed = gt1.clone()
    holed[11:19, 11:15] = False  # 8 x 4 = 32 px
    holed[11:17, 15] = False  # 6 px more: 38 removed
    assert int(holed.sum()) == 62
    # Probabilities [N, 1, H, W], as Mask R-CNN returns them: binarised at 0.5.
    prob0, prob1 = (gt0.float() * 0.8 + 0.1)[None, None], (holed.float() * 0.7 + 0.2)[None, None]
    targets = [_target([[2, 2, 12, 12]], [1], masks=gt0[None]), _target([[10, 10, 20, 20]], [2], masks=gt1[None])]
    preds = [_pred([[2, 2, 12, 12]], [1], [0.9], masks=prob0), _pred([[10, 10, 20, 20]], [2], [0.9], masks=prob1)]
    segm = detection_ap(preds, targets, iou_type="segm")
    assert segm == {"ap": pytest.approx(0.65), "ap50": pytest.approx(1.0), "ap75": pytest.approx(0.5)}
    assert detection_ap(preds, targets, iou_type="bbox")["ap"] == pytest.approx(1.0)


def test_bad_input_is_refused() -> None:
    target = _target([[0, 0, 10, 10]], [1])
    with pytest.raises(ValueError, match="1 predictions but 2 targets"):
        detection_ap([_pred([[0, 0, 10, 10]], [1], [0.9])], [target, target])
    with pytest.raises(ValueError, match="no object"):
        detection_ap([_pred([], [], [])], [_target([], [])])
    with pytest.raises(ValueError, match="prediction 0: 1 boxes but 2 scores"):
        detection_ap([_pred([[0, 0, 10, 10]], [1], [0.9, 0.8])], [target])
    with pytest.raises(ValueError, match="target 0: iou_type 'segm' needs 'masks'"):
        detection_ap([_pred([[0, 0, 10, 10]], [1], [0.9], masks=_square(16, 0, 0)[None])], [target], iou_type="segm")
    with pytest.raises(ValueError, match="iou_type"):
        detection_ap([], [], iou_type="keypoints")  # type: ignore[arg-type]


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_matches_pycocotools_own_file_based_evaluation(tmp_path, iou_type: str) -> None:
    """On the synthetic shapes set with jittered, dropped and extra predictions, the numbers are those of
    pycocotools' documented path (COCO(json file), loadRes, summarize), which builds areas and ids itself."""
    import contextlib
    import io
    import json

    import numpy as np
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from orchestrator.data.synth_detection import generate_detection_set

    made = generate_detection_set(tmp_path / "s", train=1, val=12, seed=5)
    gt_file = tmp_path / "s" / "coco" / "annotations" / "instances_val.json"
    doc = json.loads(gt_file.read_text())
    rng = np.random.default_rng(0)
    results, preds, targets = [], [], []
    for image in doc["images"]:
        anns = [a for a in doc["annotations"] if a["image_id"] == image["id"]]
        masks = [mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(a["segmentation"], 64, 64))
                                   if isinstance(a["segmentation"], list)
                                   else {"size": [64, 64], "counts": a["segmentation"]["counts"].encode()})
                 for a in anns]
        labels = [made.category_ids.index(a["category_id"]) + 1 for a in anns]
        targets.append(_target([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)], labels,
                               masks=torch.tensor(np.stack(masks)).to(torch.uint8)))
        p_boxes, p_labels, p_scores, p_masks = [], [], [], []
        for a, m, label in zip(anns, masks, labels):
            if rng.random() < 0.2:
                continue  # missed
            dx, dy = rng.integers(-3, 4, 2)
            shifted = np.roll(m, (int(dy), int(dx)), axis=(0, 1))
            x, y, w, h = a["bbox"]
            p_boxes.append([x + dx, y + dy, x + w + dx, y + h + dy])
            p_labels.append(label if rng.random() > 0.1 else 1 + (label % 4))
            p_scores.append(float(rng.random()))
            p_masks.append(shifted)
        if rng.random() < 0.5:  # a false positive somewhere
            p_boxes.append([5.0, 5.0, 20.0, 25.0])
            p_labels.append(int(rng.integers(1, 5)))
            p_scores.append(float(rng.random()))
            fp = np.zeros((64, 64), dtype=np.uint8)
            fp[5:25, 5:20] = 1
            p_masks.append(fp)
        stacked = np.stack(p_masks) if p_masks else np.zeros((0, 64, 64), dtype=np.uint8)
        preds.append(_pred(p_boxes, p_labels, p_scores, masks=torch.tensor(stacked)))
        for box, label, score, mask in zip(p_boxes, p_labels, p_scores, p_masks):
            entry = {"image_id": image["id"], "category_id": made.category_ids[label - 1], "score": score}
            if iou_type == "bbox":
                entry["bbox"] = [box[0], box[1], box[2] - box[0], box[3] - box[1]]
            else:
                rle = mask_utils.encode(np.asfortranarray(mask))
                entry["segmentation"] = {"size": rle["size"], "counts": rle["counts"].decode()}
            results.append(entry)
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(str(gt_file))
        evaluator = COCOeval(coco_gt, coco_gt.loadRes(results), iou_type)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    ours = detection_ap(preds, targets, iou_type=iou_type)
    assert 0.1 < evaluator.stats[0] < 0.95  # neither trivial case: a mismatch in matching would show
    assert ours == {"ap": pytest.approx(evaluator.stats[0]), "ap50": pytest.approx(evaluator.stats[1]),
                    "ap75": pytest.approx(evaluator.stats[2])}
