#!/usr/bin/env python
"""Split and box fusion (WBF) at the real VinDr scale: 15,000 images, 67,914 annotation rows.

Synthetic VINDR_ANNOTATIONS / VINDR_METADATA in the Kaggle VinBigData layout (3 readers per
image, as the train folder: 10,606 images that every reader called "No finding", the others with
boxes of the 14 classes, readers drawing overlapping boxes of the same finding), then the
pipeline's own stages on the files, as the rules run them: ``cxrssl.data.split.run_split`` (the
paper's protocol: abnormal images only, 70/15/15) and ``cxrssl.data.fusion.run_fusion`` (fused
CSV and the three COCO JSONs). Each size runs in a fresh child process, timed, with its peak RSS.
Baseline in the same run: the same at 1/10 of the images (``scaling`` = time at full size /
(10 x time at 1/10): 1.0 is linear).

    python benchmarks/fusion_split.py                # about 1-2 minutes on 2 busy cores
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

N_IMAGES, N_ROWS, N_NORMAL = 15_000, 67_914, 10_606  # Kaggle VinBigData train.csv


def make_tables(folder: Path, n_images: int, n_rows: int, n_normal: int, seed: int = 0) -> tuple[Path, Path]:
    from cxrssl.classes import VINDR_CLASSES, VINDR_NO_FINDING, VINDR_NO_FINDING_ID

    rng = np.random.default_rng(seed)
    ids = [f"{rng.integers(0, 2**63):016x}{i:016x}" for i in range(n_images)]
    height = rng.integers(2000, 3100, n_images)
    width = rng.integers(1800, 3000, n_images)
    rows = []
    readers = [f"R{i}" for i in range(1, 18)]
    for i in range(n_normal):
        for r in rng.choice(readers, 3, replace=False):
            rows.append((ids[i], r, VINDR_NO_FINDING, VINDR_NO_FINDING_ID, np.nan, np.nan, np.nan, np.nan))
    abnormal = np.arange(n_normal, n_images)
    n_box_rows = n_rows - len(rows)
    per_image = np.full(len(abnormal), n_box_rows // len(abnormal))
    per_image[: n_box_rows - per_image.sum()] += 1
    for i, k in zip(abnormal, per_image):
        trio = rng.choice(readers, 3, replace=False)
        findings = rng.integers(0, len(VINDR_CLASSES), max(1, k // 3))
        centres = rng.uniform(0.2, 0.8, (len(findings), 2)) * (width[i], height[i])
        for j in range(k):  # each finding drawn by the readers in turn, jittered around its centre
            f = j % len(findings)
            side = rng.uniform(80, 400, 2)
            cx, cy = centres[f] + rng.normal(0, 15, 2)
            rows.append((ids[i], trio[j % 3], VINDR_CLASSES[findings[f]], int(findings[f]),
                         max(0.0, cx - side[0] / 2), max(0.0, cy - side[1] / 2),
                         min(width[i] - 1.0, cx + side[0] / 2), min(height[i] - 1.0, cy + side[1] / 2)))
    ann = pd.DataFrame(rows, columns=["image_id", "rad_id", "class_name", "class_id", "x_min", "y_min", "x_max", "y_max"])
    ann["source_split"] = "train"
    assert len(ann) == n_rows, (len(ann), n_rows)
    scale = 1024 / np.maximum(height, width)
    meta = pd.DataFrame({"image_id": ids, "source_split": "train",
                         "png": [f"images_1024px_8bit/{i}.png" for i in ids],
                         "orig_height": height, "orig_width": width,
                         "height": np.round(height * scale).astype(int), "width": np.round(width * scale).astype(int),
                         "scale": scale, "photometric": "MONOCHROME2", "bits_stored": 12, "transfer_syntax": "1.2.840.10008.1.2.1",
                         "source_size": 8_000_000, "source_mtime": 0})
    ann.to_csv(folder / "annotations.csv", index=False)
    meta.to_csv(folder / "metadata.csv", index=False)
    return folder / "annotations.csv", folder / "metadata.csv"


def child(folder: Path) -> None:
    """One size: split then fusion on the files in ``folder``; prints the figures as JSON."""
    from cxrssl.config import section_defaults
    from cxrssl.data.fusion import SPLITS, run_fusion
    from cxrssl.data.split import run_split
    from cxrssl.errors import Quarantine

    fusion = section_defaults("vindr")["fusion"]
    start = time.perf_counter()
    split = run_split(folder / "annotations.csv", folder / "metadata.csv", folder / "split.csv", "kaggle",
                      0.15, 0.15, False, 0)
    split_s = time.perf_counter() - start
    start = time.perf_counter()
    fused = run_fusion(folder / "annotations.csv", folder / "metadata.csv", folder / "split.csv",
                       folder / "fused_boxes.csv", {s: folder / f"coco_{s}.json" for s in SPLITS},
                       quarantine=Quarantine("skip", stage="fuse_boxes"),
                       quarantine_csv=folder / "quarantine.csv", **fusion)
    fusion_s = time.perf_counter() - start
    print(json.dumps({"split_s": split_s, "fusion_s": fusion_s, "split_images": len(split),
                      "fused_boxes": len(fused),
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def run_size(folder: Path, n_images: int, n_rows: int, n_normal: int) -> dict:
    folder.mkdir(parents=True)
    start = time.perf_counter()
    make_tables(folder, n_images, n_rows, n_normal)
    made = time.perf_counter() - start
    proc = subprocess.run([sys.executable, __file__, "--child", str(folder)], capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out.update(n_images=n_images, n_rows=n_rows, tables_s=made)
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--fraction", type=int, default=10, help="Baseline size: 1/fraction of the images (default 10).")
    p.add_argument("--json", type=Path, help="Also write the figures here.")
    args = p.parse_args(argv)
    if args.child:
        return child(args.child)
    with tempfile.TemporaryDirectory(prefix="cxrssl_fusion_") as tmp:
        f = args.fraction
        small = run_size(Path(tmp) / "small", N_IMAGES // f, N_ROWS // f, N_NORMAL // f)
        full = run_size(Path(tmp) / "full", N_IMAGES, N_ROWS, N_NORMAL)
    out = {"full": full, f"baseline_1_{f}": small,
           "split_scaling": full["split_s"] / (f * small["split_s"]),
           "fusion_scaling": full["fusion_s"] / (f * small["fusion_s"]),
           "fusion_images_per_s": (N_IMAGES - N_NORMAL) / full["fusion_s"],
           "peak_rss_ratio": full["peak_rss_mb"] / small["peak_rss_mb"]}
    print(json.dumps(out, indent=1))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")
    return out


if __name__ == "__main__":
    main()
