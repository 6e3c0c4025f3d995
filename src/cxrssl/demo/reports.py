"""Radiology reports and localisation box files for the NIH-like demo images (REFERENCE.md section 8).

For every NIH-like image the demo writes one report that describes what was drawn: each finding
with its location (lung zone upper/middle/lower, the patient's side, a size), negated findings,
normal statements and the noise of real reports (technique boilerplate, comparisons,
de-identification tokens). The same report is written in both public layouts:

* IU X-ray / OpenI (``iu_xray/``): ``ecgen-radiology/<n>.xml`` (root ``<eCitation>``, sections in
  ``AbstractText Label=...``, ``XXXX`` de-identification, ``<parentImage id=...>`` per image,
  frontal and lateral mixed), the PNG release's ``NLMCXR_png/<id>.png`` (frontal images only: the
  pipeline never reads laterals) and the Kaggle release's ``indiana_projections.csv``.
* MIMIC-CXR (``mimic_cxr/``): ``files/p1X/p<subject>/s<study>.txt`` free text with ``FINDINGS:`` /
  ``IMPRESSION:`` headings and ``___`` de-identification, MIMIC-CXR-JPG images
  ``files/.../s<study>/<dicom_id>.jpg`` and ``mimic-cxr-2.0.0-metadata.csv`` (``ViewPosition``
  PA/AP/LATERAL; the lateral rows have no pixels here either).

A few reports carry the defects of the real corpora: an empty FINDINGS section (the findings are
then in the IMPRESSION), one report with no usable text and one with no frontal image, which the
parsers must quarantine. ``nih_link.csv`` (demo only) says which NIH-like image each report
describes: MIMIC ``subject_id`` is ``10_000_000 + NIH Patient ID``.

Localisation set (``localization/``): NIH-like images of their own (``images/<name>.png``,
patients 90000001.., in no NIH list and with no report in the corpora, so no pretraining ever
sees them), every one abnormal (1-2 of the 8 NIH box findings), with the boxes in three real
layouts: ``nih/BBox_List_2017.csv`` (NIH, "Infiltrate" spelling), ``rsna/stage_2_train_labels.csv``
(RSNA Pneumonia: one row per opacity box, Infiltration and Pneumonia; ``Target`` 0 rows with empty
box fields for the other images; ``patientId`` = the image stem, as the real RSNA labels are on
NIH ChestX-ray14 images; no DICOM copies) and ``ms_cxr/MS_CXR_Local_Alignment_v1.1.0.csv`` (MS-CXR
phrase grounding: ``dicom_id, category_name, label_text, path, x, y, w, h, image_width,
image_height, split``; a report sentence per box, MS-CXR's categories only, ``path`` relative to
``localization/``). Half as many images as the NIH part (at least 8).

Text comes from a random stream of its own, so the NIH and VinDr files are unchanged.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import textwrap
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

import numpy as np
import pandas as pd
from PIL import Image

from cxrssl.demo.nih import BBOX_HEADER, BBOX_LABELS, _csv_line, render_nih
from cxrssl.demo.phantom import NIH_PAINTERS, Anatomy
from cxrssl.io import atomic_path, atomic_write_csv, atomic_write_text

log = logging.getLogger(__name__)

STREAM = 3  # random stream of this part (NIH uses 1, VinDr 2)
MIMIC_SUBJECT_OFFSET = 10_000_000
MIMIC_STUDY_OFFSET = 50_000_000
IU_DIR, MIMIC_DIR, LOC_DIR = "iu_xray", "mimic_cxr", "localization"
IU_PROJECTIONS = f"{IU_DIR}/indiana_projections.csv"
MIMIC_METADATA = f"{MIMIC_DIR}/mimic-cxr-2.0.0-metadata.csv"
LINK = "nih_link.csv"
NIH_BOXES = f"{LOC_DIR}/nih/BBox_List_2017.csv"
RSNA_LABELS = f"{LOC_DIR}/rsna/stage_2_train_labels.csv"
MS_CXR = f"{LOC_DIR}/ms_cxr/MS_CXR_Local_Alignment_v1.1.0.csv"
LOC_IMAGES = f"{LOC_DIR}/images"
#: Files the Snakemake rule declares (relative to the reports root).
KEY_FILES = (IU_PROJECTIONS, MIMIC_METADATA, LINK, NIH_BOXES, RSNA_LABELS, MS_CXR)
RSNA_OPACITY = ("Infiltration", "Pneumonia")
#: NIH finding -> MS-CXR category (MS-CXR has no nodule/mass category).
MS_CXR_CATEGORY = {"Atelectasis": "Atelectasis", "Cardiomegaly": "Cardiomegaly", "Effusion": "Pleural Effusion",
                   "Infiltration": "Lung Opacity", "Pneumonia": "Pneumonia", "Pneumothorax": "Pneumothorax",
                   "Consolidation": "Consolidation", "Edema": "Edema"}
MS_CXR_COLUMNS = ["dicom_id", "category_name", "label_text", "path", "x", "y", "w", "h", "image_width",
                  "image_height", "split"]
LOC_PATIENT_OFFSET = 90_000_000
MIMIC_METADATA_COLUMNS = ["dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition",
                          "Rows", "Columns", "StudyDate", "StudyTime", "ProcedureCodeSequence_CodeMeaning",
                          "ViewCodeSequence_CodeMeaning", "PatientOrientationCodeSequence_CodeMeaning"]
#: Field of view of the demo images in cm (NIH: ~3,000 px at 0.143 mm).
FIELD_CM = 43.0

# --- sentence templates ----------------------------------------------------------------------------
# {side}: right/left (the patient's), {zone}: upper/middle/lower, {cm}: diameter, {size}: small/...

_POSITIVE = {
    "Nodule": ["There is a {cm} cm nodule in the {side} {zone} zone.",
               "A {cm} cm nodular opacity projects over the {side} {zone} lung.",
               "{Side} {zone} zone nodule measuring {cm} cm."],
    "Mass": ["There is a {cm} cm mass in the {side} {zone} zone.",
             "A large {cm} cm mass is seen in the {side} {zone} lung.",
             "{Side} {zone} zone mass measuring {cm} cm."],
    "Atelectasis": ["Plate-like atelectasis in the {side} {zone} zone.",
                    "There is subsegmental atelectasis in the {side} {zone} lung.",
                    "{Side} {zone} zone linear atelectasis."],
    "Effusion": ["{Size} {side} pleural effusion.",
                 "There is a {size} {side} pleural effusion blunting the costophrenic angle.",
                 "{Size} {side} effusion layering at the base."],
    "Infiltration": ["Patchy infiltrates in the {side} {zone} zone.",
                     "There are ill-defined infiltrative opacities in the {side} {zone} lung.",
                     "{Side} {zone} zone infiltrate."],
    "Pneumonia": ["Airspace opacity in the {side} {zone} zone, concerning for pneumonia.",
                  "{Side} {zone} zone consolidation consistent with pneumonia.",
                  "There is a focal opacity in the {side} {zone} lung compatible with pneumonia."],
    "Consolidation": ["Dense consolidation in the {side} {zone} zone.",
                      "There is focal airspace consolidation in the {side} {zone} lung.",
                      "{Side} {zone} zone consolidation."],
    "Pneumothorax": ["{Size} {side} apical pneumothorax.",
                     "There is a {size} {side} pneumothorax.",
                     "{Size} {side} pneumothorax without mediastinal shift."],
    "Cardiomegaly": ["The heart is enlarged.", "Moderate cardiomegaly.", "The cardiac silhouette is enlarged."],
    "Edema": ["Bilateral perihilar haziness consistent with pulmonary edema.",
              "There is interstitial pulmonary edema in both lungs."],
    "Emphysema": ["The lungs are hyperinflated, consistent with emphysema.",
                  "Hyperlucent, hyperexpanded lungs in keeping with emphysema."],
    "Fibrosis": ["Coarse reticular opacities in both upper zones, consistent with fibrosis.",
                 "Upper zone predominant fibrotic change bilaterally."],
    "Pleural_Thickening": ["Pleural thickening at the {side} apex.", "{Side} apical pleural thickening."],
    "Hernia": ["Retrocardiac density with an air-fluid level, consistent with a hiatal hernia.",
               "Hiatal hernia behind the heart."],
}
_IMPRESSION = {
    "Nodule": "{Side} {zone} zone pulmonary nodule.", "Mass": "{Side} {zone} zone mass.",
    "Atelectasis": "{Side} {zone} zone atelectasis.", "Effusion": "{Size} {side} pleural effusion.",
    "Infiltration": "{Side} {zone} zone infiltrate.", "Pneumonia": "{Side} {zone} zone pneumonia.",
    "Consolidation": "{Side} {zone} zone consolidation.", "Pneumothorax": "{Size} {side} pneumothorax.",
    "Cardiomegaly": "Cardiomegaly.", "Edema": "Pulmonary edema.", "Emphysema": "Emphysema.",
    "Fibrosis": "Pulmonary fibrosis.", "Pleural_Thickening": "{Side} apical pleural thickening.",
    "Hernia": "Hiatal hernia.",
}
#: Negations, each ruled out by the findings in its key (never said of a present finding).
_NEGATIVE = [
    (("Pneumothorax",), "No pneumothorax."),
    (("Effusion",), "There is no pleural effusion."),
    (("Pneumonia", "Consolidation", "Infiltration"), "No focal consolidation."),
    (("Nodule", "Mass"), "No suspicious pulmonary nodules or masses."),
    (("Edema",), "No pulmonary edema."),
    (("Pneumothorax", "Effusion"), "No pleural effusion or pneumothorax."),
    (("Pneumonia",), "There is no evidence of pneumonia."),
]
_LUNG = {"Nodule", "Mass", "Atelectasis", "Infiltration", "Pneumonia", "Consolidation", "Edema", "Fibrosis"}
_NORMAL = [
    (("Cardiomegaly",), "The heart size is normal."),
    (("Cardiomegaly", "Hernia"), "The cardiomediastinal silhouette is within normal limits."),
    (tuple(_LUNG), "The lungs are clear."),
    ((), "No acute osseous abnormality."),
    ((), "The visualized upper abdomen is unremarkable."),
]
_INDICATIONS = ["cough", "shortness of breath", "chest pain", "fever", "preoperative evaluation", "follow-up"]


def side_zone(box, anatomy: Anatomy, size: int) -> tuple[str, str]:
    """The patient's side (image left = patient's right) and lung zone of a pixel box's centre."""
    cu = (box[0] + box[2]) / 2 / size
    cv = (box[1] + box[3]) / 2 / size
    side = "right" if cu < anatomy.cx else "left"
    top, bottom = anatomy.lung_cy - anatomy.lung_ry, anatomy.lung_cy + anatomy.lung_ry
    t = (cv - top) / (bottom - top)
    return side, ("upper" if t < 1 / 3 else "middle" if t < 2 / 3 else "lower")


