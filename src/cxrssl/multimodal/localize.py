"""Annotation-free localisation: similarity maps as heatmaps, scored against boxes, with baselines.

A heatmap is a float ``(H, W)`` array at the image's pixel size, boxes are ``[x, y, w, h]`` in
the same pixels; :func:`score_map` min-max scales a map to [0, 1] and scores it with the project's
one localisation scorer, :func:`cxrssl.evaluation.localization.score_heatmap` (the one the
detectors' CAMs are scored with), so the two kinds of maps are comparable in one table.
Everything else (box files, threshold choice, baselines, bootstrap, tables, panels) is built on it.

Scores of one item (one finding in one image; its boxes' union is the ground-truth mask), all of
the scaled map (:data:`METRICS`): ``energy_in_box`` (share of the map's mass in the boxes),
``pointing_game`` (the maximum in a box; of a plateau, any maximal pixel), ``iou`` / ``dice`` of
the map thresholded at ``t`` (``t`` chosen on a validation split to maximise the mean IoU, never
on test) and ``cnr`` (``|mean_in - mean_out| / sqrt(var_in + var_out)``, BioViL's definition,
invariant to the map's scale and offset).

Two maps per query, one per embedding space of the model: ``model`` (the sentence-region space:
the local head's region features against the query's local embedding, the paper's map) and
``model_global`` (the image-report space: the global head applied at every location, dot product
with the query's normalised report embedding; since the head is linear and the global vector is
the pooled map, the locations' mean is the image's score, so the map is the CAM of the
image-report similarity, as dense CLIP maps are read).

Baselines: a random map (uniform noise on the model's finest region grid, the sentence-region
space's, upsampled bilinearly: the same smoothness as the model's maps) and a centre prior
(isotropic Gaussian at the image centre, sigma = a quarter of the side). Confidence intervals:
percentile bootstrap over images (an image's items are resampled together).

Box files: NIH ``BBox_List_2017.csv`` (header ``Image Index,Finding Label,Bbox [x,y,w,h],,,``,
read by position, "Infiltrate" as spelled there), RSNA ``stage_2_train_labels.csv``
(``patientId,x,y,width,height,Target``; Target 1 rows are "Lung Opacity" boxes scored with
pneumonia prompts, Target 0 rows carry no box) and MS-CXR ``MS_CXR_Local_Alignment_v1.1.0.csv``
(``dicom_id, category_name, label_text, path, x, y, w, h, ...``; its ``label_text`` is the
report sentence of the box, the query of sentence grounding; its ``split`` column is ignored).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from cxrssl.errors import BadInputError, Quarantine
from cxrssl.evaluation import localization as shared
from cxrssl.io import atomic_savefig

log = logging.getLogger(__name__)

BOX_COLUMNS = ["image_id", "finding", "x", "y", "w", "h"]
RSNA_FINDING = "Lung Opacity"
#: Zero-shot prompts per finding (no location words): their mean embedding is the query.
PROMPTS: dict[str, tuple[str, ...]] = {
    "Atelectasis": ("There is atelectasis.", "Plate-like atelectasis."),
    "Cardiomegaly": ("The heart is enlarged.", "Cardiomegaly."),
    "Effusion": ("There is a pleural effusion.", "Pleural effusion."),
    "Infiltrate": ("There are patchy infiltrates.", "Infiltrate."),
    "Mass": ("There is a mass.", "Lung mass."),
    "Nodule": ("There is a nodule.", "Pulmonary nodule."),
    "Pneumonia": ("There is consolidation concerning for pneumonia.", "Pneumonia."),
    "Pneumothorax": ("There is a pneumothorax.", "Pneumothorax."),
    RSNA_FINDING: ("There is an airspace opacity concerning for pneumonia.", "Consolidation consistent with pneumonia."),
    # MS-CXR categories
    "Pleural Effusion": ("There is a pleural effusion.", "Pleural effusion."),
    "Consolidation": ("There is consolidation.", "Airspace consolidation."),
    "Edema": ("There is pulmonary edema.", "Pulmonary edema."),
}
METRICS = shared.METRICS  # energy_in_box, pointing_game, iou, dice, cnr


# --- box files -------------------------------------------------------------------------------------

def _boxes_frame(rows: list) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=BOX_COLUMNS).astype({"x": float, "y": float, "w": float, "h": float})


def _check_box(where: str, values: Sequence[str]) -> list[float]:
    try:
        x, y, w, h = (float(v) for v in values)
    except (TypeError, ValueError):
        raise BadInputError(where, f"box {list(values)} is not four numbers") from None
    if not all(np.isfinite([x, y, w, h])) or w <= 0 or h <= 0 or x < 0 or y < 0:
        raise BadInputError(where, f"box x={x}, y={y}, w={w}, h={h}: needs finite x, y >= 0 and w, h > 0")
    return [x, y, w, h]


def read_nih_boxes(path: str | Path, quarantine: Quarantine) -> pd.DataFrame:
    """NIH ``BBox_List_2017.csv`` -> ``image_id, finding, x, y, w, h`` (columns by position)."""
    path = Path(path)
    frame = pd.read_csv(path, dtype=str, keep_default_na=False, header=0)
    if frame.shape[1] < 6 or list(frame.columns[:2]) != ["Image Index", "Finding Label"]:
        raise BadInputError(str(path), f"header {list(frame.columns)[:6]} is not NIH's "
                            "'Image Index,Finding Label,Bbox [x,y,w,h],,,'")
    rows = []
    for k, r in enumerate(frame.itertuples(index=False)):
        try:
            if not r[0].strip() or not r[1].strip():
                raise BadInputError(f"{path}:row {k + 1}", "empty image name or finding label")
            rows.append([r[0].strip(), r[1].strip(), *_check_box(f"{path}:row {k + 1}", r[2:6])])
        except BadInputError as err:
            quarantine.add(err)
    return _boxes_frame(rows)


def read_rsna_labels(path: str | Path, quarantine: Quarantine) -> tuple[pd.DataFrame, list[str]]:
    """RSNA ``stage_2_train_labels.csv`` -> (boxes with finding "Lung Opacity", every patientId)."""
    path = Path(path)
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    need = ["patientId", "x", "y", "width", "height", "Target"]
    if list(frame.columns[:6]) != need:
        raise BadInputError(str(path), f"columns {list(frame.columns)} are not RSNA's {need}")
    rows, ids = [], []
    for k, r in enumerate(frame.itertuples(index=False)):
        where = f"{path}:row {k + 1}"
        try:
            if not r.patientId.strip() or r.Target not in ("0", "1"):
                raise BadInputError(where, f"patientId {r.patientId!r} / Target {r.Target!r}: expected an id and 0 or 1")
            if r.Target == "1":
                rows.append([r.patientId.strip(), RSNA_FINDING, *_check_box(where, [r.x, r.y, r.width, r.height])])
            elif any(v.strip() for v in (r.x, r.y, r.width, r.height)):
                raise BadInputError(where, "Target 0 with a box")
            ids.append(r.patientId.strip())
        except BadInputError as err:
            quarantine.add(err)
    return _boxes_frame(rows), sorted(set(ids))


def read_ms_cxr(path: str | Path, quarantine: Quarantine) -> pd.DataFrame:
    """MS-CXR phrase grounding -> ``image_id`` (dicom_id), ``finding`` (category), box, ``sentence``, ``path``."""
    path = Path(path)
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    need = ["dicom_id", "category_name", "label_text", "path", "x", "y", "w", "h"]
    missing = [c for c in need if c not in frame.columns]
    if missing:
        raise BadInputError(str(path), f"missing column(s) {missing}; has {list(frame.columns)}")
    rows = []
    for k, r in enumerate(frame.itertuples(index=False)):
        where = f"{path}:row {k + 1}"
        try:
            if not (r.dicom_id.strip() and r.category_name.strip() and r.label_text.strip() and r.path.strip()):
                raise BadInputError(where, "empty dicom_id, category_name, label_text or path")
            rows.append([r.dicom_id.strip(), r.category_name.strip(), *_check_box(where, [r.x, r.y, r.w, r.h]),
                         r.label_text.strip(), r.path.strip()])
        except BadInputError as err:
            quarantine.add(err)
    return pd.DataFrame(rows, columns=[*BOX_COLUMNS, "sentence", "path"]).astype(
        {"x": float, "y": float, "w": float, "h": float})


def localisation_items(boxes: pd.DataFrame) -> pd.DataFrame:
    """One item per (image, finding[, sentence]): ``image_id, finding, boxes`` (list of [x, y, w, h]).

    With a ``sentence`` column (MS-CXR) the boxes of one sentence form one item, which keeps it.
    """
    keys = ["image_id", "finding"] + (["sentence"] if "sentence" in boxes.columns else [])
    grouped = boxes.groupby(keys, sort=True)[["x", "y", "w", "h"]]
    return pd.DataFrame([dict(zip(keys, key), boxes=g.to_numpy().tolist()) for key, g in grouped])


# --- metrics of one map: the shared scorer (cxrssl.evaluation.localization) ----------------------

def box_mask(boxes: Iterable[Sequence[float]], shape: tuple[int, int]) -> np.ndarray:
    """Union of ``[x, y, w, h]`` boxes as a bool mask; pixel (r, c) is in when its centre is."""
    return shared.box_mask(shape, shared.xywh_to_xyxy(boxes))


def normalise(heatmap: np.ndarray) -> np.ndarray:
    """Min-max scaling to [0, 1] (a constant map becomes 0 everywhere)."""
    m = np.asarray(heatmap, np.float64)
    lo, span = float(m.min()), float(np.ptp(m))
    return (m - lo) / span if span > 0 else np.zeros_like(m)


def score_map(heatmap: np.ndarray, boxes: Iterable[Sequence[float]], threshold: float) -> dict[str, float]:
    """:data:`METRICS` of one similarity map ``(H, W)`` against its ``[x, y, w, h]`` boxes.

    The map is min-max scaled to [0, 1] and scored by :func:`cxrssl.evaluation.localization.score_heatmap`
    (the detectors' CAM scorer) at ``threshold`` (of the scaled map's maximum, 1). Undefined
    scores (a constant map's energy share and CNR) are NaN, left out of means as there.
    """
    m, xyxy = _scaled(heatmap, boxes)
    scores = shared.score_heatmap(m, xyxy, threshold=threshold)
    return {k: float(scores[k]) for k in METRICS}


def _scaled(heatmap: np.ndarray, boxes: Iterable[Sequence[float]]) -> tuple[np.ndarray, list[list[float]]]:
    """The min-max scaled map and the boxes as ``[x0, y0, x1, y1]``; at least one box pixel in the map."""
    boxes = list(boxes)
    m = normalise(heatmap)
    if not box_mask(boxes, m.shape).any():
        raise ValueError("no box pixel inside the map")
    return m, shared.xywh_to_xyxy(boxes)


def choose_threshold(maps: Sequence[np.ndarray], boxes: Sequence, grid: Sequence[float] | None = None) -> float:
    """The threshold (of the min-max scaled maps) with the best mean IoU over validation items."""
    grid = np.round(np.arange(0.05, 1.0, 0.05), 2) if grid is None else np.asarray(grid)
    if not len(maps):
        raise ValueError("no validation items to choose a threshold on")
    # (items, thresholds): score_map's iou at every threshold
    ious = np.stack([shared.iou_at_thresholds(*_scaled(m, b), grid) for m, b in zip(maps, boxes)])
    best, best_t = -1.0, float(grid[0])
    for t, mean in zip(grid, ious.mean(axis=0)):
        if mean > best + 1e-12:
            best, best_t = float(mean), float(t)
    return best_t


# --- baselines -------------------------------------------------------------------------------------

def random_map(shape: tuple[int, int], grid: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Uniform noise on the region grid, upsampled bilinearly to ``shape``."""
    from cxrssl.multimodal.image import region_map

    noise = torch.from_numpy(rng.random(grid[0] * grid[1]).astype(np.float32))
    return region_map(noise, grid, shape).numpy()


def centre_map(shape: tuple[int, int]) -> np.ndarray:
    """Isotropic Gaussian at the image centre, sigma = a quarter of the shorter side."""
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w]
    sigma = min(h, w) / 4
    return np.exp(-(((yy + 0.5 - h / 2) ** 2 + (xx + 0.5 - w / 2) ** 2) / (2 * sigma ** 2)))


