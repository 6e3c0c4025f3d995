"""Fuse the radiologists' boxes with weighted boxes fusion (WBF) and write COCO files per split.

VinDr-CXR training images carry three independent readers' boxes; the detector is trained on one
consensus box set per image, made with ``ensemble_boxes.weighted_boxes_fusion``: each reader is one
list, every box has confidence 1 and weight 1, so a box drawn by k of n readers gets score k/n
(conf_type ``avg``; WBF itself counts boxes, so a reader who drew two overlapping boxes would count
twice: the ``avg`` score is the share of distinct readers, ``n_readers / n``); a repeated reader
row (same image, reader, class and box) is dropped before fusion. WBF expects coordinates in [0, 1]: boxes are
normalised by the image's ORIGINAL width/height first (pixel coordinates would be clipped to 1 and
dropped without a word).

Images with a single reader (PhysioNet's test consensus) are passed through: only exact duplicate
boxes are merged, since WBF would also merge a reader's own overlapping boxes.

Outputs: VINDR_FUSED (original pixels, all splits) and one COCO detection JSON per split with boxes
in converted-image pixels, categories from :func:`cxrssl.classes.coco_categories` (checked against
the canonical table on the way out).
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd
from ensemble_boxes import weighted_boxes_fusion
from tqdm.auto import tqdm

from cxrssl.classes import VINDR_CLASSES, VINDR_NO_FINDING_ID, check_class_names, coco_categories
from cxrssl.data.annotations import MIN_BOX_SIDE
from cxrssl.errors import BadInputError, Quarantine
from cxrssl.io import atomic_savefig, atomic_write_csv, atomic_write_json
from cxrssl.utils import progress_disabled

log = logging.getLogger(__name__)

COORDS = ["x_min", "y_min", "x_max", "y_max"]
FUSED_COLUMNS = ["image_id", "split", "class_name", "class_id", *COORDS, "score", "n_readers"]
CONF_TYPES = ("avg", "max", "box_and_model_avg", "absent_model_aware_avg")
SPLITS = ("train", "val", "test")
#: Boxes running past the image border by at most this share of its width/height are clipped;
#: larger overshoots mean the box belongs to another image size and are quarantined.
OVERSHOOT_TOLERANCE = 0.01
METADATA_COLUMNS = ["image_id", "png", "orig_height", "orig_width", "height", "width"]


def _require(frame: pd.DataFrame, columns: list[str], what: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"{what} lacks column(s) {missing}; has {list(frame.columns)}")


def clip_to_image(
    boxes: pd.DataFrame,
    metadata: pd.DataFrame,
    quarantine: Quarantine,
    source: str = "annotations.csv",
    tolerance: float = OVERSHOOT_TOLERANCE,
) -> pd.DataFrame:
    """Clip boxes that overshoot the original image by <= ``tolerance``; quarantine the others.

    ``boxes`` are annotation rows with coordinates (their index is the 0-based data row of
    ``source``, used to name a bad row). Images absent from ``metadata`` must be removed first.
    """
    sizes = metadata.set_index("image_id")[["orig_width", "orig_height"]]
    width = boxes["image_id"].map(sizes["orig_width"]).to_numpy(dtype=float)
    height = boxes["image_id"].map(sizes["orig_height"]).to_numpy(dtype=float)
    xy = boxes[COORDS].to_numpy(dtype=float)
    limit = np.stack([width, height, width, height], axis=1)
    over = np.maximum(xy - limit, 0.0) / limit
    clipped = np.minimum(xy, limit)
    outside = (over > tolerance).any(axis=1)
    degenerate = (clipped[:, 2] - clipped[:, 0] < MIN_BOX_SIDE) | (clipped[:, 3] - clipped[:, 1] < MIN_BOX_SIDE)
    bad = outside | degenerate
    for pos in np.flatnonzero(bad):
        row = boxes.iloc[pos]
        where = (f"lies outside the {int(width[pos])}x{int(height[pos])} image by more than {tolerance:.0%} of its size"
                 if outside[pos] else f"is less than {MIN_BOX_SIDE:g} px wide or high inside the image")
        quarantine.add(BadInputError(
            _row_item(source, boxes.index[pos]),
            f"box {xy[pos].tolist()} of image {row['image_id']} (reader {row['rad_id']}, {row['class_name']}) {where}",
        ))
    n_clipped = int(((over > 0).any(axis=1) & ~bad).sum())
    if n_clipped:
        log.info("clipped %d box(es) overshooting the image border by <= %.0f%%", n_clipped, tolerance * 100)
    out = boxes.copy()
    out[COORDS] = clipped
    return out[~bad]


def _row_item(source: str, label) -> str:
    """``source:row N (line L)`` for a 0-based data-row index label of ``source``."""
    return f"{source}:row {label + 1} (line {label + 2})" if isinstance(label, (int, np.integer)) else source


def drop_repeated_rows(rows: pd.DataFrame, source: str) -> pd.DataFrame:
    """Rows without repeats of an earlier row's image, reader, class and box (the log names them):
    a repeat adds nothing but would count its reader twice."""
    repeated = rows.duplicated(["image_id", "rad_id", "class_id", *COORDS], keep="first")
    if repeated.any():
        named = [_row_item(source, label) for label in rows.index[repeated][:5]]
        log.warning("%d repeated reader row(s) dropped: %s%s", int(repeated.sum()), "; ".join(named),
                    " ..." if repeated.sum() > 5 else "")
    return rows[~repeated]


def _box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix of boxes ``a`` (n, 4) and ``b`` (m, 4), x1 y1 x2 y2."""
    x1 = np.maximum(a[:, None, 0], b[None, :, 0])
    y1 = np.maximum(a[:, None, 1], b[None, :, 1])
    x2 = np.minimum(a[:, None, 2], b[None, :, 2])
    y2 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return inter / (area_a[:, None] + area_b[None, :] - inter)


