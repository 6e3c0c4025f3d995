"""Index NIH ChestX-ray14 and build the resized uint8 image cache that training reads.

Inputs as distributed: ``Data_Entry_2017.csv`` (2017 header with ``Patient Gender`` or the v2020
one with ``Patient Sex``; both end in a trailing comma that pandas reads as ``Unnamed: 11``),
``train_val_list.txt`` / ``test_list.txt`` (the official patient-disjoint split, no final newline),
and the PNGs under ``images_*/images/`` (Kaggle) or ``images/`` (the tarballs).

Outputs (CONTRIBUTING.md contracts): ``index.csv`` with ``image_index, patient_id,
official_split, path, <one 0/1 column per cxrssl.classes.NIH_FINDINGS>, cache_row`` and a uint8
``(N, S, S)`` ``.npy`` whose row ``cache_row`` is that image, square-resized with INTER_AREA.
Problems (a malformed or undecodable row, unknown label, image in both or neither list, patient in
both splits, missing or unreadable PNG) are :class:`BadInputError` naming the file and row, handled
by the quarantine row by row: under ``skip`` one bad line never rejects a whole file. Text files are
read as UTF-8 with or without a byte-order mark. The cache is built by supervised worker
processes (:mod:`cxrssl.data.workers`): a worker that dies or hangs costs its image, not the run.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from tqdm import tqdm

from cxrssl.classes import NIH_FINDINGS, NIH_NO_FINDING
from cxrssl.data.workers import FATAL, TaskFailed, run_tasks
from cxrssl.errors import BadInputError, Quarantine
from cxrssl.io import atomic_path, atomic_write_csv, exclusive_lock
from cxrssl.utils import progress_disabled

log = logging.getLogger(__name__)

DATA_ENTRY = "Data_Entry_2017.csv"
TRAIN_VAL_LIST = "train_val_list.txt"
TEST_LIST = "test_list.txt"
INDEX_COLUMNS = ["image_index", "patient_id", "official_split", "path", *NIH_FINDINGS, "cache_row"]
#: An image whose cache row takes longer is stopped and quarantined (a decoder caught in a loop).
CACHE_TIMEOUT_S = 300.0

#: Data_Entry columns by their spelling in either release -> our name.
_COLUMN_NAMES = {
    "Image Index": "image_index",
    "Finding Labels": "finding_labels",
    "Follow-up #": "follow_up",
    "Patient ID": "patient_id",
    "Patient Age": "patient_age",
    "Patient Gender": "patient_sex",  # 2017 release
    "Patient Sex": "patient_sex",  # v2020 release
    "View Position": "view_position",
}
_REQUIRED = ("Image Index", "Finding Labels", "Patient ID")
_NAME_OK = re.compile(r"^[^\s/\\]+\.png$", re.IGNORECASE)


def parse_finding_labels(text: str, where: str) -> tuple[str, ...]:
    """``"Effusion|Mass"`` -> ``("Effusion", "Mass")``; ``"No Finding"`` -> ``()``.

    Raises BadInputError (naming ``where``) for an empty field, an unknown or repeated label, or
    ``No Finding`` combined with a finding.
    """
    if not isinstance(text, str) or not text.strip():
        raise BadInputError(where, "empty Finding Labels")
    labels = [part.strip() for part in text.split("|")]
    if labels == [NIH_NO_FINDING]:
        return ()
    for label in labels:
        if label == NIH_NO_FINDING:
            raise BadInputError(where, f"'{NIH_NO_FINDING}' combined with findings in {text!r}")
        if label not in NIH_FINDINGS:
            raise BadInputError(where, f"unknown finding label {label!r} in {text!r}; expected "
                                       f"{NIH_NO_FINDING!r} or |-separated names from {list(NIH_FINDINGS)}")
    if len(set(labels)) != len(labels):
        raise BadInputError(where, f"repeated finding label in {text!r}")
    return tuple(labels)


def read_text_lines(path: str | Path) -> str:
    """A text file as str: UTF-8 with or without a byte-order mark; undecodable bytes are kept as
    surrogates (``surrogateescape``) so the line holding them can be named and skipped."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise BadInputError(str(path), "file not found") from None
    except OSError as exc:
        raise BadInputError(str(path), f"cannot read it: {exc.strerror or exc}") from None
    return data.decode("utf-8-sig", errors="surrogateescape")


