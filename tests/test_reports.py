"""Report parsing (IU X-ray OpenI XML, MIMIC-CXR free text) from fixtures written to the format
spec, pairing with frontal images, quarantine, patient-disjoint splits, and the demo's reports."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from cxrssl.demo import make_demo_dataset
from cxrssl.demo import reports as demo_reports
from cxrssl.demo.nih import make_nih
from cxrssl.errors import BadInputError, Quarantine
from cxrssl.multimodal.reports import (clean_text, load_iu, load_mimic, load_reports, parse_iu_xml,
                                       parse_mimic_sections, patient_split, read_pairs, split_sentences, write_pairs)

# --- IU X-ray fixtures (OpenI ecgen-radiology layout) ---------------------------------------------

IU_TWO_VIEWS = """<?xml version="1.0" encoding="utf-8"?>
<eCitation>
  <meta type="rr"/>
  <uId id="CXR7"/>
  <pmcId id="7"/>
  <MedlineCitation Owner="Indiana University" Status="supplied by publisher">
    <Article PubModel="Electronic">
      <Abstract>
        <AbstractText Label="COMPARISON">Chest radiographs XXXX.</AbstractText>
        <AbstractText Label="INDICATION">XXXX-year-old with cough</AbstractText>
        <AbstractText Label="FINDINGS">There is a 2.5 cm nodule in the right upper lobe. Dr. XXXX was
 notified at XXXX. No pneumothorax.</AbstractText>
        <AbstractText Label="IMPRESSION">Right upper lobe nodule. Normal chest x-XXXX.</AbstractText>
      </Abstract>
    </Article>
  </MedlineCitation>
  <MeSH><major>Nodule/lung/upper lobe/right</major></MeSH>
  <parentImage id="CXR7_IM-2263-2001">
    <figureId>F1</figureId><caption>Xray Chest PA and Lateral</caption>
    <panel type="single"><url>/hadoop/storage/radiology/extract/CXR7_IM-2263-2001.jpg</url></panel>
  </parentImage>
  <parentImage id="CXR7_IM-2263-1001">
    <figureId>F2</figureId><caption>Xray Chest PA and Lateral</caption>
    <panel type="single"><url>/hadoop/storage/radiology/extract/CXR7_IM-2263-1001.jpg</url></panel>
  </parentImage>
</eCitation>
"""

IU_EMPTY_FINDINGS = """<?xml version="1.0" encoding="utf-8"?>
<eCitation>
  <uId id="CXR8"/>
  <MedlineCitation><Article><Abstract>
    <AbstractText Label="COMPARISON"/>
    <AbstractText Label="FINDINGS"/>
    <AbstractText Label="IMPRESSION">Heart size is normal and the lungs are clear.</AbstractText>
  </Abstract></Article></MedlineCitation>
  <parentImage id="CXR8_IM-2333-1001"><caption>PA</caption></parentImage>
</eCitation>
"""

IU_NO_TEXT = """<?xml version="1.0" encoding="utf-8"?>
<eCitation>
  <uId id="CXR9"/>
  <MedlineCitation><Article><Abstract>
    <AbstractText Label="INDICATION">Chest pain</AbstractText>
    <AbstractText Label="IMPRESSION">XXXX XXXX.</AbstractText>
  </Abstract></Article></MedlineCitation>
  <parentImage id="CXR9_IM-2400-1001"/>
</eCitation>
"""

IU_NO_IMAGE = """<?xml version="1.0" encoding="utf-8"?>
<eCitation>
  <uId id="CXR10"/>
  <MedlineCitation><Article><Abstract>
    <AbstractText Label="FINDINGS">The lungs are clear.</AbstractText>
  </Abstract></Article></MedlineCitation>
