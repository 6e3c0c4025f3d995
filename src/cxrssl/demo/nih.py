"""NIH ChestX-ray14-like part of the demo: Kaggle folder layout, Data_Entry_2017.csv, split lists,
BBox_List_2017.csv, all in the exact formats of the real distribution (REFERENCE.md section 2)."""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from cxrssl.classes import NIH_FINDINGS, NIH_NO_FINDING
from cxrssl.demo.phantom import NIH_PAINTERS, Anatomy, Canvas, render_anatomy
from cxrssl.io import atomic_path, atomic_write_text
from cxrssl.utils import progress_disabled

log = logging.getLogger(__name__)

#: The real header, trailing comma included (pandas then sees an extra "Unnamed: 11" column).
DATA_ENTRY_HEADER = (
    "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
    "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],"
)
BBOX_HEADER = "Image Index,Finding Label,Bbox [x,y,w,h],,,"
#: Findings that the real BBox_List_2017.csv has boxes for, with its spelling ("Infiltrate").
BBOX_LABELS = {
    "Atelectasis": "Atelectasis", "Cardiomegaly": "Cardiomegaly", "Effusion": "Effusion",
    "Infiltration": "Infiltrate", "Mass": "Mass", "Nodule": "Nodule", "Pneumonia": "Pneumonia",
    "Pneumothorax": "Pneumothorax",
}
#: Images per Kaggle folder in the real data is ~10,000; the demo fills two folders.
N_FOLDERS = 2
STREAM = 1  # random stream id of this part (VinDr uses another), so each part is reproducible alone


def _rng(seed: int, *key: int) -> np.random.Generator:
    return np.random.default_rng([seed, STREAM, *key])


def _assign_patients(n_images: int, n_patients: int, rng: np.random.Generator) -> list[int]:
    """Patient id (1-based) of each image: every patient has at least one image."""
    extra = rng.choice(n_patients, size=n_images - n_patients, replace=True) if n_images > n_patients else []
    counts = np.ones(n_patients, int) + np.bincount(np.asarray(extra, int), minlength=n_patients)
    return [pid + 1 for pid in range(n_patients) for _ in range(counts[pid])]


def _draw_findings(rng: np.random.Generator) -> list[str]:
    """About half the images are normal; the rest carry 1-3 findings (NIH is multi-label)."""
    if rng.random() < 0.5:
        return []
    names = list(NIH_PAINTERS)
    weights = np.array([NIH_PAINTERS[n][1] for n in names])
    k = int(rng.choice([1, 2, 3], p=[0.6, 0.3, 0.1]))
    picked = rng.choice(len(names), size=k, replace=False, p=weights / weights.sum())
    return sorted(names[i] for i in picked)


def render_nih(size: int, anatomy: Anatomy, findings: list[str], rng: np.random.Generator):
    """Grey uint8 image of ``size`` x ``size`` with the findings drawn; returns (image, {finding: box})."""
    c = Canvas(size, size, anatomy)
    emphysema = "Emphysema" in findings
    render_anatomy(c, lung_scale=1.1 if emphysema else 1.0, lung_darkening=0.07 if emphysema else 0.0)
    boxes = {}
    for name in findings:
        painter = NIH_PAINTERS[name][0]
        if painter is not None:
            boxes[name] = painter(c, rng)
    gamma = rng.uniform(0.85, 1.15)
    img = np.clip(c.img, 0, 1) ** gamma
    return np.round(img * 255).astype(np.uint8), boxes


def _save_png(arr: np.ndarray, path: Path, rgba: bool) -> None:
    im = Image.fromarray(arr, mode="L")
    if rgba:  # a few real NIH PNGs are RGBA; readers must convert them to L
        im = im.convert("RGBA")
    with atomic_path(path) as tmp:
        im.save(tmp, format="PNG")


def _csv_line(values) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerow(values)
    return buf.getvalue()


