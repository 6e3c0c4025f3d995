"""Entry point of the demo generator: both datasets, the NIH images' reports, a preview, then the manifest."""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
from PIL import Image, ImageDraw

from cxrssl.demo import lungs as demo_lungs
from cxrssl.demo import reports as demo_reports
from cxrssl.demo.nih import make_nih
from cxrssl.demo.vindr import make_vindr
from cxrssl.io import atomic_path, atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
#: Written first; lets a rerun clean a folder that a crashed run left without a manifest.
MARKER = ".cxrssl-demo"
FORMAT_VERSION = 1
_GENERATED = (
    ("nih", re.compile(r"images_\d{3}/images/\d{8}_\d{3}\.png")),
    ("vindr", re.compile(r"(train|test)/[0-9a-f]{32}\.dicom")),
    ("reports", re.compile(r"iu_xray/(ecgen-radiology/\d+\.xml|NLMCXR_png/CXR\d+_IM-\d{4}-\d{4}\.png)"
                           r"|mimic_cxr/files/p\d\d/p\d{8}/s\d{8}(\.txt|/[0-9a-f-]{44}\.jpg)"
                           r"|localization/images/\d{8}_\d{3}\.png")),
    ("lungs", re.compile(demo_lungs.GENERATED)),
)
REPORTS = "reports"  # reports of the NIH-like images and localisation box files (cxrssl.demo.reports)
LUNGS = "lungs"  # lung masks of NIH-like images, Montgomery and Shenzhen layouts (cxrssl.demo.lungs)


def make_demo_dataset(root: str | Path, *, n_nih: int = 240, n_nih_patients: int = 80, n_vindr_train: int = 120,
                      n_vindr_test: int = 40, image_size: int = 256, seed: int = 0) -> dict:
    """Generate the demo under ``root`` and return the summary that is also saved as manifest.json.

    Same arguments, same bytes. Files of an earlier demo run that the new one does not produce
    (e.g. after lowering ``n_vindr_train``) are removed so folder globs see only the new dataset.
    A non-empty ``root`` that was not made by this generator is refused rather than overwritten.
    """
    root = Path(root)
    _check_root(root)
    if n_vindr_train < 1 or n_vindr_test < 1:
        raise ValueError("n_vindr_train and n_vindr_test must be at least 1")
    if image_size < 32:
        raise ValueError(f"image_size must be at least 32, got {image_size}")
    start = time.perf_counter()
    root.mkdir(parents=True, exist_ok=True)
    (root / MANIFEST).unlink(missing_ok=True)  # incomplete until the new manifest is written
    atomic_write_text("cxrssl synthetic demo dataset (safe to delete)\n", root / MARKER)
    records: list[dict] = []
    nih, nih_files = make_nih(root / "nih", n_images=n_nih, n_patients=n_nih_patients, image_size=image_size,
                              seed=seed, on_image=records.append)
    reports, report_files = demo_reports.make_reports(root / REPORTS, records, seed=seed)
    lungs, lung_files = demo_lungs.make_lung_masks(root / LUNGS, records)
    vindr, vindr_files = make_vindr(root / "vindr", n_train=n_vindr_train, n_test=n_vindr_test, image_size=image_size,
                       seed=seed)
    removed = _remove_stale(root, nih_files + vindr_files + report_files + lung_files)
    write_preview(root, root / "preview.png")
    summary = {
        "format_version": FORMAT_VERSION,
        "seed": seed,
        "settings": {"n_nih": n_nih, "n_nih_patients": n_nih_patients, "n_vindr_train": n_vindr_train,
                     "n_vindr_test": n_vindr_test, "image_size": image_size},
        "nih": nih,
        "vindr": vindr,
        "reports": reports,
        "lungs": lungs,
        "files": sorted(str(p.relative_to(root)) for p in _key_files(root)),
    }
    atomic_write_json(summary, root / MANIFEST)
    log.info("demo dataset written to %s in %.1f s (%d stale files removed)", root,
             time.perf_counter() - start, removed)
    return summary


