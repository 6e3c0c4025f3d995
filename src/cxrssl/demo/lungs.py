"""Lung masks of the demo's NIH-like images, in the layouts of the two public lung-mask releases.

* Montgomery County (``MontgomerySet/``): ``CXR_png/MCUCXR_<nnnn>_<0|1>.png`` and, with the same
  file names, ``ManualMask/leftMask/*.png`` and ``ManualMask/rightMask/*.png`` (binary PNGs,
  0 / 255, the image's size). ``leftMask`` is the **patient's** left lung, on the image's right
  (the patient faces the viewer). The last digit is 1 for an abnormal image (TB in the release).
* Shenzhen (``ChinaSet_AllFiles/``): ``CXR_png/CHNCXR_<nnnn>_<0|1>.png`` and one mask with both
  lungs, ``mask/CHNCXR_<nnnn>_<0|1>_mask.png``. As in the distributed masks, not every image has
  one: the last Shenzhen image is written without its mask (the parser quarantines it).

One image per patient (its first NIH image, as both releases hold one image per patient); odd
patient ids go to the Montgomery layout, even ones to Shenzhen. The masks are the phantom's lung
ellipses (the soft edge cut at its middle), so they match what the image shows.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from cxrssl.demo.phantom import Canvas, _ellipse
from cxrssl.io import atomic_path

MONTGOMERY, SHENZHEN = "MontgomerySet", "ChinaSet_AllFiles"
#: Stale-file patterns of this part (relative to its folder), for the generator's clean-up.
GENERATED = (r"MontgomerySet/(CXR_png|ManualMask/leftMask|ManualMask/rightMask)/MCUCXR_\d{4}_[01]\.png"
             r"|ChinaSet_AllFiles/(CXR_png/CHNCXR_\d{4}_[01]|mask/CHNCXR_\d{4}_[01]_mask)\.png")


def lung_masks(anatomy, size: int, findings: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Binary (uint8 0/1) masks of the image-left (patient's right) and image-right (patient's
    left) lung of a ``size`` x ``size`` NIH demo image (:func:`cxrssl.demo.nih.render_nih`)."""
    c = Canvas(size, size, anatomy)
    scale = 1.1 if "Emphysema" in findings else 1.0
    masks = []
    for side in (0, 1):
        lu, lv = anatomy.lung_center(side)
        masks.append((_ellipse(c, lu, lv, anatomy.lung_rx * scale, anatomy.lung_ry * scale, soft=0.1) >= 0.5)
                     .astype(np.uint8))
    return masks[0], masks[1]


def _save(arr: np.ndarray, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        Image.fromarray(arr, mode="L").save(tmp, format="PNG")
    return path


def make_lung_masks(root: str | Path, records: list[dict]) -> tuple[dict, list[Path]]:
    """Write both layouts under ``root`` from the NIH generator's per-image ``records``."""
    root = Path(root)
    firsts: dict[int, dict] = {}
    for record in records:
        firsts.setdefault(int(record["patient_id"]), record)
    written: list[Path] = []
    counts = {"montgomery": 0, "shenzhen": 0, "shenzhen_without_mask": 0}
    shenzhen_ids = [pid for pid in sorted(firsts) if pid % 2 == 0]
    for pid in sorted(firsts):
        record = firsts[pid]
        image = np.asarray(Image.open(record["path"]).convert("L"))
        right_lung, left_lung = lung_masks(record["anatomy"], int(record["image_size"]), record["findings"])
        name = f"{pid:04d}_{1 if record['findings'] else 0}"
        if pid % 2:
            base = root / MONTGOMERY
            written.append(_save(image, base / "CXR_png" / f"MCUCXR_{name}.png"))
            written.append(_save(left_lung * 255, base / "ManualMask" / "leftMask" / f"MCUCXR_{name}.png"))
            written.append(_save(right_lung * 255, base / "ManualMask" / "rightMask" / f"MCUCXR_{name}.png"))
            counts["montgomery"] += 1
        else:
            base = root / SHENZHEN
            written.append(_save(image, base / "CXR_png" / f"CHNCXR_{name}.png"))
            counts["shenzhen"] += 1
            if len(shenzhen_ids) > 1 and pid == shenzhen_ids[-1]:
                counts["shenzhen_without_mask"] += 1
                continue
            written.append(_save(np.maximum(left_lung, right_lung) * 255, base / "mask" / f"CHNCXR_{name}_mask.png"))
    return counts, written
