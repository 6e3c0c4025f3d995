"""Detection metrics on COCO files: COCO mAP, the VinBigData VOC-style metric, a bootstrap CI.

* COCO metrics (mAP@[.5:.95], mAP50, mAP75, per-class AP50) come from faster-coco-eval's COCOeval
  with its standard parameters (area "all", at most 100 detections per image and class).
* The VinBigData competition metric is PASCAL-VOC-style mAP at IoU 0.4. It is computed by the same
  COCOeval with ``iouThrs=[voc_iou]``, one area range and no practical cap on detections (10,000 per
  image and class). The interpolation is COCO's 101-point one; the competition integrated the
  precision envelope continuously, which differs in the third decimal at most.
* "No finding" (``no_finding=True``) is scored as an extra class, as the competition did: every
  image without any GT box gets a "No finding" GT box [0, 0, 1, 1]; every image whose highest
  predicted box score is below ``no_finding_thr`` gets a "No finding" prediction [0, 0, 1, 1] whose
  confidence is ``1 - max box score`` (1 for an image without predictions). Only the VOC metric
  includes this class; the COCO metrics stay on the detection classes.
* Classes without GT box in the evaluated images have AP NaN: they are left out of every mean and
  listed under ``classes_without_gt`` (JSON ``null``).
* The mAP50 confidence interval resamples images with replacement (seeded). Images are matched
  once (pycocotools' per-image evaluation, which exposes the matches); each resample then re-runs
  COCOeval's accumulation step on the resampled matches, weighted by how often each image was drawn.
  Without resampling this reproduces COCOeval's mAP50 exactly (checked in the tests).
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from cxrssl.classes import VINDR_NO_FINDING
from cxrssl.errors import BadInputError
from cxrssl.utils import progress_disabled

log = logging.getLogger(__name__)

#: COCO's recall thresholds (0, 0.01, ..., 1), as in pycocotools' Params.
REC_THRS = np.linspace(0.0, 1.0, 101, endpoint=True)
#: The "all" area range and the detection cap of COCO's AP50 (per image and class).
AREA_ALL = [0.0, 1e5 ** 2]
COCO_MAX_DETS = 100
VOC_MAX_DETS = 10_000
NO_FINDING_BOX = [0.0, 0.0, 1.0, 1.0]  # xywh == xyxy for this box


# --- loading and checking inputs ---------------------------------------------------------------

def load_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise BadInputError(str(path), "file does not exist")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise BadInputError(str(path), f"not valid JSON: {exc}") from exc


def check_ground_truth(gt: Any, where: str = "ground truth") -> dict:
    """A COCO detection GT dict with images, annotations and categories (clear errors otherwise)."""
    if not isinstance(gt, dict):
        raise BadInputError(where, "a COCO GT file must be a JSON object")
    for key in ("images", "annotations", "categories"):
        if not isinstance(gt.get(key), list):
            raise BadInputError(where, f"missing COCO list {key!r}")
    image_ids = set()
    for n, image in enumerate(gt["images"]):
        if not isinstance(image, dict) or "id" not in image:
            raise BadInputError(f"{where}: images[{n}]", "image entry without 'id'")
        image_ids.add(image["id"])
    cat_ids = {c.get("id") for c in gt["categories"]}
    for n, ann in enumerate(gt["annotations"]):
        item = f"{where}: annotations[{n}]"
        if ann.get("image_id") not in image_ids:
            raise BadInputError(item, f"image_id {ann.get('image_id')!r} is not in 'images'")
        if ann.get("category_id") not in cat_ids:
            raise BadInputError(item, f"category_id {ann.get('category_id')!r} is not in 'categories'")
        _check_bbox(ann.get("bbox"), item)
    gt = copy.deepcopy(gt)
    for ann_id, ann in enumerate(gt["annotations"], start=1):
        ann.setdefault("iscrowd", 0)
        ann.setdefault("area", float(ann["bbox"][2]) * float(ann["bbox"][3]))
        ann.setdefault("id", ann_id)
    return gt


def _check_bbox(bbox: Any, item: str) -> None:
    if (not isinstance(bbox, (list, tuple)) or len(bbox) != 4
            or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in bbox)):
        raise BadInputError(item, f"bbox must be 4 finite numbers [x, y, w, h], got {bbox!r}")
    if bbox[2] < 0 or bbox[3] < 0:
        raise BadInputError(item, f"bbox has a negative width or height: {bbox!r}")


def check_results(results: Any, gt: dict, where: str = "results") -> list[dict]:
    """A COCO results list whose images and categories exist in ``gt`` (clear errors otherwise)."""
    if not isinstance(results, list):
        raise BadInputError(where, "COCO results must be a JSON list of detections")
    image_ids = {image["id"] for image in gt["images"]}
    cat_ids = {c["id"] for c in gt["categories"]}
    out = []
    for n, det in enumerate(results):
        item = f"{where}: entry {n}"
        if not isinstance(det, dict):
            raise BadInputError(item, "detection is not an object")
        if det.get("image_id") not in image_ids:
            raise BadInputError(item, f"image_id {det.get('image_id')!r} is not an image of the GT file")
        if det.get("category_id") not in cat_ids:
            raise BadInputError(item, f"category_id {det.get('category_id')!r} is not a GT category")
        _check_bbox(det.get("bbox"), item)
        score = det.get("score")
        if not isinstance(score, (int, float)) or not math.isfinite(score):
            raise BadInputError(item, f"score must be a finite number, got {score!r}")
        out.append({"image_id": det["image_id"], "category_id": det["category_id"],
                    "bbox": [float(v) for v in det["bbox"]], "score": float(score)})
    return out


# --- "No finding" as the competition's 15th class ----------------------------------------------

def add_no_finding(gt: dict, results: list[dict], thr: float) -> tuple[dict, list[dict], int]:
    """GT and results with the "No finding" class added (see the module docstring).

    Returns the new GT, the new results and the "No finding" category id. A GT that already has a
    "No finding" category is used as it is (its own boxes count); only predictions are added.
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
        next_id = max((ann["id"] for ann in gt["annotations"]), default=0) + 1
        for image in gt["images"]:
            if image["id"] not in with_boxes:
                gt["annotations"].append({"id": next_id, "image_id": image["id"], "category_id": nf_id,
                                          "bbox": list(NO_FINDING_BOX), "area": 1.0, "iscrowd": 0})
                next_id += 1
    best = {image["id"]: 0.0 for image in gt["images"]}
    for det in results:
        if det["category_id"] != nf_id:
            best[det["image_id"]] = max(best[det["image_id"]], det["score"])
    for image_id, score in best.items():
        if score < thr:
            results.append({"image_id": image_id, "category_id": nf_id, "bbox": list(NO_FINDING_BOX),
                            "score": 1.0 - score})
    return gt, results, nf_id


