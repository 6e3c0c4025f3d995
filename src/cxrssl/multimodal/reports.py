"""Radiology reports as distributed (REFERENCE.md section 8) -> one table of (report, frontal image) pairs.

Two layouts:

* **IU X-ray / OpenI**: ``ecgen-radiology/<n>.xml`` (root ``<eCitation>``, sections in
  ``MedlineCitation/Article/Abstract/AbstractText Label=...``, any of them empty or missing),
  images ``<parentImage id=...>`` (1-3 per report, frontal and lateral mixed), pixels in the PNG
  release's ``NLMCXR_png/<id>.png``. The frontal image is the one the Kaggle release's
  ``indiana_projections.csv`` (``uid,filename,projection``; ``filename`` is the id without its
  ``CXR`` prefix plus ``.dcm.png``) calls ``Frontal``; without that table the first listed
  ``parentImage`` is taken (OpenI lists the frontal view first) and a warning says so. The OpenI
  release has no patient identifier: each report counts as its own patient.
* **MIMIC-CXR**: ``files/p1X/p<subject>/s<study>.txt`` free text with ``FINDINGS:`` and
  ``IMPRESSION:`` headings (lines wrapped), images ``files/.../s<study>/<dicom_id>.jpg``
  (MIMIC-CXR-JPG) and ``mimic-cxr-2.0.0-metadata.csv``. The frontal image of a study is its
  ``ViewPosition`` PA image, else AP (ties: the smallest ``dicom_id``); the patient is ``subject_id``.

Text: FINDINGS and IMPRESSION (what the image shows; indication and comparison describe the
request and other studies); de-identification tokens (IU ``XXXX``, MIMIC ``___``) are removed;
each section is split into sentences with pysbd (clinical abbreviations such as "Dr." or "2.5 cm"
do not end a sentence); sentences left without a word are dropped. A report with no usable
sentence, no image, no frontal image or a missing image file is quarantined
(:class:`~cxrssl.errors.Quarantine`, the file or row named).

The pairs table (:data:`PAIR_COLUMNS`): ``report_id, patient_id, study_id, image_id, image_path``
(relative to the dataset root), ``view, findings, impression, sentences`` (a JSON list),
``n_sentences, report_path, layout``; :func:`patient_split` adds ``split``.
"""

from __future__ import annotations

import functools
import json
import logging
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd

from cxrssl.errors import BadInputError, Quarantine
from cxrssl.io import atomic_write_csv

log = logging.getLogger(__name__)

LAYOUTS = ("iu", "mimic")
PAIR_COLUMNS = ["report_id", "patient_id", "study_id", "image_id", "image_path", "view", "findings", "impression",
                "sentences", "n_sentences", "report_path", "layout"]
IU_REPORTS, IU_IMAGES, IU_PROJECTIONS = "ecgen-radiology", "NLMCXR_png", "indiana_projections.csv"
MIMIC_FILES, MIMIC_METADATA = "files", "mimic-cxr-2.0.0-metadata.csv"
FRONTAL_VIEWS = ("PA", "AP")  # preference order
#: IU's ``XXXX`` (also inside words such as "x-XXXX") and MIMIC's ``___``.
DEID = re.compile(r"X{3,}|_{2,}")
_WORD = re.compile(r"[A-Za-z]{2,}")
#: A MIMIC section heading: an upper-case label at the start of a line, then a colon.
_HEADING = re.compile(r"^[ \t]*([A-Z][A-Z /&()-]*[A-Z)])[ \t]*:", re.MULTILINE)


# --- text ------------------------------------------------------------------------------------------

def clean_text(text: str | None) -> str:
    """Drop de-identification tokens, join wrapped lines, tidy the spaces they leave."""
    text = DEID.sub(" ", text or "")
    text = " ".join(text.split())
    text = re.sub(r"\s+([.,;:])", r"\1", text)  # "at  ." -> "at."
    text = re.sub(r"([.,;:])(?:\s*[,;:])+", r"\1", text)
    text = re.sub(r"[,;:]+(?=\.)", "", text)  # "at XXXX, XXXX." -> "at."
    return text.strip(" ,;:")