</eCitation>
"""


def _png(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(path)


@pytest.fixture()
def iu_root(tmp_path) -> Path:
    root = tmp_path / "iu"
    (root / "ecgen-radiology").mkdir(parents=True)
    for n, text in ((7, IU_TWO_VIEWS), (8, IU_EMPTY_FINDINGS), (9, IU_NO_TEXT), (10, IU_NO_IMAGE)):
        (root / "ecgen-radiology" / f"{n}.xml").write_text(text)
    (root / "ecgen-radiology" / "11.xml").write_text("<eCitation><uId id='CXR11'/>")  # truncated
    for image in ("CXR7_IM-2263-1001", "CXR7_IM-2263-2001", "CXR8_IM-2333-1001", "CXR9_IM-2400-1001"):
        _png(root / "NLMCXR_png" / f"{image}.png")
    # Kaggle release: file names without the CXR prefix, with .dcm.png
    (root / "indiana_projections.csv").write_text(
        "uid,filename,projection\n7,7_IM-2263-2001.dcm.png,Lateral\n7,7_IM-2263-1001.dcm.png,Frontal\n"
        "8,8_IM-2333-1001.dcm.png,Frontal\n9,9_IM-2400-1001.dcm.png,Frontal\n")
    return root


def test_iu_sections_deid_and_sentences():
    rec = parse_iu_xml_text(IU_TWO_VIEWS)
    assert rec["report_id"] == "CXR7"
    assert rec["images"] == ["CXR7_IM-2263-2001", "CXR7_IM-2263-1001"]
    assert rec["sections"]["comparison"] == "Chest radiographs XXXX."
    assert split_sentences(rec["sections"]["findings"]) == [
        "There is a 2.5 cm nodule in the right upper lobe.", "Dr. was notified at.", "No pneumothorax."]
    assert split_sentences(rec["sections"]["impression"]) == ["Right upper lobe nodule.", "Normal chest x-."]
    assert clean_text("notified at XXXX, XXXX. Normal chest x-XXXX.") == "notified at. Normal chest x-."
    assert clean_text("Findings:\n  ___ \n were   discussed") == "Findings: were discussed"
    empty = parse_iu_xml_text(IU_EMPTY_FINDINGS)["sections"]
    assert empty["findings"] == "" and empty["comparison"] == "" and "indication" not in empty


def parse_iu_xml_text(text: str, tmp=Path("/tmp")) -> dict:
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".xml", delete=False) as fh:
        fh.write(text)
    try:
        return parse_iu_xml(fh.name)
    finally:
        Path(fh.name).unlink()


def test_iu_pairs_frontal_from_projections_and_quarantine(iu_root):
    q = Quarantine("skip")
    pairs = load_iu(iu_root, q)
    assert list(pairs["report_id"]) == ["CXR7", "CXR8"]
    first = pairs.iloc[0]
    assert first["image_id"] == "CXR7_IM-2263-1001"  # the Frontal one, although listed second
    assert first["image_path"] == "NLMCXR_png/CXR7_IM-2263-1001.png"
    assert first["sentences"] == ["There is a 2.5 cm nodule in the right upper lobe.", "Dr. was notified at.",
                                  "No pneumothorax.", "Right upper lobe nodule.", "Normal chest x-."]
    assert "XXXX" not in first["findings"] + first["impression"]
    assert pairs.iloc[1]["findings"] == "" and pairs.iloc[1]["n_sentences"] == 1  # empty FINDINGS: impression
    reasons = {Path(item).name: reason for item, reason in q.items}
    assert set(reasons) == {"9.xml", "10.xml", "11.xml"}
    assert "no usable text" in reasons["9.xml"] and "no <parentImage>" in reasons["10.xml"]
    assert "XML" in reasons["11.xml"]
    with pytest.raises(BadInputError, match=r"9\.xml: no usable text"):
        load_iu(iu_root, Quarantine("fail"))


def test_iu_without_projections_takes_first_image_and_missing_file_is_quarantined(iu_root):
    (iu_root / "indiana_projections.csv").unlink()
    q = Quarantine("skip")
    pairs = load_iu(iu_root, q)
    assert pairs.set_index("report_id").loc["CXR7", "image_id"] == "CXR7_IM-2263-2001"  # documented rule
    (iu_root / "NLMCXR_png" / "CXR8_IM-2333-1001.png").unlink()
    q = Quarantine("skip")
    assert "CXR8" not in set(load_iu(iu_root, q)["report_id"])
    assert any("8.xml" in item and "does not exist" in reason for item, reason in q.items)


def test_iu_report_with_only_lateral_views_is_quarantined(iu_root):
    table = iu_root / "indiana_projections.csv"
    table.write_text(table.read_text().replace("7_IM-2263-1001.dcm.png,Frontal", "7_IM-2263-1001.dcm.png,Lateral"))
    q = Quarantine("skip")
    assert "CXR7" not in set(load_iu(iu_root, q)["report_id"])
    assert any(item.endswith("7.xml") and "no frontal image" in reason for item, reason in q.items)


# --- MIMIC-CXR fixtures ----------------------------------------------------------------------------

MIMIC_FULL = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)

 INDICATION:  ___F with new onset ascites  // eval for infection

 TECHNIQUE:  Chest PA and lateral

 COMPARISON:  None.

 FINDINGS: 

 There is no focal consolidation, pleural effusion or pneumothorax.  Bilateral
 nodular opacities that most likely represent nipple shadows. The
 cardiomediastinal silhouette is normal.  Dr. ___ was paged at ___.

 IMPRESSION: 

 No acute cardiopulmonary process.
"""