def _key_files(root: Path) -> list[Path]:
    """The CSVs and lists that downstream stages read (the Snakemake rule's declared outputs)."""
    return [root / "nih" / n for n in ("Data_Entry_2017.csv", "train_val_list.txt", "test_list.txt",
                                       "BBox_List_2017.csv")] + \
        [root / "vindr" / n for n in ("train.csv", "annotations/annotations_train.csv",
                                      "annotations/annotations_test.csv", "annotations/image_labels_train.csv",
                                      "annotations/image_labels_test.csv")] + [root / "preview.png"] + \
        [root / REPORTS / n for n in demo_reports.KEY_FILES]


def _check_root(root: Path) -> None:
    if not root.exists():
        return
    if not root.is_dir():
        raise NotADirectoryError(f"demo root {root} exists and is not a folder")
    if (root / MARKER).exists() or (root / MANIFEST).exists():
        return
    files = [p for p in root.rglob("*") if p.is_file()]
    # Snakemake may leave empty output folders and its own removed outputs; real data never.
    if files:
        raise FileExistsError(
            f"demo root {root} holds files ({files[0]}, ...) but no {MARKER} marker: refusing to write "
            "demo data into a folder this generator did not make. Point demo.root at an empty folder.")


def _remove_stale(root: Path, written: list[Path]) -> int:
    """Delete generated-looking images of an earlier run that this run did not write."""
    keep = {p.resolve() for p in written}
    removed = 0
    for sub, pattern in _GENERATED:
        base = root / sub
        for path in sorted(base.rglob("*")):
            if path.is_file() and pattern.fullmatch(path.relative_to(base).as_posix()) \
                    and path.resolve() not in keep:
                path.unlink()
                removed += 1
    return removed


def write_preview(root: Path, out: Path, n: int = 6, tile: int = 192) -> None:
    """A montage for people: VinDr test images with consensus boxes, then NIH images with labels."""
    ann = pd.read_csv(root / "vindr" / "annotations" / "annotations_test.csv")
    ids = list(dict.fromkeys(ann.loc[ann["x_min"].notna(), "image_id"]))[:n]
    entries = pd.read_csv(root / "nih" / "Data_Entry_2017.csv", usecols=[0, 1])
    nih = entries[entries["Finding Labels"] != "No Finding"].head(n)
    canvas = Image.new("RGB", (tile * n, tile * 2 + 24), "black")
    draw = ImageDraw.Draw(canvas)
    for k, image_id in enumerate(ids):
        ds = pydicom.dcmread(root / "vindr" / "test" / f"{image_id}.dicom", force=True)
        if "TransferSyntaxUID" not in ds.file_meta:
            ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
        arr = ds.pixel_array.astype(np.float32)
        if ds.PhotometricInterpretation == "MONOCHROME1":
            arr = arr.max() - arr
        arr = (arr - arr.min()) / max(float(np.ptp(arr)), 1.0) * 255
        scale = tile / max(arr.shape)
        im = Image.fromarray(arr.astype(np.uint8)).resize((round(arr.shape[1] * scale), round(arr.shape[0] * scale)))
        canvas.paste(im.convert("RGB"), (k * tile, 0))
        for _, r in ann[(ann["image_id"] == image_id) & ann["x_min"].notna()].iterrows():
            box = [k * tile + r.x_min * scale, r.y_min * scale, k * tile + r.x_max * scale, r.y_max * scale]
            draw.rectangle(box, outline=(255, 60, 60), width=2)
            draw.text((box[0] + 2, box[1] + 1), r.class_name, fill=(255, 220, 0))
    for k, (_, row) in enumerate(nih.iterrows()):
        path = next((root / "nih").glob(f"images_*/images/{row['Image Index']}"))
        im = Image.open(path).convert("L").resize((tile, tile))
        canvas.paste(im.convert("RGB"), (k * tile, tile))
        draw.text((k * tile + 2, 2 * tile + 4), row["Finding Labels"][:28], fill=(255, 220, 0))
    with atomic_path(out) as tmp:
        canvas.save(tmp, format="PNG")
