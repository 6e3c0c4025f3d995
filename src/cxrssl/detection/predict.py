"""Run a trained detector on new chest X-rays (DICOM or PNG files or folders).

Each image is prepared exactly like the training images: DICOMs through
:func:`cxrssl.data.dicom.read_dicom` (VOI LUT/window, MONOCHROME1 inversion), then — DICOM or PNG —
:func:`cxrssl.data.convert.to_display_png` at the longest side and bit depth the detector was
trained on (stored in its checkpoint). Boxes are mapped back to the ORIGINAL pixels of each file.

Outputs in ``--out-dir``:

* ``submission.csv`` — Kaggle VinBigData format ``image_id,PredictionString`` with
  ``class_id score x_min y_min x_max y_max`` repeated, 0-based class ids (cxrssl.classes), one row
  per image, ending with the "No finding" entry ``14 p 0 0 1 1`` the competition scores for every
  image, ``p = 1 - best box score`` (:func:`cxrssl.evaluation.vinbigdata.no_finding_score`, the rule
  the evaluation uses; 1 for an image without boxes).
* ``predictions.json`` — COCO results (``image_id`` = 1..N in input order, ``category_id`` 1..14,
  ``bbox`` [x, y, w, h] in original pixels, ``score``) plus ``image_name`` (the file stem); boxes only.

Either engine's checkpoint works (:func:`cxrssl.detection.engines.load_detector`).
* ``overlays/<image_id>.png`` — the image with its boxes and class names.
* ``quarantine.csv`` — inputs that could not be read (``--on-bad-input skip``).

The image id is the file name without its suffix (VinDr ids for VinDr files); it must be unique.
With ``--pseudonymize-ids true`` every output names images by pseudonym instead
(:mod:`cxrssl.privacy`; the mapping goes to ``--private-dir``, and
``cxrssl.privacy.restore_ids`` turns the submission back into real ids for an upload).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import torch
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from cxrssl.classes import VINDR_CLASSES, VINDR_NO_FINDING_ID
from cxrssl.config import add_section_args, section_args, validate_config
from cxrssl.data.convert import to_display_png
from cxrssl.data.dicom import read_dicom
from cxrssl.detection.engines import load_detector
from cxrssl.detection.transforms import read_grey_image, to_model_tensor
from cxrssl.errors import BadInputError, Quarantine
from cxrssl.evaluation.vinbigdata import no_finding_score
from cxrssl.io import atomic_path, atomic_write_csv, atomic_write_json
from cxrssl.privacy import Pseudonymizer
from cxrssl.utils import pick_device, progress_disabled, setup_logging

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
DICOM_SUFFIXES = (".dcm", ".dicom")
#: The competition's ground truth of an image without findings (its prediction is ``14 p 0 0 1 1``).
NO_FINDING_STRING = f"{VINDR_NO_FINDING_ID} 1 0 0 1 1"


@dataclass
class Prepared:
    image_id: str
    path: Path
    tensor: torch.Tensor  # (3, h, w) at the training input size
    display: np.ndarray  # the converted grey image (for overlays)
    orig_height: int
    orig_width: int


def collect_inputs(inputs: Iterable[str | Path]) -> list[Path]:
    """Files as given, folders searched recursively for DICOM and image files; sorted, unique."""
    found: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found.extend(sorted(p for p in path.rglob("*") if p.is_file()
                                and p.suffix.lower() in DICOM_SUFFIXES + IMAGE_SUFFIXES))
        elif path.is_file():
            found.append(path)
        else:
            raise FileNotFoundError(f"input {path} does not exist")
    unique = list(dict.fromkeys(p.resolve() for p in found))
    if not unique:
        raise FileNotFoundError(f"no DICOM or image files found in {[str(i) for i in inputs]}")
    stems: dict[str, Path] = {}
    for path in unique:
        if path.stem in stems:
            raise ValueError(f"two inputs share the image id {path.stem!r}: {stems[path.stem]} and {path}")
        stems[path.stem] = path
    return unique


def read_original(path: Path) -> np.ndarray:
    """The image at its original size: float VOI output for DICOMs, the grey pixels for images."""
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return read_grey_image(path).astype(np.float32)
    image, _ = read_dicom(path)
    return image


def prepare(path: Path, input_size: int, bit_depth: int, image_id: str | None = None) -> Prepared:
    original = read_original(path)
    display, _ = to_display_png(original, input_size, bit_depth, item=str(path))
    return Prepared(image_id or path.stem, path, to_model_tensor(display, path), display, *original.shape)


def to_original(boxes: np.ndarray, prep: Prepared) -> np.ndarray:
    """xyxy boxes from converted to original pixels (per axis: the conversion rounds each side)."""
    out = boxes.astype(np.float64).copy()
    out[:, 0::2] *= prep.orig_width / prep.display.shape[1]
    out[:, 1::2] *= prep.orig_height / prep.display.shape[0]
    out[:, 0::2] = out[:, 0::2].clip(0, prep.orig_width)
    out[:, 1::2] = out[:, 1::2].clip(0, prep.orig_height)
    return out


def prediction_string(labels: np.ndarray, scores: np.ndarray, boxes: np.ndarray) -> str:
    """Kaggle PredictionString; labels are COCO ids (1..14) and become 0-based class ids; the
    "No finding" entry ``14 p 0 0 1 1`` ends every string."""
    parts = [f"{int(lab) - 1} {score:.4f} {x0:.0f} {y0:.0f} {x1:.0f} {y1:.0f}"
             for lab, score, (x0, y0, x1, y1) in zip(labels, scores, boxes)]
    parts.append(f"{VINDR_NO_FINDING_ID} {no_finding_score(scores):.4f} 0 0 1 1")
    return " ".join(parts)


_PALETTE = [tuple(int(255 * c) for c in rgb) for rgb in (
    (0.12, 0.47, 0.71), (1.0, 0.5, 0.05), (0.17, 0.63, 0.17), (0.84, 0.15, 0.16), (0.58, 0.4, 0.74),
    (0.55, 0.34, 0.29), (0.89, 0.47, 0.76), (0.74, 0.74, 0.13), (0.09, 0.75, 0.81), (0.98, 0.6, 0.6),
    (0.6, 0.87, 0.54), (1.0, 0.73, 0.47), (0.77, 0.69, 0.84), (0.97, 0.71, 0.82))]


def draw_overlay(prep: Prepared, labels: np.ndarray, scores: np.ndarray, boxes: np.ndarray, max_size: int,
                 path: Path) -> None:
    """The converted image (at most ``max_size`` px) with boxes (given in original pixels) and names."""
    grey = prep.display
    if grey.dtype != np.uint8:
        grey = (grey.astype(np.float32) / np.iinfo(grey.dtype).max * 255).round().astype(np.uint8)
    scale = min(1.0, max_size / max(grey.shape))
    if scale < 1.0:
        grey = cv2.resize(grey, (max(1, round(grey.shape[1] * scale)), max(1, round(grey.shape[0] * scale))),
                          interpolation=cv2.INTER_AREA)
    canvas = Image.fromarray(grey).convert("RGB")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=max(10, round(max(canvas.size) / 60)))
    sx, sy = canvas.size[0] / prep.orig_width, canvas.size[1] / prep.orig_height
    width = max(1, round(max(canvas.size) / 400))
    for lab, score, (x0, y0, x1, y1) in zip(labels, scores, boxes):
        color = _PALETTE[(int(lab) - 1) % len(_PALETTE)]
        rect = (x0 * sx, y0 * sy, x1 * sx, y1 * sy)
        draw.rectangle(rect, outline=color, width=width)
        text = f"{VINDR_CLASSES[int(lab) - 1]} {score:.2f}"
        left, top, right, bottom = draw.textbbox((rect[0], rect[1]), text, font=font)
        offset = bottom - top + 2
        ty = rect[1] - offset if rect[1] - offset >= 0 else rect[1]
        draw.rectangle((left, ty, right + 2, ty + offset), fill=color)
        draw.text((rect[0] + 1, ty), text, fill=(255, 255, 255), font=font)
    with atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG")


def _batches(paths: list[Path], size: int, input_size: int, bit_depth: int, quarantine: Quarantine,
             ids: Pseudonymizer) -> Iterator[list[Prepared]]:
    batch: list[Prepared] = []
    for path in paths:
        try:
            batch.append(prepare(path, input_size, bit_depth, ids.image_id(path.stem, path)))
        except BadInputError as exc:
            quarantine.add(BadInputError(ids.file_label(path), ids.scrub(exc.reason, path)) if ids.enabled else exc)
            continue
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def predict_files(checkpoint: str | Path, inputs: Iterable[str | Path], out_dir: str | Path,
                  score_thr: float | None = None, device: str | None = None, batch_size: int = 4,
                  overlay_score_thr: float = 0.3, overlay_max_size: int = 1024,
                  on_bad_input: str = "fail", pseudonymize_ids: bool = False,
                  private_dir: str | Path | None = None) -> pd.DataFrame:
    """Predict every input with the detector in ``checkpoint``; writes the outputs listed in the
    module docstring and returns the submission table. ``score_thr`` defaults to the checkpoint's."""
    out_dir = Path(out_dir)
    paths = collect_inputs(inputs)
    dev = pick_device(device)
    model, meta = load_detector(checkpoint, dev, score_thr=score_thr)
    thr = float(score_thr) if score_thr is not None else float(meta.get("score_thr", meta["settings"].get("score_thr")))
    quarantine = Quarantine(policy=on_bad_input, stage="predict")
    ids = Pseudonymizer(pseudonymize_ids, private_dir)
    log.info("predicting %d files with %s (%s engine, %s, init %s, res %d, score >= %g) on %s", len(paths), checkpoint,
             meta["engine"], meta["arch"], meta["init"], meta["res"], thr, dev)
    rows, results = [], []
    bar = tqdm(total=len(paths), desc="predict", disable=progress_disabled())
    coco_id = 0
    for batch in _batches(paths, batch_size, int(meta["input_size"]), int(meta["input_bit_depth"]), quarantine, ids):
        with torch.no_grad():
            outputs = model([p.tensor.to(dev) for p in batch])
        for prep, out in zip(batch, outputs):
            coco_id += 1
            boxes = to_original(out["boxes"].float().cpu().numpy().reshape(-1, 4), prep)
            scores = out["scores"].float().cpu().numpy()
            labels = out["labels"].cpu().numpy()
            rows.append({"image_id": prep.image_id, "PredictionString": prediction_string(labels, scores, boxes)})
            for lab, score, (x0, y0, x1, y1) in zip(labels, scores, boxes):
                results.append({"image_id": coco_id, "category_id": int(lab),
                                "bbox": [round(float(x0), 2), round(float(y0), 2),
                                         round(float(x1 - x0), 2), round(float(y1 - y0), 2)],
                                "score": round(float(score), 5), "image_name": prep.image_id})
            shown = scores >= overlay_score_thr
            draw_overlay(prep, labels[shown], scores[shown], boxes[shown], overlay_max_size,
                         out_dir / "overlays" / f"{prep.image_id}.png")
        bar.update(len(batch))
    bar.update(len(paths) - bar.n)
    bar.close()
    submission = pd.DataFrame(rows, columns=["image_id", "PredictionString"])
    atomic_write_csv(submission, out_dir / "submission.csv")
    atomic_write_json(results, out_dir / "predictions.json", indent=None)
    quarantine.write(out_dir / "quarantine.csv")
    ids.write_mapping("predict")
    log.info("wrote %d images (%d boxes, %d quarantined) to %s", len(submission), len(results), len(quarantine),
             out_dir)
    return submission


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cxrssl-predict",
        description="Detect the 14 VinDr-CXR abnormalities on new DICOM or PNG chest X-rays with a trained "
                    "cxrssl detector; writes submission.csv (Kaggle VinBigData format, original pixels), "
                    "predictions.json (COCO results) and overlays/*.png.")
    parser.add_argument("inputs", nargs="+", help="DICOM/PNG files or folders (searched recursively).")
    parser.add_argument("--checkpoint", required=True, help="best.pth of a detection run.")
    parser.add_argument("--out-dir", required=True, help="Folder receiving the outputs.")
    parser.add_argument("--score-thr", type=float, default=None,
                        help="Lowest score kept (default: the checkpoint's detection.score_thr).")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available).")
    parser.add_argument("--on-bad-input", choices=["fail", "skip"], default=validate_config({})["on_bad_input"],
                        help="Stop at an unreadable input, or list it in quarantine.csv and go on.")
    parser.add_argument("--log", default=None, help="Also log to this file.")
    add_section_args(parser, "detection.predict")
    add_section_args(parser, "privacy")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log)
    settings = section_args(args, "detection.predict")
    predict_files(args.checkpoint, args.inputs, args.out_dir, score_thr=args.score_thr, device=args.device,
                  on_bad_input=args.on_bad_input, **settings, **section_args(args, "privacy"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
