"""Zero-shot localisation with a trained model: heatmaps for prompts and report sentences, scored
against boxes beside a random-map and a centre-prior baseline (cxrssl.multimodal.localize).

Two queries per item (one finding, or one sentence, in one image): ``prompt`` (the finding's
prompts, no location words: the zero-shot setting of the paper) and, when the items carry a
``sentence`` (MS-CXR's ``label_text``), ``sentence`` (phrase grounding). Each query kind is
scored with the baselines on the same items; thresholds are chosen on the ``val`` items.

:func:`demo_localisation` wires the demo's held-out localisation set
(``reports/localization/``: its own images, never in a report corpus or an NIH list) in the
NIH, RSNA or MS-CXR layout.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from cxrssl.errors import BadInputError, Quarantine
from cxrssl.io import atomic_write_csv, atomic_write_json
from cxrssl.multimodal.localize import (centre_map, evaluate_maps, image_regions, localisation_items,
                                        prompt_embeddings, random_map, read_ms_cxr, read_nih_boxes, read_rsna_labels,
                                        save_panel, similarity_map, split_images)
from cxrssl.multimodal.method import load_trained

log = logging.getLogger(__name__)

SCORES, SUMMARY, PANEL, ITEMS, LOCALIZATION = "scores.csv", "summary.csv", "panel.png", "items.json", "localization.json"
#: The model's map sources: embedding space -> source name (cxrssl.multimodal.localize's module doc).
SOURCES = {"local": "model", "global": "model_global"}
BOX_LAYOUTS = ("nih", "rsna", "ms_cxr")


def _resize(image: np.ndarray, size: int) -> np.ndarray:
    x = torch.from_numpy(image.astype(np.float32))[None, None]
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x[0, 0].round().clamp(0, 255).to(torch.uint8).numpy()


def zero_shot(run_dir: str | Path, items: pd.DataFrame, load_image: Callable[[str], np.ndarray], out_dir: str | Path,
              seed: int = 0, n_boot: int = 1000, device: str = "cpu", panel_per_finding: int = 1) -> pd.DataFrame:
    """Score the model of ``run_dir`` on ``items`` (``image_id, finding, boxes, split[, sentence]``).

    ``load_image(image_id)`` gives the uint8 ``(H, W)`` image the boxes refer to. Writes
    ``summary.csv`` (query, source, metric, mean, CI, threshold, counts), ``scores.csv`` (per
    test item) and ``panel.png``; returns the summary.
    """
    out = Path(out_dir)
    model, settings = load_trained(run_dir, device)
    images = {i: load_image(i) for i in sorted(set(items["image_id"]))}
    order = sorted(images)
    small = np.stack([_resize(images[i], settings.image_size) for i in order])
    row = {i: k for k, i in enumerate(order)}
    findings = sorted(set(items["finding"]))
    by_space, grids = image_regions(model, small)
    regions = {source: by_space[space] for space, source in SOURCES.items()}
    grid = {source: grids[space] for space, source in SOURCES.items()}
    queries = {}
    for space, source in SOURCES.items():
        prompts = prompt_embeddings(model, findings, space)
        queries.setdefault("prompt", {})[source] = torch.stack([prompts[f] for f in items["finding"]])
        if "sentence" in items.columns:
            queries.setdefault("sentence", {})[source] = model.embed_sentences(items["sentence"].tolist(), space)
    rng = np.random.default_rng(seed)
    tables, per_item, panel_maps = [], [], {}
    shapes = [images[i].shape for i in items["image_id"]]
    # the random map on the finest of the model's grids (the local space's): its smoothness
    baselines = {"random": [random_map(s, grids["local"], rng) for s in shapes],
                 "centre": [centre_map(s) for s in shapes]}
    for kind, by_source in queries.items():
        start = time.perf_counter()
        maps = {source: [similarity_map(regions[source][row[r.image_id]], q[k], grid[source], images[r.image_id].shape)
                         for k, r in enumerate(items.itertuples(index=False))] for source, q in by_source.items()}
        scores, summary = evaluate_maps(items, {**maps, **baselines}, n_boot, seed)
        tables.append(summary.assign(query=kind))
        per_item.append(scores.assign(query=kind))
        panel_maps.update({f"{kind} ({space})": maps[source] for space, source in SOURCES.items()})
        log.info("%s queries: %d items in %.1f s\n%s", kind, len(items), time.perf_counter() - start,
                 summary.pivot(index="source", columns="metric", values="mean").round(3))
    summary = pd.concat(tables, ignore_index=True)[["query", "source", "metric", "mean", "ci_low", "ci_high",
                                                    "threshold", "n_items", "n_images"]]
    atomic_write_csv(summary, out / SUMMARY)
    atomic_write_csv(pd.concat(per_item, ignore_index=True), out / SCORES)
    picks = [int(k) for _, g in items[items["split"] == "test"].groupby("finding", sort=True)
             for k in g.index[:panel_per_finding]]
    if picks:
        save_panel([images[items.loc[k, "image_id"]] for k in picks],
                   {name: [maps[k] for k in picks] for name, maps in panel_maps.items()},
                   [items.loc[k, "boxes"] for k in picks],
                   [f"{items.loc[k, 'finding']}\n{items.loc[k, 'image_id']}" for k in picks], out / PANEL)
    return summary


def load_items(layout: str, boxes_file: str | Path, images_dir: str | Path, val_fraction: float = 0.4, seed: int = 0,
               quarantine: Quarantine | None = None) -> tuple[pd.DataFrame, Callable[[str], np.ndarray]]:
    """Items of a box file in ``layout`` (nih, rsna, ms_cxr), a seeded val/test split by image, and a loader.

    ``images_dir``: NIH: the folder of the ``Image Index`` files; RSNA: the folder of
    ``<patientId>.png`` (PNG copies of its DICOMs); MS-CXR: the folder its ``path`` column is
    relative to. Images are read as 8-bit grey; the boxes are in their pixels.
    """
    if layout not in BOX_LAYOUTS:
        raise ValueError(f"boxes must be one of {BOX_LAYOUTS}, got {layout!r}")
    q = quarantine or Quarantine("skip", stage="zero_shot")
    images_dir = Path(images_dir)
    if layout == "nih":
        frame = read_nih_boxes(boxes_file, q)
        paths = dict(zip(frame["image_id"], frame["image_id"]))
    elif layout == "rsna":
        frame, _ = read_rsna_labels(boxes_file, q)
        frame = frame.assign(image_id=frame["image_id"] + ".png")
        paths = dict(zip(frame["image_id"], frame["image_id"]))
    else:
        frame = read_ms_cxr(boxes_file, q)
        frame = frame.assign(image_id=frame["path"].map(lambda p: Path(p).name))
        paths = dict(zip(frame["image_id"], frame["path"]))
        frame = frame.drop(columns="path")
    items = localisation_items(frame)
    if items.empty:
        raise BadInputError(str(boxes_file), "no usable box")
    split = split_images(sorted(set(items["image_id"])), val_fraction, seed)  # one image per patient
    items = items.assign(split=items["image_id"].map(split))

    def load(image_id: str) -> np.ndarray:
        path = images_dir / paths[image_id]
        try:
            with Image.open(path) as im:
                return np.asarray(im.convert("L"), dtype=np.uint8)
        except (OSError, ValueError) as exc:
            raise BadInputError(str(path), f"not a readable image ({exc})") from None

    return items, load


def demo_paths(demo_root: str | Path, boxes: str) -> tuple[Path, Path]:
    """(box file, images folder) of the demo's held-out localisation set in layout ``boxes``."""
    loc = Path(demo_root) / "reports" / "localization"
    return {"nih": (loc / "nih" / "BBox_List_2017.csv", loc / "images"),
            "rsna": (loc / "rsna" / "stage_2_train_labels.csv", loc / "images"),
            "ms_cxr": (loc / "ms_cxr" / "MS_CXR_Local_Alignment_v1.1.0.csv", loc)}[boxes]