def fuse_image(
    boxes: pd.DataFrame,
    readers: list[str],
    width: float,
    height: float,
    iou_thr: float,
    skip_box_thr: float,
    conf_type: str,
) -> pd.DataFrame:
    """Fused boxes of one image: columns class_id, x_min..y_max (original pixels), score, n_readers.

    ``boxes`` holds the image's reader boxes (rad_id, class_id, coordinates in original pixels,
    inside the image); ``readers`` every reader of the image, those without boxes included, so a
    box that only one of three readers drew scores 1/3.
    """
    columns = ["class_id", *COORDS, "score", "n_readers"]
    if boxes.empty:
        return pd.DataFrame(columns=columns)
    if len(readers) == 1:
        # One (consensus) reader: nothing to reconcile; only exact duplicates are merged.
        out = boxes.drop_duplicates(["class_id", *COORDS])[["class_id", *COORDS]].copy()
        out["score"] = 1.0
        out["n_readers"] = 1
        return out.sort_values(["class_id", *COORDS]).reset_index(drop=True)

    scale = np.array([width, height, width, height], dtype=float)
    norm = boxes[COORDS].to_numpy(dtype=float) / scale
    reader_of = boxes["rad_id"].map({r: i for i, r in enumerate(readers)}).to_numpy()
    classes = boxes["class_id"].to_numpy(dtype=int)
    boxes_list, scores_list, labels_list = [], [], []
    for r in range(len(readers)):
        mine = reader_of == r
        boxes_list.append(norm[mine].tolist())
        scores_list.append([1.0] * int(mine.sum()))
        labels_list.append(classes[mine].tolist())
    with warnings.catch_warnings():
        # ensemble_boxes only warns when it clips, swaps or drops a box; inputs are validated and
        # normalised, so a warning here is a bug that must not silently lose a box.
        warnings.simplefilter("error")
        fused, scores, labels = weighted_boxes_fusion(
            boxes_list, scores_list, labels_list, weights=[1.0] * len(readers),
            iou_thr=iou_thr, skip_box_thr=skip_box_thr, conf_type=conf_type,
        )
    fused = np.asarray(fused, dtype=float).reshape(-1, 4)
    labels = np.asarray(labels, dtype=int)
    # WBF does not report cluster membership: attribute each reader box to the fused box of its
    # class it overlaps most, and count the distinct readers behind every fused box.
    n_readers = np.zeros(len(fused), dtype=int)
    for cid in np.unique(labels):
        out_idx = np.flatnonzero(labels == cid)
        in_idx = np.flatnonzero(classes == cid)
        best = out_idx[_box_iou(norm[in_idx], fused[out_idx]).argmax(axis=1)]
        for k in out_idx:
            # Every fused box comes from at least one reader box, even if a near-identical
            # neighbouring cluster won the attribution of all its members.
            n_readers[k] = max(1, len(set(reader_of[in_idx[best == k]].tolist())))
    out = pd.DataFrame(fused * scale, columns=COORDS)
    out.insert(0, "class_id", labels)
    scores = np.asarray(scores, dtype=float)
    if conf_type == "avg":  # WBF counts boxes; one reader's two overlapping boxes must not count twice
        scores = np.minimum(scores, n_readers / len(readers))
    out["score"] = scores
    out["n_readers"] = n_readers
    return out.sort_values(["class_id", *COORDS]).reset_index(drop=True)