def _undecodable(text: str) -> bool:
    return any("\udc80" <= ch <= "\udcff" for ch in text)


def _csv_records(path: Path, text: str, quarantine: Quarantine) -> Iterator[tuple[int, list[str]]]:
    """``(line, fields)`` of every CSV record; a record the csv module cannot parse is quarantined."""
    reader = csv.reader(io.StringIO(text, newline=""))
    next_line = 1
    while True:
        start = next_line
        try:
            record = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            next_line = reader.line_num + 1
            quarantine.add(BadInputError(f"{path}:line {start}", f"malformed CSV record: {exc}"))
            continue
        next_line = reader.line_num + 1
        yield start, record


def read_data_entry(csv_path: str | Path, quarantine: Quarantine | None = None) -> pd.DataFrame:
    """Read Data_Entry_2017.csv (either release) into one row per image.

    Columns: ``image_index, patient_id, finding_labels`` plus ``follow_up, patient_age,
    patient_sex, view_position`` where present, and one 0/1 int column per NIH finding. Every row
    is checked on its own; bad rows (named ``file:line N``) go to ``quarantine`` (default: fail
    on the first). A missing file or a header without the required columns is never skippable.
    """
    csv_path = Path(csv_path)
    quarantine = quarantine if quarantine is not None else Quarantine("fail", stage="index_nih")
    records = _csv_records(csv_path, read_text_lines(csv_path), quarantine)
    header = None
    for line, record in records:
        if any(field.strip() for field in record):
            header = [field.strip() for field in record]
            break
    if header is None:
        raise BadInputError(str(csv_path), "empty file (no header)")
    missing = [c for c in _REQUIRED if c not in header]
    if missing or _undecodable(",".join(header)):
        raise BadInputError(f"{csv_path}:line {line}", f"missing column(s) {missing}; header is {header}")
    position = {_COLUMN_NAMES[name]: i for i, name in enumerate(header) if name in _COLUMN_NAMES}
    unnamed = [i for i, name in enumerate(header) if not name]  # the trailing comma's empty column

    rows, labels, first_line = [], [], {}
    for line, record in records:
        if not any(field.strip() for field in record):
            continue  # blank line
        where = f"{csv_path}:line {line}"
        try:
            if _undecodable(",".join(record)):
                raise BadInputError(where, "is not valid UTF-8")
            if len(record) > len(header) and any(f.strip() for f in record[len(header):]):
                raise BadInputError(where, f"has {len(record)} fields, the header {len(header)}")
            if len(record) < len(header) and any(i < len(header) and i not in unnamed
                                                 for i in range(len(record), len(header))):
                raise BadInputError(where, f"has {len(record)} fields, the header {len(header)}")
            row = {name: (record[i].strip() if i < len(record) else "") for name, i in position.items()}
            if not _NAME_OK.match(row["image_index"]):
                raise BadInputError(where, f"Image Index {row['image_index'][:80]!r} is not a PNG file name")
            if not row["patient_id"]:
                raise BadInputError(where, f"empty Patient ID for {row['image_index']}")
            if row["image_index"] in first_line:
                raise BadInputError(where, f"duplicate Image Index {row['image_index']} (first at line "
                                           f"{first_line[row['image_index']]})")
            found = parse_finding_labels(row["finding_labels"], where)
        except BadInputError as exc:
            quarantine.add(exc)
            continue
        if any(i < len(record) and record[i].strip() for i in unnamed):
            log.warning("%s: values in the unnamed trailing column ignored", where)
        first_line[row["image_index"]] = line
        rows.append(row)
        labels.append([int(name in found) for name in NIH_FINDINGS])
    columns = [c for c in _COLUMN_NAMES.values() if c in position]
    frame = pd.DataFrame(rows, columns=list(dict.fromkeys(columns)))
    matrix = pd.DataFrame(np.asarray(labels, dtype=np.int64).reshape(len(rows), len(NIH_FINDINGS)),
                          columns=list(NIH_FINDINGS))
    return pd.concat([frame, matrix], axis=1)