def _size_word(box, size: int, finding: str) -> str:
    frac = (box[2] - box[0]) * (box[3] - box[1]) / size ** 2
    cuts = (0.02, 0.05) if finding == "Pneumothorax" else (0.03, 0.06)
    return "small" if frac < cuts[0] else "moderate" if frac < cuts[1] else "large"


def _fill(template: str, box, anatomy: Anatomy, size: int, finding: str) -> str:
    words = {}
    if box is not None:
        side, zone = side_zone(box, anatomy, size)
        cm = max(box[2] - box[0], box[3] - box[1]) / size * FIELD_CM
        words = dict(side=side, Side=side.capitalize(), zone=zone, cm=f"{cm:.1f}",
                     size=_size_word(box, size, finding), Size=_size_word(box, size, finding).capitalize())
    return template.format(**words)


def finding_text(finding: str, box, anatomy: Anatomy, size: int, rng: np.random.Generator) -> str:
    """One sentence describing ``finding`` at ``box`` (a random template of its own)."""
    templates = _POSITIVE[finding]
    return _fill(templates[int(rng.integers(len(templates)))], box, anatomy, size, finding)


def compose_report(record: dict, rng: np.random.Generator, deid: str) -> dict:
    """Sections (comparison, indication, findings, impression) of one image's report.

    ``deid`` is the corpus's de-identification token (``XXXX`` in IU X-ray, ``___`` in MIMIC).
    """
    present = record["findings"]
    boxes, anatomy, size = record["boxes"], record["anatomy"], record["image_size"]
    positive = [finding_text(f, boxes.get(f), anatomy, size, rng) for f in present]
    negative = [text for rules, text in _NEGATIVE if not set(rules) & set(present)]
    negative = [negative[int(j)] for j in sorted(rng.permutation(len(negative))[:int(rng.integers(1, 4))])]
    normal = [text for rules, text in _NORMAL if not set(rules) & set(present)]
    normal = [normal[int(j)] for j in sorted(rng.permutation(len(normal))[:int(rng.integers(1, 3))])]
    body = positive + normal + negative
    if present and rng.random() < 0.15:
        body.append(f"Dr. {deid} was notified of the findings by telephone at {deid} on {deid}.")
    if rng.random() < 0.2:
        body.insert(0, "PA and lateral views of the chest were obtained.")
    if present:
        impression = [_fill(_IMPRESSION[f], boxes.get(f), anatomy, size, f) for f in present[:2]]
    else:
        impression = ["No acute cardiopulmonary abnormality."]
    comparison = f"Chest radiographs {deid}." if rng.random() < 0.5 else "None."
    indication = f"{deid}-year-old {'male' if record['sex'] == 'M' else 'female'} with " \
                 f"{_INDICATIONS[int(rng.integers(len(_INDICATIONS)))]}."
    findings = " ".join(body)
    if rng.random() < 0.1:  # real reports sometimes have only an impression: it then says it all
        impression, findings = positive or impression, ""
    return dict(comparison=comparison, indication=indication, findings=findings, impression=" ".join(impression))


