"""Zero-shot localisation with a trained model: heatmaps for prompts and report sentences, scored
against boxes beside a random-map and a centre-prior baseline (cxrssl.multimodal.localize).

Two queries per item (one finding in one image): ``prompt`` (the finding's prompts, no location
words, the zero-shot setting of the paper) and ``sentence`` (the image's own report sentence that
names the finding, as in MS-CXR phrase grounding; only items whose report has one). Each query
kind is scored on its items with the baselines on the same items.

:func:`demo_localisation` wires the demo: the NIH-like images of the NIH ``test_list`` (patients
the pretraining never saw), every box of ``reports/localization/nih/BBox_List_2017.csv`` and
the RSNA-layout boxes, the sentences of their MIMIC-layout reports (via ``nih_link.csv``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from cxrssl.errors import Quarantine
from cxrssl.io import atomic_write_csv, atomic_write_json
from cxrssl.multimodal.localize import (evaluate_maps, finding_sentence, localisation_items, prompt_embeddings,
                                        random_map, centre_map, read_nih_boxes, read_rsna_labels, save_panel,
                                        image_regions, similarity_map, split_images)
from cxrssl.multimodal.method import load_trained

log = logging.getLogger(__name__)

SCORES, SUMMARY, PANEL = "scores.csv", "summary.csv", "panel.png"


def zero_shot(run_dir: str | Path, items: pd.DataFrame, load_image: Callable[[str], np.ndarray], out_dir: str | Path,
              sentences: dict[str, list[str]] | None = None, seed: int = 0, n_boot: int = 1000,
              device: str = "cpu", panel_per_finding: int = 1) -> pd.DataFrame:
    """Score the model of ``run_dir`` on ``items`` (``image_id, finding, boxes, split``); write the tables and panel.

    ``load_image(image_id)`` gives the uint8 ``(H, W)`` image the boxes refer to; ``sentences``
    maps an image to its report sentences (sentence queries). Returns the summary table.
    """
    out = Path(out_dir)
    model, settings = load_trained(run_dir, device)
    size = settings.image_size
    images = {i: load_image(i) for i in sorted(set(items["image_id"]))}
    inputs = {i: np.asarray(torch.nn.functional.interpolate(
        torch.from_numpy(im.astype(np.float32))[None, None], size=(size, size), mode="bilinear",
        antialias=True, align_corners=False)[0, 0].round().clamp(0, 255).to(torch.uint8)) for i, im in images.items()}
    prompts = prompt_embeddings(model, sorted(set(items["finding"])))
    rng = np.random.default_rng(seed)
    order = sorted(inputs)
    regions, grid = image_regions(model, np.stack([inputs[i] for i in order]))
    row = {i: k for k, i in enumerate(order)}

    def maps_for(subset: pd.DataFrame, queries: torch.Tensor) -> list[np.ndarray]:
        return [similarity_map(regions[row[r.image_id]], queries[k], grid, images[r.image_id].shape)
                for k, r in enumerate(subset.itertuples(index=False))]

    tables, per_item, panels = [], [], {}
    queries = {"prompt": (items, torch.stack([prompts[f] for f in items["finding"]]))}
    if sentences:
        said = [finding_sentence(sentences.get(r.image_id, []), r.finding) for r in items.itertuples(index=False)]
        keep = np.array([s is not None for s in said])
        if keep.any() and items[keep]["split"].nunique() == 2:
            with torch.no_grad():
                emb = model.embed_sentences([s for s in said if s is not None])
            queries["sentence"] = (items[keep].reset_index(drop=True), emb)
    for kind, (subset, q) in queries.items():
        start = time.perf_counter()
        model_maps = maps_for(subset, q)
        shapes = [images[i].shape for i in subset["image_id"]]
        sources = {"model": model_maps, "random": [random_map(s, grid, rng) for s in shapes],
                   "centre": [centre_map(s) for s in shapes]}
        scores, summary = evaluate_maps(subset, sources, n_boot, seed)
        tables.append(summary.assign(query=kind))
        per_item.append(scores.assign(query=kind))
        panels[kind] = (subset, model_maps)
        log.info("%s queries: %d items in %.1f s\n%s", kind, len(subset), time.perf_counter() - start,
                 summary.pivot(index="source", columns="metric", values="mean").round(3))
    summary = pd.concat(tables, ignore_index=True)[["query", "source", "metric", "mean", "ci_low", "ci_high",
                                                    "threshold", "n_items", "n_images"]]
    atomic_write_csv(summary, out / SUMMARY)
    atomic_write_csv(pd.concat(per_item, ignore_index=True), out / SCORES)
    _panel(panels, images, out / PANEL, panel_per_finding)
    return summary


def _panel(panels: dict, images: dict, path: Path, per_finding: int) -> None:
    """Test examples, ``per_finding`` per finding: the image with boxes, then each query's map."""
    subset, _ = panels["prompt"]
    test = subset[subset["split"] == "test"]
    picks = [g.index[:per_finding] for _, g in test.groupby("finding", sort=True)]
    rows = [int(k) for p in picks for k in p]
    if not rows:
        return
    ex = subset.loc[rows]
    maps = {}
    for kind, (sub, mm) in panels.items():
        where = {(r.image_id, r.finding): m for r, m in zip(sub.itertuples(index=False), mm)}
        maps[f"{kind} map"] = [where.get((r.image_id, r.finding), np.zeros(images[r.image_id].shape))
                               for r in ex.itertuples(index=False)]
    save_panel([images[i] for i in ex["image_id"]], maps, ex["boxes"].tolist(),
               [f"{r.finding}\n{r.image_id}" for r in ex.itertuples(index=False)], path)