def read_split_list(path: str | Path, quarantine: Quarantine | None = None) -> list[str]:
    """Image names of one official split list, in file order.

    Tolerates a byte-order mark, a missing final newline, CRLF line ends and blank lines; a
    duplicate, malformed or undecodable name is a BadInputError naming ``file:line N`` (skipped
    under the ``skip`` policy).
    """
    path = Path(path)
    quarantine = quarantine if quarantine is not None else Quarantine("fail", stage="index_nih")
    names, seen = [], {}
    for number, line in enumerate(read_text_lines(path).splitlines(), start=1):
        name = line.strip()
        if not name:
            continue
        where = f"{path}:line {number}"
        if _undecodable(name):
            quarantine.add(BadInputError(where, "is not valid UTF-8"))
        elif not _NAME_OK.match(name):
            quarantine.add(BadInputError(where, f"{name[:80]!r} is not a PNG file name"))
        elif name in seen:
            quarantine.add(BadInputError(where, f"duplicate entry {name} (first at line {seen[name]})"))
        else:
            seen[name] = number
            names.append(name)
    return names


def assign_official_split(entries: pd.DataFrame, train_val: list[str], test: list[str],
                          quarantine: Quarantine, lists: tuple[str, str] = (TRAIN_VAL_LIST, TEST_LIST)
                          ) -> pd.DataFrame:
    """Add ``official_split`` (``train_val``/``test``) and enforce a clean, patient-disjoint split.

    An image in both lists or in neither, a listed image missing from Data_Entry, and every image
    of a patient found in both splits are bad inputs (the latter keeps the split patient-disjoint
    under the skip policy).
    """
    train_set, test_set = set(train_val), set(test)
    known = set(entries["image_index"])
    for name, list_name in [*((n, lists[0]) for n in train_val), *((n, lists[1]) for n in test)]:
        if name not in known:
            quarantine.add(BadInputError(f"{list_name}: {name}", f"listed in {list_name} but not in {DATA_ENTRY} "
                                                                 "(or its row was quarantined)"))
    split = []
    for name in entries["image_index"]:
        in_train, in_test = name in train_set, name in test_set
        if in_train and in_test:
            quarantine.add(BadInputError(name, f"listed in both {lists[0]} and {lists[1]}"))
            split.append(None)
        elif not (in_train or in_test):
            quarantine.add(BadInputError(name, f"in neither {lists[0]} nor {lists[1]}"))
            split.append(None)
        else:
            split.append("train_val" if in_train else "test")
    out = entries.assign(official_split=split)
    out = out[out["official_split"].notna()].reset_index(drop=True)

    per_patient = out.groupby("patient_id")["official_split"].nunique()
    mixed = set(per_patient.index[per_patient > 1])
    if mixed:
        for name, patient in out.loc[out["patient_id"].isin(mixed), ["image_index", "patient_id"]].itertuples(
                index=False):
            quarantine.add(BadInputError(name, f"patient {patient} has images in both {lists[0]} and "
                                               f"{lists[1]}; the official split must be patient-disjoint"))
        out = out[~out["patient_id"].isin(mixed)].reset_index(drop=True)
    return out


def find_images(root: str | Path) -> dict[str, str]:
    """Map PNG name -> path relative to ``root`` for ``images_*/images/*.png`` and ``images/*.png``."""
    root = Path(root)
    folders = sorted(root.glob("images_*/images")) + ([root / "images"] if (root / "images").is_dir() else [])
    found: dict[str, str] = {}
    for folder in folders:
        with os.scandir(folder) as entries:
            for entry in entries:
                if not entry.name.lower().endswith(".png") or not entry.is_file():
                    continue
                rel = Path(folder.relative_to(root), entry.name).as_posix()
                if entry.name in found:
                    raise BadInputError(str(root / rel), f"the same image name is also at {root / found[entry.name]}")
                found[entry.name] = rel
    if not found:
        raise BadInputError(str(root), "no PNGs found under images_*/images/ or images/")
    return found