@functools.lru_cache(maxsize=1)
def _segmenter():
    import pysbd

    return pysbd.Segmenter(language="en", clean=False)


def split_sentences(text: str) -> list[str]:
    """Clinical sentence splitting (pysbd) of cleaned text; sentences without a word are dropped."""
    text = clean_text(text)
    if not text:
        return []
    return [s.strip() for s in _segmenter().segment(text) if _WORD.search(s)]


def report_sentences(findings: str, impression: str) -> list[str]:
    """FINDINGS then IMPRESSION sentences (a sentence never spans two sections)."""
    return split_sentences(findings) + split_sentences(impression)


# --- IU X-ray (OpenI XML) -------------------------------------------------------------------------

def parse_iu_xml(path: str | Path) -> dict:
    """Sections and image ids of one OpenI report; raises BadInputError for a file that is not one."""
    path = Path(path)
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as exc:
        raise BadInputError(str(path), f"not a readable OpenI XML report ({exc})") from None
    if root.tag != "eCitation":
        raise BadInputError(str(path), f"root element is <{root.tag}>, expected <eCitation>")
    sections = {}
    for node in root.iterfind("./MedlineCitation/Article/Abstract/AbstractText"):
        label = (node.get("Label") or "").strip().lower()
        if label:
            sections[label] = "".join(node.itertext()).strip()
    uid = root.find("uId")
    images = [p.get("id").strip() for p in root.iter("parentImage") if (p.get("id") or "").strip()]
    return {"report_id": uid.get("id") if uid is not None and uid.get("id") else f"CXR{path.stem}",
            "sections": sections, "images": images}


