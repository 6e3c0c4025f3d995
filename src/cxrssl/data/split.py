"""Seeded, multi-label stratified train/val/test split of the VinDr-CXR images (VINDR_SPLIT).

Stratification uses iterative-stratification's ``MultilabelStratifiedShuffleSplit`` on each image's
class presence (the 14 classes plus "No finding", from any reader), so rare classes land in every
split. PhysioNet keeps its official test folder as the test set; the Kaggle distribution has no
labelled test set, so one is carved out of its training images first (stratified, seeded).

Only images that were converted (listed in VINDR_METADATA) and that have annotation rows are split.
The split depends on annotations, metadata and the ``vindr.split`` settings only, never on fusion
settings, so retuning WBF does not reshuffle the images.

``keep_no_finding`` decides which images the protocol uses at all, in every split alike: true keeps
them all (the fuller protocol, config/full.yaml); false keeps the abnormal images only, those that at
least one reader gave a box (the original study's protocol, config/paper.yaml: 4,394 of Kaggle's
15,000, so that ``val_fraction = test_fraction = 0.15`` give its 659 / 660 val / test images).
The fractions are shares of the images kept. Whether the detectors then train on the kept images
without boxes is a detection setting (``detection.train_on_empty``), read by both engines.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
from iterstrat.ml_stratifiers import MultilabelStratifiedShuffleSplit

from cxrssl.classes import VINDR_CLASSES, VINDR_NO_FINDING_ID
from cxrssl.io import atomic_write_csv

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
N_LABELS = len(VINDR_CLASSES) + 1  # the 14 classes and "No finding"


def _require(frame: pd.DataFrame, columns: list[str], what: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"{what} lacks column(s) {missing}; has {list(frame.columns)}")


def presence_matrix(annotations: pd.DataFrame, image_ids: list[str]) -> np.ndarray:
    """(len(image_ids), 15) 0/1 matrix: which class ids (0..14) any reader gave each image."""
    index = {image_id: i for i, image_id in enumerate(image_ids)}
    rows = annotations[annotations["image_id"].isin(index)]
    labels = np.zeros((len(image_ids), N_LABELS), dtype=np.int8)
    labels[rows["image_id"].map(index).to_numpy(), rows["class_id"].to_numpy(dtype=int)] = 1
    return labels


def _stratified_holdout(labels: np.ndarray, n_holdout: int, seed: int) -> np.ndarray:
    """Boolean mask of ``n_holdout`` (approximately: the algorithm balances labels first) rows."""
    splitter = MultilabelStratifiedShuffleSplit(n_splits=1, test_size=n_holdout, random_state=seed)
    _, held = next(splitter.split(np.zeros((len(labels), 1)), labels))
    mask = np.zeros(len(labels), dtype=bool)
    mask[held] = True
    # Iterative stratification trades exact sizes for label balance; on tiny pools it can hold out
    # nothing or everything. Both sides must be non-empty (val selects checkpoints), so move one
    # seeded-random image across.
    rng = np.random.default_rng(seed)
    if not mask.any():
        mask[rng.integers(len(mask))] = True
    elif mask.all():
        mask[rng.integers(len(mask))] = False
    return mask


def _holdout_size(fraction: float, n_pool: int, name: str) -> int:
    n = max(1, int(round(fraction * n_pool)))
    if n >= n_pool:
        raise ValueError(f"{name}={fraction} of {n_pool} images leaves no training images")
    return n


def split_vindr(
    annotations: pd.DataFrame,
    metadata: pd.DataFrame,
    layout: str,
    val_fraction: float,
    test_fraction: float,
    keep_no_finding: bool,
    seed: int,
) -> pd.DataFrame:
    """Assign each usable image to ``train``, ``val`` or ``test``; returns ``[image_id, split]``.

    ``val_fraction`` and (Kaggle only) ``test_fraction`` are shares of the kept labelled
    training-folder images, so the defaults 0.1/0.1 give 80/10/10 on Kaggle. ``keep_no_finding=False``
    keeps only the images with a box from any reader, in every split (PhysioNet's official test set
    included). Same inputs and seed give the same split regardless of row order.
    """
    if layout not in ("physionet", "kaggle"):
        raise ValueError(f"unknown VinDr layout {layout!r}; expected physionet or kaggle")
    if not 0 < val_fraction < 1 or not 0 < test_fraction < 1:
        raise ValueError(f"val_fraction and test_fraction must be in (0, 1), got {val_fraction}, {test_fraction}")
    _require(annotations, ["image_id", "class_id", "source_split"], "annotations")
    _require(metadata, ["image_id", "source_split"], "metadata")
    if metadata["image_id"].duplicated().any():
        dups = sorted(metadata.loc[metadata["image_id"].duplicated(), "image_id"].unique())[:5]
        raise ValueError(f"metadata lists image(s) more than once: {dups}")

    folder = dict(zip(metadata["image_id"].astype(str), metadata["source_split"].astype(str)))
    labelled = annotations.drop_duplicates("image_id").set_index("image_id")["source_split"]
    mismatch = [i for i, s in labelled.items() if i in folder and folder[i] != s]
    if mismatch:
        raise ValueError(
            f"{len(mismatch)} image(s) sit in a different folder than their annotation file says, "
            f"e.g. {mismatch[0]!r}: metadata source_split {folder[mismatch[0]]!r}, "
            f"annotations source_split {labelled[mismatch[0]]!r}"
        )
    unlabelled = sorted(set(folder) - set(labelled.index))
    if layout == "kaggle":
        # Kaggle's test folder is unlabelled by design (the competition's hidden set).
        kaggle_test = [i for i in unlabelled if folder[i] == "test"]
        if kaggle_test:
            log.info("%d image(s) of the unlabelled Kaggle test folder are not split", len(kaggle_test))
        unlabelled = [i for i in unlabelled if folder[i] != "test"]
    if unlabelled:
        # e.g. every row of the image was quarantined: without labels it cannot be ground truth.
        log.warning("%d converted image(s) have no annotation rows and are left out of the split, e.g. %s",
                    len(unlabelled), unlabelled[:3])
    not_converted = len(set(labelled.index) - set(folder))
    if not_converted:
        log.warning("%d annotated image(s) were not converted (absent from metadata) and are left out",
                    not_converted)

    image_ids = sorted(set(folder) & set(labelled.index))
    labels = presence_matrix(annotations, image_ids)
    has_box = labels[:, :VINDR_NO_FINDING_ID].any(axis=1)
    keep = np.ones(len(image_ids), dtype=bool) if keep_no_finding else has_box
    if not keep_no_finding:
        log.info("keep_no_finding=false: %d abnormal image(s) kept, %d without any box dropped from every split",
                 int(has_box.sum()), int((~has_box).sum()))
    image_ids = [i for i, k in zip(image_ids, keep) if k]
    labels = labels[keep]
    source = np.array([folder[i] for i in image_ids])

    split = np.full(len(image_ids), "train", dtype=object)
    if layout == "physionet":
        split[source == "test"] = "test"
        pool = np.flatnonzero(source == "train")
        if len(pool) < 2:
            raise ValueError(f"only {len(pool)} usable training image(s); at least 2 are needed for a val split")
        n_val = _holdout_size(val_fraction, len(pool), "val_fraction")
        val = _stratified_holdout(labels[pool], n_val, seed)
        split[pool[val]] = "val"
    else:
        pool = np.flatnonzero(source == "train")
        if len(pool) < 3:
            raise ValueError(f"only {len(pool)} usable training image(s); at least 3 are needed for train/val/test")
        n_test = _holdout_size(test_fraction, len(pool), "test_fraction")
        n_val = _holdout_size(val_fraction, len(pool), "val_fraction")
        if n_test + n_val >= len(pool):
            raise ValueError(f"val_fraction + test_fraction leave no training images of {len(pool)}")
        test = _stratified_holdout(labels[pool], n_test, seed)
        split[pool[test]] = "test"
        rest = pool[~test]
        if len(rest) < 2:
            raise ValueError(f"after carving out {int(test.sum())} test image(s) only {len(rest)} remain for train/val")
        val = _stratified_holdout(labels[rest], min(n_val, len(rest) - 1), seed + 1)
        split[rest[val]] = "val"

    out = pd.DataFrame({"image_id": image_ids, "split": split.astype(str)})
    if out["image_id"].duplicated().any():
        raise AssertionError("an image was assigned to more than one split")
    counts = out["split"].value_counts().reindex(SPLITS, fill_value=0)
    log.info("split: %s", ", ".join(f"{s} {n}" for s, n in counts.items()))
    return out


def run_split(annotations_csv: str | Path, metadata_csv: str | Path, split_csv: str | Path, layout: str,
              val_fraction: float, test_fraction: float, keep_no_finding: bool, seed: int) -> pd.DataFrame:
    """Read VINDR_ANNOTATIONS and VINDR_METADATA, split, and write VINDR_SPLIT."""
    annotations = pd.read_csv(annotations_csv, dtype={"image_id": str, "source_split": str},
                              usecols=["image_id", "class_id", "source_split"])
    metadata = pd.read_csv(metadata_csv, dtype={"image_id": str, "source_split": str},
                           usecols=["image_id", "source_split"])
    out = split_vindr(annotations, metadata, layout, val_fraction, test_fraction, keep_no_finding, seed)
    atomic_write_csv(out, split_csv)
    return out