def build_index(root: str | Path, quarantine: Quarantine) -> pd.DataFrame:
    """The NIH_INDEX table (contract columns, sorted by image name, ``cache_row`` = 0..N-1)."""
    root = Path(root)
    entries = read_data_entry(root / DATA_ENTRY, quarantine)
    train_val = read_split_list(root / TRAIN_VAL_LIST, quarantine)
    test = read_split_list(root / TEST_LIST, quarantine)
    indexed = assign_official_split(entries, train_val, test, quarantine)
    images = find_images(root)
    paths = indexed["image_index"].map(images)
    for name in indexed.loc[paths.isna(), "image_index"]:
        quarantine.add(BadInputError(str(root / name), f"referenced by {DATA_ENTRY} but no such PNG under "
                                                       "images_*/images/ or images/"))
    indexed = indexed.assign(path=paths)[paths.notna()]
    indexed = indexed.sort_values("image_index", kind="stable").reset_index(drop=True)
    indexed["cache_row"] = np.arange(len(indexed), dtype=np.int64)
    log.info("NIH index: %d images, %d patients (%d train_val, %d test)", len(indexed),
             indexed["patient_id"].nunique(), (indexed["official_split"] == "train_val").sum(),
             (indexed["official_split"] == "test").sum())
    return indexed[INDEX_COLUMNS]


def load_grey(path: str | Path, size: int) -> np.ndarray:
    """One PNG as uint8 ``(size, size)``: grey (RGB/RGBA converted with ITU-R 601 luma, like PIL's
    ``convert('L')``; 16-bit scaled to 8), square-resized with INTER_AREA."""
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise BadInputError(str(path), "not a readable image (missing, truncated or corrupt PNG)")
    if image.ndim == 3:
        code = {3: cv2.COLOR_BGR2GRAY, 4: cv2.COLOR_BGRA2GRAY}.get(image.shape[2])
        if code is None:
            raise BadInputError(str(path), f"unexpected {image.shape[2]} channels")
        image = cv2.cvtColor(image, code)
    if image.dtype == np.uint16:
        image = np.rint(image / 257.0).astype(np.uint8)
    elif image.dtype != np.uint8:
        raise BadInputError(str(path), f"unexpected pixel type {image.dtype}")
    if min(image.shape) < 8:
        raise BadInputError(str(path), f"implausible image size {image.shape}")
    interp = cv2.INTER_AREA if max(image.shape) >= size else cv2.INTER_CUBIC
    return cv2.resize(image, (size, size), interpolation=interp)


def _cache_init() -> None:
    cv2.setNumThreads(1)  # one process per core already


def _cache_worker(task: tuple[int, str, int]) -> tuple:
    """Worker: one cache row; ``(row, image, None)`` or ``(row, None, reason)``, never raises for a
    property of the image (the exception does not survive pickling: the reason travels back)."""
    row, path, size = task
    try:
        return row, load_grey(path, size), None
    except BadInputError as exc:
        return row, None, exc.reason
    except FATAL:
        raise
    except BaseException as exc:  # noqa: BLE001 - e.g. an OpenCV error or MemoryError on a hostile PNG
        return row, None, f"could not read it ({type(exc).__name__}: {str(exc).strip()[:200]})"