def _iu_key(name: str) -> str:
    """Image id as both OpenI (``CXR1_IM-0001-1001``) and Kaggle (``1_IM-0001-1001.dcm.png``) name it."""
    name = name.strip()
    for suffix in (".dcm.png", ".png", ".jpg", ".dcm"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return name[3:] if name.startswith("CXR") else name


def read_iu_projections(path: str | Path, quarantine: Quarantine) -> dict[str, str]:
    """Kaggle ``indiana_projections.csv``: image key -> ``Frontal`` / ``Lateral``."""
    path = Path(path)
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = {"filename", "projection"} - set(frame.columns)
    if missing:
        raise BadInputError(str(path), f"missing column(s) {sorted(missing)}; has {list(frame.columns)}")
    out = {}
    for row, (name, projection) in enumerate(zip(frame["filename"], frame["projection"])):
        if not name.strip() or projection.strip().lower() not in ("frontal", "lateral"):
            quarantine.add(BadInputError(f"{path}:row {row + 1}", f"filename {name!r} / projection {projection!r}: "
                                         "expected a file name and Frontal or Lateral"))
            continue
        out[_iu_key(name)] = projection.strip().capitalize()
    return out


def load_iu(root: str | Path, quarantine: Quarantine, projections: str | Path | None = None,
            images_dir: str = IU_IMAGES) -> pd.DataFrame:
    """Pairs of the OpenI reports under ``root`` (``ecgen-radiology/`` and ``NLMCXR_png/``).

    ``projections``: the Kaggle projections table (default ``root/indiana_projections.csv`` when
    it exists). Image paths in the table are relative to ``root``.
    """
    root = Path(root)
    folder = root / IU_REPORTS if (root / IU_REPORTS).is_dir() else root
    files = sorted(folder.glob("*.xml"), key=lambda p: (int(p.stem) if p.stem.isdigit() else 1 << 62, p.name))
    if not files:
        raise FileNotFoundError(f"no OpenI XML reports in {folder} (expected {IU_REPORTS}/<n>.xml)")
    table = Path(projections) if projections else root / IU_PROJECTIONS
    views = read_iu_projections(table, quarantine) if table.is_file() else None
    if views is None:
        log.warning("no %s: taking each report's first parentImage as its frontal view", table)
    rows = []
    for path in files:
        try:
            rec = parse_iu_xml(path)
            sec = rec["sections"]
            sentences = report_sentences(sec.get("findings", ""), sec.get("impression", ""))
            if not sentences:
                raise BadInputError(str(path), "no usable text: FINDINGS and IMPRESSION are empty, missing or "
                                    "only de-identification tokens")
            if not rec["images"]:
                raise BadInputError(str(path), "no <parentImage>: the report has no image")
            if views is None:
                frontal = rec["images"][:1]
            else:
                frontal = [i for i in rec["images"] if views.get(_iu_key(i)) == "Frontal"]
                if not frontal:
                    seen = ", ".join(f"{i}: {views.get(_iu_key(i), 'not in the table')}" for i in rec["images"])
                    raise BadInputError(str(path), f"no frontal image ({seen}; projections from {table})")
            present = [i for i in frontal if (root / images_dir / f"{i}.png").is_file()]
            if not present:
                raise BadInputError(str(path), f"frontal image file {images_dir}/{frontal[0]}.png does not exist "
                                    f"under {root}")
        except BadInputError as err:
            quarantine.add(err)
            continue
        image = present[0]
        rows.append(dict(report_id=rec["report_id"], patient_id=rec["report_id"], study_id=rec["report_id"],
                         image_id=image, image_path=f"{images_dir}/{image}.png", view="Frontal",
                         findings=clean_text(sec.get("findings")), impression=clean_text(sec.get("impression")),
                         sentences=sentences, report_path=path.relative_to(root).as_posix(), layout="iu"))
    return _frame(rows)


# --- MIMIC-CXR -------------------------------------------------------------------------------------

def parse_mimic_sections(text: str) -> dict[str, str]:
    """Section name (lower case) -> text of a MIMIC free-text report; ``findings``/``impression`` keys.

    A heading is an upper-case label at the start of a line followed by a colon; a section runs to
    the next heading. "FINDINGS AND IMPRESSION" counts as findings, "CONCLUSION" as impression.
    Repeated headings are joined.
    """
    heads = list(_HEADING.finditer(text))
    out: dict[str, str] = {}
    for k, m in enumerate(heads):
        end = heads[k + 1].start() if k + 1 < len(heads) else len(text)
        name = " ".join(m.group(1).lower().split())
        key = "findings" if "findings" in name else "impression" if name in ("impression", "conclusion") else name
        body = " ".join(text[m.end():end].split())
        out[key] = f"{out[key]} {body}".strip() if key in out else body
    return out


def read_mimic_metadata(path: str | Path, quarantine: Quarantine) -> pd.DataFrame:
    """``mimic-cxr-2.0.0-metadata.csv``: ``dicom_id, subject_id, study_id, ViewPosition`` rows, checked."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"MIMIC-CXR metadata {path} does not exist (it ships with MIMIC-CXR-JPG; "
                                "pairing reports with frontal images needs its ViewPosition column)")
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = {"dicom_id", "subject_id", "study_id", "ViewPosition"} - set(frame.columns)
    if missing:
        raise BadInputError(str(path), f"missing column(s) {sorted(missing)}; has {list(frame.columns)}")
    keep = []
    for row, r in enumerate(frame.itertuples(index=False)):
        if not (r.dicom_id.strip() and r.subject_id.isdigit() and r.study_id.isdigit()):
            quarantine.add(BadInputError(f"{path}:row {row + 1}", f"dicom_id {r.dicom_id!r}, subject_id "
                                         f"{r.subject_id!r}, study_id {r.study_id!r}: expected an id and two numbers"))
            continue
        keep.append(row)
    out = frame.iloc[keep][["dicom_id", "subject_id", "study_id", "ViewPosition"]].copy()
    out["ViewPosition"] = out["ViewPosition"].str.strip().str.upper()
    return out.reset_index(drop=True)


def load_mimic(root: str | Path, quarantine: Quarantine, metadata: str | Path | None = None,
               image_ext: str = ".jpg") -> pd.DataFrame:
    """Pairs of the MIMIC-CXR reports under ``root/files`` with their frontal image.

    ``metadata`` defaults to ``root/mimic-cxr-2.0.0-metadata.csv``; ``image_ext`` is ``.jpg``
    (MIMIC-CXR-JPG) or ``.dcm``. Image paths are relative to ``root``.
    """
    root = Path(root)
    meta = read_mimic_metadata(metadata or root / MIMIC_METADATA, quarantine)
    by_study = {sid: g for sid, g in meta.groupby("study_id", sort=False)}
    files = sorted((root / MIMIC_FILES).glob("p*/p*/s*.txt"))
    if not files:
        raise FileNotFoundError(f"no MIMIC-CXR reports under {root / MIMIC_FILES} (expected "
                                "files/p1X/p<subject>/s<study>.txt)")
    rank = {v: k for k, v in enumerate(FRONTAL_VIEWS)}
    rows = []
    for path in files:
        rel = path.relative_to(root).as_posix()
        try:
            subject, study = path.parent.name[1:], path.stem[1:]
            if not (subject.isdigit() and study.isdigit()):
                raise BadInputError(str(path), "not named files/p1X/p<subject>/s<study>.txt")
            sec = parse_mimic_sections(path.read_text(errors="replace"))
            sentences = report_sentences(sec.get("findings", ""), sec.get("impression", ""))
            if not sentences:
                raise BadInputError(str(path), "no usable text: no FINDINGS or IMPRESSION section with words "
                                    f"(sections found: {sorted(sec) or 'none'})")
            images = by_study.get(study)
            if images is None:
                raise BadInputError(str(path), f"study {study} has no image in the metadata")
            if set(images["subject_id"]) != {subject}:
                raise BadInputError(str(path), f"metadata puts study {study} under subject(s) "
                                    f"{sorted(set(images['subject_id']))}, the folder says {subject}")
            frontal = images[images["ViewPosition"].isin(FRONTAL_VIEWS)]
            if frontal.empty:
                raise BadInputError(str(path), f"no frontal (PA/AP) image; views {sorted(set(images['ViewPosition']))}")
            frontal = frontal.assign(_rank=frontal["ViewPosition"].map(rank)).sort_values(["_rank", "dicom_id"])
            chosen = None
            for r in frontal.itertuples(index=False):
                if (root / path.parent.relative_to(root) / f"s{study}" / f"{r.dicom_id}{image_ext}").is_file():
                    chosen = r
                    break
            if chosen is None:
                raise BadInputError(str(path), f"frontal image file s{study}/{frontal['dicom_id'].iloc[0]}{image_ext} "
                                    f"does not exist beside the report")
        except BadInputError as err:
            quarantine.add(err)
            continue
        rows.append(dict(report_id=f"s{study}", patient_id=f"p{subject}", study_id=f"s{study}",
                         image_id=chosen.dicom_id,
                         image_path=f"{path.parent.relative_to(root).as_posix()}/s{study}/{chosen.dicom_id}{image_ext}",
                         view=chosen.ViewPosition, findings=clean_text(sec.get("findings")),
                         impression=clean_text(sec.get("impression")), sentences=sentences, report_path=rel,
                         layout="mimic"))
    return _frame(rows)


def _frame(rows: list[dict]) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=[c for c in PAIR_COLUMNS if c != "n_sentences"])
    frame["n_sentences"] = frame["sentences"].map(len).astype(int)
    return frame[PAIR_COLUMNS]


def load_reports(layout: str, root: str | Path, quarantine: Quarantine, **kwargs) -> pd.DataFrame:
    """Pairs of either layout (``iu`` or ``mimic``); ``kwargs`` go to :func:`load_iu` / :func:`load_mimic`."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown report layout {layout!r}; expected one of {LAYOUTS}")
    frame = (load_iu if layout == "iu" else load_mimic)(root, quarantine, **kwargs)
    if frame.empty:
        raise BadInputError(str(root), "no usable report-image pair (all quarantined)")
    log.info("%s reports under %s: %d pairs of %d patients, %d quarantined", layout, root, len(frame),
             frame["patient_id"].nunique(), len(quarantine))
    return frame


