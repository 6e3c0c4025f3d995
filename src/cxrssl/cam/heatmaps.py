"""Heatmaps of trained detectors on test images: Ablation-CAM (fast path) or EigenCAM, drawn with the
GT boxes (green) and the explained predictions (red), and a side-by-side panel across inits.

The explained predictions are those scoring at least ``score_thr``, or the ``top_k`` best when none
does; the CAM target is the library's ``FasterRCNNBoxScoreTarget`` on them (sum of IoU + score of
the matching detections). An image without any prediction cannot be explained by ablation (the
target score is 0): it falls back to EigenCAM and says so in the title and the manifest. Maps are
corrected for the detector's padding to 32 (:class:`cxrssl.cam.ablation.PaddingAwareCAM`).

Each run also scores its maps against the GT boxes (:mod:`cxrssl.evaluation.localization`: share
of heat inside the boxes, pointing game, IoU/Dice, CNR) on the drawn images plus, up to
``n_scored``, further test images with boxes, and writes ``localization.json`` (per image and the
means with bootstrap intervals over images).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from cxrssl.cam.ablation import FastAblationCAM, FPNReshape, PaddedAblationCAM, PaddedEigenCAM
from cxrssl.cam.names import heatmap_name
from cxrssl.errors import BadInputError
from cxrssl.evaluation.localization import score_heatmap, summarize_scores
from cxrssl.io import atomic_savefig, atomic_write_json
from cxrssl.utils import pick_device, progress_disabled

log = logging.getLogger(__name__)

METHODS = ("ablation", "eigen")
ENGINES = ("torchvision", "mmdet")


# --- models ---------------------------------------------------------------------------------------

def load_model(engine: str | None, checkpoint: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """A trained detector of any engine in eval mode (:func:`cxrssl.detection.engines.load_detector`:
    torchvision-like answers, ``.backbone`` returning the FPN levels) and its meta. ``engine``, when
    given, must be the checkpoint's."""
    from cxrssl.detection.engines import load_detector

    model, meta = load_detector(checkpoint, device)
    if engine is not None and meta["engine"] != engine:
        raise ValueError(f"{checkpoint} is a {meta['engine']} checkpoint, not {engine}'s")
    return model.eval(), dict(meta)


def geometry_of(model: nn.Module, height: int, width: int) -> tuple[int, int, int, int] | None:
    """(resized h, w, padded h, w) of an input inside ``model`` when it says (``input_geometry``)."""
    geometry = getattr(model, "input_geometry", None)
    return tuple(geometry(height, width)) if callable(geometry) else None


def resolve_device(name: str) -> torch.device:
    return pick_device(None if name == "auto" else name)


def resolve_layer(model: nn.Module, path: str) -> nn.Module:
    """The module at dotted ``path`` (e.g. ``backbone`` or ``backbone.body.layer4``)."""
    try:
        return model.get_submodule(path)
    except AttributeError:
        children = [name for name, _ in model.named_children()]
        raise ValueError(f"heatmaps.target_layer {path!r} is not a module of {type(model).__name__} "
                         f"(top-level modules: {children})") from None


# --- one CAM --------------------------------------------------------------------------------------

@dataclass
class CamResult:
    cam: np.ndarray  # (H, W) float32 in [0, 1], the input image's size
    boxes: np.ndarray  # explained predictions, (N, 4) xyxy
    labels: np.ndarray
    scores: np.ndarray
    method: str  # what actually ran: "ablation" or "eigen"
    seconds: float
    note: str = ""
    n_channels_ablated: int = 0
    extra: dict = field(default_factory=dict)


def explained_predictions(output: Mapping[str, torch.Tensor], score_thr: float, top_k: int):
    """Predictions scoring >= ``score_thr``, else the ``top_k`` best (numpy boxes, labels, scores)."""
    boxes = output["boxes"].detach().float().cpu().numpy().reshape(-1, 4)
    labels = output["labels"].detach().cpu().numpy().astype(np.int64)
    scores = output["scores"].detach().float().cpu().numpy()
    order = np.argsort(-scores, kind="stable")
    keep = order[scores[order] >= score_thr]
    if keep.size == 0:
        keep = order[:top_k]
    return boxes[keep], labels[keep], scores[keep]