# --- model heatmaps --------------------------------------------------------------------------------

@torch.no_grad()
def image_regions(model, images: np.ndarray, batch_size: int = 32) -> tuple[dict[str, torch.Tensor],
                                                                            dict[str, tuple[int, int]]]:
    """Per space, region features ``(N, h*w, D)`` of uint8 ``(N, S, S)`` model-size images and their
    grid, from one backbone pass (:meth:`cxrssl.multimodal.image.ImageEncoder.regions`): ``local``
    L2-normalised (cosine maps); ``global`` not normalised (their mean is the image's global
    embedding, so a map of dot products with a query is that similarity's CAM: each location's
    share of it)."""
    from cxrssl.ssl.augment import normalize_views

    device = next(model.parameters()).device
    out, grids = {}, {}
    for k in range(0, len(images), batch_size):
        x = normalize_views(torch.from_numpy(np.ascontiguousarray(images[k:k + batch_size])).unsqueeze(1), device)
        for space, (r, grid) in model.image.regions(x).items():
            r = torch.nn.functional.normalize(r.float(), dim=-1) if space == "local" else r.float()
            out.setdefault(space, []).append(r.cpu())
            grids[space] = grid
    return {space: torch.cat(parts) for space, parts in out.items()}, grids


def similarity_map(regions: torch.Tensor, query: torch.Tensor, grid: tuple[int, int],
                   size: tuple[int, int]) -> np.ndarray:
    """One image's regions ``(R, D)`` dotted with the normalised query ``(D,)``, at ``size`` (a cosine
    map for normalised regions, :func:`image_regions`)."""
    from cxrssl.multimodal.image import region_map

    sim = regions @ torch.nn.functional.normalize(query.float().cpu(), dim=-1)
    return region_map(sim, grid, tuple(size)).numpy()