# --- COCOeval runs ------------------------------------------------------------------------------

def _quiet(*_args, **_kwargs) -> None:
    return None


def _faster_cocoeval(gt: dict, results: list[dict], iou_thrs=None, max_dets=None, area_all_only=False):
    """An evaluated and accumulated faster-coco-eval COCOeval (bbox)."""
    from faster_coco_eval import COCO, COCOeval_faster

    coco_gt = COCO(copy.deepcopy(gt))
    coco_dt = coco_gt.loadRes(copy.deepcopy(results))
    evaluator = COCOeval_faster(coco_gt, coco_dt, "bbox", print_function=_quiet)
    if iou_thrs is not None:
        evaluator.params.iouThrs = np.asarray(iou_thrs, dtype=np.float64)
    if area_all_only:
        evaluator.params.areaRng = [list(AREA_ALL)]
        evaluator.params.areaRngLbl = ["all"]
    if max_dets is not None:
        evaluator.params.maxDets = list(max_dets)
    evaluator.evaluate()
    evaluator.accumulate()
    return evaluator


def _per_class_ap(precision: np.ndarray, iou_index: int, max_det_index: int = -1) -> np.ndarray:
    """AP per category from COCOeval's precision array [T, R, K, A, M] (NaN when no GT)."""
    block = precision[iou_index, :, :, 0, max_det_index]  # R x K, area "all"
    has_gt = (block > -1).any(axis=0)
    ap = np.where(block > -1, block, 0.0).mean(axis=0)
    return np.where(has_gt, ap, np.nan)