def demo_items(demo_root: str | Path, boxes: str = "ms_cxr", val_fraction: float = 0.4, seed: int = 0,
               quarantine: Quarantine | None = None) -> tuple[pd.DataFrame, Callable[[str], np.ndarray]]:
    """Items (with a seeded val/test split by image) and an image loader for the demo's localisation set."""
    if boxes not in BOX_LAYOUTS:
        raise ValueError(f"boxes must be one of {BOX_LAYOUTS}, got {boxes!r}")
    return load_items(boxes, *demo_paths(demo_root, boxes), val_fraction, seed, quarantine)


def localisation_json(summary: pd.DataFrame, meta: dict) -> dict:
    """``localization.json``: per query kind and map source the scores in the shape of the CAM
    runs' files (metric -> ``{mean, ci, n}``, :func:`cxrssl.evaluation.localization.summarize_scores`),
    plus the threshold chosen on validation; ``summary`` is the model's prompt maps (what the
    comparison table reads, as it reads a CAM run's ``summary``), ``global_space`` the same for the
    image-report space's maps (``model_global``)."""
    def num(v):
        return None if v is None or not np.isfinite(v) else float(v)

    queries: dict = {}
    for (query, source), g in summary.groupby(["query", "source"], sort=True):
        queries.setdefault(query, {})[source] = {
            "threshold": float(g["threshold"].iloc[0]), "n_items": int(g["n_items"].iloc[0]),
            "n_images": int(g["n_images"].iloc[0]),
            "scores": {r.metric: {"mean": num(r.mean), "ci": [num(r.ci_low), num(r.ci_high)], "n": int(r.n_items)}
                       for r in g.itertuples(index=False)}}
    return {**meta, "queries": queries, "summary": queries["prompt"]["model"]["scores"],
            "global_space": queries["prompt"]["model_global"]["scores"],
            "baselines": {k: v["scores"] for k, v in queries["prompt"].items() if k not in SOURCES.values()}}


