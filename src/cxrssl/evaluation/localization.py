"""How well a heatmap points at the lesions: scores of a map against the ground-truth boxes.

One scorer for every method's maps: detector CAMs (:mod:`cxrssl.cam.heatmaps`) and the image-text
similarity maps of the multimodal method (:mod:`cxrssl.multimodal.localize`, min-max scaled to
[0, 1] first), so one table compares them all. A heatmap is an (H, W) array of
non-negative relevance (negative values count as 0) in the pixels of the image whose GT boxes
(``[x0, y0, x1, y1]``, the same pixels) it is scored against; only images with at least one box
are scored. Per image:

* ``energy_in_box``: share of the map's total mass inside the union of the boxes (1 = all of it;
  a flat map scores the boxes' share of the image area);
* ``pointing_game``: 1 if the map's maximum lies inside a box (within ``tolerance`` pixels), else 0
  (Zhang et al. 2016; several equal maxima: a hit if any is inside);
* ``iou`` and ``dice`` of the map thresholded at ``threshold`` x its maximum against the box mask;
* ``cnr``: contrast-to-noise ratio ``|mean_in - mean_out| / sqrt(var_in + var_out)`` of the map
  inside and outside the boxes (as image-text grounding papers report it).

:func:`summarize_scores` gives each score's mean over images with a percentile bootstrap interval
over images (seeded).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

METRICS = ("energy_in_box", "pointing_game", "iou", "dice", "cnr")
#: Map sources of a zero-shot localization.json that are the model's (label suffix in the table):
#: the sentence-region space and the image-report space (cxrssl.multimodal.localize).
MODEL_SOURCES = {"model": "", "model_global": " (global space)"}


def box_mask(shape: tuple[int, int], boxes: Sequence[Sequence[float]]) -> np.ndarray:
    """Boolean (H, W) union of xyxy boxes; pixel (y, x) is inside when its centre (x + 0.5, y + 0.5) is."""
    height, width = int(shape[0]), int(shape[1])
    centres_x = np.arange(width) + 0.5
    centres_y = np.arange(height) + 0.5
    mask = np.zeros((height, width), dtype=bool)
    for x0, y0, x1, y1 in boxes:
        cols = (centres_x >= x0) & (centres_x < x1)
        rows = (centres_y >= y0) & (centres_y < y1)
        mask |= rows[:, None] & cols[None, :]
    return mask


def _dilate(mask: np.ndarray, pixels: int) -> np.ndarray:
    if pixels <= 0:
        return mask
    import cv2

    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * pixels + 1, 2 * pixels + 1))
    return cv2.dilate(mask.astype(np.uint8), kernel).astype(bool)


def score_heatmap(heatmap: np.ndarray, boxes: Sequence[Sequence[float]], threshold: float = 0.5,
                  tolerance: int = 0) -> dict[str, float] | None:
    """The scores of one map (see the module docstring); None for an image without boxes."""
    heat = np.clip(np.nan_to_num(np.asarray(heatmap, dtype=np.float64)), 0.0, None)
    if heat.ndim != 2:
        raise ValueError(f"a heatmap must be 2-D (H, W), got shape {heat.shape}")
    if len(boxes) == 0:
        return None
    mask = box_mask(heat.shape, boxes)
    if not mask.any():
        return None
    total, peak = float(heat.sum()), float(heat.max())
    scores = {"energy_in_box": float(heat[mask].sum() / total) if total > 0 else float("nan"),
              "pointing_game": float(bool((_dilate(mask, tolerance) & (heat == peak)).any())) if peak > 0 else 0.0}
    binary = heat >= threshold * peak if peak > 0 else np.zeros_like(mask)
    inter, union = float((binary & mask).sum()), float((binary | mask).sum())
    scores["iou"] = inter / union if union else float("nan")
    scores["dice"] = 2 * inter / (binary.sum() + mask.sum()) if (binary.sum() + mask.sum()) else float("nan")
    inside, outside = heat[mask], heat[~mask]
    spread = math.sqrt(inside.var() + outside.var()) if outside.size else 0.0
    scores["cnr"] = abs(inside.mean() - outside.mean()) / spread if spread > 0 else float("nan")
    return scores


def iou_at_thresholds(heatmap: np.ndarray, boxes: Sequence[Sequence[float]], thresholds: Sequence[float]) -> np.ndarray:
    """:func:`score_heatmap`'s ``iou`` at every threshold at once (the same binarisation,
    ``heat >= t * peak``, counted from sorted values instead of one mask per threshold)."""
    heat = np.clip(np.nan_to_num(np.asarray(heatmap, dtype=np.float64)), 0.0, None)
    mask = box_mask(heat.shape, boxes)
    t = np.asarray(thresholds, dtype=np.float64)
    peak, n_box = float(heat.max()), int(mask.sum())
    if peak > 0:
        cut = t * peak
        every, inside = np.sort(heat.ravel()), np.sort(heat[mask])
        predicted = every.size - np.searchsorted(every, cut, side="left")
        inter = inside.size - np.searchsorted(inside, cut, side="left")
    else:
        predicted = inter = np.zeros(t.shape, dtype=np.int64)
    union = predicted + n_box - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, inter / np.maximum(union, 1), np.nan)


def summarize_scores(rows: Sequence[dict], n_resamples: int = 1000, seed: int = 0, level: float = 0.95,
                     groups: Sequence | None = None) -> dict[str, dict]:
    """Per score: ``mean`` over the rows where it is defined, percentile bootstrap ``ci`` over
    images (``[None, None]`` without resamples or with fewer than two defined rows), and ``n``.

    ``groups`` (one label per row, e.g. the image of each (image, finding) item): rows of a group
    are resampled together (a cluster bootstrap over images); None: every row is its own image.
    """
    out = {}
    rng = np.random.default_rng(seed)
    if groups is None:
        index, n_groups = np.arange(len(rows)), len(rows)
    else:
        if len(groups) != len(rows):
            raise ValueError(f"{len(groups)} group labels for {len(rows)} rows")
        _, index = np.unique(np.asarray(groups, dtype=str), return_inverse=True)
        n_groups = int(index.max()) + 1 if len(rows) else 0
    draws = rng.integers(0, n_groups, size=(n_resamples, n_groups)) if rows and n_resamples > 0 else None
    for metric in METRICS:
        values = np.array([r[metric] if r.get(metric) is not None else np.nan for r in rows], dtype=float)
        defined = np.isfinite(values)
        mean = float(values[defined].mean()) if defined.any() else float("nan")
        ci = [float("nan"), float("nan")]
        if draws is not None and defined.sum() >= 2:
            sums = np.bincount(index, weights=np.where(defined, values, 0.0), minlength=n_groups)
            counts = np.bincount(index, weights=defined.astype(float), minlength=n_groups)
            sampled, drawn = sums[draws].sum(axis=1), counts[draws].sum(axis=1)
            means = sampled[drawn > 0] / drawn[drawn > 0]
            alpha = (1 - level) / 2
            ci = [float(v) for v in np.percentile(means, [100 * alpha, 100 * (1 - alpha)])]
        out[metric] = {"mean": _num(mean), "ci": [_num(v) for v in ci], "n": int(defined.sum())}
    return out


def xywh_to_xyxy(boxes: Sequence[Sequence[float]]) -> list[list[float]]:
    """``[x, y, w, h]`` boxes (NIH, RSNA, MS-CXR files) as the ``[x0, y0, x1, y1]`` this scorer takes."""
    return [[float(x), float(y), float(x) + float(w), float(y) + float(h)] for x, y, w, h in boxes]


def _num(value: float) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


# --- one table for every method's maps -------------------------------------------------------------

def comparison_rows(cams: Sequence[tuple[dict, dict]] = (), zeroshot: Sequence[tuple[str, dict]] = ()) -> list[dict]:
    """Rows of the localisation comparison: detector CAM runs and zero-shot similarity maps (with
    their baselines), each score as mean and 95 percent CI.

    ``cams``: ``(run, localization.json)`` with ``run`` = ``{engine, init, res, seed}``;
    ``zeroshot``: ``(box layout, localization.json of cxrssl.multimodal.zeroshot)``.
    """
    def cells(summary: dict) -> dict:
        out = {}
        for metric in METRICS:
            entry = summary.get(metric) or {}
            lo, hi = (entry.get("ci") or [None, None])[:2]
            out.update({metric: entry.get("mean"), f"{metric}_ci_low": lo, f"{metric}_ci_high": hi})
        return out

    rows = []
    for run, loc in cams:
        rows.append({"maps": f"CAM ({loc.get('engine', run['engine'])})", "method": str(run["init"]),
                     "boxes": "VinDr-CXR test", "query": "detector boxes", "setting": f"{run['res']}px seed {run['seed']}",
                     **cells(loc["summary"])})
    for layout, loc in zeroshot:
        method = loc.get("method", "multimodal")
        for query, sources in sorted(loc["queries"].items()):
            models = [s for s in MODEL_SOURCES if s in sources]
            for source in (*models, *sorted(s for s in sources if s not in MODEL_SOURCES)):
                entry = sources[source]
                label = f"{method}{MODEL_SOURCES[source]}" if source in MODEL_SOURCES else f"{source} baseline"
                rows.append({"maps": "image-text similarity" if source in MODEL_SOURCES else "baseline", "method": label,
                             "boxes": layout, "query": query, "setting": f"threshold {entry['threshold']:g} (val)",
                             **cells(entry["scores"])})
    return rows


def comparison_markdown(rows: Sequence[dict], digits: int = 3) -> str:
    """The comparison rows as a Markdown table: each score ``mean [low, high]``."""
    def fmt(v):
        return "n/a" if v is None or not math.isfinite(v) else f"{v:.{digits}f}"

    head = ["maps", "method", "boxes", "query", "setting", *METRICS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        scores = [f"{fmt(r[m])} [{fmt(r[f'{m}_ci_low'])}, {fmt(r[f'{m}_ci_high'])}]" for m in METRICS]
        lines.append("| " + " | ".join([str(r[k]) for k in head[:5]] + scores) + " |")
    return "\n".join(lines) + "\n"
