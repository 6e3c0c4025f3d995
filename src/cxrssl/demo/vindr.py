"""VinDr-CXR-like part of the demo: DICOMs in train/ and test/, PhysioNet annotation CSVs and the
Kaggle VinBigData train.csv, with the DICOM variety of the real files (REFERENCE.md section 2).

Layouts: ``train/`` holds the 3-reader images; Kaggle ``train.csv`` lists exactly those images (the
Kaggle layout has no test labels, so it never reads ``test/``). PhysioNet
``annotations/annotations_test.csv`` gives ``test/`` one consensus reader per image.
Coordinates are original DICOM pixels; original sizes differ per image and are not square.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from pydicom import dcmwrite
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
    generate_uid,
)
from tqdm import tqdm

from cxrssl.classes import VINDR_CLASSES, VINDR_NO_FINDING, VINDR_NO_FINDING_ID, class_id
from cxrssl.demo.phantom import VINDR_PAINTERS, Anatomy, Canvas, render_anatomy
from cxrssl.io import atomic_path, atomic_write_csv
from cxrssl.utils import progress_disabled

log = logging.getLogger(__name__)
# openjpeg logs every encoded tile at INFO; that would flood the rule's log.
logging.getLogger("openjpeg").setLevel(logging.WARNING)

STREAM = 2
KAGGLE_COLUMNS = ["image_id", "class_name", "class_id", "rad_id", "x_min", "y_min", "x_max", "y_max"]
PHYSIONET_COLUMNS = ["image_id", "rad_id", "class_name", "x_min", "y_min", "x_max", "y_max"]
#: rad_id of the test set's consensus reading (the real test labels are a 5-reader consensus).
CONSENSUS_READER = "R_consensus"
DX_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
CR_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.1"  # Computed Radiography Image Storage
#: Fixed so rewritten files are byte-identical whatever pydicom version wrote them.
IMPLEMENTATION_UID = "1.2.826.0.1.3680043.8.498.1.4242"


@dataclass(frozen=True)
class Profile:
    """How one DICOM is encoded; the generator cycles through these so every run has all of them."""

    photometric: str
    bits_stored: int
    encoding: str  # "native", "jpeg2000", "rle", "no_tsuid" (file meta lacks TransferSyntaxUID)
    voi: str  # "window", "lut" (VOI LUT Sequence) or "none"
    sop: str = DX_SOP_CLASS


PROFILES = (
    Profile("MONOCHROME2", 12, "native", "window"),
    Profile("MONOCHROME1", 14, "jpeg2000", "window"),
    Profile("MONOCHROME2", 16, "rle", "window", CR_SOP_CLASS),
    Profile("MONOCHROME2", 12, "native", "lut"),
    Profile("MONOCHROME1", 16, "no_tsuid", "window", CR_SOP_CLASS),
    Profile("MONOCHROME2", 14, "native", "none"),
)


def _rng(seed: int, *key: int) -> np.random.Generator:
    return np.random.default_rng([seed, STREAM, *key])


def _draw_lesions(rng: np.random.Generator) -> list[str]:
    """About 45 % of the images are normal; the rest have 1-3 different findings."""
    if rng.random() < 0.45:
        return []
    names = list(VINDR_PAINTERS)
    weights = np.array([VINDR_PAINTERS[n][1] for n in names])
    k = int(rng.choice([1, 2, 3], p=[0.55, 0.3, 0.15]))
    picked = rng.choice(len(names), size=k, replace=False, p=weights / weights.sum())
    return [names[i] for i in sorted(picked)]


def render_vindr(height: int, width: int, lesions: list[str], rng: np.random.Generator):
    """Display-convention float image in [0, 1] and the true boxes ``[(class_name, box), ...]``."""
    c = Canvas(height, width, Anatomy.sample(rng))
    render_anatomy(c)
    truth = [(name, VINDR_PAINTERS[name][0](c, rng)) for name in lesions]
    return np.clip(c.img, 0, 1), truth


def _jitter(box, rng: np.random.Generator, width: int, height: int, rel: float):
    """A reader's box: each edge moves by a few % of the box size; clipped to the image."""
    x0, y0, x1, y1 = box
    bw, bh = x1 - x0, y1 - y0
    x0, x1 = x0 + rng.normal(0, rel) * bw, x1 + rng.normal(0, rel) * bw
    y0, y1 = y0 + rng.normal(0, rel) * bh, y1 + rng.normal(0, rel) * bh
    x0, x1 = float(np.clip(round(min(x0, x1)), 0, width - 2)), float(np.clip(round(max(x0, x1)), 0, width - 1))
    y0, y1 = float(np.clip(round(min(y0, y1)), 0, height - 2)), float(np.clip(round(max(y0, y1)), 0, height - 1))
    return x0, y0, max(x1, x0 + 1), max(y1, y0 + 1)


