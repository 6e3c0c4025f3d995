"""Hostile inputs for tests/test_fuzz.py and benchmarks/fuzz_campaign.py: seeds, mutators, oracles.

Every case is made from a valid seed by one mutation whose expected outcome is known:

* ``reject``: the input is wrong in a way the code must notice (geometry that contradicts the data,
  a blank image, a decompression bomb, a hostile header value): anything but a BadInputError naming
  the input is a failure, and a converted PNG is a *silent wrong output*.
* ``any``: random damage (flipped, spliced or cut bytes): a BadInputError naming the input, or a
  result that is consistent with what the file declares.

Each check returns a short outcome: ``"clean"`` (BadInputError naming the input), ``"ok"`` (a
consistent result), ``"uncaught"``, ``"wrong"`` (silent wrong output) or ``"unnamed"`` (a
BadInputError that does not name the input). Patient names and ids are planted in tags and file
names (``SECRETS``) so that callers can grep every output for leaks.
"""

from __future__ import annotations

import csv
import io
import math
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEG2000Lossless,
                         RLELossless, generate_uid)

from cxrssl.data.annotations import KAGGLE_HEADER, PHYSIONET_HEADER, read_vindr_annotations
from cxrssl.data.nih import read_data_entry, read_split_list
from cxrssl.errors import BadInputError, Quarantine

#: Planted identifiers: none may appear in any output (file names are pseudonymised in the campaign).
PATIENT_NAME, PATIENT_ID, BIRTH_DATE = "Fuzzman^Patricia", "PID-FUZZ-90210", "19420704"
FILE_SECRET = "Fuzzman_Patricia"
SECRETS = (PATIENT_NAME, PATIENT_ID, BIRTH_DATE, FILE_SECRET, "Fuzzman", "90210")


@dataclass
class Case:
    """One hostile input: ``path`` holds it, ``expect`` is ``reject`` or ``any``, ``kind`` names the mutation."""

    path: Path
    kind: str
    expect: str
    seed: str = ""


# --- DICOM -----------------------------------------------------------------------------------------