def fuse_boxes(
    annotations: pd.DataFrame,
    metadata: pd.DataFrame,
    split: pd.DataFrame,
    iou_thr: float,
    skip_box_thr: float,
    conf_type: str,
    quarantine: Quarantine | None = None,
    source: str = "annotations.csv",
) -> pd.DataFrame:
    """Fused boxes of every image in ``split`` in the VINDR_FUSED layout (original pixels).

    ``annotations`` is VINDR_ANNOTATIONS as read from ``source`` (its index names rows in errors),
    ``metadata`` VINDR_METADATA, ``split`` VINDR_SPLIT. Boxes past the image border are clipped or
    quarantined (:func:`clip_to_image`).
    """
    if conf_type not in CONF_TYPES:  # ensemble_boxes would print and exit() the interpreter
        raise ValueError(f"conf_type must be one of {CONF_TYPES}, got {conf_type!r}")
    if not 0 <= iou_thr <= 1 or not 0 <= skip_box_thr <= 1:
        raise ValueError(f"iou_thr and skip_box_thr must be in [0, 1], got {iou_thr}, {skip_box_thr}")
    quarantine = quarantine if quarantine is not None else Quarantine("fail", stage="fuse_boxes")
    _require(annotations, ["image_id", "rad_id", "class_name", "class_id", *COORDS], "annotations")
    _require(metadata, METADATA_COLUMNS, "metadata")
    _require(split, ["image_id", "split"], "split")
    missing = sorted(set(split["image_id"]) - set(metadata["image_id"]))
    if missing:
        raise ValueError(f"{len(missing)} split image(s) are not in the metadata, e.g. {missing[:3]}")
    bad_split = sorted(set(split["split"]) - set(SPLITS))
    if bad_split:
        raise ValueError(f"split has unknown split name(s) {bad_split}; expected {SPLITS}")
    _check_class_columns(annotations, "annotations")

    rows = annotations[annotations["image_id"].isin(set(split["image_id"]))]
    rows = drop_repeated_rows(rows, source)
    readers = rows.groupby("image_id")["rad_id"].agg(lambda s: sorted(set(s)))
    boxes = rows[rows["class_id"] != VINDR_NO_FINDING_ID]
    boxes = clip_to_image(boxes, metadata, quarantine, source=source)
    by_image = dict(tuple(boxes.groupby("image_id", sort=True)))
    sizes = metadata.set_index("image_id")
    split_of = dict(zip(split["image_id"], split["split"]))

    parts = []
    for image_id in tqdm(sorted(by_image), desc="fusing boxes", unit="image", disable=progress_disabled()):
        size = sizes.loc[image_id]
        fused = fuse_image(by_image[image_id], readers[image_id], float(size["orig_width"]),
                           float(size["orig_height"]), iou_thr, skip_box_thr, conf_type)
        fused.insert(0, "image_id", image_id)
        parts.append(fused)
    out = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=["image_id", "class_id", *COORDS, "score", "n_readers"])
    out["split"] = out["image_id"].map(split_of)
    out["class_id"] = out["class_id"].astype(int)
    out["class_name"] = [VINDR_CLASSES[c] for c in out["class_id"]]
    out[COORDS] = out[COORDS].astype(float).round(3)
    out["score"] = out["score"].astype(float).round(6)
    out["n_readers"] = out["n_readers"].astype(int)
    out = out[FUSED_COLUMNS].sort_values(["image_id", "class_id", *COORDS], kind="stable").reset_index(drop=True)
    log.info("%d reader boxes on %d images fused into %d boxes", len(boxes), len(by_image), len(out))
    return out