# --- splits and storage ----------------------------------------------------------------------------

def patient_split(pairs: pd.DataFrame, val_fraction: float, test_fraction: float, seed: int,
                  force_test: Iterable[str] = ()) -> pd.DataFrame:
    """Add ``split`` (train/val/test), patient-disjoint, seeded, independent of the row order.

    ``force_test``: patients that must never be trained on (e.g. those of an evaluation set drawn
    from the same hospital); they go to test, the others are split by the fractions (of all
    patients, rounded; at least one train patient).
    """
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(f"val_fraction {val_fraction} and test_fraction {test_fraction} must be in [0, 1) "
                         "and sum to less than 1")
    forced = set(map(str, force_test))
    patients = sorted(set(pairs["patient_id"].astype(str)))
    free = [p for p in patients if p not in forced]
    order = [free[int(k)] for k in np.random.default_rng(seed).permutation(len(free))]
    n = len(patients)
    n_test = max(0, round(test_fraction * n) - len(forced & set(patients)))
    n_val = round(val_fraction * n)
    n_val, n_test = min(n_val, max(0, len(free) - 1)), min(n_test, max(0, len(free) - 1 - n_val))
    split = {p: "test" for p in forced}
    split.update({p: "val" for p in order[:n_val]})
    split.update({p: "test" for p in order[n_val:n_val + n_test]})
    split.update({p: "train" for p in order[n_val + n_test:]})
    out = pairs.copy()
    out["split"] = out["patient_id"].astype(str).map(split)
    return out