def vit_of(model: nn.Module, layer: nn.Module) -> nn.Module | None:
    """The timm ViT of ``model`` that holds ``layer`` (None when the layer is in none)."""
    for module in model.modules():
        if hasattr(module, "num_prefix_tokens") and hasattr(module, "patch_embed"):
            if any(sub is layer for sub in module.modules()):
                return module
    return None


def token_reshape_for(model: nn.Module, layer: nn.Module, height: int, width: int):
    """The :class:`~cxrssl.detection.vitdet.TokenReshape` of a ViT token layer for a ``height`` x
    ``width`` input of the ViT (a detector's padded canvas): its patch grid, prefix tokens dropped."""
    from cxrssl.detection.vitdet import TokenReshape

    vit = vit_of(model, layer)
    if vit is None:
        raise ValueError("the target layer returns tokens (B, N, C) but is in no ViT of the model")
    patch = vit.patch_embed.patch_size
    return TokenReshape(vit.num_prefix_tokens, (int(height) // patch[0], int(width) // patch[1]))


def _predict(model: nn.Module, batch: torch.Tensor, layer: nn.Module):
    """Predictions for one image and whether the target layer returns a mapping (FPN levels), a map
    or ViT tokens (``"mapping"``, ``"map"``, ``"tokens"``)."""
    seen = {}

    def hook(_module, _inputs, output):
        seen["mapping"] = ("mapping" if isinstance(output, Mapping)
                           else "tokens" if torch.is_tensor(output) and output.dim() == 3 else "map")

    handle = layer.register_forward_hook(hook)
    try:
        with torch.inference_mode():
            output = model(batch)[0]
    finally:
        handle.remove()
    if "mapping" not in seen:
        raise ValueError("the target layer did not run in the model's forward pass; check heatmaps.target_layer")
    return output, seen["mapping"]


def compute_cam(model: nn.Module, image: torch.Tensor, method: str = "ablation", target_layer: str = "backbone",
                ratio: float = 0.1, batch_size: int = 32, score_thr: float = 0.5, top_k: int = 3,
                min_grid: int = 16) -> CamResult:
    """The CAM of one (3, H, W) image in [0, 1] for the model's own confident predictions.

    ``min_grid``: FPN targets are summed on the coarsest level with at least that many cells on its
    short side (0: the coarsest level, as the library does); see :class:`FPNReshape`.
    """
    from pytorch_grad_cam.utils.model_targets import FasterRCNNBoxScoreTarget

    if method not in METHODS:
        raise ValueError(f"unknown CAM method {method!r}; expected one of {METHODS}")
    model.eval()
    device = next(model.parameters()).device
    layer = resolve_layer(model, target_layer)
    batch = image.unsqueeze(0).to(device)
    start = time.perf_counter()
    output, kind = _predict(model, batch, layer)
    boxes, labels, scores = explained_predictions(output, score_thr, top_k)
    geometry = geometry_of(model, *image.shape[-2:])
    reshape = None
    if kind == "mapping":
        reshape = FPNReshape(min_grid)
    elif kind == "tokens":  # the ViT sees the padded canvas
        reshape = token_reshape_for(model, layer, *(geometry[2:] if geometry else image.shape[-2:]))
    target = FasterRCNNBoxScoreTarget(labels=list(labels), bounding_boxes=boxes)
    note, used, n_ablated = "", method, 0
    if method == "ablation" and len(boxes) == 0:
        note, used = "no prediction to explain: EigenCAM instead", "eigen"
    with torch.inference_mode():
        if used == "ablation":
            cam_obj = FastAblationCAM(model, [layer], reshape_transform=reshape, batch_size=batch_size,
                                      ratio_channels_to_ablate=ratio)
            cam_obj.geometry = geometry
            try:
                cam = cam_obj(batch, targets=[target])[0]
                n_ablated = cam_obj.n_channels_ablated
            finally:
                cam_obj.release()
        else:
            cam_obj = PaddedEigenCAM(model, [layer], reshape_transform=reshape)
            cam_obj.geometry = geometry
            try:
                cam = cam_obj(batch, targets=[target])[0]
            finally:
                cam_obj.activations_and_grads.release()
    cam = np.clip(np.nan_to_num(np.asarray(cam, dtype=np.float32)), 0.0, 1.0)
    return CamResult(cam, boxes, labels, scores, used, time.perf_counter() - start, note, n_ablated)


def library_ablation_cam(model: nn.Module, image: torch.Tensor, boxes: np.ndarray, labels: Sequence[int],
                         batch_size: int = 32, ratio: float = 1.0, reshape_transform=None) -> np.ndarray:
    """The library's own Ablation-CAM recipe for a torchvision Faster R-CNN (its tutorial defaults:
    ``model.backbone``, every channel ablated, the coarsest FPN level as grid unless another
    ``reshape_transform`` is given); the reference the fast path is measured against. It gets the
    same padding correction as the fast path, so the two differ only in the channels ablated."""
    from pytorch_grad_cam.ablation_layer import AblationLayerFasterRCNN
    from pytorch_grad_cam.utils.model_targets import FasterRCNNBoxScoreTarget
    from pytorch_grad_cam.utils.reshape_transforms import fasterrcnn_reshape_transform

    device = next(model.parameters()).device
    cam_obj = PaddedAblationCAM(model, [model.backbone],
                                reshape_transform=reshape_transform or fasterrcnn_reshape_transform,
                                ablation_layer=AblationLayerFasterRCNN(), batch_size=batch_size,
                                ratio_channels_to_ablate=ratio)
    cam_obj.geometry = geometry_of(model, *image.shape[-2:])
    try:
        cam = cam_obj(image.unsqueeze(0).to(device),
                      targets=[FasterRCNNBoxScoreTarget(labels=list(labels), bounding_boxes=boxes)])[0]
    finally:
        cam_obj.activations_and_grads.release()
    return np.asarray(cam, dtype=np.float32)


# --- images ---------------------------------------------------------------------------------------

def image_key(image: dict) -> str:
    return str(image.get("vindr_id") or Path(image.get("file_name", str(image["id"]))).stem)


def select_images(coco: dict, n_images: int, image_ids: Sequence[str] = ()) -> list[dict]:
    """The ``image_ids`` (vindr_id, file stem or COCO id) in that order, or the ``n_images`` images
    with most GT boxes (ties: by id), deterministic."""
    images = coco["images"]
    if image_ids:
        lookup = {}
        for image in images:
            for key in (image_key(image), str(image["id"])):
                lookup.setdefault(key, image)
        missing = [i for i in image_ids if str(i) not in lookup]
        if missing:
            raise ValueError(f"heatmaps.images: {missing} are not images of the test COCO file")
        return [lookup[str(i)] for i in image_ids]
    if n_images > len(images):
        raise ValueError(f"heatmaps.n_images is {n_images} but the test set has only {len(images)} images")
    counts = {image["id"]: 0 for image in images}
    for ann in coco["annotations"]:
        counts[ann["image_id"]] = counts.get(ann["image_id"], 0) + 1
    return sorted(images, key=lambda im: (-counts[im["id"]], image_key(im), im["id"]))[:n_images]


# --- drawing --------------------------------------------------------------------------------------

def draw_heatmap(ax, grey: np.ndarray, cam: np.ndarray, gt_boxes, gt_names, pred_boxes, pred_names, pred_scores,
                 title: str) -> None:
    """Image, CAM overlay, GT boxes (green) and explained predictions (red, dashed) with class names."""
    from matplotlib.patches import Rectangle

    ax.imshow(grey, cmap="gray")
    ax.imshow(cam, cmap="jet", alpha=0.4, vmin=0.0, vmax=1.0)
    for (x0, y0, x1, y1), name in zip(gt_boxes, gt_names):
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="lime", linewidth=1.2))
        ax.text(x0, y0, name, color="black", fontsize=6, va="bottom",
                bbox={"facecolor": "lime", "alpha": 0.7, "pad": 1, "linewidth": 0})
    for (x0, y0, x1, y1), name, score in zip(pred_boxes, pred_names, pred_scores):
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="red", linewidth=1.2,
                               linestyle="--"))
        ax.text(x0, y1, f"{name} {score:.2f}", color="white", fontsize=6, va="top",
                bbox={"facecolor": "red", "alpha": 0.7, "pad": 1, "linewidth": 0})
    ax.set_title(title, fontsize=8)
    ax.axis("off")