def run_zero_shot(run_dir: str | Path, layout: str, boxes_file: str | Path, images_dir: str | Path,
                  out_dir: str | Path, seed: int = 0, n_boot: int = 1000, val_fraction: float = 0.4,
                  panel_per_finding: int = 1, on_bad_input: str = "fail", device: str = "cpu") -> dict:
    """Zero-shot localisation of a trained run on one box file: writes ``summary.csv``, ``scores.csv``,
    ``panel.png``, ``items.json``, ``quarantine.csv`` and ``localization.json`` (returned)."""
    out = Path(out_dir)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    q = Quarantine(on_bad_input, stage="zero_shot")
    items, load = load_items(layout, boxes_file, images_dir, val_fraction, seed, q)
    start = time.perf_counter()
    summary = zero_shot(run_dir, items, load, out, seed, n_boot, device=device, panel_per_finding=panel_per_finding)
    meta = {"method": "multimodal", "boxes": layout, "items": len(items), "images": int(items["image_id"].nunique()),
            "val_items": int((items["split"] == "val").sum()), "test_items": int((items["split"] == "test").sum()),
            "quarantined": len(q), "threshold_chosen_on": "val", "bootstrap": n_boot, "seconds": None}
    meta["seconds"] = round(time.perf_counter() - start, 1)
    atomic_write_json({k: meta[k] for k in ("boxes", "items", "images", "val_items", "test_items", "quarantined")},
                      out / ITEMS)
    q.write(out / "quarantine.csv")
    result = localisation_json(summary, meta)
    atomic_write_json(result, out / LOCALIZATION)
    return result


def demo_localisation(demo_root: str | Path, run_dir: str | Path, out_dir: str | Path, seed: int = 0,
                      n_boot: int = 1000, val_fraction: float = 0.4, boxes: str = "ms_cxr") -> pd.DataFrame:
    """Zero-shot localisation on the demo's held-out localisation set; ``boxes``: nih, rsna or ms_cxr."""
    q = Quarantine("skip", stage="zero_shot")
    items, load = demo_items(demo_root, boxes, val_fraction, seed, q)
    summary = zero_shot(run_dir, items, load, out_dir, seed, n_boot)
    atomic_write_json({"boxes": boxes, "items": len(items), "images": int(items["image_id"].nunique()),
                       "val_items": int((items["split"] == "val").sum()),
                       "test_items": int((items["split"] == "test").sum()), "quarantined": len(q)},
                      Path(out_dir) / ITEMS)
    return summary