def write_pairs(pairs: pd.DataFrame, path: str | Path) -> None:
    """The pairs table as CSV (``sentences`` as JSON), atomically."""
    atomic_write_csv(pairs.assign(sentences=pairs["sentences"].map(json.dumps)), path)


def read_pairs(path: str | Path) -> pd.DataFrame:
    """Read what :func:`write_pairs` wrote; a row whose sentences are not a JSON list raises."""
    path = Path(path)
    frame = pd.read_csv(path, dtype={"report_id": str, "patient_id": str, "study_id": str, "image_id": str},
                        keep_default_na=False)
    missing = [c for c in PAIR_COLUMNS if c not in frame.columns]
    if missing:
        raise BadInputError(str(path), f"missing column(s) {missing}; has {list(frame.columns)}")
    sentences = []
    for row, text in enumerate(frame["sentences"]):
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = None
        if not (isinstance(value, list) and value and all(isinstance(s, str) for s in value)):
            raise BadInputError(f"{path}:row {row + 1}", "sentences is not a non-empty JSON list of strings")
        sentences.append(value)
    return frame.assign(sentences=sentences)


def prepare_pairs(layout: str, root: str | Path, out_csv: str | Path, *, seed: int, val_fraction: float,
                  test_fraction: float, force_test: Iterable[str] = (), on_bad_input: str = "fail",
                  quarantine_csv: str | Path | None = None, **kwargs) -> pd.DataFrame:
    """Parse a report corpus, split it by patient and write the pairs table (and the quarantine CSV).

    What a thin script or a rule calls; ``kwargs`` go to :func:`load_iu` / :func:`load_mimic`.
    """
    quarantine = Quarantine(on_bad_input, stage=f"reports_{layout}")
    pairs = patient_split(load_reports(layout, root, quarantine, **kwargs), val_fraction, test_fraction, seed,
                          force_test)
    write_pairs(pairs, out_csv)
    quarantine.write(quarantine_csv or Path(out_csv).with_name("quarantine.csv"))
    log.info("pairs: %s", pairs["split"].value_counts().to_dict())
    return pairs