def _readers(rng: np.random.Generator) -> list[str]:
    """Three distinct radiologists of R1..R17; R8-R10 read most images, as in the real data."""
    weights = np.ones(17)
    weights[7:10] = 6.0
    picked = rng.choice(17, size=3, replace=False, p=weights / weights.sum())
    return [f"R{i + 1}" for i in sorted(picked)]


def _to_stored(display: np.ndarray, profile: Profile, rng: np.random.Generator):
    """Map display intensities to stored values; returns (pixels, window center, window width)."""
    maxv = 2**profile.bits_stored - 1
    lo, hi = rng.uniform(0.02, 0.1) * maxv, rng.uniform(0.75, 0.98) * maxv
    values = lo + display * (hi - lo)
    center, width = (lo + hi) / 2, (hi - lo) * rng.uniform(0.95, 1.1)
    if profile.photometric == "MONOCHROME1":  # high stored value = dark on screen
        values = maxv - values
        center = maxv - center
    return np.round(values).astype(np.uint16), round(center, 1), round(width, 1)


def _voi_lut_item(bits_stored: int) -> Dataset:
    """A monotone S-shaped VOI LUT covering every stored value (output 16 bit)."""
    n = 2**bits_stored
    x = np.arange(n, dtype=np.float64)
    lut = 1 / (1 + np.exp(-(x - n / 2) / (n / 6)))
    lut = (lut - lut[0]) / (lut[-1] - lut[0])
    item = Dataset()
    item.LUTDescriptor = [n, 0, 16]
    item.LUTExplanation = "DEMO SIGMOID"
    # LUTData's VR is "US or OW"; state US explicitly (what most real files carry).
    item.add_new(0x00283006, "US", np.round(lut * 65535).astype(np.uint16).tolist())
    return item