def prompt_embeddings(model, findings: Iterable[str], space: str = "local") -> dict[str, torch.Tensor]:
    """Mean (normalised) embedding of each finding's prompts in ``space`` (local or global)."""
    out = {}
    for f in findings:
        emb = torch.nn.functional.normalize(model.embed_sentences(list(PROMPTS[f]), space), dim=-1).mean(0)
        out[f] = emb
    return out


# --- evaluation ------------------------------------------------------------------------------------

def bootstrap_ci(scores: pd.DataFrame, metric: str, n: int, seed: int, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean of ``metric`` over items, resampling images
    (:func:`cxrssl.evaluation.localization.summarize_scores` with the items grouped by image)."""
    summary = shared.summarize_scores(scores.to_dict("records"), n, seed, level, groups=scores["image_id"].tolist())
    lo, hi = summary[metric]["ci"]
    return (float("nan") if lo is None else lo, float("nan") if hi is None else hi)


def score_items(items: pd.DataFrame, maps: Sequence[np.ndarray], threshold: float) -> pd.DataFrame:
    """Per-item scores (``image_id, finding`` + :data:`METRICS`)."""
    rows = [dict(image_id=r.image_id, finding=r.finding, **score_map(m, r.boxes, threshold))
            for r, m in zip(items.itertuples(index=False), maps)]
    return pd.DataFrame(rows, columns=["image_id", "finding", *METRICS])


def evaluate_maps(items: pd.DataFrame, maps: dict[str, Sequence[np.ndarray]], n_boot: int = 1000,
                  seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Score every map source (``maps[name][k]`` is the map of ``items`` row k).

    ``items`` needs a ``split`` column (``val``/``test``): each source's threshold is chosen on
    its val items, scores are reported on test. Returns (per-item test scores with a ``source``
    column, summary: source, metric, mean, ci_low, ci_high, threshold, n_items, n_images).
    """
    val, test = items["split"].eq("val").to_numpy(), items["split"].eq("test").to_numpy()
    if not val.any() or not test.any():
        raise ValueError("localisation needs val items (threshold) and test items (scores)")
    per_item, summary = [], []
    for name, source in maps.items():
        source = list(source)
        t = choose_threshold([m for m, v in zip(source, val) if v], items.loc[val, "boxes"].tolist())
        scores = score_items(items[test], [m for m, k in zip(source, test) if k], t).assign(source=name)
        per_item.append(scores)
        stats = shared.summarize_scores(scores.to_dict("records"), n_boot, seed, groups=scores["image_id"].tolist())
        for metric in METRICS:
            lo, hi = (np.nan if v is None else v for v in stats[metric]["ci"])
            summary.append(dict(source=name, metric=metric, mean=np.nan if stats[metric]["mean"] is None
                                else stats[metric]["mean"], ci_low=lo, ci_high=hi, threshold=t, n_items=len(scores),
                                n_images=scores["image_id"].nunique()))
    return pd.concat(per_item, ignore_index=True), pd.DataFrame(summary)


def split_images(image_ids: Sequence[str], val_fraction: float, seed: int,
                 patient_of: Callable[[str], str] = lambda i: i) -> dict[str, str]:
    """image -> ``val``/``test``, patient-disjoint and seeded (threshold choice vs scoring)."""
    patients = sorted({patient_of(i) for i in image_ids})
    order = [patients[int(k)] for k in np.random.default_rng(seed).permutation(len(patients))]
    n_val = min(max(1, round(val_fraction * len(patients))), len(patients) - 1)
    val = set(order[:n_val])
    return {i: "val" if patient_of(i) in val else "test" for i in image_ids}


# --- panels ----------------------------------------------------------------------------------------

def save_panel(images: Sequence[np.ndarray], maps: dict[str, Sequence[np.ndarray]], boxes: Sequence,
               titles: Sequence[str], path: str | Path) -> None:
    """One column per example (image, boxes), one row per map source (overlaid on the image)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    rows = ["image", *maps]
    fig, axes = plt.subplots(len(rows), len(images), figsize=(2.2 * len(images), 2.2 * len(rows)), squeeze=False)
    for c, img in enumerate(images):
        for r, name in enumerate(rows):
            ax = axes[r, c]
            ax.imshow(img, cmap="gray", vmin=0, vmax=255)
            if name != "image":
                ax.imshow(normalise(maps[name][c]), cmap="jet", alpha=0.45, vmin=0, vmax=1)
            for x, y, w, h in boxes[c]:
                ax.add_patch(Rectangle((x, y), w, h, fill=False, ec="lime", lw=1.2))
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(titles[c], fontsize=7)
            if c == 0:
                ax.set_ylabel(name, fontsize=8)
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=110)
    plt.close(fig)