def _check_class_columns(frame: pd.DataFrame, what: str) -> None:
    """class_name and class_id must agree with cxrssl.classes (catches renamed classes)."""
    table = {i: name for i, name in enumerate(VINDR_CLASSES)}
    pairs = frame[["class_id", "class_name"]].drop_duplicates()
    for cid, name in pairs.itertuples(index=False):
        if int(cid) == VINDR_NO_FINDING_ID:
            continue
        if table.get(int(cid)) != name:
            raise ValueError(
                f"{what}: class_id {cid} is called {name!r} but cxrssl.classes calls it "
                f"{table.get(int(cid))!r}"
            )


def build_coco(fused: pd.DataFrame, metadata: pd.DataFrame, image_ids: list[str], split_name: str) -> dict:
    """COCO detection dict of one split: every image in ``image_ids`` (with or without boxes).

    Image ids are 1..N in sorted ``vindr_id`` order; ``file_name``, ``width`` and ``height`` are
    those of the converted PNG, and boxes are scaled from original to converted pixels per axis.
    """
    categories = coco_categories()
    ordered = sorted(categories, key=lambda c: c["id"])
    check_class_names([c["name"] for c in ordered], where=f"COCO categories of split {split_name!r}")
    if [c["id"] for c in ordered] != list(range(1, len(VINDR_CLASSES) + 1)):
        raise ValueError(f"COCO categories of split {split_name!r}: ids must be 1..{len(VINDR_CLASSES)}")
    _check_class_columns(fused, f"fused boxes of split {split_name!r}")

    meta = metadata.set_index("image_id")
    images, coco_id = [], {}
    for n, image_id in enumerate(sorted(image_ids), start=1):
        row = meta.loc[image_id]
        coco_id[image_id] = n
        images.append({"id": n, "file_name": str(row["png"]), "width": int(row["width"]),
                       "height": int(row["height"]), "vindr_id": image_id})
    boxes = fused[fused["image_id"].isin(coco_id)].sort_values(["image_id", "class_id", *COORDS], kind="stable")
    annotations = []
    for k, box in enumerate(boxes.itertuples(index=False), start=1):
        row = meta.loc[box.image_id]
        sx = float(row["width"]) / float(row["orig_width"])
        sy = float(row["height"]) / float(row["orig_height"])
        x, y = box.x_min * sx, box.y_min * sy
        w, h = (box.x_max - box.x_min) * sx, (box.y_max - box.y_min) * sy
        annotations.append({
            "id": k, "image_id": coco_id[box.image_id], "category_id": int(box.class_id) + 1,
            "bbox": [round(x, 3), round(y, 3), round(w, 3), round(h, 3)],
            "area": round(w * h, 3), "iscrowd": 0,
        })
    return {
        "info": {"description": f"VinDr-CXR reader boxes fused with WBF, split {split_name}"},
        "images": images,
        "annotations": annotations,
        "categories": categories,
    }