def _nanmean(values: np.ndarray) -> float:
    values = np.asarray(values, dtype=float)
    return float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")


# --- bootstrap over images -----------------------------------------------------------------------

@dataclass
class ClassMatches:
    """One class's detections at one IoU threshold, in COCOeval's accumulation order."""

    image_index: np.ndarray  # image (position in the image list) of each detection, sorted by score
    tp: np.ndarray
    fp: np.ndarray
    gt_per_image: np.ndarray  # non-ignored GT boxes of this class per image


def match_per_image(gt: dict, results: list[dict], iou: float = 0.5,
                    max_dets: int = COCO_MAX_DETS) -> tuple[list, dict[int, ClassMatches]]:
    """Per-image matches at one IoU threshold from pycocotools' COCOeval.evaluate()."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    image_ids = sorted(image["id"] for image in gt["images"])
    position = {image_id: n for n, image_id in enumerate(image_ids)}
    cat_ids = sorted(c["id"] for c in gt["categories"])
    gt_count = {k: np.zeros(len(image_ids), dtype=np.int64) for k in cat_ids}
    matches: dict[int, ClassMatches] = {}
    if results:
        with contextlib.redirect_stdout(io.StringIO()):
            coco_gt = COCO()
            coco_gt.dataset = copy.deepcopy(gt)
            coco_gt.createIndex()
            coco_dt = coco_gt.loadRes(copy.deepcopy(results))
            evaluator = COCOeval(coco_gt, coco_dt, "bbox")
            evaluator.params.imgIds = image_ids
            evaluator.params.catIds = cat_ids
            evaluator.params.iouThrs = np.array([iou])
            evaluator.params.areaRng = [list(AREA_ALL)]
            evaluator.params.areaRngLbl = ["all"]
            evaluator.params.maxDets = [max_dets]
            evaluator.evaluate()
        # evalImgs is ordered category-major, then area range (one), then image.
        n_img = len(image_ids)
        for k_index, cat in enumerate(cat_ids):
            scores, img_idx, tps, fps = [], [], [], []
            for i in range(n_img):
                entry = evaluator.evalImgs[k_index * n_img + i]
                if entry is None:
                    continue
                dt_scores = np.asarray(entry["dtScores"][:max_dets], dtype=float)
                dtm = np.asarray(entry["dtMatches"][0][:max_dets])
                dt_ig = np.asarray(entry["dtIgnore"][0][:max_dets], dtype=bool)
                gt_ig = np.asarray(entry["gtIgnore"], dtype=bool)
                gt_count[cat][i] = int((~gt_ig).sum())
                scores.append(dt_scores)
                img_idx.append(np.full(len(dt_scores), i))
                tps.append((dtm > 0) & ~dt_ig)
                fps.append((dtm == 0) & ~dt_ig)
            if scores:
                s = np.concatenate(scores)
                order = np.argsort(-s, kind="mergesort")  # COCOeval's tie order
                matches[cat] = ClassMatches(np.concatenate(img_idx)[order], np.concatenate(tps)[order],
                                            np.concatenate(fps)[order], gt_count[cat])
    else:
        for ann in gt["annotations"]:
            if not ann.get("iscrowd", 0):
                gt_count[ann["category_id"]][position[ann["image_id"]]] += 1
    for cat in cat_ids:
        matches.setdefault(cat, ClassMatches(np.zeros(0, int), np.zeros(0, bool), np.zeros(0, bool),
                                             gt_count[cat]))
    return image_ids, matches


def weighted_ap(m: ClassMatches, weights: np.ndarray) -> float:
    """COCOeval's 101-point AP of one class when image i counts ``weights[i]`` times (NaN: no GT).

    Copies of one detection sit next to each other in the sorted list and are all TP or all FP, so
    weighted cumulative sums give the same interpolated precision as repeating them.
    """
    n_gt = float(np.dot(weights, m.gt_per_image))
    if n_gt == 0:
        return float("nan")
    w = weights[m.image_index].astype(float)
    keep = w > 0
    if not keep.any():
        return 0.0
    tp = np.cumsum(w[keep] * m.tp[keep])
    fp = np.cumsum(w[keep] * m.fp[keep])
    recall = tp / n_gt
    precision = tp / (tp + fp + np.spacing(1))
    precision = np.maximum.accumulate(precision[::-1])[::-1]
    idx = np.searchsorted(recall, REC_THRS, side="left")
    q = np.where(idx < len(precision), precision[np.minimum(idx, len(precision) - 1)], 0.0)
    return float(q.mean())


def bootstrap_map(matches: dict[int, ClassMatches], n_images: int, n_resamples: int, seed: int,
                  level: float = 0.95) -> tuple[float, list[float], np.ndarray]:
    """Point mAP, the percentile CI over image resamples, and the resampled mAPs."""
    cats = sorted(matches)
    ones = np.ones(n_images, dtype=np.int64)
    point = _nanmean(np.array([weighted_ap(matches[c], ones) for c in cats]))
    if n_resamples <= 0 or n_images == 0:
        return point, [float("nan"), float("nan")], np.zeros(0)
    rng = np.random.default_rng(seed)
    values = np.empty(n_resamples)
    for b in tqdm(range(n_resamples), desc="bootstrap", disable=progress_disabled(), leave=False):
        counts = np.bincount(rng.integers(0, n_images, size=n_images), minlength=n_images)
        values[b] = _nanmean(np.array([weighted_ap(matches[c], counts) for c in cats]))
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return point, [float("nan"), float("nan")], values
    alpha = (1.0 - level) / 2.0
    low, high = np.percentile(finite, [100 * alpha, 100 * (1 - alpha)])
    return point, [float(low), float(high)], values


# --- the public entry point ------------------------------------------------------------------------

def _json_number(value: float) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def evaluate(gt_json: str | Path | dict, results_json: str | Path | list, voc_iou: float = 0.4,
             bootstrap: int = 1000, seed: int = 0, no_finding: bool = True,
             no_finding_thr: float = 0.5, ci_level: float = 0.95) -> dict[str, Any]:
    """All detection metrics of ``results_json`` against ``gt_json`` (paths or loaded objects).

    Returns a JSON-ready dict: ``mAP``, ``mAP50``, ``mAP75`` (COCO), ``mAP50_ci`` ([low, high]),
    ``voc_mAP`` at ``voc_iou`` (also as ``voc_mAP40`` when voc_iou is 0.4), ``per_class_AP50`` and
    ``per_class_voc_AP`` (name -> AP or null), ``classes_without_gt`` and counts. NaN is ``None``.
    """
    gt_where = str(gt_json) if not isinstance(gt_json, dict) else "ground truth"
    res_where = str(results_json) if not isinstance(results_json, list) else "results"
    gt = check_ground_truth(gt_json if isinstance(gt_json, dict) else load_json(gt_json), gt_where)
    results = check_results(results_json if isinstance(results_json, list) else load_json(results_json),
                            gt, res_where)
    if not gt["images"]:
        raise BadInputError(gt_where, "the GT file has no images to evaluate")
    categories = sorted(gt["categories"], key=lambda c: c["id"])
    names = {c["id"]: str(c.get("name", c["id"])) for c in categories}
    log.info("evaluating %d detections on %d images (%d GT boxes, %d classes)", len(results),
             len(gt["images"]), len(gt["annotations"]), len(categories))

    coco = _faster_cocoeval(gt, results)
    precision = coco.eval["precision"]
    iou_thrs = np.asarray(coco.params.iouThrs)
    cat_order = list(coco.params.catIds)
    ap50 = _per_class_ap(precision, int(np.argmin(np.abs(iou_thrs - 0.5))))
    ap75 = _per_class_ap(precision, int(np.argmin(np.abs(iou_thrs - 0.75))))
    # A class has GT at every IoU threshold or at none: a plain mean keeps NaN for the latter.
    ap_all = np.stack([_per_class_ap(precision, t) for t in range(len(iou_thrs))]).mean(axis=0)
    per_class_ap50 = {names[c]: _json_number(v) for c, v in zip(cat_order, ap50)}
    without_gt = [names[c] for c, v in zip(cat_order, ap50) if not math.isfinite(v)]

    voc_gt, voc_results, nf_id = (add_no_finding(gt, results, no_finding_thr) if no_finding
                                  else (gt, results, None))
    voc = _faster_cocoeval(voc_gt, voc_results, iou_thrs=[voc_iou], max_dets=[VOC_MAX_DETS], area_all_only=True)
    voc_names = {c["id"]: str(c.get("name", c["id"])) for c in voc_gt["categories"]}
    voc_ap = _per_class_ap(voc.eval["precision"], 0)
    per_class_voc = {voc_names[c]: _json_number(v) for c, v in zip(voc.params.catIds, voc_ap)}

    image_ids, matches = match_per_image(gt, results, iou=0.5, max_dets=COCO_MAX_DETS)
    point, ci, _ = bootstrap_map(matches, len(image_ids), bootstrap, seed, ci_level)
    map50 = _nanmean(ap50)
    if math.isfinite(map50) and abs(point - map50) > 1e-6:
        # The bootstrap re-implements only COCOeval's accumulation; any drift is a bug worth a warning.
        log.warning("bootstrap point estimate %.6f differs from COCOeval mAP50 %.6f", point, map50)

    metrics = {
        "gt": gt_where,
        "results": res_where,
        "n_images": len(gt["images"]),
        "n_images_with_boxes": len({a["image_id"] for a in gt["annotations"]}),
        "n_gt_boxes": len(gt["annotations"]),
        "n_predictions": len(results),
        "mAP": _json_number(_nanmean(ap_all)),
        "mAP50": _json_number(map50),
        "mAP75": _json_number(_nanmean(ap75)),
        "mAP50_ci": [_json_number(v) for v in ci],
        "ci_level": ci_level,
        "bootstrap": int(bootstrap),
        "seed": int(seed),
        "voc_iou": float(voc_iou),
        "voc_mAP": _json_number(_nanmean(voc_ap)),
        "no_finding": bool(no_finding),
        "no_finding_thr": float(no_finding_thr),
        "per_class_AP50": per_class_ap50,
        "per_class_voc_AP": per_class_voc,
        "classes_without_gt": without_gt,
    }
    if abs(voc_iou - 0.4) < 1e-9:
        metrics["voc_mAP40"] = metrics["voc_mAP"]
    if nf_id is not None:
        metrics["no_finding_category_id"] = nf_id
    return metrics


def format_table(metrics: dict[str, Any]) -> str:
    """A plain-text table of the headline metrics and per-class AP50 (for the console and logs)."""
    def fmt(v):
        return "   n/a" if v is None else f"{v:6.3f}"

    ci = metrics["mAP50_ci"]
    lines = [
        f"images {metrics['n_images']}  GT boxes {metrics['n_gt_boxes']}  predictions {metrics['n_predictions']}",
        f"mAP@[.5:.95] {fmt(metrics['mAP'])}   mAP50 {fmt(metrics['mAP50'])} "
        f"[{fmt(ci[0]).strip()}, {fmt(ci[1]).strip()}] ({int(metrics['ci_level'] * 100)}% CI, "
        f"{metrics['bootstrap']} resamples)   mAP75 {fmt(metrics['mAP75'])}",
        f"VOC mAP@{metrics['voc_iou']:g} {fmt(metrics['voc_mAP'])}"
        f"{' (No finding as a class)' if metrics['no_finding'] else ''}",
        "",
        f"{'class':<24} {'AP50':>6} {'VOC AP':>7}",
    ]
    for name, value in metrics["per_class_AP50"].items():
        lines.append(f"{name:<24} {fmt(value)} {fmt(metrics['per_class_voc_AP'].get(name)):>7}")
    for name, value in metrics["per_class_voc_AP"].items():
        if name not in metrics["per_class_AP50"]:
            lines.append(f"{name:<24} {'':>6} {fmt(value):>7}")
    if metrics["classes_without_gt"]:
        lines.append(f"no GT box (AP n/a, left out of the means): {', '.join(metrics['classes_without_gt'])}")
    return "\n".join(lines)
