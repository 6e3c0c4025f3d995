"""Convert VinDr-CXR DICOMs to resized PNGs plus the ``metadata.csv`` contract table.

Per image: :func:`cxrssl.data.dicom.read_dicom` (VOI, MONOCHROME1 inversion; JPEG 2000 decoded at
the coarsest resolution level that still covers ``size``, unless ``j2k_reduce`` is false), resize
so the longest side is ``size`` (aspect kept, ``cv2.INTER_AREA``, in float), min-max to 8 or 16
bits, PNG via cv2, written atomically. Files are spread over ``workers`` processes
(:func:`cxrssl.data.workers.run_tasks`); only small metadata rows travel back, so memory stays
flat whatever the number of files.

Failures stay per file: whatever goes wrong with one DICOM (a bad header, a decoder error or
panic, a worker killed by a segfault or the out-of-memory killer, a decode that hangs) is a
:class:`~cxrssl.errors.BadInputError` naming that file, which the quarantine records under
``skip``; the other files are converted. A file that cannot be *written* (a full disk) is not bad
input: the run stops with an ``OSError`` naming the file and the reason.

Per-file cache. Every run records, in ``<out_dir>/.convert_index.csv``, each PNG with its source
(relative to the dataset: ``<folder>/<file>``), size and mtime and the settings it was made with. A
later run reuses a PNG whose record matches (and whose file still exists) instead of decoding the
DICOM again. Under Snakemake the rule reruns whenever its list of input DICOMs changes (a file
added or removed); the cache makes that rerun cost only the new files. The cache record lives in
the image folder, not in ``metadata.csv``, because Snakemake deletes a rule's declared outputs
before rerunning it. Files no longer in the input are dropped from ``metadata.csv`` (their PNGs
stay until the folder is removed, except when ids are pseudonymised: then they go at once).

Identifiers: ``image_id`` is the file stem, or its pseudonym (:mod:`cxrssl.privacy`); with
pseudonyms, files are named ``<folder>/<pseudonym><suffix>`` in the quarantine report and the log
and the mapping back is written to the private folder only.

Atomicity: the output folder and ``metadata.csv`` are locked for the run (a second job on them
stops at once); ``metadata.csv`` is deleted when a run starts and written last, so it exists only
after a complete run and lists only PNGs that are fully written.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from tqdm import tqdm

from cxrssl.data.dicom import DEFAULT_MAX_DECODED_MB, REDUCIBLE_SYNTAXES, read_dicom, scaled_shape
from cxrssl.data.workers import FATAL, TaskFailed, run_tasks
from cxrssl.errors import BadInputError, Quarantine
from cxrssl.io import atomic_write_bytes, atomic_write_csv, exclusive_lock
from cxrssl.privacy import SAFE_FOLDERS, Pseudonymizer
from cxrssl.utils import progress_disabled

log = logging.getLogger(__name__)

#: Columns of VINDR_METADATA (CONTRIBUTING.md data contract), in order.
METADATA_COLUMNS = [
    "image_id", "source_split", "png", "orig_height", "orig_width", "height", "width", "scale",
    "photometric", "bits_stored", "transfer_syntax", "source_size", "source_mtime",
]
#: Per-folder cache record (hidden so that globbing the PNGs never sees it).
CACHE_INDEX_NAME = ".convert_index.csv"
_CACHE_COLUMNS = METADATA_COLUMNS + ["source", "size", "bit_depth", "j2k_reduce"]
DICOM_SUFFIXES = (".dicom", ".dcm")
#: Seconds between cache-record flushes, so a killed run keeps most of its work.
FLUSH_EVERY_S = 60.0
#: A file whose conversion takes longer is stopped and quarantined (a decoder caught in a loop).
FILE_TIMEOUT_S = 600.0
#: Memory of one conversion worker: the interpreter and its libraries (177 MB measured), plus this
#: many times the largest decoded frame (pixels, compressed copy, index and float32 image; peak RSS
#: over the decoded frame measured at 4.0 native, 4.9 RLE, 5.4 JPEG 2000, 6.8 for 32-bit data on the
#: float path). rules/convert.smk reserves worker_mem_mb() per worker.
WORKER_BASE_MB, WORKER_FRAME_FACTOR = 250, 7


def worker_mem_mb(max_decoded_mb: float) -> int:
    """Memory (MB) one conversion worker may need when frames up to ``max_decoded_mb`` are accepted."""
    return int(WORKER_BASE_MB + WORKER_FRAME_FACTOR * max_decoded_mb)


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


def to_display_png(image: np.ndarray, size: int, bit_depth: int, item: str = "image",
                   source_bits: int = 16, orig_shape: tuple[int, int] | None = None) -> tuple[np.ndarray, float]:
    """Resize so the longest side is ``size`` (INTER_AREA) and min-max scale to ``bit_depth`` bits.

    Returns ``(array, scale)`` with ``array`` uint8/uint16 and converted = original * scale.
    ``orig_shape`` is the original image's ``(height, width)`` when ``image`` is a reduced
    resolution level of it: the output size and ``scale`` are those of the original.
    Resizing happens in float before quantisation so no precision is lost twice. A blank image
    is refused BEFORE resizing (a constant image leaves the float resize with 1e-7 ripples that
    min-max stretching would blow up into full-range noise): blank means a value range below one
    level of a ``source_bits``-bit image at the image's own magnitude.
    """
    if bit_depth not in (8, 16):
        raise ValueError(f"bit_depth must be 8 or 16, got {bit_depth}")
    if image.ndim != 2 or min(image.shape) < 1:
        raise BadInputError(item, f"expected a 2-D grey image, got shape {image.shape}")
    lo, hi = float(image.min()), float(image.max())
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise BadInputError(item, "non-finite pixel values")
    if hi - lo <= max(abs(lo), abs(hi), 1.0) * 2.0 ** -source_bits:
        raise BadInputError(item, f"blank image: every pixel has the same value ({lo:g}..{hi:g}) after the VOI transform")
    height, width = orig_shape or image.shape
    scale = size / max(height, width)
    new_h, new_w = scaled_shape(height, width, size)
    interp = cv2.INTER_AREA if size < max(image.shape) else cv2.INTER_CUBIC  # AREA is for shrinking
    resized = cv2.resize(np.ascontiguousarray(image, dtype=np.float32), (new_w, new_h), interpolation=interp)
    lo, hi = float(resized.min()), float(resized.max())
    if not hi > lo:  # resizing averaged the only contrast away (e.g. a single bright pixel)
        raise BadInputError(item, "blank image: no contrast left after resizing")
    top = 255 if bit_depth == 8 else 65535
    out = np.rint((resized - lo) * (top / (hi - lo)))
    np.clip(out, 0, top, out=out)
    return out.astype(np.uint8 if bit_depth == 8 else np.uint16), scale


def _write_png(array: np.ndarray, path: Path) -> None:
    # cv2's default PNG settings (level 1 with a run-length strategy) are kept on purpose: on
    # 1024 px radiographs they were the fastest and smallest of levels 1, 3, 6 (lossless at any).
    # Encoded in memory and written by Python, so a failed write says why (cv2.imwrite only
    # returns False).
    ok, data = cv2.imencode(".png", array)
    if not ok:
        raise OSError(errno.EIO, f"could not write {path}: cv2 failed to encode the PNG")
    atomic_write_bytes(data.tobytes(), path)


def _worker_init() -> None:
    import logging as _logging

    cv2.setNumThreads(1)  # one process per core already; threads would oversubscribe
    # pydicom logs every plugin failure it sees; the failure reaches the quarantine anyway.
    _logging.getLogger("pydicom").setLevel(_logging.CRITICAL)


def _convert_one(task: tuple) -> tuple:
    """Worker: convert one DICOM; never raises for a property of the file.

    Returns ``("ok", meta, shape, scale)``, ``("bad", reason)`` (bad input: anything that went
    wrong reading or converting it) or ``("error", errno, message)`` (the PNG could not be
    written: not the file's fault). Plain tuples travel back (BadInputError's two-argument
    constructor does not survive pickling).
    """
    src, png, size, bit_depth, max_decoded_mb, j2k_reduce = task
    try:
        image, meta = read_dicom(src, max_decoded_mb=max_decoded_mb, longest_side=size if j2k_reduce else None)
        array, scale = to_display_png(image, size, bit_depth, item=src, source_bits=int(meta["bits_stored"]),
                                      orig_shape=(meta["orig_height"], meta["orig_width"]))
        del image
    except BadInputError as exc:
        return ("bad", exc.reason)
    except MemoryError:
        return ("bad", "ran out of memory while converting it")
    except FATAL:
        raise
    except BaseException as exc:  # noqa: BLE001 - e.g. an OpenCV error on an odd array: this file's problem
        return ("bad", f"could not convert it ({type(exc).__name__}: {str(exc).strip()[:200]})")
    try:
        _write_png(array, Path(png))
    except OSError as exc:
        return ("error", exc.errno or errno.EIO, str(exc))
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
    if list(frame.columns) == _CACHE_COLUMNS[:-1]:  # written before j2k_reduce existed: full decodes
        frame["j2k_reduce"] = False
    if list(frame.columns) != _CACHE_COLUMNS:
        log.warning("cache record %s has other columns (older version?): converting everything again", path)
        return pd.DataFrame(columns=_CACHE_COLUMNS)
    return frame


def _cache_hit(record: dict | None, stat: os.stat_result, size: int, bit_depth: int, j2k_reduce: bool,
               png: Path) -> bool:
    # Identity is (image_id, folder, size, mtime), not the absolute path: a moved or copied
    # checkout (or dataset) keeps its cache. j2k_reduce only changes JPEG 2000 PNGs.
    return (
        record is not None
        and int(record["source_size"]) == stat.st_size
        and abs(float(record["source_mtime"]) - stat.st_mtime) < 1e-6
        and int(record["size"]) == size
        and int(record["bit_depth"]) == bit_depth
        and (str(record["transfer_syntax"]) not in REDUCIBLE_SYNTAXES or str(record["j2k_reduce"]) == str(j2k_reduce))
        and png.is_file()
    )


def convert_dicoms(
    dicom_paths: Iterable[str | Path],
    out_dir: str | Path,
    metadata_csv: str | Path,
    size: int = 1024,
    bit_depth: int = 8,
    workers: int = 1,
    quarantine: Quarantine | None = None,
    max_decoded_mb: float = DEFAULT_MAX_DECODED_MB,
    ids: Pseudonymizer | None = None,
    timeout_s: float = FILE_TIMEOUT_S,
    j2k_reduce: bool = True,
) -> ConvertResult:
    """Convert ``dicom_paths`` to PNGs in ``out_dir`` and write ``metadata_csv`` (see module doc).

    ``image_id`` is the file stem (or its pseudonym, ``ids``) and ``source_split`` the parent
    folder name (``train``/``test``); ``png`` is relative to the folder of ``metadata_csv``. Bad
    files go to ``quarantine`` (policy ``fail`` raises on the first one); two files with the same
    stem are a bad input too. Unchanged files whose PNG is cached are not decoded again.
    ``workers`` processes convert (0: in this process, without crash isolation); frames larger
    than ``max_decoded_mb`` are refused before decoding. ``j2k_reduce``: decode JPEG 2000 at the
    coarsest resolution level that still covers ``size`` (:func:`cxrssl.data.dicom.reduced_level`).
    """
    quarantine = quarantine if quarantine is not None else Quarantine("fail", stage="convert_dicom")
    ids = ids if ids is not None else Pseudonymizer(enabled=False)
    out_dir, metadata_csv = Path(out_dir), Path(metadata_csv)
    out_dir.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(out_dir / ".lock", f"the image folder {out_dir}"), \
            exclusive_lock(metadata_csv.with_name(f".{metadata_csv.name}.lock"), str(metadata_csv)):
        try:
            result = _convert_locked(dicom_paths, out_dir, metadata_csv, size, bit_depth, workers, quarantine,
                                     max_decoded_mb, ids, timeout_s, j2k_reduce)
        except BaseException:
            try:  # a failed run's message names its file by pseudonym: the mapping must be there too
                ids.write_mapping("convert")
            except OSError as exc:  # but never in place of the error on its way
                log.error("%s", exc)
            raise
        ids.write_mapping("convert")
        return result


def _convert_locked(dicom_paths, out_dir: Path, metadata_csv: Path, size: int, bit_depth: int, workers: int,
                    quarantine: Quarantine, max_decoded_mb: float, ids: Pseudonymizer,
                    timeout_s: float, j2k_reduce: bool) -> ConvertResult:
    metadata_csv.unlink(missing_ok=True)  # never leave a stale table claiming completeness
    png_base = os.path.relpath(out_dir.resolve(), metadata_csv.parent.resolve())

    cache = _read_cache(out_dir)
    cache_by_key = {(r["image_id"], r["source_split"]): r for r in cache.to_dict("records")}
    rows: dict[str, dict] = {}  # image_id -> cache record (metadata columns + cache fields)
    tasks, task_rows, seen = [], [], {}
    result = ConvertResult(metadata=pd.DataFrame(columns=METADATA_COLUMNS))

    def bad(path: Path, reason: str) -> None:
        label = ids.file_label(path)
        result.quarantined.append(label)
        quarantine.add(BadInputError(label, ids.scrub(reason, path)))

    for path in sorted(Path(p) for p in dicom_paths):
        image_id, split = ids.image_id(path.stem, path), path.parent.name
        if image_id in seen:
            bad(path, f"duplicate image_id {image_id!r} (also {ids.file_label(seen[image_id])})")
            continue
        seen[image_id] = path
        if ids.enabled and split not in SAFE_FOLDERS:  # metadata would store the folder's name
            bad(path, f"is not in a {' or '.join(SAFE_FOLDERS)} folder; with pseudonymised ids other folder names "
                      "are not stored")
            continue
        try:
            stat = path.stat()
        except OSError as exc:
            bad(path, f"cannot read file: {exc.strerror or exc}")
            continue
        png = out_dir / f"{image_id}.png"
        base = {
            "image_id": image_id, "source_split": split, "png": Path(png_base, png.name).as_posix(),
            "source_size": stat.st_size, "source_mtime": stat.st_mtime,
            "source": "" if ids.enabled else f"{split}/{path.name}",  # relative: no site paths stored
            "size": size, "bit_depth": bit_depth, "j2k_reduce": j2k_reduce,
        }
        record = cache_by_key.get((image_id, split))
        if _cache_hit(record, stat, size, bit_depth, j2k_reduce, png):
            rows[image_id] = {**record, **base}
            result.cached.append(image_id)
        else:
            tasks.append((str(path), str(png), size, bit_depth, max_decoded_mb, j2k_reduce))
            task_rows.append((path, base))
    log.info("%d DICOMs: %d cached, %d to convert (size %d, %d-bit, %d workers, frames up to %g MB, JPEG 2000 at "
             "%s resolution)", len(seen), len(result.cached), len(tasks), size, bit_depth, workers, max_decoded_mb,
             "reduced" if j2k_reduce else "full")

    def flush() -> None:
        frame = pd.DataFrame(list(rows.values()), columns=_CACHE_COLUMNS).sort_values("image_id")
        atomic_write_csv(frame, out_dir / CACHE_INDEX_NAME)

    last_flush = time.monotonic()
    stream = run_tasks(_convert_one, tasks, workers, initializer=_worker_init, preload=("cxrssl.data.convert",),
                       timeout_s=timeout_s, what="DICOM")
    bar = tqdm(stream, total=len(tasks), desc="convert DICOM", unit="img", disable=progress_disabled() or not tasks)
    failed = False
    try:
        for index, outcome in bar:
            path, base = task_rows[index]
            if isinstance(outcome, TaskFailed):
                bad(path, f"{outcome.reason} (a decoder crash, or more memory than the "
                          f"{max_decoded_mb:g} MB frame limit allows for)")
                continue
            if outcome[0] == "bad":
                bad(path, outcome[1])
                continue
            if outcome[0] == "error":
                raise OSError(outcome[1], ids.scrub(outcome[2], path))
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
    except BaseException:
        failed = True
        raise
    finally:
        bar.close()
        stream.close()  # stops the workers at once when a bad file aborts the run
        try:
            flush()  # even a failed run keeps the PNGs it finished for the next one
        except OSError as exc:
            if not failed:
                raise
            # the real error is already on its way: do not replace it with this one
            log.error("%s; the next run converts again what this one finished", exc)

    if ids.enabled:  # PNGs of earlier runs may carry real ids in their names: keep only this run's
        for png in out_dir.glob("*.png"):
            if png.stem not in rows:
                png.unlink(missing_ok=True)
    metadata = pd.DataFrame(list(rows.values()), columns=METADATA_COLUMNS)
    metadata = metadata.sort_values("image_id", kind="stable").reset_index(drop=True)
    atomic_write_csv(metadata, metadata_csv)
    log.info("wrote %s: %d images (%d converted, %d cached, %d quarantined)", metadata_csv, len(metadata),
             len(result.converted), len(result.cached), len(result.quarantined))
    result.metadata = metadata
    return result


def run_convert(dicoms: Iterable[str | Path], dicom_dirs: Iterable[str | Path], out_dir: str | Path,
                metadata_csv: str | Path, quarantine_csv: str | Path, size: int = 1024, bit_depth: int = 8,
                workers: int = 1, on_bad_input: str = "fail", max_decoded_mb: float = DEFAULT_MAX_DECODED_MB,
                j2k_reduce: bool = True, pseudonymize_ids: bool = False,
                private_dir: str | Path | None = None) -> ConvertResult:
    """The convert stage: DICOMs given as files and/or folders -> PNGs, metadata and quarantine CSV."""
    dicoms, dicom_dirs = list(dicoms), list(dicom_dirs)
    paths = sorted({Path(p) for p in dicoms} | set(find_dicoms(dicom_dirs)))
    if not paths:
        raise BadInputError(", ".join(map(str, [*dicoms, *dicom_dirs])) or "(no input)", "no DICOM files found")
    quarantine = Quarantine(on_bad_input, stage="convert_dicom")
    Path(quarantine_csv).unlink(missing_ok=True)
    ids = Pseudonymizer(pseudonymize_ids, private_dir)
    result = convert_dicoms(paths, out_dir, metadata_csv, size=size, bit_depth=bit_depth, workers=workers,
                            quarantine=quarantine, max_decoded_mb=max_decoded_mb, ids=ids, j2k_reduce=j2k_reduce)
    quarantine.write(quarantine_csv)
    if result.metadata.empty:
        raise BadInputError(str(out_dir), f"none of the {len(paths)} DICOMs could be converted (see {quarantine_csv})")
    return result