def build_cache(index: pd.DataFrame, root: str | Path, out_path: str | Path, size: int, workers: int = 1,
                quarantine: Quarantine | None = None) -> pd.DataFrame:
    """Write the uint8 ``(len(index), size, size)`` cache atomically, row by row as the workers return
    them (no memory in proportion to the pixels); return the index without the rows whose image
    could not be read (their cache rows stay zero, ``cache_row`` is unchanged)."""
    quarantine = quarantine if quarantine is not None else Quarantine("fail", stage="index_nih")
    root = Path(root)
    tasks = [(int(r), str(root / p), size) for r, p in zip(index["cache_row"], index["path"], strict=True)]
    n_rows = int(index["cache_row"].max()) + 1 if len(index) else 0
    bad_rows: set[int] = set()
    # Rows are written into the file, not through a memory map: the pages of a written map count
    # as this process's RSS (7.3 GB for NIH at 256 px), which schedulers and benchmarks read as its
    # memory. Sized at once to zeros (sparse), so a row that is never written stays zero.
    with atomic_path(out_path, suffix=".npy") as tmp, open(tmp, "wb") as cache:
        np.lib.format.write_array_header_1_0(cache, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)),
                                                     "fortran_order": False, "shape": (n_rows, size, size)})
        offset, row_bytes = cache.tell(), size * size
        cache.truncate(offset + n_rows * row_bytes)
        stream = run_tasks(_cache_worker, tasks, workers, initializer=_cache_init, preload=("cxrssl.data.nih",),
                           timeout_s=CACHE_TIMEOUT_S, what="NIH image")
        try:
            for k, outcome in tqdm(stream, total=len(tasks), desc=f"NIH cache {size}px", unit="img",
                                   disable=progress_disabled() or not tasks):
                row, image, error = (tasks[k][0], None, outcome.reason) if isinstance(outcome, TaskFailed) else outcome
                if error is not None:
                    bad_rows.add(row)
                    quarantine.add(BadInputError(tasks[k][1], error))
                    continue
                cache.seek(offset + row * row_bytes)
                cache.write(np.ascontiguousarray(image, dtype=np.uint8).tobytes())
        finally:
            stream.close()
    return index[~index["cache_row"].isin(bad_rows)].reset_index(drop=True)


def index_nih(root: str | Path, index_csv: str | Path, cache_npy: str | Path, quarantine_csv: str | Path,
              cache_size: int, workers: int = 1, on_bad_input: str = "fail") -> pd.DataFrame:
    """Build NIH_INDEX, NIH_CACHE and NIH_QUARANTINE; the index is written last. A second job on
    the same index stops at once (lock beside it) instead of mixing its outputs with the first's."""
    index_csv = Path(index_csv)
    with exclusive_lock(index_csv.with_name(f".{index_csv.name}.lock"), str(index_csv)):
        return _index_nih(root, index_csv, cache_npy, quarantine_csv, cache_size, workers, on_bad_input)


def _index_nih(root, index_csv: Path, cache_npy, quarantine_csv, cache_size: int, workers: int,
               on_bad_input: str) -> pd.DataFrame:
    quarantine = Quarantine(on_bad_input, stage="index_nih")
    index_csv.unlink(missing_ok=True)  # exists only after a complete run
    index = build_index(root, quarantine)
    if index.empty:
        quarantine.write(quarantine_csv)
        raise BadInputError(str(root), f"no usable NIH images (see {quarantine_csv})")
    index = build_cache(index, root, cache_npy, cache_size, workers, quarantine)
    quarantine.write(quarantine_csv)
    if index.empty:
        raise BadInputError(str(root), f"no readable NIH images (see {quarantine_csv})")
    atomic_write_csv(index, index_csv)
    log.info("wrote %s (%d images) and %s; %d quarantined", index_csv, len(index), cache_npy, len(quarantine))
    return index


def open_cache(path: str | Path) -> np.ndarray:
    """Memory-map the uint8 ``(N, S, S)`` cache written by :func:`build_cache` (read-only)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"NIH image cache {path} does not exist (rule index_nih makes it)")
    try:
        cache = np.load(path, mmap_mode="r")
    except ValueError as exc:
        raise BadInputError(str(path), f"not a .npy array: {exc}") from exc
    if cache.dtype != np.uint8 or cache.ndim != 3 or cache.shape[1] != cache.shape[2]:
        raise BadInputError(str(path), f"expected a uint8 (N, S, S) array, found {cache.dtype} {cache.shape}")
    return cache
