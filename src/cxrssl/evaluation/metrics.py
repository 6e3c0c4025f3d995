"""Detection metrics on COCO files: COCO mAP, the VinBigData competition metric, bootstrap CIs.

* COCO metrics (mAP@[.5:.95], mAP50, mAP75, per-class AP50) come from faster-coco-eval's COCOeval
  with its standard parameters (area "all", at most 100 detections per image and class).
* ``voc_mAP`` is the VinBigData competition metric (:mod:`cxrssl.evaluation.vinbigdata`): PASCAL
  VOC 2010 mAP, all-point interpolation, IoU > ``voc_iou`` (0.4), "No finding" scored as a 15th
  class (``no_finding``). ``coco101_mAP`` is the same inputs scored by COCOeval at IoU >= ``voc_iou``
  with COCO's 101-point interpolation (what cxrssl reported as "VOC mAP" before); it keeps its own
  name and is not the competition's metric.
* Classes without GT box in the evaluated images have AP NaN: they are left out of every mean and
  listed under ``classes_without_gt`` (JSON ``null``).
* The mAP50 bootstrap resamples images with replacement (seeded) over a FIXED class set, the classes
  with GT in the evaluated images: a resample in which one of them has no GT box is drawn again
  (the mean would otherwise be over other classes; dropping rare, low-AP classes pushed the
  interval up). It reports the percentile and the BCa interval (Efron & Tibshirani 1993, 14.3; the
  acceleration from the leave-one-image-out jackknife, skipping the images whose removal leaves a
  class without GT) and stores the replicates and jackknife values, so that two runs on the same
  test set can be compared over the same resamples (:func:`paired_difference`). Images are matched
  once (pycocotools' per-image evaluation, which exposes the matches); each resample then re-runs
  COCOeval's accumulation step on the resampled matches, weighted by how often each image was drawn.
  Without resampling this reproduces COCOeval's mAP50 exactly (checked in the tests).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from statistics import NormalDist
from typing import Any

import numpy as np
from tqdm import tqdm

from cxrssl.errors import BadInputError
from cxrssl.evaluation.vinbigdata import add_no_finding, voc_map
from cxrssl.utils import progress_disabled

log = logging.getLogger(__name__)

#: COCO's recall thresholds (0, 0.01, ..., 1), as in pycocotools' Params.
REC_THRS = np.linspace(0.0, 1.0, 101, endpoint=True)
#: The "all" area range and the detection cap of COCO's AP50 (per image and class).
AREA_ALL = [0.0, 1e5 ** 2]
COCO_MAX_DETS = 100
#: COCOeval's cap per image and class for the 101-point variant of the VinBigData inputs (no cap).
COCO101_MAX_DETS = 10_000
#: Bootstrap draws give up after this many times the asked resamples (a class set that rarely occurs).
MAX_DRAWS_FACTOR = 100


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


def fixed_classes(matches: dict[int, ClassMatches]) -> list[int]:
    """The classes with GT in the evaluated images: every resample averages over exactly these."""
    return [c for c in sorted(matches) if matches[c].gt_per_image.sum() > 0]


def map_over(matches: dict[int, ClassMatches], classes: list[int], weights: np.ndarray) -> float:
    """Mean AP over ``classes`` with image weights (NaN if one of them has no GT under them)."""
    if not classes:
        return float("nan")
    return float(np.mean([weighted_ap(matches[c], weights) for c in classes]))


def resample_counts(gt_presence: np.ndarray, n_resamples: int, seed: int) -> tuple[np.ndarray, int]:
    """(accepted resamples as per-image draw counts (B, n), number of rejected draws).

    ``gt_presence`` is (classes, images): GT boxes per class and image. A draw in which a class has
    no GT is rejected and drawn again, so every resample holds every class of the fixed set. The
    draws depend only on ``seed`` and ``gt_presence``: runs on the same test set share them.
    """
    n_images = gt_presence.shape[1]
    rng = np.random.default_rng(seed)
    accepted, rejected = [], 0
    while len(accepted) < n_resamples:
        if rejected > MAX_DRAWS_FACTOR * n_resamples:
            raise ValueError(f"only {len(accepted)} of {rejected + len(accepted)} bootstrap resamples hold a GT box of "
                             "every class: too few images carry the rarest class for an image bootstrap")
        counts = np.bincount(rng.integers(0, n_images, size=n_images), minlength=n_images)
        if (gt_presence @ counts > 0).all():
            accepted.append(counts)
        else:
            rejected += 1
    return np.array(accepted, dtype=np.int64).reshape(n_resamples, n_images), rejected


def percentile_interval(replicates: np.ndarray, level: float = 0.95) -> list[float]:
    """Percentile bootstrap interval (NaN without replicates)."""
    replicates = np.asarray(replicates, dtype=float)
    if replicates.size == 0 or not np.isfinite(replicates).all():
        return [float("nan"), float("nan")]
    alpha = (1.0 - level) / 2.0
    return [float(v) for v in np.percentile(replicates, [100 * alpha, 100 * (1 - alpha)])]


def bca_interval(replicates: np.ndarray, jackknife: np.ndarray, point: float, level: float = 0.95) -> list[float]:
    """Bias-corrected and accelerated interval (Efron & Tibshirani 1993, 14.3), as scipy.stats.bootstrap
    computes it: bias ``z0`` from the share of replicates below the point (ties count half), the
    acceleration from the jackknife values (NaN entries, undefined leave-one-outs, are skipped)."""
    replicates = np.asarray(replicates, dtype=float)
    jack = np.asarray(jackknife, dtype=float)
    jack = jack[np.isfinite(jack)]
    if replicates.size == 0 or not math.isfinite(point) or not np.isfinite(replicates).all():
        return [float("nan"), float("nan")]
    share = (np.count_nonzero(replicates < point) + np.count_nonzero(replicates <= point)) / (2 * replicates.size)
    if not 0 < share < 1:
        return [float("nan"), float("nan")]
    normal = NormalDist()
    z0 = normal.inv_cdf(share)
    d = jack.mean() - jack if jack.size else np.zeros(0)
    den = 6.0 * float(np.sum(d ** 2)) ** 1.5
    accel = float(np.sum(d ** 3)) / den if den > 0 else 0.0
    alpha = (1.0 - level) / 2.0
    bounds = []
    for z in (normal.inv_cdf(alpha), normal.inv_cdf(1 - alpha)):
        bounds.append(normal.cdf(z0 + (z0 + z) / (1 - accel * (z0 + z))))
    return [float(v) for v in np.percentile(replicates, [100 * b for b in bounds])]


def bootstrap_p_value(differences: np.ndarray) -> float:
    """Two-sided bootstrap p-value of "no difference": twice the smaller share of resampled
    differences at or beyond 0 on either side, with the +1 correction ``(1 + k) / (1 + B)`` (the
    smallest level at which the percentile interval of the difference leaves out 0)."""
    d = np.asarray(differences, dtype=float)
    if d.size == 0 or not np.isfinite(d).all():
        return float("nan")
    tail = min(np.count_nonzero(d <= 0), np.count_nonzero(d >= 0))
    return float(min(1.0, 2.0 * (1 + tail) / (1 + d.size)))


@dataclass
class Bootstrap:
    """An image bootstrap of mAP50 over the fixed class set (see the module docstring)."""

    point: float
    replicates: np.ndarray
    jackknife: np.ndarray
    classes: list[int]
    rejected: int = 0
    level: float = 0.95
    resamples_id: str = ""
    percentile: list[float] = field(default_factory=lambda: [float("nan")] * 2)
    bca: list[float] = field(default_factory=lambda: [float("nan")] * 2)


def bootstrap_map(matches: dict[int, ClassMatches], n_images: int, n_resamples: int, seed: int,
                  level: float = 0.95, jackknife: bool = True) -> Bootstrap:
    """Point mAP over the fixed class set, its resampled values, percentile and BCa intervals."""
    classes = fixed_classes(matches)
    ones = np.ones(n_images, dtype=np.int64)
    point = map_over(matches, classes, ones)
    presence = np.array([matches[c].gt_per_image for c in classes], dtype=np.int64).reshape(len(classes), n_images)
    resamples_id = hashlib.sha256(json.dumps([int(seed), int(n_resamples), presence.tolist()]).encode()).hexdigest()[:16]
    result = Bootstrap(point, np.zeros(0), np.zeros(0), classes, level=level, resamples_id=resamples_id)
    if n_resamples <= 0 or n_images == 0 or not classes:
        return result
    counts, result.rejected = resample_counts(presence, n_resamples, seed)
    result.replicates = np.array([map_over(matches, classes, c) for c in
                                  tqdm(counts, desc="bootstrap", disable=progress_disabled(), leave=False)])
    if jackknife:
        jack = np.full(n_images, np.nan)
        for i in tqdm(range(n_images), desc="jackknife", disable=progress_disabled(), leave=False):
            weights = ones.copy()
            weights[i] = 0
            if (presence @ weights > 0).all():
                jack[i] = map_over(matches, classes, weights)
        result.jackknife = jack
    result.percentile = percentile_interval(result.replicates, level)
    result.bca = bca_interval(result.replicates, result.jackknife, point, level)
    return result


def paired_difference(a: dict, b: dict, level: float = 0.95) -> dict[str, Any]:
    """mAP50 of run ``a`` minus run ``b`` over the same image resamples, from two metrics dicts of
    :func:`evaluate` on the same test set: point, percentile and BCa intervals, bootstrap p-value."""
    for key in ("mAP50_bootstrap", "mAP50_jackknife", "bootstrap_resamples_id"):
        if key not in a or key not in b:
            raise ValueError(f"metrics without {key!r}: evaluate both runs with bootstrap > 0")
    if a["bootstrap_resamples_id"] != b["bootstrap_resamples_id"]:
        raise ValueError("the two runs were not bootstrapped over the same resamples (different test "
                         "sets, seeds or resample counts): their difference cannot be paired")
    diff = np.asarray(a["mAP50_bootstrap"], dtype=float) - np.asarray(b["mAP50_bootstrap"], dtype=float)
    jack = _floats(a["mAP50_jackknife"]) - _floats(b["mAP50_jackknife"])
    point = _value(a["mAP50"]) - _value(b["mAP50"])
    return {"delta": point, "delta_ci": percentile_interval(diff, level), "delta_ci_bca": bca_interval(diff, jack, point, level),
            "p_value": bootstrap_p_value(diff), "n_resamples": int(diff.size), "replicates": diff, "jackknife": jack}


def _value(v) -> float:
    return float("nan") if v is None else float(v)


def _floats(values) -> np.ndarray:
    return np.array([_value(v) for v in values], dtype=float)


# --- the public entry point ------------------------------------------------------------------------

def _json_number(value: float) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def evaluate(gt_json: str | Path | dict, results_json: str | Path | list, voc_iou: float = 0.4,
             bootstrap: int = 1000, seed: int = 0, no_finding: bool = True, ci_level: float = 0.95) -> dict[str, Any]:
    """All detection metrics of ``results_json`` against ``gt_json`` (paths or loaded objects).

    Returns a JSON-ready dict: ``mAP``, ``mAP50``, ``mAP75`` (COCO), ``mAP50_ci`` (percentile) and
    ``mAP50_ci_bca`` ([low, high]) with the bootstrap's replicates, jackknife values and resample id,
    ``voc_mAP`` (the VinBigData metric at ``voc_iou``; also ``voc_mAP40`` when voc_iou is 0.4),
    ``coco101_mAP`` (the same inputs, COCO 101-point), ``per_class_AP50``, ``per_class_voc_AP`` and
    ``per_class_coco101_AP`` (name -> AP or null), ``classes_without_gt`` and counts. NaN is ``None``.
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

    vin_gt, vin_results, nf_id = add_no_finding(gt, results) if no_finding else (gt, results, None)
    vin_names = {c["id"]: str(c.get("name", c["id"])) for c in vin_gt["categories"]}
    voc_ap = voc_map(vin_gt, vin_results, voc_iou)
    coco101 = _faster_cocoeval(vin_gt, vin_results, iou_thrs=[voc_iou], max_dets=[COCO101_MAX_DETS],
                               area_all_only=True)
    coco101_ap = _per_class_ap(coco101.eval["precision"], 0)

    image_ids, matches = match_per_image(gt, results, iou=0.5, max_dets=COCO_MAX_DETS)
    boot = bootstrap_map(matches, len(image_ids), bootstrap, seed, ci_level)
    map50 = _nanmean(ap50)
    if math.isfinite(map50) and abs(boot.point - map50) > 1e-6:
        # The bootstrap re-implements only COCOeval's accumulation; any drift is a bug worth a warning.
        log.warning("bootstrap point estimate %.6f differs from COCOeval mAP50 %.6f", boot.point, map50)

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
        "mAP50_ci": [_json_number(v) for v in boot.percentile],
        "mAP50_ci_bca": [_json_number(v) for v in boot.bca],
        "ci_level": ci_level,
        "bootstrap": int(bootstrap),
        "bootstrap_classes": [names[c] for c in boot.classes],
        "bootstrap_rejected": int(boot.rejected),
        "bootstrap_resamples_id": boot.resamples_id,
        "seed": int(seed),
        "voc_iou": float(voc_iou),
        "voc_mAP": _json_number(_nanmean(np.array(list(voc_ap.values())))),
        "coco101_mAP": _json_number(_nanmean(coco101_ap)),
        "no_finding": bool(no_finding),
        "per_class_AP50": per_class_ap50,
        "per_class_voc_AP": {vin_names[c]: _json_number(v) for c, v in voc_ap.items()},
        "per_class_coco101_AP": {vin_names[c]: _json_number(v) for c, v in zip(coco101.params.catIds, coco101_ap)},
        "classes_without_gt": without_gt,
        "mAP50_bootstrap": [_json_number(v) for v in boot.replicates],
        "mAP50_jackknife": [_json_number(v) for v in boot.jackknife],
    }
    if abs(voc_iou - 0.4) < 1e-9:
        metrics["voc_mAP40"] = metrics["voc_mAP"]
        metrics["coco101_mAP40"] = metrics["coco101_mAP"]
    if nf_id is not None:
        metrics["no_finding_category_id"] = nf_id
    return metrics


