"""The VinBigData competition metric: PASCAL VOC 2010 mAP at IoU > 0.4, "No finding" as a 15th class.

The competition ("VinBigData Chest X-ray Abnormalities Detection", Kaggle) scored "the standard
PASCAL VOC 2010 mean Average Precision (mAP) at IoU > 0.4". Per class, as VOC 2010's devkit:

* detections of all images are ranked by score (ties keep their order);
* each detection is matched to the ground-truth box of its image with the largest IoU; it is a true
  positive if that IoU is above the threshold (strictly) and that box is not matched yet, otherwise a
  false positive (VOC does not fall back to the second-best box, as COCOeval's matching does);
* AP is the area under the precision envelope over every recall level reached ("all-point"
  interpolation, VOC 2010 on; COCO samples the envelope at 101 recall levels instead);
* classes without a ground-truth box in the evaluated images have no AP and are left out of the mean.

Boxes are real-valued ``[x, y, w, h]`` (COCO results); IoU is that of the continuous boxes (the
devkit's "+1 pixel" widths are for integer pixel boxes). No detection cap per image.

"No finding" (class id 14): an image without any box has the ground truth ``14 1 0 0 1 1``, i.e. a
box [0, 0, 1, 1] of that class; a submission predicts ``14 p 0 0 1 1`` for every image.
:func:`no_finding_score` is the ``p`` cxrssl derives from a detector, the probability that the image
shows nothing: ``1 - max box score`` (1 for an image without boxes). The evaluation and
``cxrssl-predict``'s submission use the same rule.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import numpy as np

from cxrssl.classes import VINDR_NO_FINDING

NO_FINDING_BOX = [0.0, 0.0, 1.0, 1.0]  # xywh == xyxy for this box
#: The competition's IoU threshold (a match needs IoU > this).
VINBIGDATA_IOU = 0.4


def no_finding_score(scores: Iterable[float]) -> float:
    """``p`` of the "No finding" prediction of an image whose boxes score ``scores``."""
    scores = [float(s) for s in scores]
    return 1.0 - max(scores, default=0.0)


def add_no_finding(gt: dict, results: list[dict]) -> tuple[dict, list[dict], int]:
    """GT and results with the "No finding" class (see the module docstring); returns its category id.

    A GT that already has a "No finding" category keeps its own boxes; results that already hold
    "No finding" predictions keep them. Otherwise every GT image without a box gets the GT box and
    every image gets a prediction with ``p = no_finding_score(its box scores)``.
    """
    gt = copy.deepcopy(gt)
    results = list(results)
    existing = [c["id"] for c in gt["categories"] if c.get("name") == VINDR_NO_FINDING]
    if existing:
        nf_id = existing[0]
    else:
        nf_id = max((c["id"] for c in gt["categories"]), default=0) + 1
        gt["categories"].append({"id": nf_id, "name": VINDR_NO_FINDING, "supercategory": "none"})
        with_boxes = {ann["image_id"] for ann in gt["annotations"]}
        next_id = max((ann.get("id", 0) for ann in gt["annotations"]), default=0) + 1
        for image in gt["images"]:
            if image["id"] not in with_boxes:
                gt["annotations"].append({"id": next_id, "image_id": image["id"], "category_id": nf_id,
                                          "bbox": list(NO_FINDING_BOX), "area": 1.0, "iscrowd": 0})
                next_id += 1
    if not any(det["category_id"] == nf_id for det in results):
        scores: dict[Any, list[float]] = {image["id"]: [] for image in gt["images"]}
        for det in results:
            scores[det["image_id"]].append(det["score"])
        for image_id, image_scores in scores.items():
            results.append({"image_id": image_id, "category_id": nf_id, "bbox": list(NO_FINDING_BOX),
                            "score": no_finding_score(image_scores)})
    return gt, results, nf_id


def _xyxy(bbox) -> np.ndarray:
    x, y, w, h = (float(v) for v in bbox)
    return np.array([x, y, x + w, y + h])


def _iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    ix = np.clip(np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0]), 0, None)
    iy = np.clip(np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1]), 0, None)
    inter = ix * iy
    union = (box[2] - box[0]) * (box[3] - box[1]) + (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def voc_matches(gt_boxes: dict, detections: list[tuple[Any, np.ndarray, float]], iou_thr: float
                ) -> tuple[np.ndarray, np.ndarray]:
    """VOC 2010 matching of one class: (tp, fp) flags of ``detections`` ranked by score.

    ``gt_boxes`` maps image id -> (N, 4) xyxy GT boxes; ``detections`` are (image id, xyxy, score).
    """
    order = np.argsort(-np.array([d[2] for d in detections], dtype=float), kind="stable")
    used = {image_id: np.zeros(len(boxes), dtype=bool) for image_id, boxes in gt_boxes.items()}
    tp = np.zeros(len(detections), dtype=bool)
    for rank, index in enumerate(order):
        image_id, box, _ = detections[index]
        boxes = gt_boxes.get(image_id)
        if boxes is None or len(boxes) == 0:
            continue
        overlaps = _iou(box, boxes)
        best = int(np.argmax(overlaps))
        if overlaps[best] > iou_thr and not used[image_id][best]:
            tp[rank] = True
            used[image_id][best] = True
    return tp, ~tp


def voc_ap(tp: np.ndarray, fp: np.ndarray, n_gt: int) -> float:
    """All-point interpolated AP (VOC 2010 on) of ranked tp/fp flags; NaN without GT."""
    if n_gt == 0:
        return float("nan")
    tp_cum, fp_cum = np.cumsum(tp), np.cumsum(fp)
    recall = tp_cum / n_gt
    precision = tp_cum / np.maximum(tp_cum + fp_cum, np.finfo(float).eps)
    mrec = np.concatenate([[0.0], recall, [1.0]])
    mpre = np.concatenate([[0.0], precision, [0.0]])
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    steps = np.flatnonzero(mrec[1:] != mrec[:-1])
    return float(np.sum((mrec[steps + 1] - mrec[steps]) * mpre[steps + 1]))


def voc_map(gt: dict, results: list[dict], iou_thr: float = VINBIGDATA_IOU) -> dict[int, float]:
    """Per-category VOC 2010 AP (NaN for categories without GT) of COCO GT and results."""
    per_class: dict[int, float] = {}
    for cat in sorted(c["id"] for c in gt["categories"]):
        boxes: dict[Any, list] = {}
        for ann in gt["annotations"]:
            if ann["category_id"] == cat and not ann.get("iscrowd", 0):
                boxes.setdefault(ann["image_id"], []).append(_xyxy(ann["bbox"]))
        gt_boxes = {k: np.array(v) for k, v in boxes.items()}
        dets = [(d["image_id"], _xyxy(d["bbox"]), float(d["score"])) for d in results if d["category_id"] == cat]
        tp, fp = voc_matches(gt_boxes, dets, iou_thr)
        per_class[cat] = voc_ap(tp, fp, sum(len(b) for b in gt_boxes.values()))
    return per_class