def build_dicom(pixels: np.ndarray, profile: Profile, *, image_id: str, seed: int, index: int,
                rng: np.random.Generator, window: tuple[float, float], spacing: float) -> Dataset:
    """A valid CR/DX dataset with fake patient identifiers; UIDs and dates derive from the seed."""
    def uid(kind: str) -> str:
        return generate_uid(entropy_srcs=[f"cxrssl-demo-{seed}", image_id, kind])

    sop_uid = uid("sop")
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = profile.sop
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = IMPLEMENTATION_UID
    meta.ImplementationVersionName = "CXRSSL_DEMO"
    ds = Dataset()
    ds.file_meta = meta
    ds.preamble = b"\0" * 128
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.SOPClassUID = profile.sop
    ds.SOPInstanceUID = sop_uid
    year, month, day = int(rng.integers(2018, 2021)), int(rng.integers(1, 13)), int(rng.integers(1, 29))
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = f"{year:04d}{month:02d}{day:02d}"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = f"{int(rng.integers(7, 19)):02d}{int(rng.integers(60)):02d}00"
    ds.AccessionNumber = f"DEMO{index:06d}"
    ds.Modality = "DX" if profile.sop == DX_SOP_CLASS else "CR"
    ds.Manufacturer = "Demo Imaging"
    ds.InstitutionName = "Demo General Hospital"
    ds.InstitutionAddress = "1 Synthetic Street, Nowhere"
    ds.ReferringPhysicianName = "DEMO^REFERRER"
    ds.StationName = f"XR{index % 3 + 1}"
    # Fake identifiers: the real files carry some; the pipeline must never copy them to outputs.
    ds.PatientName = f"DEMO^PATIENT^{index:05d}"
    ds.PatientID = f"DEMO{int(rng.integers(10**7, 10**8))}"
    age = int(rng.integers(18, 90))
    ds.PatientBirthDate = f"{year - age:04d}{int(rng.integers(1, 13)):02d}{int(rng.integers(1, 29)):02d}"
    ds.PatientSex = str(rng.choice(["M", "F", "O"], p=[0.5, 0.45, 0.05]))
    ds.PatientAge = f"{age:03d}Y"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.StudyInstanceUID = uid("study")
    ds.SeriesInstanceUID = uid("series")
    ds.StudyID = f"{index + 1}"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.PatientOrientation = ["L", "F"]
    ds.PixelSpacing = [f"{spacing:.4f}", f"{spacing:.4f}"]
    ds.ImagerPixelSpacing = [f"{spacing:.4f}", f"{spacing:.4f}"]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = profile.photometric
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated = 16
    ds.BitsStored = profile.bits_stored
    ds.HighBit = profile.bits_stored - 1
    ds.PixelRepresentation = 0
    ds.PresentationLUTShape = "INVERSE" if profile.photometric == "MONOCHROME1" else "IDENTITY"
    if profile.voi == "window":
        ds.WindowCenter, ds.WindowWidth = window
        ds.VOILUTFunction = "LINEAR"
    elif profile.voi == "lut":
        ds.VOILUTSequence = Sequence([_voi_lut_item(profile.bits_stored)])
    if profile.encoding == "jpeg2000":
        ds.compress(JPEG2000Lossless, pixels, encoding_plugin="pylibjpeg",
                    generate_instance_uid=False)  # keep the seeded UID (determinism)
    elif profile.encoding == "rle":
        ds.compress(RLELossless, pixels, encoding_plugin="pylibjpeg",
                    generate_instance_uid=False)  # keep the seeded UID (determinism)
    else:
        ds.PixelData = pixels.astype("<u2").tobytes()
    return ds


def write_dicom(ds: Dataset, profile: Profile, path: Path) -> None:
    with atomic_path(path) as tmp:
        if profile.encoding == "no_tsuid":
            # As some PhysioNet files: implicit VR body, file meta without (0002,0010). pydicom
            # reads it with force=True; decoders then need the transfer syntax set by the reader.
            del ds.file_meta.TransferSyntaxUID
            dcmwrite(tmp, ds, implicit_vr=True, little_endian=True, enforce_file_format=False)
        else:
            ds.save_as(tmp, enforce_file_format=True)


def _image_id(rng: np.random.Generator, used: set[str]) -> str:
    while True:
        image_id = rng.bytes(16).hex()
        if image_id not in used:
            used.add(image_id)
            return image_id


def _fmt(frame: pd.DataFrame) -> pd.DataFrame:
    """Coordinates as float columns (empty for No finding), like the real CSVs."""
    for col in ("x_min", "y_min", "x_max", "y_max"):
        frame[col] = frame[col].astype("float64")
    return frame