MIMIC_IMPRESSION_ONLY = """                                 FINAL REPORT
 INDICATION:  Shortness of breath.

 IMPRESSION:  Moderate left pleural effusion.  Mild
 cardiomegaly.
"""

MIMIC_NO_TEXT = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PORTABLE AP)
 INDICATION:  ___ with fever
 IMPRESSION:  ___
"""

METADATA = """dicom_id,subject_id,study_id,PerformedProcedureStepDescription,ViewPosition,Rows,Columns,StudyDate,StudyTime,ProcedureCodeSequence_CodeMeaning,ViewCodeSequence_CodeMeaning,PatientOrientationCodeSequence_CodeMeaning
bbbb0000-00000000-00000000-00000000-00000001,10000032,50414267,CHEST (PA AND LAT),LATERAL,3056,2544,21800506,213014.531,CHEST (PA AND LAT),lateral,Erect
aaaa0000-00000000-00000000-00000000-00000002,10000032,50414267,CHEST (PA AND LAT),AP,3056,2544,21800506,213014.531,CHEST (PA AND LAT),antero-posterior,Erect
cccc0000-00000000-00000000-00000000-00000003,10000032,50414267,CHEST (PA AND LAT),PA,3056,2544,21800506,213014.531,CHEST (PA AND LAT),postero-anterior,Erect
dddd0000-00000000-00000000-00000000-00000004,10000032,53189527,CHEST (PORTABLE AP),AP,2544,3056,21800626,165500.312,CHEST (PORTABLE AP),antero-posterior,Recumbent
eeee0000-00000000-00000000-00000000-00000005,10000764,57375967,CHEST (PA AND LAT),LATERAL,3056,2544,21321015,110000.000,CHEST (PA AND LAT),lateral,Erect
ffff0000-00000000-00000000-00000000-00000006,10000898,50771383,CHEST (PORTABLE AP),AP,3056,2544,21321015,110000.000,CHEST (PORTABLE AP),antero-posterior,Erect
"""


@pytest.fixture()
def mimic_root(tmp_path) -> Path:
    root = tmp_path / "mimic"
    reports = {("10000032", "50414267"): MIMIC_FULL, ("10000032", "53189527"): MIMIC_IMPRESSION_ONLY,
               ("10000764", "57375967"): MIMIC_FULL, ("10000898", "50771383"): MIMIC_NO_TEXT,
               ("10000935", "51178377"): MIMIC_FULL}
    for (subject, study), text in reports.items():
        path = root / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    meta = pd.read_csv(pd.io.common.StringIO(METADATA), dtype=str)
    for r in meta.itertuples():
        _png(root / "files" / f"p{r.subject_id[:2]}" / f"p{r.subject_id}" / f"s{r.study_id}" / f"{r.dicom_id}.jpg")
    (root / "mimic-cxr-2.0.0-metadata.csv").write_text(METADATA)
    return root


def test_mimic_sections_wrapped_lines_and_headings():
    sec = parse_mimic_sections(MIMIC_FULL)
    assert sec["findings"].startswith("There is no focal consolidation, pleural effusion or pneumothorax. Bilateral "
                                      "nodular opacities")
    assert sec["impression"] == "No acute cardiopulmonary process."
    assert sec["comparison"] == "None." and sec["technique"] == "Chest PA and lateral"
    assert split_sentences(sec["findings"]) == [
        "There is no focal consolidation, pleural effusion or pneumothorax.",
        "Bilateral nodular opacities that most likely represent nipple shadows.",
        "The cardiomediastinal silhouette is normal.", "Dr. was paged at."]
    only = parse_mimic_sections(MIMIC_IMPRESSION_ONLY)
    assert "findings" not in only and split_sentences(only["impression"]) == [
        "Moderate left pleural effusion.", "Mild cardiomegaly."]
    assert parse_mimic_sections("FINDINGS AND IMPRESSION: Clear lungs.")["findings"] == "Clear lungs."


def test_mimic_pairs_prefer_pa_then_ap_and_quarantine(mimic_root):
    q = Quarantine("skip")
    pairs = load_mimic(mimic_root, q).set_index("study_id")
    assert list(pairs.index) == ["s50414267", "s53189527"]
    full = pairs.loc["s50414267"]
    assert full["view"] == "PA" and full["image_id"].startswith("cccc")  # PA over AP over LATERAL
    assert full["image_path"] == "files/p10/p10000032/s50414267/cccc0000-00000000-00000000-00000000-00000003.jpg"
    assert full["patient_id"] == "p10000032" and full["n_sentences"] == 5
    assert "___" not in full["findings"]
    assert pairs.loc["s53189527", "view"] == "AP" and pairs.loc["s53189527", "findings"] == ""
    reasons = {Path(item).name: reason for item, reason in q.items}
    assert "no frontal" in reasons["s57375967.txt"] and "LATERAL" in reasons["s57375967.txt"]
    assert "no usable text" in reasons["s50771383.txt"]
    assert "no image in the metadata" in reasons["s51178377.txt"]
    # a missing PA file falls back to the AP image
    (mimic_root / full["image_path"]).unlink()
    again = load_mimic(mimic_root, Quarantine("skip")).set_index("study_id")
    assert again.loc["s50414267", "view"] == "AP"


def test_mimic_metadata_bad_row_named(mimic_root):
    path = mimic_root / "mimic-cxr-2.0.0-metadata.csv"
    path.write_text(path.read_text().replace("ffff0000-00000000-00000000-00000000-00000006,10000898",
                                             "ffff0000-00000000-00000000-00000000-00000006,abc"))
    with pytest.raises(BadInputError, match=r"metadata\.csv:row 6"):
        load_mimic(mimic_root, Quarantine("fail"))
    (path).unlink()
    with pytest.raises(FileNotFoundError, match="ViewPosition"):
        load_mimic(mimic_root, Quarantine("skip"))


def test_load_reports_refuses_unknown_layout_and_all_quarantined(tmp_path, iu_root):
    with pytest.raises(ValueError, match="layout"):
        load_reports("openi", iu_root, Quarantine("skip"))
    for name in ("7.xml", "8.xml"):
        (iu_root / "ecgen-radiology" / name).unlink()
    with pytest.raises(BadInputError, match="no usable report-image pair"):
        load_reports("iu", iu_root, Quarantine("skip"))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from(list("abc XZ_.,;:\n") + ["XXXX", "___", "Dr.", " 2.5 cm", "x-XXXX"]), max_size=40))
def test_clean_text_and_sentences_never_keep_deid_tokens(parts):
    text = "".join(parts)
    cleaned = clean_text(text)
    assert "XXX" not in cleaned and "__" not in cleaned and "\n" not in cleaned
    for sentence in split_sentences(text):
        assert sentence and "XXX" not in sentence and any(c.isalpha() for c in sentence)


# --- splits and storage ----------------------------------------------------------------------------

def _pairs(n_patients: int, per: int = 2) -> pd.DataFrame:
    rows = [dict(report_id=f"r{p}_{k}", patient_id=f"p{p}", sentences=["a b."]) for p in range(n_patients)
            for k in range(per)]
    return pd.DataFrame(rows)


def test_patient_split_disjoint_seeded_and_forced_test():
    pairs = _pairs(40)
    a = patient_split(pairs, 0.2, 0.2, seed=3)
    b = patient_split(pairs.sample(frac=1, random_state=1), 0.2, 0.2, seed=3).sort_index()
    assert (a["split"] == b["split"]).all()  # independent of row order
    assert a.groupby("patient_id")["split"].nunique().max() == 1
    counts = a.drop_duplicates("patient_id")["split"].value_counts()
    assert counts["val"] == 8 and counts["test"] == 8 and counts["train"] == 24
    assert not (patient_split(pairs, 0.2, 0.2, seed=4)["split"] == a["split"]).all()
    forced = patient_split(pairs, 0.2, 0.1, seed=3, force_test=["p1", "p2", "p3", "p4", "p5", "p6"])
    per_patient = forced.drop_duplicates("patient_id").set_index("patient_id")["split"]
    assert (per_patient[["p1", "p2", "p3", "p4", "p5", "p6"]] == "test").all()
    assert per_patient.value_counts()["test"] == 6  # the forced patients fill the test share
    with pytest.raises(ValueError):
        patient_split(pairs, 0.6, 0.5, seed=0)


def test_pairs_round_trip_and_bad_row(tmp_path, iu_root):
    pairs = load_iu(iu_root, Quarantine("skip"))
    write_pairs(pairs, tmp_path / "pairs.csv")
    back = read_pairs(tmp_path / "pairs.csv")
    assert back["sentences"].tolist() == pairs["sentences"].tolist()
    assert back["report_id"].tolist() == pairs["report_id"].tolist()
    text = (tmp_path / "pairs.csv").read_text().splitlines()
    text[2] = text[2].replace('"[""', '"{""', 1)
    (tmp_path / "pairs.csv").write_text("\n".join(text) + "\n")
    with pytest.raises(BadInputError, match=r"pairs\.csv:row 2"):
        read_pairs(tmp_path / "pairs.csv")


# --- the demo's reports ----------------------------------------------------------------------------

SIZES = dict(n_nih=24, n_nih_patients=8, n_vindr_train=4, n_vindr_test=2, image_size=96)


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("demo_reports")
    make_demo_dataset(root, seed=2, **SIZES)
    return root


def test_report_hook_leaves_nih_files_unchanged(tmp_path):
    def files(root):
        return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    records = []
    make_nih(tmp_path / "a", n_images=10, n_patients=4, image_size=64, seed=1)
    make_nih(tmp_path / "b", n_images=10, n_patients=4, image_size=64, seed=1, on_image=records.append)
    assert files(tmp_path / "a") == files(tmp_path / "b")
    assert len(records) == 10 and [r["index"] for r in records] == list(range(10))
    assert all({"findings", "boxes", "anatomy", "path", "test"} <= set(r) for r in records)


def test_demo_reports_both_layouts_describe_the_same_image(demo):
    root = demo / "reports"
    iu_q, mimic_q = Quarantine("skip"), Quarantine("skip")
    iu = load_reports("iu", root / "iu_xray", iu_q)
    mimic = load_reports("mimic", root / "mimic_cxr", mimic_q)
    assert len(iu_q) == 2 and len(mimic_q) == 2  # one report without text, one without a frontal image
    assert len(iu) == len(mimic) == SIZES["n_nih"] - 2
    link = pd.read_csv(root / "nih_link.csv", dtype=str, keep_default_na=False)
    by_iu, by_mimic = dict(zip(iu["image_id"], iu["sentences"])), dict(zip(mimic["image_id"], mimic["sentences"]))
    entries = pd.read_csv(demo / "nih" / "Data_Entry_2017.csv").set_index("Image Index")
    nih_images = {p.name: p for p in (demo / "nih").glob("images_*/images/*.png")}
    checked = 0
    for r in link.itertuples(index=False):
        if r.iu_image_id not in by_iu:
            continue
        assert by_iu[r.iu_image_id] == by_mimic[r.dicom_id]  # same text, other de-identification token
        # the IU PNG is the NIH image itself; the MIMIC JPEG is a lossy copy of it
        iu_png = root / "iu_xray" / "NLMCXR_png" / f"{r.iu_image_id}.png"
        assert iu_png.read_bytes() == nih_images[r[0]].read_bytes()
        jpg = mimic.set_index("image_id").loc[r.dicom_id, "image_path"]
        a = np.asarray(Image.open(root / "mimic_cxr" / jpg), np.float32)
        b = np.asarray(Image.open(nih_images[r[0]]).convert("L"), np.float32)
        assert np.abs(a - b).mean() < 3
        labels = entries.loc[r[0], "Finding Labels"]
        text = " ".join(by_iu[r.iu_image_id]).lower()
        if "Nodule" in labels:
            assert "nodul" in text and " zone" in text and " cm " in text
        if labels == "No Finding":
            assert "no acute cardiopulmonary abnormality" in text
        checked += 1
    assert checked == len(iu)
    assert (mimic["patient_id"].str[1:].astype(int) - demo_reports.MIMIC_SUBJECT_OFFSET).isin(
        entries["Patient ID"]).all()


def test_demo_locations_follow_the_drawn_boxes(demo):
    """The side a report sentence names is where the box is (image left = patient's right)."""
    loc = demo / "reports" / "localization"
    ms = pd.read_csv(loc / "ms_cxr" / "MS_CXR_Local_Alignment_v1.1.0.csv")
    assert list(ms.columns) == demo_reports.MS_CXR_COLUMNS
    size = SIZES["image_size"]
    lateral = ms[ms["category_name"].isin(["Pneumothorax", "Pleural Effusion", "Lung Opacity", "Pneumonia"])]
    for row in lateral.itertuples(index=False):
        side = "right" if row.x + row.w / 2 < size / 2 else "left"
        assert side in row.label_text.lower(), row
    assert len(lateral) >= 1 and (loc / ms["path"].iloc[0]).is_file()


def test_demo_localisation_set_is_held_out_and_in_three_layouts(demo):
    loc = demo / "reports" / "localization"
    images = sorted(p.name for p in (loc / "images").glob("*.png"))
    assert len(images) == max(8, SIZES["n_nih"] // 2)
    nih_names = set(pd.read_csv(demo / "nih" / "Data_Entry_2017.csv")["Image Index"])
    assert not set(images) & nih_names  # no NIH list, no report corpus has them
    assert {Image.open(loc / "images" / n).size for n in images} == {(SIZES["image_size"],) * 2}
    text = (loc / "nih" / "BBox_List_2017.csv").read_text()
    assert text.startswith("Image Index,Finding Label,Bbox [x,y,w,h],,,\n")
    boxes = pd.read_csv(loc / "nih" / "BBox_List_2017.csv")
    assert set(boxes["Image Index"]) == set(images)  # every image is abnormal
    assert set(boxes["Finding Label"]) <= set(demo_reports.BBOX_LABELS.values())
    path = loc / "rsna" / "stage_2_train_labels.csv"
    assert path.read_text().splitlines()[0] == "patientId,x,y,width,height,Target"
    frame = pd.read_csv(path)
    assert set(frame["patientId"]) == {n[:-4] for n in images}
    neg = frame["Target"] == 0
    assert frame.loc[neg, ["x", "y", "width", "height"]].isna().all().all()
    assert (frame.loc[~neg, ["width", "height"]] > 0).all().all()
    assert frame[neg]["patientId"].is_unique and not set(frame[neg]["patientId"]) & set(frame[~neg]["patientId"])
    opacity = boxes[boxes["Finding Label"].isin(["Infiltrate", "Pneumonia"])]
    assert (~neg).sum() == len(opacity)
    manifest = json.loads((demo / "manifest.json").read_text())
    assert manifest["reports"]["reports"] == SIZES["n_nih"]
    assert manifest["reports"]["localization"]["images"] == len(images)
    for rel in demo_reports.KEY_FILES:
        assert f"reports/{rel}" in manifest["files"]


def test_demo_rule_declares_the_report_files():
    import re

    text = (Path(__file__).resolve().parents[1] / "rules" / "demo.smk").read_text()
    block = text[text.index("DEMO_REPORT_FILES = ["):text.index("if DEMO[")]
    assert tuple(re.findall(r'"([^"]+\.csv)"', block)) == demo_reports.KEY_FILES


def test_prepare_pairs_holds_out_the_nih_test_patients(demo, tmp_path):
    from cxrssl.multimodal.reports import prepare_pairs

    held = demo_reports.held_out_subjects(demo / "reports")
    test_list = (demo / "nih" / "test_list.txt").read_text().split("\n")
    assert held == {f"p{demo_reports.MIMIC_SUBJECT_OFFSET + int(n[:8])}" for n in test_list}
    pairs = prepare_pairs("mimic", demo / "reports" / "mimic_cxr", tmp_path / "pairs.csv", seed=0, val_fraction=0.2,
                          test_fraction=0.0, force_test=held, on_bad_input="skip")
    assert set(pairs.loc[pairs["patient_id"].isin(held), "split"]) == {"test"}
    assert set(pairs.loc[~pairs["patient_id"].isin(held), "split"]) == {"train", "val"}
    assert len(pd.read_csv(tmp_path / "quarantine.csv")) == 2
    assert read_pairs(tmp_path / "pairs.csv")["split"].tolist() == pairs["split"].tolist()
