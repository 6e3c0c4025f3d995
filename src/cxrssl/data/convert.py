"""Convert VinDr-CXR DICOMs to resized PNGs plus the ``metadata.csv`` contract table.

Per image: :func:`cxrssl.data.dicom.read_dicom` (VOI, MONOCHROME1 inversion), resize so the
longest side is ``size`` (aspect kept, ``cv2.INTER_AREA``, in float), min-max to 8 or 16 bits,
PNG via cv2, written atomically. Files are spread over ``workers`` processes; only small metadata
rows travel back, so memory stays flat whatever the number of files.

Per-file cache. Every run records, in ``<out_dir>/.convert_index.csv``, each PNG with the source
path, size and mtime and the settings it was made with. A later run reuses a PNG whose record
matches (and whose file still exists) instead of decoding the DICOM again. Under Snakemake the rule
reruns whenever its list of input DICOMs changes (a file added or removed); the cache makes that
rerun cost only the new files. The cache record lives in the image folder, not in
``metadata.csv``, because Snakemake deletes a rule's declared outputs before rerunning it. Files no
longer in the input are dropped from ``metadata.csv`` (their PNGs stay until the folder is removed).

Atomicity: ``metadata.csv`` is deleted when a run starts and written last, so it exists only after
a complete run and lists only PNGs that are fully written.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from tqdm import tqdm

from cxrssl.data.dicom import read_dicom
from cxrssl.errors import BadInputError, Quarantine
from cxrssl.io import atomic_path, atomic_write_csv
from cxrssl.utils import progress_disabled

log = logging.getLogger(__name__)

#: Columns of VINDR_METADATA (CONTRIBUTING.md data contract), in order.
METADATA_COLUMNS = [
    "image_id", "source_split", "png", "orig_height", "orig_width", "height", "width", "scale",
    "photometric", "bits_stored", "transfer_syntax", "source_size", "source_mtime",
]
#: Per-folder cache record (hidden so that globbing the PNGs never sees it).
CACHE_INDEX_NAME = ".convert_index.csv"
_CACHE_COLUMNS = METADATA_COLUMNS + ["source", "size", "bit_depth"]
DICOM_SUFFIXES = (".dicom", ".dcm")
#: Seconds between cache-record flushes, so a killed run keeps most of its work.
FLUSH_EVERY_S = 60.0


@dataclass
class ConvertResult:
    """What a conversion run did: the metadata table and which image_ids were (re)converted."""

    metadata: pd.DataFrame
    converted: list[str] = field(default_factory=list)
    cached: list[str] = field(default_factory=list)
    quarantined: list[str] = field(default_factory=list)


def find_dicoms(folders: Iterable[str | Path]) -> list[Path]:
    """Sorted ``*.dicom``/``*.dcm`` files directly inside each folder (missing folders skipped)."""
    found: list[Path] = []
    for folder in folders:
        folder = Path(folder)
        if not folder.is_dir():
            log.info("no DICOM folder %s: skipped", folder)
            continue
        found.extend(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in DICOM_SUFFIXES)
    return sorted(found)


def to_display_png(image: np.ndarray, size: int, bit_depth: int, item: str = "image") -> tuple[np.ndarray, float]:
    """Resize so the longest side is ``size`` (INTER_AREA) and min-max scale to ``bit_depth`` bits.

    Returns ``(array, scale)`` with ``array`` uint8/uint16 and converted = original * scale.
    Resizing happens in float before quantisation so no precision is lost twice.
    """
    if bit_depth not in (8, 16):
        raise ValueError(f"bit_depth must be 8 or 16, got {bit_depth}")
    height, width = image.shape
    scale = size / max(height, width)
    new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC  # AREA is for shrinking
    resized = cv2.resize(np.ascontiguousarray(image, dtype=np.float32), (new_w, new_h), interpolation=interp)
    lo, hi = float(resized.min()), float(resized.max())
    if not hi > lo:
        raise BadInputError(item, "blank image: every pixel has the same value after the VOI transform")
    top = 255 if bit_depth == 8 else 65535
    out = np.rint((resized - lo) * (top / (hi - lo)))
    np.clip(out, 0, top, out=out)
    return out.astype(np.uint8 if bit_depth == 8 else np.uint16), scale


def _write_png(array: np.ndarray, path: Path) -> None:
    # cv2's default PNG settings (level 1 with a run-length strategy) are kept on purpose: on
    # 1024 px radiographs they were the fastest and smallest of levels 1, 3, 6 (lossless at any).
    with atomic_path(path) as tmp:
        if not cv2.imwrite(str(tmp), array):
            raise OSError(f"{path}: cv2 could not write the PNG")


def _worker_init() -> None:
    cv2.setNumThreads(1)  # one process per core already; threads would oversubscribe


def _convert_one(task: tuple[str, str, int, int]) -> tuple:
    """Worker: convert one DICOM. Returns ``("ok", meta, shape, scale)`` or ``("bad", item, reason)``.

    BadInputError is returned, not raised, because its two-argument constructor does not survive
    pickling across processes.
    """
    src, png, size, bit_depth = task
    try:
        image, meta = read_dicom(src)
        array, scale = to_display_png(image, size, bit_depth, item=src)
        del image
        _write_png(array, Path(png))
    except BadInputError as exc:
        return ("bad", exc.item, exc.reason)
    return ("ok", meta, array.shape, scale)


def _read_cache(out_dir: Path) -> pd.DataFrame:
    path = out_dir / CACHE_INDEX_NAME
    if not path.exists():
        return pd.DataFrame(columns=_CACHE_COLUMNS)
    try:
        frame = pd.read_csv(path, dtype={"image_id": str, "source_split": str, "source": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        log.warning("cache record %s unreadable (%s): converting everything again", path, exc)
        return pd.DataFrame(columns=_CACHE_COLUMNS)
    if list(frame.columns) != _CACHE_COLUMNS:
        log.warning("cache record %s has other columns (older version?): converting everything again", path)
        return pd.DataFrame(columns=_CACHE_COLUMNS)
    return frame


def _cache_hit(record: dict | None, stat: os.stat_result, size: int, bit_depth: int,
               png: Path) -> bool:
    # Identity is (image_id, folder, size, mtime), not the absolute path: a moved or copied
    # checkout (or dataset) keeps its cache.
    return (
        record is not None
        and int(record["source_size"]) == stat.st_size
        and abs(float(record["source_mtime"]) - stat.st_mtime) < 1e-6
        and int(record["size"]) == size
        and int(record["bit_depth"]) == bit_depth
        and png.is_file()
    )


def _results(tasks: list[tuple], workers: int) -> Iterator[tuple[int, tuple]]:
    """Yield ``(task index, worker result)`` as they complete, in a pool or in-process."""
    if workers <= 1 or len(tasks) <= 1:
        previous = cv2.getNumThreads()
        _worker_init()
        try:
            for i, task in enumerate(tasks):
                yield i, _convert_one(task)
        finally:
            cv2.setNumThreads(previous)
        return
    # forkserver: workers do not inherit the parent's threads (logging, tqdm monitor)
    context = mp.get_context("forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn")
    if context.get_start_method() == "forkserver":
        context.set_forkserver_preload(["cxrssl.data.convert"])  # import once in the server, not per worker
    with context.Pool(min(workers, len(tasks)), initializer=_worker_init) as pool:
        indexed = pool.imap_unordered(_indexed_convert, list(enumerate(tasks)), chunksize=1)
        yield from indexed


def _indexed_convert(item: tuple[int, tuple]) -> tuple[int, tuple]:
    index, task = item
    return index, _convert_one(task)


def convert_dicoms(
    dicom_paths: Iterable[str | Path],
    out_dir: str | Path,
    metadata_csv: str | Path,
    size: int = 1024,
    bit_depth: int = 8,
    workers: int = 1,
    quarantine: Quarantine | None = None,
) -> ConvertResult:
    """Convert ``dicom_paths`` to PNGs in ``out_dir`` and write ``metadata_csv`` (see module doc).

    ``image_id`` is the file stem and ``source_split`` the parent folder name (``train``/``test``);
    ``png`` is relative to the folder of ``metadata_csv``. Bad files go to ``quarantine`` (policy
    ``fail`` raises on the first one); two files with the same stem are a bad input too. Unchanged
    files whose PNG is cached are not decoded again.
    """
    quarantine = quarantine if quarantine is not None else Quarantine("fail", stage="convert_dicom")
    out_dir, metadata_csv = Path(out_dir), Path(metadata_csv)
    out_dir.mkdir(parents=True, exist_ok=True)
    metadata_csv.unlink(missing_ok=True)  # never leave a stale table claiming completeness
    png_base = os.path.relpath(out_dir.resolve(), metadata_csv.parent.resolve())

    cache = _read_cache(out_dir)
    cache_by_key = {(r["image_id"], r["source_split"]): r for r in cache.to_dict("records")}
    rows: dict[str, dict] = {}  # image_id -> cache record (metadata columns + cache fields)
    tasks, task_rows, seen = [], [], {}
    result = ConvertResult(metadata=pd.DataFrame(columns=METADATA_COLUMNS))
    for path in sorted(Path(p) for p in dicom_paths):
        source = path.resolve()
        image_id, split = path.stem, path.parent.name
        if image_id in seen:
            quarantine.add(BadInputError(str(path), f"duplicate image_id {image_id!r} (also {seen[image_id]})"))
            result.quarantined.append(str(path))
            continue
        seen[image_id] = path
        try:
            stat = source.stat()
        except OSError as exc:
            quarantine.add(BadInputError(str(path), f"cannot read file: {exc.strerror or exc}"))
            result.quarantined.append(str(path))
            continue
        png = out_dir / f"{image_id}.png"
        base = {
            "image_id": image_id, "source_split": split, "png": Path(png_base, png.name).as_posix(),
            "source_size": stat.st_size, "source_mtime": stat.st_mtime, "source": str(source),
            "size": size, "bit_depth": bit_depth,
        }
        record = cache_by_key.get((image_id, split))
        if _cache_hit(record, stat, size, bit_depth, png):
            rows[image_id] = {**record, **base}
            result.cached.append(image_id)
        else:
            tasks.append((str(source), str(png), size, bit_depth))
            task_rows.append(base)
    log.info("%d DICOMs: %d cached, %d to convert (size %d, %d-bit, %d workers)",
             len(seen), len(result.cached), len(tasks), size, bit_depth, workers)

    def flush() -> None:
        frame = pd.DataFrame(list(rows.values()), columns=_CACHE_COLUMNS).sort_values("image_id")
        atomic_write_csv(frame, out_dir / CACHE_INDEX_NAME)

    last_flush = time.monotonic()
    stream = _results(tasks, workers)
    bar = tqdm(stream, total=len(tasks), desc="convert DICOM", unit="img", disable=progress_disabled() or not tasks)
    try:
        for index, outcome in bar:
            base = task_rows[index]
            if outcome[0] == "bad":
                _, item, reason = outcome
                result.quarantined.append(item)
                quarantine.add(BadInputError(item, reason))
                continue
            _, meta, (height, width), scale = outcome
            rows[base["image_id"]] = {
                **base, "orig_height": meta["orig_height"], "orig_width": meta["orig_width"],
                "height": height, "width": width, "scale": scale, "photometric": meta["photometric"],
                "bits_stored": meta["bits_stored"], "transfer_syntax": meta["transfer_syntax"],
            }
            result.converted.append(base["image_id"])
            if time.monotonic() - last_flush > FLUSH_EVERY_S:
                flush()
                last_flush = time.monotonic()
    finally:
        bar.close()
        stream.close()  # stops the pool at once when a bad file aborts the run
        flush()  # even a failed run keeps the PNGs it finished for the next one

    metadata = pd.DataFrame(list(rows.values()), columns=METADATA_COLUMNS)
    metadata = metadata.sort_values("image_id", kind="stable").reset_index(drop=True)
    atomic_write_csv(metadata, metadata_csv)
    log.info("wrote %s: %d images (%d converted, %d cached, %d quarantined)", metadata_csv, len(metadata),
             len(result.converted), len(result.cached), len(result.quarantined))
    result.metadata = metadata
    return result


def run_convert(dicoms: Iterable[str | Path], dicom_dirs: Iterable[str | Path], out_dir: str | Path,
                metadata_csv: str | Path, quarantine_csv: str | Path, size: int = 1024, bit_depth: int = 8,
                workers: int = 1, on_bad_input: str = "fail") -> ConvertResult:
    """The convert stage: DICOMs given as files and/or folders -> PNGs, metadata and quarantine CSV."""
    paths = sorted({Path(p) for p in dicoms} | set(find_dicoms(dicom_dirs)))
    if not paths:
        raise BadInputError(", ".join(map(str, [*dicoms, *dicom_dirs])) or "(no input)", "no DICOM files found")
    quarantine = Quarantine(on_bad_input, stage="convert_dicom")
    Path(quarantine_csv).unlink(missing_ok=True)
    result = convert_dicoms(paths, out_dir, metadata_csv, size=size, bit_depth=bit_depth, workers=workers,
                            quarantine=quarantine)
    quarantine.write(quarantine_csv)
    if result.metadata.empty:
        raise BadInputError(str(out_dir), f"none of the {len(paths)} DICOMs could be converted (see {quarantine_csv})")
    return result
