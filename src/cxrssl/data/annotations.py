"""Read the VinDr-CXR reader annotations of either distribution into one table (VINDR_ANNOTATIONS).

Both layouts become the same columns: ``image_id, rad_id, class_name, class_id, x_min, y_min,
x_max, y_max, source_split`` (coordinates in original pixels, empty for "No finding").

* PhysioNet 1.0.0: ``annotations/annotations_train.csv`` and ``annotations/annotations_test.csv``
  with header ``image_id,rad_id,class_name,x_min,y_min,x_max,y_max``.
* Kaggle VinBigData: ``train.csv`` with header
  ``image_id,class_name,class_id,rad_id,x_min,y_min,x_max,y_max``; its ``class_id`` must agree with
  :mod:`cxrssl.classes` (the original study lost a class to a spelling mismatch).

Every row is checked; a bad row raises :class:`~cxrssl.errors.BadInputError` naming the file, the
1-based data row and the line, and under the ``skip`` policy is quarantined while the rest goes on.
Bad rows include records the csv module cannot parse (a field over its 128 kB limit), bytes that
are not UTF-8 and boxes smaller than ``MIN_BOX_SIDE`` pixels. A repeated reader row (same image,
reader, class and box as an earlier row) carries nothing new but would count one reader twice in
fusion: it is dropped, and the log names it.
A wrong header or a missing/unreadable file is never skippable: nothing in it can be trusted.
Boxes running past the image border are checked later, in fusion, where image sizes are known.
With pseudonymised ids (:mod:`cxrssl.privacy`) image ids are replaced as they are read, and no
message repeats an original id.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import re
from collections.abc import Iterator
from pathlib import Path

import pandas as pd

from cxrssl.classes import VINDR_CLASSES, VINDR_NO_FINDING, VINDR_NO_FINDING_ID
from cxrssl.errors import BadInputError, Quarantine
from cxrssl.io import atomic_write_csv
from cxrssl.privacy import Pseudonymizer

log = logging.getLogger(__name__)

LAYOUTS = ("physionet", "kaggle")
COLUMNS = ["image_id", "rad_id", "class_name", "class_id", "x_min", "y_min", "x_max", "y_max", "source_split"]
COORDS = ["x_min", "y_min", "x_max", "y_max"]
PHYSIONET_HEADER = ["image_id", "rad_id", "class_name", "x_min", "y_min", "x_max", "y_max"]
KAGGLE_HEADER = ["image_id", "class_name", "class_id", "rad_id", "x_min", "y_min", "x_max", "y_max"]
#: PhysioNet annotation files (relative to vindr.root) and the folder their images sit in.
PHYSIONET_FILES = {"train": "annotations/annotations_train.csv", "test": "annotations/annotations_test.csv"}
KAGGLE_FILE = "train.csv"
#: Smallest width and height of a box, in original pixels: anything smaller is no annotation (and
#: would vanish when the COCO export rounds converted-pixel boxes).
MIN_BOX_SIDE = 1.0

# Image ids name DICOM/PNG files: keep them to file-name-safe characters.
_IMAGE_ID = re.compile(r"[A-Za-z0-9._-]+")
# A plain decimal number (float() would also take "1_0", "inf", "nan").
_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
_CLASS_IDS = {name: i for i, name in enumerate(VINDR_CLASSES)} | {VINDR_NO_FINDING: VINDR_NO_FINDING_ID}


def annotation_files(root: str | Path, layout: str) -> dict[str, Path]:
    """The annotation CSV(s) of ``layout`` under ``root``, keyed by source split (train/test)."""
    root = Path(root)
    if layout == "physionet":
        return {split: root / rel for split, rel in PHYSIONET_FILES.items()}
    if layout == "kaggle":
        return {"train": root / KAGGLE_FILE}
    raise ValueError(f"unknown VinDr layout {layout!r}; expected one of {LAYOUTS}")


def _is_missing(text: str) -> bool:
    return text == "" or text.lower() == "nan"


def _parse_coords(fields: dict[str, str]) -> list[float] | None:
    """The four coordinates, None when all are empty; ValueError says what is wrong."""
    raw = [fields[c] for c in COORDS]
    missing = [_is_missing(v) for v in raw]
    if all(missing):
        return None
    if any(missing):
        empty = [c for c, m in zip(COORDS, missing) if m]
        raise ValueError(f"coordinates partly empty ({', '.join(empty)})")
    values = []
    for name, text in zip(COORDS, raw):
        if not _NUMBER.fullmatch(text):
            raise ValueError(f"{name} is not a number: {text!r}")
        value = float(text)
        if not math.isfinite(value):
            raise ValueError(f"{name} is not finite: {text!r}")
        values.append(value)
    return values


def _parse_row(fields: dict[str, str], layout: str, source_split: str, ids: Pseudonymizer | None = None) -> dict:
    """One validated output row from the fields of one CSV record (ValueError on a bad row)."""
    ids = ids if ids is not None else Pseudonymizer(enabled=False)
    image_id = fields["image_id"]
    if not _IMAGE_ID.fullmatch(image_id):
        shown = "" if ids.enabled else f" {image_id[:80]!r}"
        raise ValueError(f"image_id{shown} is empty or has characters other than letters, digits, '.', '_', '-'")
    image_id = ids.image_id(image_id)
    rad_id = fields["rad_id"]
    if not rad_id or not rad_id.isprintable():
        raise ValueError(f"rad_id {rad_id!r} is empty or not printable")
    name = fields["class_name"]
    if name not in _CLASS_IDS:
        raise ValueError(
            f"unknown class_name {name!r}; expected one of {list(VINDR_CLASSES) + [VINDR_NO_FINDING]}"
        )
    cid = _CLASS_IDS[name]
    if layout == "kaggle":
        text = fields["class_id"]
        if not re.fullmatch(r"[0-9]+", text):
            raise ValueError(f"class_id is not an integer: {text!r}")
        if int(text) != cid:
            raise ValueError(
                f"class_id {int(text)} does not match class_name {name!r} "
                f"(cxrssl.classes says {cid})"
            )
    coords = _parse_coords(fields)
    if name == VINDR_NO_FINDING:
        if coords is not None:
            raise ValueError(f"'{VINDR_NO_FINDING}' row has coordinates {coords}; they must be empty")
        coords = [math.nan] * 4
    else:
        if coords is None:
            raise ValueError(f"{name!r} row has empty coordinates")
        x0, y0, x1, y1 = coords
        if min(coords) < 0:
            raise ValueError(f"negative coordinate in box {coords}")
        if x1 <= x0 or y1 <= y0:
            raise ValueError(f"inverted or empty box {coords} (needs x_max > x_min and y_max > y_min)")
        if x1 - x0 < MIN_BOX_SIDE or y1 - y0 < MIN_BOX_SIDE:
            raise ValueError(f"degenerate box {coords}: {x1 - x0:.3g} x {y1 - y0:.3g} px, less than "
                             f"{MIN_BOX_SIDE:g} px wide or high")
    return dict(zip(COLUMNS, [image_id, rad_id, name, cid, *coords, source_split]))


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise BadInputError(str(path), "annotation file is missing")
    # surrogateescape keeps undecodable bytes so the row holding them can be named and skipped.
    return path.read_bytes().decode("utf-8-sig", errors="surrogateescape")


def _records(reader) -> Iterator[tuple[int, list[str] | None, str | None]]:
    """``(start line, record, None)`` per CSV record, or ``(line, None, error)`` where csv fails."""
    next_line = 1
    while True:
        start = next_line
        try:
            record = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:  # a field over the size limit; the reader goes on after it
            next_line = reader.line_num + 1
            yield start, None, f"malformed CSV record ({exc})"
            continue
        next_line = reader.line_num + 1
        yield start, record, None


def read_annotation_file(path: str | Path, layout: str, source_split: str, quarantine: Quarantine,
                         ids: Pseudonymizer | None = None) -> list[dict]:
    """Validated rows of one annotation CSV; bad rows go through ``quarantine``."""
    path = Path(path)
    expected = PHYSIONET_HEADER if layout == "physionet" else KAGGLE_HEADER
    reader = csv.reader(io.StringIO(_read_text(path), newline=""))
    rows: list[dict] = []
    first: dict[tuple, str] = {}  # (image, reader, class, box) -> where it was first seen
    repeats: list[str] = []
    header = None
    data_row = 0
    for start_line, record, error in _records(reader):
        if record is not None and (not record or (len(record) == 1 and not record[0].strip())):
            continue  # blank line
        if header is None:
            if record is None:
                raise BadInputError(f"{path}:line {start_line}", f"unreadable header: {error}")
            header = [h.strip() for h in record]
            if header != expected:
                raise BadInputError(
                    f"{path}:line {start_line}",
                    f"wrong header for the {layout} layout: got {','.join(header)[:300]!r}, "
                    f"expected {','.join(expected)!r}",
                )
            continue
        data_row += 1
        item = f"{path}:row {data_row} (line {start_line})"
        try:
            if record is None:
                raise ValueError(error)
            if len(record) != len(expected):
                raise ValueError(f"has {len(record)} fields, expected {len(expected)}")
            text = ",".join(record)
            if any("\udc80" <= ch <= "\udcff" for ch in text):
                raise ValueError("is not valid UTF-8")
            fields = {k: v.strip() for k, v in zip(expected, record)}
            row = _parse_row(fields, layout, source_split, ids)
        except ValueError as exc:
            quarantine.add(BadInputError(item, str(exc)))
            continue
        key = (row["image_id"], row["rad_id"], row["class_id"], *(None if math.isnan(row[c]) else row[c] for c in COORDS))
        if key in first:
            repeats.append(f"row {data_row} (line {start_line}) = {first[key]}")
            continue
        first[key] = f"row {data_row} (line {start_line})"
        rows.append(row)
    if header is None:
        raise BadInputError(str(path), "annotation file is empty (no header)")
    if repeats:
        log.warning("%s: %d repeated reader row(s) dropped (same image, reader, class and box as an earlier "
                    "row): %s%s", path, len(repeats), "; ".join(repeats[:5]), " ..." if len(repeats) > 5 else "")
    log.info("%s: %d valid rows of %d", path, len(rows), data_row)
    return rows


def read_vindr_annotations(root: str | Path, layout: str, quarantine: Quarantine | None = None,
                           ids: Pseudonymizer | None = None) -> pd.DataFrame:
    """All reader boxes of the VinDr-CXR copy at ``root`` in the VINDR_ANNOTATIONS layout.

    ``layout`` is ``physionet`` or ``kaggle``; ``quarantine`` (default: policy ``fail``) decides
    whether a bad row stops the run or is recorded and skipped; ``ids`` pseudonymises image ids.
    Row order follows the files.
    """
    quarantine = quarantine if quarantine is not None else Quarantine("fail", stage="parse_annotations")
    files = annotation_files(root, layout)
    rows: list[dict] = []
    for source_split, path in files.items():
        rows.extend(read_annotation_file(path, layout, source_split, quarantine, ids))
    frame = pd.DataFrame(rows, columns=COLUMNS)
    frame = frame.astype({"image_id": str, "rad_id": str, "class_name": str, "class_id": "int64",
                          **{c: "float64" for c in COORDS}, "source_split": str})
    if layout == "physionet":
        # An image listed in both the train and the test file would leak across the official split.
        both = frame.groupby("image_id")["source_split"].nunique()
        leaked = sorted(both.index[both > 1])
        for image_id in leaked:
            quarantine.add(BadInputError(
                f"{files['test']}:image {image_id}",
                f"image also appears in {files['train']}; it cannot be in both the train and test set",
            ))
        if leaked:
            frame = frame[~frame["image_id"].isin(leaked)]
    frame = frame.reset_index(drop=True)
    n_images = frame["image_id"].nunique()
    n_boxes = int((frame["class_name"] != VINDR_NO_FINDING).sum())
    log.info("%d annotation rows (%d boxes) on %d images, %d rows quarantined",
             len(frame), n_boxes, n_images, len(quarantine))
    return frame


def run_parse(root: str | Path, layout: str, annotations_csv: str | Path, quarantine_csv: str | Path,
              policy: str = "fail", pseudonymize_ids: bool = False, private_dir: str | Path | None = None
              ) -> pd.DataFrame:
    """Parse ``root``'s annotations and write VINDR_ANNOTATIONS and its quarantine report."""
    quarantine = Quarantine(policy, stage="parse_annotations")
    frame = read_vindr_annotations(root, layout, quarantine, Pseudonymizer(pseudonymize_ids, private_dir))
    if frame.empty:
        raise BadInputError(str(root), f"no valid annotation rows in the {layout} layout files")
    atomic_write_csv(frame, annotations_csv)
    quarantine.write(quarantine_csv)
    return frame
