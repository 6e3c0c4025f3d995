"""One training epoch, inference to COCO results, and the COCO mAP50 used to select checkpoints.

Precision is the model's own (:func:`cxrssl.detection.model.set_precision`: bf16 backbone + FPN,
fp32 heads), so training and prediction run the same way; nothing here wraps the model in autocast.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable

import torch
from torch import nn
from tqdm import tqdm

from cxrssl.detection.schedule import WarmupCosine  # noqa: F401  (re-exported: the engine's schedule)
from cxrssl.utils import progress_disabled

log = logging.getLogger(__name__)

LOSS_KEYS = ("loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg")


def _to_device(images, targets, device):
    images = [im.to(device, non_blocking=True) for im in images]
    targets = [{k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in t.items()}
               for t in targets]
    return images, targets


def _reduce_mean(values: torch.Tensor) -> torch.Tensor:
    """Mean over ranks (identity without torch.distributed), for logging only."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        values = values.clone()
        torch.distributed.all_reduce(values)
        values /= torch.distributed.get_world_size()
    return values


def train_one_epoch(model: nn.Module, loader: Iterable, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, device: torch.device, epoch: int,
                    show_progress: bool = True, grad_clip: float = 0.0) -> list[dict]:
    """Train for one pass over ``loader``, stepping the LR every iteration; one log row per iteration
    (``epoch`` is the 1-based epoch number; ``iter`` counts iterations done, as mmdet's log).
    ``grad_clip`` > 0 caps the global gradient norm of each step."""
    model.train()
    rows = []
    bar = tqdm(loader, desc=f"epoch {epoch}", leave=False, disable=progress_disabled() or not show_progress)
    for images, targets in bar:
        images, targets = _to_device(images, targets, device)
        lr = optimizer.param_groups[0]["lr"]
        losses = model(images, targets)
        loss = sum(losses[k] for k in LOSS_KEYS)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"non-finite loss at epoch {epoch}, iteration {scheduler.last_epoch + 1}: "
                + ", ".join(f"{k}={float(losses[k]):.4g}" for k in LOSS_KEYS)
                + " (lower detection.lr or check the boxes)"
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], grad_clip)
        optimizer.step()
        iteration = scheduler.last_epoch + 1
        scheduler.step()
        logged = _reduce_mean(torch.stack([loss.detach()] + [losses[k].detach() for k in LOSS_KEYS]).float())
        row = {"epoch": epoch, "iter": iteration, "loss": float(logged[0]),
               **{k: float(v) for k, v in zip(LOSS_KEYS, logged[1:])}, "lr": lr}
        rows.append(row)
        bar.set_postfix(loss=f"{row['loss']:.3f}", lr=f"{lr:.2e}")
    return rows


@torch.no_grad()
def predict_coco(model: nn.Module, loader: Iterable, device: torch.device, score_thr: float = 0.0, desc: str = "predict", show_progress: bool = True) -> list[dict]:
    """COCO results (``image_id, category_id, bbox [x, y, w, h], score``) in the pixels of the images
    the loader yields; labels are COCO category ids, at most the model's detections per image."""
    model.eval()
    results = []
    for images, targets in tqdm(loader, desc=desc, leave=False, disable=progress_disabled() or not show_progress):
        images = [im.to(device, non_blocking=True) for im in images]
        outputs = model(images)
        for target, out in zip(targets, outputs):
            boxes = out["boxes"].float().cpu()
            scores = out["scores"].float().cpu()
            labels = out["labels"].cpu()
            keep = scores >= score_thr
            for box, score, label in zip(boxes[keep].tolist(), scores[keep].tolist(), labels[keep].tolist()):
                x0, y0, x1, y1 = box
                results.append({
                    "image_id": int(target["image_id"]),
                    "category_id": int(label),
                    "bbox": [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)],
                    "score": round(float(score), 5),
                })
    return results


def coco_map50(coco_gt: dict, results: list[dict]) -> float:
    """COCO bbox AP at IoU 0.5 (101-point, all areas, 100 detections) through faster-coco-eval.

    Images without boxes count (their detections are false positives). Returns 0.0 for no results.
    Equals the evaluation stage's ``mAP50`` (cxrssl.evaluation.metrics.evaluate, checked in the
    tests) at a fraction of its cost: that function also runs the VOC metric and the per-image
    matching for its bootstrap, too slow to repeat after every epoch.
    """
    from faster_coco_eval import COCO, COCOeval_faster

    gt = copy.deepcopy(coco_gt)
    for i, ann in enumerate(gt["annotations"]):
        ann.setdefault("id", i + 1)
        ann.setdefault("iscrowd", 0)
        ann.setdefault("area", float(ann["bbox"][2] * ann["bbox"][3]))
    if not gt["annotations"]:
        raise ValueError("mAP50 needs at least one ground-truth box; the split has none")
    if not results:
        return 0.0
    coco = COCO(gt)
    evaluator = COCOeval_faster(coco, coco.loadRes(copy.deepcopy(results)), "bbox", print_function=log.debug)
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    ap50 = float(evaluator.stats[1])
    return max(ap50, 0.0)  # -1 means "no ground truth" per category set; guarded above


def evaluate_map50(model: nn.Module, loader: Iterable, coco_gt: dict, device: torch.device,
                   score_thr: float = 0.0) -> tuple[float, list[dict]]:
    """Predict ``loader`` and score it against ``coco_gt``; returns (mAP50, results)."""
    results = predict_coco(model, loader, device, score_thr=score_thr, desc="val")
    return coco_map50(coco_gt, results), results