# --- layouts ---------------------------------------------------------------------------------------

def iu_xml(uid: int, sections: dict, images: list[tuple[str, str]], mesh: list[str]) -> str:
    """An OpenI ``ecgen-radiology`` report; ``images`` are (id, caption); empty sections self-close."""
    texts = []
    for label in ("COMPARISON", "INDICATION", "FINDINGS", "IMPRESSION"):
        text = sections.get(label.lower(), "")
        texts.append(f'        <AbstractText Label="{label}">{escape(text)}</AbstractText>' if text
                     else f'        <AbstractText Label="{label}"/>')
    parents = "".join(
        f"  <parentImage id={quoteattr(image_id)}>\n    <figureId>F{k + 1}</figureId>\n"
        f"    <caption>{escape(caption)}</caption>\n    <panel type=\"single\">\n"
        f"      <url>/hadoop/storage/radiology/extract/{escape(image_id)}.jpg</url>\n"
        f"      <imgModality>7</imgModality>\n    </panel>\n  </parentImage>\n"
        for k, (image_id, caption) in enumerate(images))
    abstract = "\n".join(texts)
    majors = "".join(f"    <major>{escape(term)}</major>\n" for term in mesh or ["normal"])
    return (f'<?xml version="1.0" encoding="utf-8"?>\n<eCitation>\n  <meta type="rr"/>\n  <uId id="CXR{uid}"/>\n'
            f'  <pmcId id="{uid}"/>\n  <docSource>CXR</docSource>\n  <IUXRId id="{uid}"/>\n'
            f'  <licenseType>open-access</licenseType>\n'
            f'  <licenseURL>http://creativecommons.org/licenses/by-nc-nd/4.0/</licenseURL>\n'
            f'  <publisher>Indiana University</publisher>\n  <title>Indiana University Chest X-ray Collection</title>\n'
            f'  <MedlineCitation Owner="Indiana University" Status="supplied by publisher">\n'
            f'    <Article PubModel="Electronic">\n      <ArticleTitle>Indiana University Chest X-ray Collection'
            f'</ArticleTitle>\n      <Abstract>\n{abstract}\n      </Abstract>\n    </Article>\n'
            f'  </MedlineCitation>\n  <MeSH>\n{majors}  </MeSH>\n{parents}</eCitation>\n')