def image(height: int, width: int, bits: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = np.add.outer(np.linspace(0, 1, height), np.linspace(0, 1, width)) / 2 + rng.normal(0, 0.05, (height, width))
    base = (base - base.min()) / (base.max() - base.min())
    return np.rint(base * (2**bits - 1)).astype(np.uint16)


def make_dicom(path: Path, pixels: np.ndarray, bits: int = 12, syntax=ExplicitVRLittleEndian, compress=None,
               **tags) -> Path:
    """A DX DICOM carrying the planted patient identifiers."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = syntax
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = PATIENT_NAME, PATIENT_ID, BIRTH_DATE
    ds.InstitutionName = f"Clinic of {PATIENT_NAME}"
    ds.Modality = "DX"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, tags.pop("photometric", "MONOCHROME2")
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits, bits - 1, 0
    for key, value in tags.items():
        setattr(ds, key, value)
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    if compress is not None:
        ds.compress(compress, encoding_plugin="pylibjpeg" if compress == JPEG2000Lossless else "")
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def dicom_seeds(folder: Path) -> dict[str, Path]:
    """Valid files of every variant the reader handles (small: fuzzing is about structure, not size)."""
    folder.mkdir(parents=True, exist_ok=True)
    px = image(48, 40, 12, 1)
    seeds = {
        "native": make_dicom(folder / "native.dcm", px),
        "window_mono1": make_dicom(folder / "mono1.dcm", px, photometric="MONOCHROME1", WindowCenter=2048,
                                   WindowWidth=3000),
        "rescale": make_dicom(folder / "rescale.dcm", px, RescaleSlope=2, RescaleIntercept=-1000),
        "implicit": make_dicom(folder / "implicit.dcm", px, syntax=ImplicitVRLittleEndian),
        "bigendian": make_dicom(folder / "big.dcm", px, syntax=ExplicitVRBigEndian),
        "j2k": make_dicom(folder / "j2k.dcm", image(40, 48, 12, 2), compress=JPEG2000Lossless),
        # converted at 32 px, this one is decoded at resolution level 1 (cxrssl.data.dicom.reduced_level)
        "j2k_level1": make_dicom(folder / "j2k_level1.dcm", image(80, 96, 12, 4), compress=JPEG2000Lossless,
                                 photometric="MONOCHROME1"),
        "rle": make_dicom(folder / "rle.dcm", image(40, 48, 12, 3), compress=RLELossless),
    }
    lut = Dataset()
    lut.LUTDescriptor = [4096, 0, 16]
    lut.LUTData = np.rint(np.sqrt(np.arange(4096) / 4095) * 65535).astype(int).tolist()
    lut["LUTData"].VR = "US"
    seeds["voi_lut"] = make_dicom(folder / "lut.dcm", px, VOILUTSequence=[lut])
    return seeds


def _set(ds: Dataset, keyword: str, value) -> None:
    if value is None:
        if keyword in ds:
            delattr(ds, keyword)
    else:
        setattr(ds, keyword, value)


#: Header mutations that must be rejected: (name, function(ds, rng)).
def _geometry_mutations():
    def rows(delta):
        return lambda ds, rng: _set(ds, "Rows", int(ds.Rows) + delta)

    def cols(delta):
        return lambda ds, rng: _set(ds, "Columns", int(ds.Columns) + delta)

    def blank(ds, rng):
        arr = ds.pixel_array
        value = int(rng.integers(0, 4096))
        if ds.file_meta.TransferSyntaxUID.is_compressed:
            ds.decompress()
        ds.PixelData = np.full(arr.shape, value, dtype=np.uint16).tobytes()

    def swap(ds, rng):
        ds.Rows, ds.Columns = int(ds.Columns), int(ds.Rows)

    def pad(ds, rng):
        if not ds.file_meta.TransferSyntaxUID.is_compressed:
            ds.PixelData = bytes(ds.PixelData) + bytes(int(rng.integers(2, 400)) * 2)
        else:
            ds.Rows = int(ds.Rows) - 2

    return {
        "rows_minus": rows(-3), "rows_plus": rows(+5), "cols_minus": cols(-2), "cols_plus": cols(+4),
        "swap_dims": swap, "excess_padding": pad, "blank": blank,
        "rows_zero": lambda ds, rng: _set(ds, "Rows", 0),
        "rows_multi": lambda ds, rng: _set(ds, "Rows", [int(ds.Rows), int(ds.Rows)]),
        "cols_huge": lambda ds, rng: _set(ds, "Columns", 65535),
        "bomb": lambda ds, rng: (_set(ds, "Rows", 16384), _set(ds, "Columns", 16384)),
        "bits_allocated_odd": lambda ds, rng: _set(ds, "BitsAllocated", int(rng.choice([1, 7, 12, 64]))),
        "bits_allocated_multi": lambda ds, rng: _set(ds, "BitsAllocated", [16, 16]),
        "bits_stored_over": lambda ds, rng: _set(ds, "BitsStored", 17),
        "samples_3": lambda ds, rng: _set(ds, "SamplesPerPixel", 3),
        "photometric_rgb": lambda ds, rng: _set(ds, "PhotometricInterpretation", "RGB"),
        "photometric_garbage": lambda ds, rng: _set(ds, "PhotometricInterpretation", "X" * int(rng.integers(1, 60))),
        "photometric_missing": lambda ds, rng: _set(ds, "PhotometricInterpretation", None),
        "frames": lambda ds, rng: _set(ds, "NumberOfFrames", int(rng.choice([0, 2, 3]))),
        "no_pixels": lambda ds, rng: _set(ds, "PixelData", None),
        "rows_missing": lambda ds, rng: _set(ds, "Rows", None),
        "window_nonsense": lambda ds, rng: (_set(ds, "WindowCenter", "nan"), _set(ds, "WindowWidth", "0")),
        "lut_garbage": lambda ds, rng: _set(ds, "VOILUTSequence", [_bad_lut(rng)]),
        "slope_nan": lambda ds, rng: (_set(ds, "RescaleSlope", "nan"), _set(ds, "RescaleIntercept", "0")),
        "syntax_unknown": lambda ds, rng: setattr(ds.file_meta, "TransferSyntaxUID", "1.2.3.4.5.6"),
        "syntax_wrong_codec": lambda ds, rng: setattr(ds.file_meta, "TransferSyntaxUID",
                                                      "1.2.840.10008.1.2.4.50" if ds.file_meta.TransferSyntaxUID.is_compressed
                                                      else "1.2.840.10008.1.2.5"),
    }


def _bad_lut(rng) -> Dataset:
    """A VOI LUT that cannot be applied as declared: entries missing or extra, or unusable bits."""
    item = Dataset()
    entries, bits = int(rng.integers(1, 6)), int(rng.choice([1, 8, 16, 33]))
    given = int(rng.choice([n for n in range(0, 8) if n != entries])) if bits in (8, 16) else entries
    item.LUTDescriptor = [entries, int(rng.integers(0, 5000)), bits]
    item.LUTData = [int(v) for v in rng.integers(0, 2, size=given)]
    item["LUTData"].VR = "US"
    return item


GEOMETRY_KINDS = tuple(_geometry_mutations())


def _flip(data: bytearray, rng, start: int, end: int, count: int) -> None:
    for _ in range(count):
        if end > start:
            i = int(rng.integers(start, end))
            data[i] = int(rng.integers(0, 256))


def mutate_dicom(seed_path: Path, out: Path, rng: np.random.Generator) -> Case:
    """One mutated copy of ``seed_path`` at ``out``: a header mutation (reject) or random damage (any)."""
    raw = seed_path.read_bytes()
    pixel_at = raw.rfind(b"\xe0\x7f\x10\x00")  # (7FE0,0010) PixelData tag
    choice = rng.random()
    if choice < 0.45:
        for _ in range(20):  # some mutations do not apply to a seed, or pydicom cannot write them
            kind = str(rng.choice(GEOMETRY_KINDS))
            if kind == "swap_dims" and "j2k" not in seed_path.stem:
                continue  # uncompressed and RLE data carry no size of their own: a swap is undetectable
            ds = pydicom.dcmread(seed_path)
            try:
                _geometry_mutations()[kind](ds, rng)
                out.parent.mkdir(parents=True, exist_ok=True)
                ds.save_as(out, enforce_file_format=False)
                break
            except (OSError, ValueError, TypeError, OverflowError, AttributeError):
                continue
        # a VOI LUT takes precedence over the window: nonsense window values next to one are unused
        expect = "any" if kind == "window_nonsense" and "VOILUTSequence" in ds else "reject"
    else:
        data = bytearray(raw)
        kind = str(rng.choice(["header_flip", "pixel_flip", "truncate", "splice", "zero_run", "vr_garbage"]))
        if kind == "header_flip":
            _flip(data, rng, 128, max(129, pixel_at), int(rng.integers(1, 6)))
        elif kind == "pixel_flip":
            _flip(data, rng, pixel_at + 8, len(data), int(rng.integers(1, 30)))
        elif kind == "truncate":
            data = data[:int(rng.integers(0, len(data)))]
        elif kind == "splice":
            at = int(rng.integers(0, len(data)))
            data[at:at] = bytes(rng.integers(0, 256, size=int(rng.integers(1, 64)), dtype=np.uint8))
        elif kind == "zero_run":
            at = int(rng.integers(0, len(data)))
            data[at:at + int(rng.integers(1, 200))] = bytes(200)[:len(data[at:at + 200])]
        else:  # an element's VR replaced by letters that are no VR (lazy parsing fails on access)
            vrs = [i for i in range(132, max(133, pixel_at)) if data[i:i + 2] in (b"US", b"CS", b"DS", b"IS")]
            if vrs:
                i = int(rng.choice(vrs))
                data[i:i + 2] = bytes(rng.choice([b"ZZ", b"QQ", b"\x00\x01"]))
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(bytes(data))
        expect = "any"
    return Case(out, kind, expect, seed=seed_path.stem)


def _declared(path: Path) -> tuple[int, int] | None:
    """Rows/Columns the file declares, as pydicom reads them (None when it cannot)."""
    try:
        ds = pydicom.dcmread(path, force=True, stop_before_pixels=True)
        return int(ds.Rows), int(ds.Columns)
    except Exception:  # noqa: BLE001 - the oracle only asks; the code under test must decide
        return None


def judge_conversion(case: Case, label: str, converted: dict | None, quarantined: dict[str, str],
                     png: np.ndarray | None) -> str:
    """Outcome of one case in a conversion run: ``converted`` is its metadata row (or None)."""
    if converted is None:
        if label not in quarantined:
            return "unnamed"  # neither converted nor named in the quarantine: lost silently
        return "clean"
    if case.expect == "reject":
        return "wrong"
    declared = _declared(case.path)
    if declared != (converted["orig_height"], converted["orig_width"]):
        return "wrong"
    if png is None or png.shape != (converted["height"], converted["width"]) or png.min() != 0 or png.max() == 0:
        return "wrong"
    return "ok"


# --- CSV files -------------------------------------------------------------------------------------

TEXT_MUTATIONS = ("quote", "delete", "duplicate_line", "huge_field", "nul", "bad_utf8", "bom", "crlf", "truncate",
                  "number", "empty_field", "extra_field", "unicode", "blank_lines", "swap_fields")
HOSTILE_NUMBERS = ("nan", "inf", "-inf", "1e308", "-0", "1e-13", "1,5", "0x10", "", " 12 ", "1e400", "-1")


def mutate_text(data: bytes, rng: np.random.Generator) -> tuple[bytes, set[int] | None, str]:
    """One mutated copy of a CSV/list file. Returns ``(bytes, touched 0-based lines or None for 'maybe
    all from here on', kind)``; the header is line 0."""
    lines = data.split(b"\n")
    kind = str(rng.choice(TEXT_MUTATIONS))
    k = int(rng.integers(0, len(lines)))
    line = lines[k]
    touched: set[int] | None = {k}
    if kind == "quote":
        at = int(rng.integers(0, len(line) + 1))
        lines[k] = line[:at] + b'"' + line[at:]
        touched = None  # an open quote may swallow every following line
    elif kind == "delete" and line:
        at = int(rng.integers(0, len(line)))
        lines[k] = line[:at] + line[at + 1:]
    elif kind == "duplicate_line":
        lines.insert(k, line)
        touched = {k, k + 1}
    elif kind == "huge_field":
        lines[k] = line + b"," + b"x" * 200_000
    elif kind == "nul":
        lines[k] = line[:len(line) // 2] + b"\x00" + line[len(line) // 2:]
    elif kind == "bad_utf8":
        lines[k] = line[:len(line) // 2] + bytes([0xff, 0xfe, 0xc3]) + line[len(line) // 2:]
    elif kind == "bom":
        lines[0] = b"\xef\xbb\xbf" + lines[0]
        touched = set()  # a BOM is allowed: nothing may be lost
    elif kind == "crlf":
        lines = [ln + b"\r" for ln in lines]
        touched = set()
    elif kind == "truncate":
        cut = int(rng.integers(0, len(line) + 1))
        touched = set(range(k, len(lines)))  # everything from the cut on is gone
        lines = lines[:k] + [line[:cut]]
    elif kind == "number":
        fields = line.split(b",")
        j = int(rng.integers(0, len(fields)))
        fields[j] = str(rng.choice(HOSTILE_NUMBERS)).encode()
        lines[k] = b",".join(fields)
    elif kind == "empty_field":
        fields = line.split(b",")
        fields[int(rng.integers(0, len(fields)))] = b""
        lines[k] = b",".join(fields)
    elif kind == "extra_field":
        lines[k] = line + b",extra"
    elif kind == "unicode":
        lines[k] = line + "\u202e\u00e9\U0001f600".encode()
    elif kind == "blank_lines":
        lines.insert(k, b"   ")
        touched = {k}
    elif kind == "swap_fields":
        fields = line.split(b",")
        if len(fields) > 1:
            i, j = rng.choice(len(fields), 2, replace=False)
            fields[i], fields[j] = fields[j], fields[i]
        lines[k] = b",".join(fields)
    if touched is not None and k == 0 and kind not in ("bom", "crlf", "blank_lines"):
        touched = None  # a broken header rejects the file
    return b"\n".join(lines), touched, kind


def csv_rows(data: bytes) -> list[list[str]]:
    """The records of a well-formed seed file, the header first."""
    return list(csv.reader(io.StringIO(data.decode("utf-8-sig"), newline="")))


def names_input(exc: BadInputError, path: Path) -> bool:
    return exc.item.startswith(str(path))


def temporary_leftovers(folder: Path) -> list[Path]:
    """Half-written files (cxrssl.io's ``.<name>.<random><suffix>`` temporaries), locks excepted."""
    keep = {".lock", ".convert_index.csv", ".metadata.csv.lock"}
    return [p for p in folder.rglob(".*") if p.is_file() and p.name not in keep]


def annotation_seed(layout: str) -> bytes:
    """A valid annotation file of ``layout`` (12 rows, boxes and No finding, 3 readers)."""
    rows = []
    for i in range(12):
        image_id, rad = f"img{i % 4}", f"R{1 + i % 3}"
        name, cid = (("Cardiomegaly", "3") if i % 3 else ("No finding", "14"))
        coords = [f"{10 + i}.0", f"{20 + i}.5", f"{200 + i}.0", f"{300 + i}.25"] if cid != "14" else [""] * 4
        rows.append([image_id, rad, name, *coords] if layout == "physionet" else [image_id, name, cid, rad, *coords])
    header = PHYSIONET_HEADER if layout == "physionet" else KAGGLE_HEADER
    return ("\n".join(",".join(r) for r in [header, *rows]) + "\n").encode()


def _row_key(record: dict) -> tuple:
    return tuple(str(record[c]) for c in ("image_id", "rad_id", "class_name")) + tuple(
        None if (isinstance(record[c], float) and math.isnan(record[c])) or record[c] == "" else float(record[c])
        for c in ("x_min", "y_min", "x_max", "y_max"))


def judge_annotations(root: Path, layout: str, seed: bytes, data: bytes, touched: set[int] | None) -> tuple[str, str]:
    """Write ``data`` as the layout's train file under ``root`` and judge the parser on it."""
    header = PHYSIONET_HEADER if layout == "physionet" else KAGGLE_HEADER
    path = root / ("annotations/annotations_train.csv" if layout == "physionet" else "train.csv")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    if layout == "physionet":
        (root / "annotations/annotations_test.csv").write_text(",".join(header) + "\n")
    quarantine = Quarantine("skip")
    try:
        frame = read_vindr_annotations(root, layout, quarantine)
    except BadInputError as exc:
        if not names_input(exc, path):
            return "unnamed", str(exc)
        return ("clean", "") if touched is None else ("wrong", f"file rejected for one bad row: {exc}")
    except Exception as exc:  # noqa: BLE001 - what the campaign counts
        return "uncaught", f"{type(exc).__name__}: {exc}"
    if not all(item.startswith(str(path)) for item, _ in quarantine.items):
        return "unnamed", str(quarantine.items)
    if touched is not None:  # every row the mutation did not touch is still there, unchanged
        kept = {_row_key(r) for r in frame.to_dict("records")}
        records = [dict(zip(header, r)) for r in csv_rows(seed)[1:]]
        lost = [r for i, r in enumerate(records, start=1) if i not in touched and _row_key(r) not in kept]
        if lost:
            return "wrong", f"lost untouched rows {lost[:2]}"
    return ("clean" if quarantine.items else "ok"), ""


def nih_seed() -> tuple[bytes, bytes]:
    """A valid Data_Entry file (2017 header, trailing commas) and a list file of its images."""
    header = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
              "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],")
    rows = [f"{p:08d}_{k:03d}.png,{'Effusion|Mass' if k else 'No Finding'},{k},{p},58,M,PA,1024,1024,0.143,0.143,"
            for p in range(1, 7) for k in range(2)]
    names = [r.split(",")[0] for r in rows]
    return ("\n".join([header, *rows]) + "\n").encode(), "\n".join(names).encode()


def judge_nih(path: Path, data: bytes, touched: set[int] | None, names: list[str], is_list: bool) -> tuple[str, str]:
    """Write ``data`` to ``path`` (a Data_Entry or a list file) and judge its reader."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    quarantine = Quarantine("skip")
    try:
        found = read_split_list(path, quarantine) if is_list else list(read_data_entry(path, quarantine)["image_index"])
    except BadInputError as exc:
        if not names_input(exc, path):
            return "unnamed", str(exc)
        return ("clean", "") if touched is None else ("wrong", f"file rejected for one bad line: {exc}")
    except Exception as exc:  # noqa: BLE001
        return "uncaught", f"{type(exc).__name__}: {exc}"
    if not all(item.startswith(str(path)) for item, _ in quarantine.items):
        return "unnamed", str(quarantine.items)
    if touched is not None:
        first = 0 if is_list else 1  # a list file has no header line
        lost = [n for i, n in enumerate(names, start=first) if i not in touched and n not in set(found)]
        if lost:
            return "wrong", f"lost untouched lines {lost[:3]}"
    return ("clean" if quarantine.items else "ok"), ""


# --- configs ---------------------------------------------------------------------------------------

HOSTILE_VALUES = (math.nan, math.inf, -math.inf, 10**30, -(10**30), -1, 0, 1e-300, "", " ", "x" * 5000, "../..",
                  [], [None], {}, {"a": 1}, None, True, False, "1e3", "nan", [math.nan], [-1, -1], ["a/b", "c d"])


def schema_keys(schema: dict, prefix: str = "") -> list[tuple[str, dict]]:
    """Every dotted setting key of the schema with its property schema."""
    out = []
    for name, prop in schema.get("properties", {}).items():
        key = f"{prefix}{name}"
        out.append((key, prop))
        if prop.get("type") == "object":
            out.extend(schema_keys(prop, key + "."))
    return out


def set_key(config: dict, key: str, value) -> dict:
    node = config
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            return config
    node[parts[-1]] = value
    return config


def random_config(rng: random.Random, keys: list[tuple[str, dict]], n: int) -> dict:
    config: dict = {}
    for key, _ in rng.sample(keys, min(n, len(keys))):
        set_key(config, key, rng.choice(HOSTILE_VALUES))
    return config
