"""Lung-mask datasets in the layouts of the Montgomery County and Shenzhen releases, and their split.

Layouts (``segmentation.sources``: a list of ``{layout, root}``):

* ``montgomery``: ``root/CXR_png/<name>.png`` with ``root/ManualMask/leftMask/<name>.png`` and
  ``root/ManualMask/rightMask/<name>.png`` (the same file name); the lung mask is their union.
* ``shenzhen``: ``root/CXR_png/<name>.png`` with ``root/mask/<name>_mask.png`` (both lungs).

An image is quarantined (kept out, one row with the file and the reason) when a mask is missing,
unreadable, of another size than the image, or empty; a mask without its image is reported too.
Masks are binarised at half their maximum (0/255 and 0/1 files alike).

Both releases hold one image per patient, named ``<prefix>_<nnnn>_<label>``; the patient is the
source and ``<prefix>_<nnnn>`` (any other name: its stem), and :func:`split_patients` keeps each
patient in one split.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from cxrssl.errors import BadInputError

log = logging.getLogger(__name__)

LAYOUTS = ("montgomery", "shenzhen")
COLUMNS = ["source", "layout", "name", "patient", "image", "masks"]
QUARANTINE_COLUMNS = ["source", "file", "reason"]
_PATIENT = re.compile(r"^([A-Za-z]+_\d+)_[01]$")


def patient_of(stem: str) -> str:
    match = _PATIENT.match(stem)
    return match.group(1) if match else stem


def _read_size(path: Path) -> tuple[int, int] | None:
    try:
        with Image.open(path) as im:
            return im.size
    except (OSError, ValueError):
        return None


def read_mask(paths: list[str] | str) -> np.ndarray:
    """The union of the binary masks in ``paths`` (``;``-separated in a string) as a bool array."""
    if isinstance(paths, str):
        paths = paths.split(";")
    out = None
    for path in paths:
        arr = np.asarray(Image.open(path).convert("L"))
        mask = arr > (arr.max() / 2.0) if arr.max() > 0 else np.zeros(arr.shape, bool)
        out = mask if out is None else (out | mask)
    return out


def read_image(path: str | Path) -> np.ndarray:
    """A grey uint8 image (RGB / RGBA PNGs converted)."""
    return np.asarray(Image.open(path).convert("L"))


def _mask_files(layout: str, root: Path, name: str) -> list[Path]:
    if layout == "montgomery":
        return [root / "ManualMask" / "leftMask" / name, root / "ManualMask" / "rightMask" / name]
    return [root / "mask" / f"{Path(name).stem}_mask.png"]


def parse_source(layout: str, root: str | Path, source: str | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(usable images, quarantine) of one release folder."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown lung-mask layout {layout!r}; expected one of {LAYOUTS}")
    root = Path(root)
    source = source or layout
    images_dir = root / "CXR_png"
    if not images_dir.is_dir():
        raise BadInputError(str(images_dir), f"no CXR_png folder: not a {layout} lung-mask release")
    rows, bad = [], []
    names = sorted(p.name for p in images_dir.glob("*.png"))
    for name in names:
        image = images_dir / name
        size = _read_size(image)
        if size is None:
            bad.append((source, str(image), "unreadable image"))
            continue
        masks = _mask_files(layout, root, name)
        reason = None
        for mask in masks:
            if not mask.is_file():
                reason = f"missing mask {mask.relative_to(root)}"
                break
            msize = _read_size(mask)
            if msize is None:
                reason = f"unreadable mask {mask.relative_to(root)}"
                break
            if msize != size:
                reason = f"mask {mask.relative_to(root)} is {msize[0]}x{msize[1]}, the image {size[0]}x{size[1]}"
                break
        if reason is None and not read_mask([str(m) for m in masks]).any():
            reason = "empty mask"
        if reason is not None:
            bad.append((source, str(image), reason))
            continue
        rows.append((source, layout, Path(name).stem, f"{source}:{patient_of(Path(name).stem)}", str(image),
                     ";".join(str(m) for m in masks)))
    # masks whose image is missing
    stems = {Path(n).stem for n in names}
    mask_dirs = ([root / "ManualMask" / "leftMask", root / "ManualMask" / "rightMask"] if layout == "montgomery"
                 else [root / "mask"])
    for folder in mask_dirs:
        for mask in sorted(folder.glob("*.png")):
            stem = mask.stem[: -len("_mask")] if layout == "shenzhen" and mask.stem.endswith("_mask") else mask.stem
            if stem not in stems:
                bad.append((source, str(mask), "mask without an image in CXR_png"))
    return pd.DataFrame(rows, columns=COLUMNS), pd.DataFrame(bad, columns=QUARANTINE_COLUMNS)


def parse_sources(sources: list[dict]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """All usable images of ``sources`` (``{layout, root, name?}``) and every quarantined file."""
    frames, quarantines, seen = [], [], {}
    for src in sources:
        base = src.get("name") or src["layout"]
        seen[base] = seen.get(base, 0) + 1
        name = base if seen[base] == 1 else f"{base}{seen[base]}"  # a second release of one layout
        frame, bad = parse_source(src["layout"], src["root"], name)
        frames.append(frame)
        quarantines.append(bad)
        log.info("%s (%s, %s): %d images with masks, %d quarantined", name, src["layout"], src["root"],
                 len(frame), len(bad))
    frame = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=COLUMNS)
    bad = pd.concat(quarantines, ignore_index=True) if quarantines else pd.DataFrame(columns=QUARANTINE_COLUMNS)
    return frame, bad


def split_patients(frame: pd.DataFrame, val_fraction: float, test_fraction: float, seed: int) -> pd.Series:
    """``train`` / ``val`` / ``test`` per row, patient-disjoint, from a seeded permutation of the
    patients (at least one patient in each of val and test, given three patients)."""
    patients = np.array(sorted(frame["patient"].unique()))
    if len(patients) < 3:
        raise ValueError(f"{len(patients)} patients with lung masks: a train/val/test split needs 3")
    order = np.random.default_rng(seed).permutation(len(patients))
    n_test = min(len(patients) - 2, max(1, round(test_fraction * len(patients))))
    n_val = min(len(patients) - n_test - 1, max(1, round(val_fraction * len(patients))))
    split = {}
    for rank, idx in enumerate(order):
        split[patients[idx]] = "test" if rank < n_test else "val" if rank < n_test + n_val else "train"
    return frame["patient"].map(split).rename("split")