def demo_localisation(demo_root: str | Path, pairs: pd.DataFrame, run_dir: str | Path, out_dir: str | Path,
                      seed: int = 0, n_boot: int = 1000, val_fraction: float = 0.4, boxes: str = "nih",
                      images: set[str] | None = None) -> pd.DataFrame:
    """Zero-shot localisation on the demo's held-out NIH-like images (module doc).

    ``pairs``: the MIMIC-layout pairs table (its sentences); ``boxes``: ``nih`` or ``rsna``;
    ``images``: the NIH image names to score (default: the NIH ``test_list``).
    """
    root = Path(demo_root)
    q = Quarantine("skip", stage="zero_shot")
    test_list = images if images is not None else set((root / "nih" / "test_list.txt").read_text().split())
    if boxes == "nih":
        frame = read_nih_boxes(root / "reports" / "localization" / "nih" / "BBox_List_2017.csv", q)
    else:
        frame, _ = read_rsna_labels(root / "reports" / "localization" / "rsna" / "stage_2_train_labels.csv", q)
        frame = frame.assign(image_id=frame["image_id"] + ".png")
    items = localisation_items(frame[frame["image_id"].isin(test_list)])
    split = split_images(sorted(set(items["image_id"])), val_fraction, seed, patient_of=lambda i: i[:8])
    items = items.assign(split=items["image_id"].map(split))
    paths = {p.name: p for p in (root / "nih").glob("images_*/images/*.png")}
    link = pd.read_csv(root / "reports" / "nih_link.csv", dtype=str, keep_default_na=False)
    by_dicom = dict(zip(pairs["image_id"], pairs["sentences"]))
    sentences = {r[0]: by_dicom[r.dicom_id] for r in link.itertuples(index=False) if r.dicom_id in by_dicom}

    def load(image_id: str) -> np.ndarray:
        from PIL import Image

        with Image.open(paths[image_id]) as im:
            return np.asarray(im.convert("L"), dtype=np.uint8)

    summary = zero_shot(run_dir, items, load, out_dir, sentences, seed, n_boot)
    atomic_write_json({"items": len(items), "images": items["image_id"].nunique(), "boxes": boxes,
                       "quarantined": len(q)}, Path(out_dir) / "items.json")
    return summary