def class_counts(fused: pd.DataFrame, split: pd.DataFrame) -> pd.DataFrame:
    """Fused boxes per class and split, plus image counts (the report's data summary)."""
    table = (fused.groupby(["class_name", "split"]).size().unstack(fill_value=0)
             .reindex(index=list(VINDR_CLASSES), columns=list(SPLITS), fill_value=0))
    with_boxes = fused.drop_duplicates("image_id")["split"].value_counts().reindex(SPLITS, fill_value=0)
    images = split["split"].value_counts().reindex(SPLITS, fill_value=0)
    table.loc["(images)"] = images
    table.loc["(images with boxes)"] = with_boxes
    table["total"] = table.sum(axis=1)
    table.index.name = "class_name"
    return table.reset_index()


def plot_class_counts(counts: pd.DataFrame, path: str | Path) -> None:
    """Horizontal grouped bar chart of fused boxes per class and split."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = counts[counts["class_name"].isin(VINDR_CLASSES)].set_index("class_name")[list(SPLITS)]
    fig, ax = plt.subplots(figsize=(7, 5))
    ypos = np.arange(len(data))
    height = 0.8 / len(SPLITS)
    for k, name in enumerate(SPLITS):
        ax.barh(ypos + k * height, data[name].to_numpy(), height=height, label=name)
    ax.set_yticks(ypos + height, data.index)
    ax.invert_yaxis()
    ax.set_xlabel("fused boxes")
    ax.set_title("VinDr-CXR boxes after WBF, per split")
    ax.legend()
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=120)
    plt.close(fig)


def read_metadata(path: str | Path) -> pd.DataFrame:
    metadata = pd.read_csv(path, dtype={"image_id": str, "png": str, "source_split": str})
    _require(metadata, METADATA_COLUMNS, str(path))
    sizes = metadata[["orig_height", "orig_width", "height", "width"]]
    if sizes.isna().any().any() or (sizes <= 0).any().any():
        bad = metadata.loc[(sizes.isna() | (sizes <= 0)).any(axis=1), "image_id"].tolist()
        raise ValueError(f"{path}: missing or non-positive image sizes for {bad[:3]}")
    return metadata


def run_fusion(
    annotations_csv: str | Path,
    metadata_csv: str | Path,
    split_csv: str | Path,
    fused_csv: str | Path,
    coco_json: Mapping[str, str | Path],
    iou_thr: float,
    skip_box_thr: float,
    conf_type: str,
    quarantine: Quarantine,
    quarantine_csv: str | Path | None = None,
    counts_csv: str | Path | None = None,
    counts_png: str | Path | None = None,
) -> pd.DataFrame:
    """Read the stage inputs, fuse, and write VINDR_FUSED, one COCO JSON per split and the summary."""
    annotations = pd.read_csv(annotations_csv, dtype={"image_id": str, "rad_id": str, "class_name": str})
    metadata = read_metadata(metadata_csv)
    split = pd.read_csv(split_csv, dtype={"image_id": str, "split": str})
    fused = fuse_boxes(annotations, metadata, split, iou_thr, skip_box_thr, conf_type, quarantine,
                       source=str(annotations_csv))
    atomic_write_csv(fused, fused_csv)
    meta_dir = Path(metadata_csv).parent
    for split_name, path in coco_json.items():
        # file_name is relative to the JSON's folder (the contract's image root).
        relocated = metadata.copy()
        relocated["png"] = [Path(os.path.relpath(meta_dir / p, Path(path).parent)).as_posix()
                            for p in metadata["png"]]
        ids = split.loc[split["split"] == split_name, "image_id"].tolist()
        coco = build_coco(fused, relocated, ids, split_name)
        atomic_write_json(coco, path)
        log.info("%s: %d images, %d boxes", path, len(coco["images"]), len(coco["annotations"]))
    if quarantine_csv is not None:
        quarantine.write(quarantine_csv)
    if counts_csv is not None or counts_png is not None:
        counts = class_counts(fused, split)
        if counts_csv is not None:
            atomic_write_csv(counts, counts_csv)
        if counts_png is not None:
            plot_class_counts(counts, counts_png)
    return fused