def format_table(metrics: dict[str, Any]) -> str:
    """A plain-text table of the headline metrics and per-class AP50 (for the console and logs)."""
    def fmt(v):
        return "   n/a" if v is None else f"{v:6.3f}"

    ci, bca = metrics["mAP50_ci"], metrics.get("mAP50_ci_bca", [None, None])
    lines = [
        f"images {metrics['n_images']}  GT boxes {metrics['n_gt_boxes']}  predictions {metrics['n_predictions']}",
        f"mAP@[.5:.95] {fmt(metrics['mAP'])}   mAP50 {fmt(metrics['mAP50'])} "
        f"[{fmt(ci[0]).strip()}, {fmt(ci[1]).strip()}] percentile, [{fmt(bca[0]).strip()}, {fmt(bca[1]).strip()}] BCa "
        f"({int(metrics['ci_level'] * 100)}% CI, {metrics['bootstrap']} resamples over "
        f"{len(metrics.get('bootstrap_classes', []))} classes)   mAP75 {fmt(metrics['mAP75'])}",
        f"VinBigData VOC 2010 mAP@{metrics['voc_iou']:g} {fmt(metrics['voc_mAP'])}"
        f"{' (No finding as a class)' if metrics['no_finding'] else ''}   "
        f"COCO 101-point mAP@{metrics['voc_iou']:g} {fmt(metrics.get('coco101_mAP'))}",
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