def make_vindr(root: str | Path, *, n_train: int, n_test: int, image_size: int,
               seed: int) -> tuple[dict, list[Path]]:
    """Write the VinDr-like dataset under ``root`` (the folder that ``vindr.root`` points at).

    Returns the summary counts and the paths of the DICOMs written.
    """
    root = Path(root)
    used: set[str] = set()
    id_rng = _rng(seed, 0)
    jobs = [("train", i) for i in range(n_train)] + [("test", i) for i in range(n_test)]
    reader_rows, consensus_rows, label_rows = [], [], {"train": [], "test": []}
    profile_counts: dict[str, int] = {}
    n_abnormal = {"train": 0, "test": 0}
    written = []
    for index, (split, _) in enumerate(tqdm(jobs, desc="VinDr demo DICOMs", disable=progress_disabled())):
        image_id = _image_id(id_rng, used)
        rng = _rng(seed, 1, index)
        profile = PROFILES[index % len(PROFILES)]
        height = int(round(image_size * rng.uniform(0.9, 1.3)))
        width = int(round(image_size * rng.uniform(0.9, 1.3)))
        lesions = _draw_lesions(rng)
        display, truth = render_vindr(height, width, lesions, rng)
        pixels, center, win = _to_stored(display, profile, rng)
        ds = build_dicom(pixels, profile, image_id=image_id, seed=seed, index=index, rng=rng,
                         window=(center, win), spacing=float(rng.uniform(0.12, 0.2)))
        write_dicom(ds, profile, root / split / f"{image_id}.dicom")
        written.append(root / split / f"{image_id}.dicom")
        key = f"{profile.photometric}/{profile.bits_stored}bit/{profile.encoding}/{profile.voi}"
        profile_counts[key] = profile_counts.get(key, 0) + 1
        n_abnormal[split] += bool(truth)

        if split == "train":
            for rad in _readers(rng):
                found = [(name, _jitter(box, rng, width, height, 0.04)) for name, box in truth
                         if rng.random() < 0.85]
                _reader_rows(reader_rows, image_id, rad, found)
                label_rows["train"].append(_label_row(image_id, rad, found))
        else:
            found = [(name, _jitter(box, rng, width, height, 0.01)) for name, box in truth]
            _reader_rows(consensus_rows, image_id, CONSENSUS_READER, found)
            label_rows["test"].append(_label_row(image_id, CONSENSUS_READER, found))

    kaggle = _fmt(pd.DataFrame(reader_rows, columns=KAGGLE_COLUMNS))
    atomic_write_csv(kaggle, root / "train.csv")
    atomic_write_csv(kaggle[PHYSIONET_COLUMNS], root / "annotations" / "annotations_train.csv")
    consensus = _fmt(pd.DataFrame(consensus_rows, columns=KAGGLE_COLUMNS))
    atomic_write_csv(consensus[PHYSIONET_COLUMNS], root / "annotations" / "annotations_test.csv")
    label_cols = ["image_id", "rad_id", *VINDR_CLASSES, VINDR_NO_FINDING]
    for split in ("train", "test"):
        atomic_write_csv(pd.DataFrame(label_rows[split], columns=label_cols),
                         root / "annotations" / f"image_labels_{split}.csv")
    boxes = kaggle[kaggle["class_id"] != VINDR_NO_FINDING_ID]
    log.info("VinDr demo: %d train (%d abnormal), %d test (%d abnormal), %d reader boxes",
             n_train, n_abnormal["train"], n_test, n_abnormal["test"], len(boxes))
    return {"train": n_train, "test": n_test, "abnormal_train": n_abnormal["train"],
            "abnormal_test": n_abnormal["test"], "reader_boxes_train": int(len(boxes)),
            "consensus_boxes_test": int((consensus["class_id"] != VINDR_NO_FINDING_ID).sum()),
            "class_counts_train": {k: int(v) for k, v in boxes["class_name"].value_counts().sort_index().items()},
            "profiles": dict(sorted(profile_counts.items())),
            "consensus_reader": CONSENSUS_READER}, written


def _reader_rows(rows: list, image_id: str, rad: str, found: list) -> None:
    """One row per box; a reader without boxes says "No finding" with empty coordinates."""
    if not found:
        rows.append([image_id, VINDR_NO_FINDING, VINDR_NO_FINDING_ID, rad, None, None, None, None])
    for name, (x0, y0, x1, y1) in found:
        rows.append([image_id, name, class_id(name), rad, x0, y0, x1, y1])


def _label_row(image_id: str, rad: str, found: list) -> list:
    present = {name for name, _ in found}
    return [image_id, rad, *(int(c in present) for c in VINDR_CLASSES), int(not present)]