def mimic_text(sections: dict, view: str) -> str:
    """A MIMIC-CXR free-text report: headed paragraphs, lines wrapped at 78 columns."""
    def para(text: str) -> str:
        return "\n".join(" " + line for line in textwrap.wrap(text, 77)) if text else ""

    exam = "CHEST (PA AND LAT)" if view == "PA" else "CHEST (PORTABLE AP)"
    parts = [f"{'FINAL REPORT':>45}", f" EXAMINATION:  {exam}", "",
             f" INDICATION:  {sections['indication']}", "",
             f" TECHNIQUE:  {'Chest PA and lateral' if view == 'PA' else 'Portable AP chest'}", "",
             f" COMPARISON:  {sections['comparison']}", ""]
    if sections["findings"]:
        parts += [" FINDINGS: ", "", para(sections["findings"]), ""]
    parts += [" IMPRESSION: ", "", para(sections["impression"]), ""]
    return "\n".join(parts)


def dicom_id(seed: int, name: str, view: str) -> str:
    """MIMIC-style dicom_id (five groups of 8 hex digits), fixed by seed, image and view."""
    h = hashlib.sha1(f"{seed}:{name}:{view}".encode()).hexdigest()
    return "-".join(h[k:k + 8] for k in range(0, 40, 8))


def mimic_paths(subject: int, study: int) -> tuple[str, str]:
    """(report path, image folder) of a study, relative to the MIMIC root."""
    base = f"files/p{str(subject)[:2]}/p{subject}/s{study}"
    return f"{base}.txt", base