def make_nih(root: str | Path, *, n_images: int, n_patients: int, image_size: int,
             seed: int, on_image: Callable[[dict], None] | None = None) -> tuple[dict, list[Path]]:
    """Write the NIH-like dataset under ``root`` (the folder that ``nih.root`` points at).

    Returns the summary counts and the paths of the images written. ``on_image`` (optional) is
    called with what is known about each image once it is written (index, name, patient, view,
    findings, pixel boxes, anatomy, path, test patient or not), e.g. to write its report; it
    draws nothing from this generator's random streams, so the NIH files stay the same bytes.
    """
    root = Path(root)
    if n_patients > n_images:
        raise ValueError(f"n_nih_patients ({n_patients}) must not exceed n_nih ({n_images})")
    if n_patients < 2:
        raise ValueError("n_nih_patients must be at least 2 (train_val and test need a patient each)")
    rng = _rng(seed, 0)
    patients = _assign_patients(n_images, n_patients, rng)
    names = []
    follow = {}
    for pid in patients:
        follow[pid] = follow.get(pid, -1) + 1
        names.append(f"{pid:08d}_{follow[pid]:03d}.png")
    # Patient-level split (~25 % test), as the official lists are patient-disjoint.
    n_test_pat = min(n_patients - 1, max(1, round(0.25 * n_patients)))
    test_patients = set((rng.permutation(n_patients)[:n_test_pat] + 1).tolist())
    rgba_idx = set(rng.choice(n_images, size=min(2, n_images), replace=False).tolist())
    per_folder = -(-n_images // N_FOLDERS)

    # Per-patient constants (anatomy, sex, age, original size) from the patient's own stream.
    pat_info = {}
    for pid in range(1, n_patients + 1):
        prng = _rng(seed, 1, pid)
        pat_info[pid] = dict(anatomy=Anatomy.sample(prng), sex=str(prng.choice(["M", "F"])),
                             age=int(prng.integers(18, 86)), spacing=float(prng.choice([0.143, 0.139, 0.168])),
                             width=int(prng.integers(2000, 3057)), height=int(prng.integers(2000, 3057)))

    rows, bbox_rows, labels, written = [], [], [], []
    for i, name in enumerate(tqdm(names, desc="NIH demo images", disable=progress_disabled())):
        pid = patients[i]
        irng = _rng(seed, 2, i)
        info = pat_info[pid]
        findings = _draw_findings(irng)
        anatomy = info["anatomy"].jittered(irng)
        img, boxes = render_nih(image_size, anatomy, findings, irng)
        folder = root / f"images_{i // per_folder + 1:03d}" / "images"
        _save_png(img, folder / name, rgba=i in rgba_idx)
        written.append(folder / name)
        fu = int(name[9:12])
        view = "PA" if irng.random() < 0.7 else "AP"
        rows.append([name, "|".join(findings) or NIH_NO_FINDING, fu, pid, info["age"] + fu // 4, info["sex"], view,
                     info["width"], info["height"], info["spacing"], info["spacing"]])
        labels.append(findings)
        if on_image is not None:
            on_image(dict(index=i, name=name, patient_id=pid, view=view, findings=list(findings), boxes=dict(boxes),
                          anatomy=anatomy, path=folder / name, image_size=image_size, sex=info["sex"],
                          age=info["age"] + fu // 4, test=pid in test_patients))
        for f, (x0, y0, x1, y1) in boxes.items():
            if f in BBOX_LABELS:
                bbox_rows.append([name, BBOX_LABELS[f], x0, y0, x1 - x0, y1 - y0])

    # The real BBox list covers ~1 % of the images; keep a deterministic handful.
    keep = max(3, n_images // 20)
    bbox_rows = [bbox_rows[int(j)] for j in sorted(rng.permutation(len(bbox_rows))[:keep])]

    # Rows end without the header's trailing comma, as in the real file.
    atomic_write_text(DATA_ENTRY_HEADER + "\n" + "".join(_csv_line(r) for r in rows), root / "Data_Entry_2017.csv")
    bbox_text = BBOX_HEADER + "\n" + "".join(
        _csv_line([r[0], r[1], *(f"{v:.6f}" for v in r[2:])]) for r in bbox_rows)
    atomic_write_text(bbox_text, root / "BBox_List_2017.csv")
    train_val = sorted(n for n, p in zip(names, patients) if p not in test_patients)
    test = sorted(n for n, p in zip(names, patients) if p in test_patients)
    # No newline at the end of the file, like the official lists.
    atomic_write_text("\n".join(train_val), root / "train_val_list.txt")
    atomic_write_text("\n".join(test), root / "test_list.txt")

    prevalence = {f: sum(f in fs for fs in labels) for f in NIH_FINDINGS}
    log.info("NIH demo: %d images of %d patients (%d train_val, %d test), %d RGBA, %d bbox rows",
             n_images, n_patients, len(train_val), len(test), len(rgba_idx), len(bbox_rows))
    return {"images": n_images, "patients": n_patients, "train_val": len(train_val), "test": len(test),
            "rgba": len(rgba_idx), "no_finding": sum(not fs for fs in labels), "bbox_rows": len(bbox_rows),
            "prevalence": prevalence, "image_size": image_size}, written