def _xyxy(anns: list[dict]) -> list[tuple[float, float, float, float]]:
    return [(a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]) for a in anns]


def scored_images(coco: dict, drawn: Sequence[dict], n_scored: int) -> list[dict]:
    """The drawn images, then more test images with boxes (most boxes first, by id) up to ``n_scored``."""
    with_boxes = {a["image_id"] for a in coco["annotations"]}
    chosen = list(drawn)
    if n_scored > len(chosen):
        seen = {im["id"] for im in chosen}
        extra = [im for im in select_images(coco, len(coco["images"])) if im["id"] in with_boxes and im["id"] not in seen]
        chosen += extra[: n_scored - len(chosen)]
    return chosen


def render_run(engine: str | None, checkpoint: str | Path, coco_json: str | Path, out_dir: str | Path,
               settings: Mapping[str, Any], label: str = "", seed: int = 0) -> dict:
    """Heatmaps of one detection run: ``heatmap_XX.png`` per drawn image, ``heatmaps.json`` and the
    localisation scores ``localization.json`` (bootstrap ``seed``) in ``out_dir``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cxrssl.detection.transforms import read_grey_image, to_model_tensor

    coco_json, out_dir = Path(coco_json), Path(out_dir)
    coco = json.loads(coco_json.read_text())
    names = {c["id"]: c["name"] for c in coco["categories"]}
    selected = select_images(coco, int(settings["n_images"]), settings.get("images") or ())
    scored = scored_images(coco, selected, int(settings.get("n_scored", 0)))
    device = resolve_device(settings.get("device", "auto"))
    model, meta = load_model(engine, checkpoint, device)
    log.info("heatmaps of %s (%s) on %s: %d images drawn, %d scored, method %s, layer %s, ratio %.3g, batch %d",
             checkpoint, meta["engine"], device, len(selected), len(scored), settings["method"],
             settings["target_layer"], settings["ratio_channels_to_ablate"], settings["batch_size"])
    gt_by_image: dict[int, list[dict]] = {}
    for ann in coco["annotations"]:
        gt_by_image.setdefault(ann["image_id"], []).append(ann)
    entries, scores = [], []
    threshold = float(settings.get("loc_threshold", 0.5))
    for index, image in enumerate(tqdm(scored, desc="heatmaps", disable=progress_disabled())):
        path = coco_json.parent / image["file_name"]
        grey = read_grey_image(path)
        if (grey.shape[0], grey.shape[1]) != (image.get("height", grey.shape[0]), image.get("width", grey.shape[1])):
            raise BadInputError(str(path), f"image is {grey.shape[1]}x{grey.shape[0]} but {coco_json} says "
                                           f"{image.get('width')}x{image.get('height')}")
        result = compute_cam(model, to_model_tensor(grey, path), method=settings["method"],
                             target_layer=settings["target_layer"], ratio=settings["ratio_channels_to_ablate"],
                             batch_size=settings["batch_size"], score_thr=settings["score_thr"],
                             top_k=settings["top_k"], min_grid=settings["min_grid"])
        gts = gt_by_image.get(image["id"], [])
        gt_boxes = _xyxy(gts)
        score = score_heatmap(result.cam, gt_boxes, threshold=threshold)
        if score is not None:
            scores.append({"image_id": image["id"], "key": image_key(image), "n_gt_boxes": len(gts),
                           "method": result.method, "drawn": index < len(selected), **score})
        if index >= len(selected):
            continue
        title = f"{label + ' | ' if label else ''}{image_key(image)} | {result.method}"
        if result.note:
            title += f"\n({result.note})"
        fig, ax = plt.subplots(figsize=(5, 5 * grey.shape[0] / grey.shape[1]))
        draw_heatmap(ax, grey, result.cam, gt_boxes, [names.get(a["category_id"], "?") for a in gts],
                     result.boxes, [names.get(int(c), str(c)) for c in result.labels], result.scores, title)
        fig.tight_layout()
        png = out_dir / heatmap_name(index)
        atomic_savefig(fig, png, dpi=150)
        plt.close(fig)
        log.info("%s: %s in %.1f s (%d channels ablated, %d boxes explained) -> %s", image_key(image),
                 result.method, result.seconds, result.n_channels_ablated, len(result.boxes), png)
        entries.append({
            "index": index, "png": png.name, "image_id": image["id"], "key": image_key(image),
            "file_name": image["file_name"], "n_gt_boxes": len(gts), "method": result.method, "note": result.note,
            "seconds": round(result.seconds, 3), "n_channels_ablated": result.n_channels_ablated,
            "explained": [{"category_id": int(c), "name": names.get(int(c), str(c)), "score": float(s),
                           "box_xyxy": [float(v) for v in b]}
                          for b, c, s in zip(result.boxes, result.labels, result.scores)],
            "localization": score,
        })
    manifest = {"engine": meta["engine"], "checkpoint": str(checkpoint), "label": label, "device": str(device),
                "settings": dict(settings), "meta": {k: v for k, v in meta.items() if isinstance(v, (str, int, float))},
                "images": entries}
    atomic_write_json(manifest, out_dir / "heatmaps.json")
    localization = {"engine": meta["engine"], "checkpoint": str(checkpoint), "label": label,
                    "method": settings["method"], "threshold": threshold, "n_images": len(scores),
                    "summary": summarize_scores(scores, int(settings.get("loc_bootstrap", 1000)), seed),
                    "images": scores}
    atomic_write_json(localization, out_dir / "localization.json")
    return manifest


def make_panel(columns: Sequence[tuple[str, str | Path]], out_png: str | Path, title: str = "") -> None:
    """Rows = images, columns = runs (e.g. inits): tiles the runs' heatmap PNGs, listed by their
    ``heatmaps.json`` manifests, which must show the same images in the same order."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.image as mpimg
    import matplotlib.pyplot as plt

    manifests = []
    for label, manifest_path in columns:
        manifest_path = Path(manifest_path)
        if not manifest_path.is_file():
            raise BadInputError(str(manifest_path), "heatmap manifest does not exist")
        manifests.append((label, manifest_path, json.loads(manifest_path.read_text())))
    keys = [[entry["key"] for entry in m["images"]] for _, _, m in manifests]
    if any(k != keys[0] for k in keys):
        raise ValueError(f"heatmap runs show different images: {dict(zip([c[0] for c in columns], keys))}")
    n_rows, n_cols = len(keys[0]), len(manifests)
    if n_rows == 0:
        raise ValueError("heatmap runs hold no images")
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(4 * n_cols, 4 * n_rows), squeeze=False)
    for col, (label, manifest_path, manifest) in enumerate(manifests):
        for row, entry in enumerate(manifest["images"]):
            ax = axes[row][col]
            ax.imshow(mpimg.imread(manifest_path.parent / entry["png"]))
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(label, fontsize=12)
            if col == 0:
                ax.set_ylabel(entry["key"], fontsize=9)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    atomic_savefig(fig, out_png, dpi=120)
    plt.close(fig)