def make_reports(root: str | Path, records: list[dict], *, seed: int) -> tuple[dict, list[Path]]:
    """Write both report layouts, the link table and the localisation box files under ``root``.

    ``records``: what :func:`cxrssl.demo.nih.make_nih` reported for each image (``on_image``).
    Returns summary counts and the per-report files written (reports and images).
    """
    root = Path(root)
    n = len(records)
    no_text = {n // 2} if n >= 8 else set()  # reports the parsers must quarantine
    no_frontal = {n // 3} if n >= 8 else set()
    projections, metadata, links, written = [], [], [], []
    empty_findings = 0
    for rec in records:
        i, name, pid, view = rec["index"], rec["name"], rec["patient_id"], rec["view"]
        rng = np.random.default_rng([seed, STREAM, i])
        lateral = rng.random() < 0.6
        uid, study, subject = i + 1, MIMIC_STUDY_OFFSET + i + 1, MIMIC_SUBJECT_OFFSET + pid
        iu = compose_report(rec, np.random.default_rng([seed, STREAM, i, 1]), "XXXX")
        mimic = compose_report(rec, np.random.default_rng([seed, STREAM, i, 1]), "___")
        if i in no_text:
            iu.update(findings="", impression="XXXX.")
            mimic.update(findings="", impression="___.")
        empty_findings += not iu["findings"]
        # IU X-ray: frontal (and often lateral) image ids; the frontal PNG is the NIH image itself.
        frontal_id = f"CXR{uid}_IM-{pid:04d}-1001"
        lateral_id = f"CXR{uid}_IM-{pid:04d}-2001"
        images = [] if i in no_frontal else [(frontal_id, f"Xray Chest {view}{' and Lateral' if lateral else ''}")]
        if lateral and i not in no_frontal:
            images.append((lateral_id, images[0][1]))
        written.append(root / IU_DIR / "ecgen-radiology" / f"{uid}.xml")
        atomic_write_text(iu_xml(uid, iu, images, [f.replace("_", " ") for f in rec["findings"]]), written[-1])
        for image_id, _ in images:
            projections.append([uid, f"{image_id[3:]}.dcm.png", "Frontal" if image_id == frontal_id else "Lateral"])
        if i not in no_frontal:
            written.append(root / IU_DIR / "NLMCXR_png" / f"{frontal_id}.png")
            _copy(rec["path"], written[-1])
        # MIMIC-CXR: report text, JPEG of the frontal view, metadata rows (laterals without pixels).
        report_path, image_dir = mimic_paths(subject, study)
        written.append(root / MIMIC_DIR / report_path)
        atomic_write_text(mimic_text(mimic, view), written[-1])
        views = ([] if i in no_frontal else [view]) + (["LATERAL"] if lateral or i in no_frontal else [])
        date = f"21{(i % 90) + 10:02d}0{1 + i % 9}{10 + i % 18}"
        for v in views:
            did = dicom_id(seed, name, v)
            orient = "Erect" if v != "AP" else "Recumbent"
            metadata.append([did, subject, study, "CHEST (PA AND LAT)" if view == "PA" else "CHEST (PORTABLE AP)",
                             v, rec["image_size"], rec["image_size"], date, f"{(i * 3731) % 240000:06d}.000",
                             "CHEST (PA AND LAT)", {"PA": "postero-anterior", "AP": "antero-posterior",
                                                    "LATERAL": "lateral"}[v], orient])
            if v != "LATERAL":
                written.append(root / MIMIC_DIR / image_dir / f"{did}.jpg")
                _save_jpeg(rec["path"], written[-1])
        links.append([name, pid, uid, frontal_id if i not in no_frontal else "", subject, study,
                      dicom_id(seed, name, view) if i not in no_frontal else "", rec["test"]])

    atomic_write_csv(pd.DataFrame(projections, columns=["uid", "filename", "projection"]), root / IU_PROJECTIONS)
    atomic_write_csv(pd.DataFrame(metadata, columns=MIMIC_METADATA_COLUMNS), root / MIMIC_METADATA)
    atomic_write_csv(pd.DataFrame(links, columns=["Image Index", "Patient ID", "iu_uid", "iu_image_id", "subject_id",
                                                  "study_id", "dicom_id", "nih_test"]), root / LINK)
    loc, loc_files = make_localization_set(root, max(8, n // 2), records[0]["image_size"] if records else 64,
                                           seed=seed)
    written += loc_files
    summary = {"reports": n, "empty_findings": empty_findings, "no_usable_text": len(no_text),
               "no_frontal_image": len(no_frontal), "localization": loc}
    log.info("demo reports: %s", summary)
    return summary, written


def make_localization_set(root: Path, n: int, size: int, *, seed: int) -> tuple[dict, list[Path]]:
    """The held-out localisation images and their NIH, RSNA and MS-CXR box files (module doc)."""
    names = list(BBOX_LABELS)
    weights = np.array([NIH_PAINTERS[f][1] for f in names])
    nih_rows, rsna_rows, ms_rows, written = [], [], [], []
    for k in range(n):
        rng = np.random.default_rng([seed, STREAM, 1_000_000 + k])
        picked = rng.choice(len(names), size=int(rng.choice([1, 2], p=[0.6, 0.4])), replace=False,
                            p=weights / weights.sum())
        findings = sorted(names[int(j)] for j in picked)
        anatomy = Anatomy.sample(rng)
        img, boxes = render_nih(size, anatomy, findings, rng)
        name = f"{LOC_PATIENT_OFFSET + k + 1:08d}_000.png"
        written.append(root / LOC_IMAGES / name)
        with atomic_path(written[-1]) as tmp:
            Image.fromarray(img, mode="L").save(tmp, format="PNG")
        opacity = False
        for f in findings:
            x0, y0, x1, y1 = boxes[f]
            nih_rows.append([name, BBOX_LABELS[f], x0, y0, x1 - x0, y1 - y0])
            if f in RSNA_OPACITY:
                rsna_rows.append([name[:-4], x0, y0, x1 - x0, y1 - y0, 1])
                opacity = True
            if f in MS_CXR_CATEGORY:
                ms_rows.append([name[:-4], MS_CXR_CATEGORY[f], finding_text(f, boxes[f], anatomy, size, rng),
                                f"images/{name}", round(x0), round(y0), round(x1 - x0), round(y1 - y0), size, size,
                                "test"])
        if not opacity:
            rsna_rows.append([name[:-4], None, None, None, None, 0])
    atomic_write_text(BBOX_HEADER + "\n" + "".join(
        _csv_line([r[0], r[1], *(f"{v:.6f}" for v in r[2:])]) for r in nih_rows), root / NIH_BOXES)
    atomic_write_text("patientId,x,y,width,height,Target\n" + "".join(
        _csv_line([r[0], *("" if v is None else f"{v:.1f}" for v in r[1:5]), r[5]]) for r in rsna_rows),
        root / RSNA_LABELS)
    atomic_write_csv(pd.DataFrame(ms_rows, columns=MS_CXR_COLUMNS), root / MS_CXR)
    return {"images": n, "nih_boxes": len(nih_rows), "rsna_boxes": sum(r[5] for r in rsna_rows),
            "ms_cxr_boxes": len(ms_rows)}, written


def _copy(src: Path, dst: Path) -> None:
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)


def _save_jpeg(src: Path, dst: Path) -> None:
    with Image.open(src) as im, atomic_path(dst) as tmp:
        im.convert("L").save(tmp, format="JPEG", quality=95)


def held_out_subjects(root: str | Path) -> set[str]:
    """MIMIC-layout patient ids (``p<subject_id>``) of the NIH ``test_list`` patients (``root``: the
    reports folder): what pretraining on the demo reports must never see, as zero-shot
    localisation is scored on those images."""
    link = pd.read_csv(Path(root) / LINK, dtype=str, keep_default_na=False)
    return {f"p{s}" for s in link.loc[link["nih_test"] == "True", "subject_id"]}
