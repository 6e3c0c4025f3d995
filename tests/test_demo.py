"""Tests of the synthetic demo generator (cxrssl.demo): real layouts, determinism, DICOM variety,
decodability and visible lesions where the boxes are."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from pydicom.pixels import apply_voi_lut
from pydicom.uid import JPEG2000Lossless, RLELossless

from cxrssl.classes import NIH_FINDINGS, VINDR_CLASSES, VINDR_NO_FINDING, class_id
from cxrssl.demo import MANIFEST, make_demo_dataset
from cxrssl.demo import nih as demo_nih
from cxrssl.demo import vindr as demo_vindr

REPO = Path(__file__).resolve().parents[1]
SIZES = dict(n_nih=12, n_nih_patients=5, n_vindr_train=6, n_vindr_test=3, image_size=96)
SEED = 5


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("demo_a")
    make_demo_dataset(root, seed=SEED, **SIZES)
    return root


@pytest.fixture(scope="module")
def demo_again(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("demo_b")
    make_demo_dataset(root, seed=SEED, **SIZES)
    return root


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def read_dicom(path: Path) -> pydicom.Dataset:
    """How the pipeline must read VinDr files: force=True, and a transfer syntax when meta lacks it."""
    ds = pydicom.dcmread(path, force=True)
    if "TransferSyntaxUID" not in ds.file_meta:
        implicit, little = ds.original_encoding
        ds.file_meta.TransferSyntaxUID = (pydicom.uid.ImplicitVRLittleEndian if implicit
                                          else pydicom.uid.ExplicitVRLittleEndian)
        assert little
    return ds


def display(ds: pydicom.Dataset) -> np.ndarray:
    """Pixels in display convention (bright = dense), scaled to [0, 1]."""
    arr = ds.pixel_array.astype(np.float64)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        arr = (2**ds.BitsStored - 1) - arr
    return (arr - arr.min()) / np.ptp(arr)


# --- determinism and completion ----------------------------------------------------------------

def test_same_seed_same_bytes(demo, demo_again):
    a, b = _files(demo), _files(demo_again)
    assert sorted(a) == sorted(b)
    differing = [name for name in a if a[name] != b[name]]
    assert not differing, f"files differ between two runs with the same seed: {differing[:5]}"
    assert any(n.endswith(".dicom") for n in a) and any(n.endswith(".png") for n in a)


def test_other_seed_other_data(demo, tmp_path):
    make_demo_dataset(tmp_path, seed=SEED + 1, **SIZES)
    assert (tmp_path / "vindr" / "train.csv").read_bytes() != (demo / "vindr" / "train.csv").read_bytes()
    assert (tmp_path / "nih" / "Data_Entry_2017.csv").read_bytes() != (demo / "nih" / "Data_Entry_2017.csv").read_bytes()


def test_manifest_written_last_and_lists_key_files(demo):
    import json

    manifest = json.loads((demo / MANIFEST).read_text())
    assert manifest["settings"] == SIZES and manifest["seed"] == SEED
    newest_other = max(p.stat().st_mtime_ns for p in demo.rglob("*") if p.is_file() and p.name != MANIFEST)
    assert (demo / MANIFEST).stat().st_mtime_ns >= newest_other
    for rel in manifest["files"]:
        assert (demo / rel).is_file(), rel
    assert manifest["vindr"]["train"] == SIZES["n_vindr_train"]
    assert manifest["nih"]["images"] == SIZES["n_nih"]


# --- NIH layout ---------------------------------------------------------------------------------

def test_nih_data_entry_exact_header_and_values(demo):
    text = (demo / "nih" / "Data_Entry_2017.csv").read_text()
    assert text.splitlines()[0] == ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,"
                                    "View Position,OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],")
    df = pd.read_csv(demo / "nih" / "Data_Entry_2017.csv")
    # What pandas makes of the real header (trailing comma, brackets with commas).
    assert list(df.columns) == ["Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age",
                                "Patient Gender", "View Position", "OriginalImage[Width", "Height]",
                                "OriginalImagePixelSpacing[x", "y]", "Unnamed: 11"]
    assert len(df) == SIZES["n_nih"] and df["Image Index"].is_unique
    assert df["Patient ID"].nunique() == SIZES["n_nih_patients"]
    for row in df.itertuples():
        m = re.fullmatch(r"(\d{8})_(\d{3})\.png", row[1])
        assert m and int(m.group(1)) == row[4] and int(m.group(2)) == row[3], row
        labels = row[2].split("|")
        assert labels == ["No Finding"] or set(labels) <= set(NIH_FINDINGS), row[2]
    assert (df["Finding Labels"] == "No Finding").any() and df["Finding Labels"].str.contains(r"\|").any()


def test_nih_images_kaggle_layout(demo):
    df = pd.read_csv(demo / "nih" / "Data_Entry_2017.csv")
    found = {p.name: p for p in (demo / "nih").glob("images_*/images/*.png")}
    assert set(found) == set(df["Image Index"])
    assert {p.parent.parent.name for p in found.values()} == {"images_001", "images_002"}
    modes = [Image.open(p).mode for p in found.values()]
    assert modes.count("RGBA") == 2 and modes.count("L") == len(modes) - 2
    assert {Image.open(p).size for p in found.values()} == {(SIZES["image_size"], SIZES["image_size"])}


def test_nih_split_lists_patient_disjoint(demo):
    tv_text = (demo / "nih" / "train_val_list.txt").read_text()
    test_text = (demo / "nih" / "test_list.txt").read_text()
    assert not tv_text.endswith("\n") and not test_text.endswith("\n")
    tv, test = tv_text.split("\n"), test_text.split("\n")
    df = pd.read_csv(demo / "nih" / "Data_Entry_2017.csv")
    assert sorted(tv + test) == sorted(df["Image Index"]) and tv and test
    patient = dict(zip(df["Image Index"], df["Patient ID"]))
    assert not {patient[n] for n in tv} & {patient[n] for n in test}


def test_nih_bbox_list_header_and_boxes(demo):
    lines = (demo / "nih" / "BBox_List_2017.csv").read_text().splitlines()
    assert lines[0] == "Image Index,Finding Label,Bbox [x,y,w,h],,,"
    df = pd.read_csv(demo / "nih" / "BBox_List_2017.csv")
    assert list(df.columns)[:6] == ["Image Index", "Finding Label", "Bbox [x", "y", "w", "h]"]
    assert len(df) >= 3
    labels = pd.read_csv(demo / "nih" / "Data_Entry_2017.csv").set_index("Image Index")["Finding Labels"]
    size = SIZES["image_size"]
    for row in df.itertuples(index=False):
        finding = "Infiltration" if row[1] == "Infiltrate" else row[1]
        assert finding in labels[row[0]].split("|"), row
        x, y, w, h = row[2:6]
        assert 0 <= x and 0 <= y and w > 0 and h > 0 and x + w <= size and y + h <= size


# --- VinDr layouts ------------------------------------------------------------------------------

def test_vindr_kaggle_train_csv(demo):
    path = demo / "vindr" / "train.csv"
    assert path.read_text().splitlines()[0] == "image_id,class_name,class_id,rad_id,x_min,y_min,x_max,y_max"
    df = pd.read_csv(path)
    stems = {p.stem for p in (demo / "vindr" / "train").glob("*.dicom")}
    assert set(df["image_id"]) == stems and len(stems) == SIZES["n_vindr_train"]
    assert all(re.fullmatch(r"[0-9a-f]{32}", s) for s in stems)
    readers = df.groupby("image_id")["rad_id"].nunique()
    assert (readers == 3).all()
    assert df["rad_id"].str.fullmatch(r"R([1-9]|1[0-7])").all()
    nf = df["class_name"] == VINDR_NO_FINDING
    assert (df.loc[nf, "class_id"] == 14).all() and df.loc[nf, ["x_min", "y_min", "x_max", "y_max"]].isna().all().all()
    assert df.loc[~nf, ["x_min", "y_min", "x_max", "y_max"]].notna().all().all()
    assert (df.loc[~nf, "class_id"] == df.loc[~nf, "class_name"].map(class_id)).all()
    # A "No finding" reader row is that reader's only row for the image.
    per_reader = df.groupby(["image_id", "rad_id"])["class_name"].agg(list)
    assert all(v == [VINDR_NO_FINDING] or VINDR_NO_FINDING not in v for v in per_reader)
    assert nf.any() and (~nf).any()
    line = next(ln for ln in path.read_text().splitlines() if ",No finding," in ln)
    assert line.endswith(",,,,")


def test_vindr_physionet_annotations(demo):
    ann = demo / "vindr" / "annotations"
    header = "image_id,rad_id,class_name,x_min,y_min,x_max,y_max"
    for name in ("annotations_train.csv", "annotations_test.csv"):
        assert (ann / name).read_text().splitlines()[0] == header
    kaggle = pd.read_csv(demo / "vindr" / "train.csv")
    train = pd.read_csv(ann / "annotations_train.csv")
    pd.testing.assert_frame_equal(train, kaggle[train.columns.tolist()])
    test = pd.read_csv(ann / "annotations_test.csv")
    test_stems = {p.stem for p in (demo / "vindr" / "test").glob("*.dicom")}
    assert set(test["image_id"]) == test_stems and len(test_stems) == SIZES["n_vindr_test"]
    assert test.groupby("image_id")["rad_id"].nunique().eq(1).all()
    assert not test_stems & set(kaggle["image_id"])
    for split, boxes in (("train", train), ("test", test)):
        labels = pd.read_csv(ann / f"image_labels_{split}.csv")
        assert list(labels.columns) == ["image_id", "rad_id", *VINDR_CLASSES, VINDR_NO_FINDING]
        assert len(labels) == boxes.groupby(["image_id", "rad_id"]).ngroups
        merged = boxes.groupby(["image_id", "rad_id"])["class_name"].agg(set)
        for row in labels.itertuples(index=False):
            present = merged[(row[0], row[1])]
            for k, name in enumerate([*VINDR_CLASSES, VINDR_NO_FINDING]):
                assert row[2 + k] == int(name in present), (split, row[0], name)


def test_boxes_inside_original_bounds_and_not_square(demo):
    sizes = {}
    for split in ("train", "test"):
        for p in (demo / "vindr" / split).glob("*.dicom"):
            ds = pydicom.dcmread(p, force=True, stop_before_pixels=True)
            sizes[p.stem] = (int(ds.Rows), int(ds.Columns))
    assert any(h != w for h, w in sizes.values())
    s = SIZES["image_size"]
    assert all(0.9 * s - 1 <= v <= 1.3 * s + 1 for hw in sizes.values() for v in hw)
    boxes = pd.concat([pd.read_csv(demo / "vindr" / "train.csv"),
                       pd.read_csv(demo / "vindr" / "annotations" / "annotations_test.csv")]).dropna(subset=["x_min"])
    assert len(boxes) > 0
    for row in boxes.itertuples():
        h, w = sizes[row.image_id]
        assert 0 <= row.x_min < row.x_max <= w and 0 <= row.y_min < row.y_max <= h, row


# --- DICOM variety and decoding -----------------------------------------------------------------

def test_dicom_variety(demo):
    files = sorted((demo / "vindr").glob("*/*.dicom"))
    seen = {"photometric": set(), "bits": set(), "tsuid": set(), "voi_lut": 0, "window": 0, "sop": set()}
    for p in files:
        raw = pydicom.dcmread(p, force=True, stop_before_pixels=True)
        seen["photometric"].add(raw.PhotometricInterpretation)
        seen["bits"].add(int(raw.BitsStored))
        seen["tsuid"].add(raw.file_meta.get("TransferSyntaxUID"))
        seen["voi_lut"] += "VOILUTSequence" in raw
        seen["window"] += "WindowCenter" in raw and "WindowWidth" in raw
        seen["sop"].add(raw.SOPClassUID)
        for tag in ("PatientName", "PatientID", "PatientBirthDate", "InstitutionName"):
            assert str(raw.get(tag, "")), f"{p.name} lacks {tag}"
        assert len(raw.PixelSpacing) == 2 and raw.Rows > 0 and raw.Columns > 0
    assert seen["photometric"] == {"MONOCHROME1", "MONOCHROME2"}
    assert seen["bits"] == {12, 14, 16}
    assert {JPEG2000Lossless, RLELossless, None} <= seen["tsuid"]
    assert seen["voi_lut"] >= 1 and seen["window"] > len(files) / 2
    assert seen["sop"] <= {demo_vindr.DX_SOP_CLASS, demo_vindr.CR_SOP_CLASS}


def test_missing_transfer_syntax_needs_force(demo):
    lacking = [p for p in (demo / "vindr").glob("*/*.dicom")
               if "TransferSyntaxUID" not in pydicom.dcmread(p, force=True, stop_before_pixels=True).file_meta]
    assert lacking
    ds = read_dicom(lacking[0])
    assert ds.pixel_array.shape == (ds.Rows, ds.Columns)


def test_every_dicom_decodes(demo):
    for p in sorted((demo / "vindr").glob("*/*.dicom")):
        ds = read_dicom(p)
        arr = ds.pixel_array
        assert arr.shape == (ds.Rows, ds.Columns) and arr.dtype == np.uint16, p.name
        assert int(arr.max()) < 2**ds.BitsStored and np.ptp(arr) > 2 ** (ds.BitsStored - 2), p.name
        shown = apply_voi_lut(arr, ds)
        assert np.isfinite(shown).all() and np.ptp(shown) > 0, p.name


@pytest.mark.parametrize("encoding", ["native", "jpeg2000", "rle", "no_tsuid"])
def test_lossless_round_trip(tmp_path, encoding):
    rng = np.random.default_rng(0)
    # Smooth content plus noise, like an X-ray: random bytes would not compress at all.
    yy, xx = np.mgrid[0:37, 0:53]
    pixels = (yy * 200 + xx * 100 + rng.integers(0, 64, size=(37, 53))).astype(np.uint16)
    profile = demo_vindr.Profile("MONOCHROME2", 14, encoding, "window")
    ds = demo_vindr.build_dicom(pixels, profile, image_id="0" * 32, seed=0, index=0, rng=rng,
                                window=(8000.0, 16000.0), spacing=0.15)
    path = tmp_path / "x.dicom"
    demo_vindr.write_dicom(ds, profile, path)
    np.testing.assert_array_equal(read_dicom(path).pixel_array, pixels)


# --- lesions are visible where the boxes are ----------------------------------------------------

def _ring_contrast(img: np.ndarray, box) -> float:
    """Mean inside the box minus mean of a surrounding ring half the box size wide."""
    h, w = img.shape
    x0, y0, x1, y1 = int(box[0]), int(box[1]), int(np.ceil(box[2])), int(np.ceil(box[3]))
    bw, bh = x1 - x0, y1 - y0
    X0, Y0, X1, Y1 = max(0, x0 - bw // 2), max(0, y0 - bh // 2), min(w, x1 + bw // 2), min(h, y1 + bh // 2)
    inner, outer = img[y0:y1, x0:x1], img[Y0:Y1, X0:X1]
    return float(inner.mean() - (outer.sum() - inner.sum()) / max(outer.size - inner.size, 1))


def test_lesions_visible_in_files(demo):
    contrasts = []
    for split, csv in (("train", "train.csv"), ("test", "annotations/annotations_test.csv")):
        ann = pd.read_csv(demo / "vindr" / csv).dropna(subset=["x_min"])
        for image_id, group in ann.groupby("image_id"):
            img = display(read_dicom(demo / "vindr" / split / f"{image_id}.dicom"))
            contrasts += [_ring_contrast(img, (r.x_min, r.y_min, r.x_max, r.y_max)) for r in group.itertuples()]
    contrasts = np.array(contrasts)
    assert len(contrasts) >= 5
    # Every drawn lesion is denser (brighter) than what surrounds it.
    assert np.median(contrasts) > 0.05 and (contrasts > 0.02).mean() >= 0.75, contrasts


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), cls=st.sampled_from(sorted(demo_vindr.VINDR_PAINTERS)),
       h=st.integers(80, 140), w=st.integers(80, 140))
def test_lesion_changes_pixels_inside_its_box(seed, cls, h, w):
    """Against the same anatomy without the lesion, the change sits inside the reported box."""
    with_lesion, truth = demo_vindr.render_vindr(h, w, [cls], np.random.default_rng(seed))
    clean, _ = demo_vindr.render_vindr(h, w, [], np.random.default_rng(seed))
    (name, (x0, y0, x1, y1)), = truth
    assert name == cls and 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
    diff = np.abs(with_lesion - clean)
    inside = np.zeros_like(diff, bool)
    inside[int(y0):int(np.ceil(y1)), int(x0):int(np.ceil(x1))] = True
    assert diff[inside].mean() > 0.04, (cls, diff[inside].mean())
    assert diff[~inside].sum() <= 0.25 * diff.sum(), cls  # at most a soft edge spills outside


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), findings=st.lists(st.sampled_from(NIH_FINDINGS), min_size=1, max_size=3,
                                                          unique=True))
def test_nih_findings_change_the_image(seed, findings):
    from cxrssl.demo.phantom import Anatomy

    anatomy = Anatomy.sample(np.random.default_rng(seed))
    with_f, boxes = demo_nih.render_nih(64, anatomy, sorted(findings), np.random.default_rng(seed))
    clean, _ = demo_nih.render_nih(64, anatomy, [], np.random.default_rng(seed))
    assert np.abs(with_f.astype(int) - clean.astype(int)).mean() > 0.3
    for box in boxes.values():
        assert 0 <= box[0] < box[2] <= 64 and 0 <= box[1] < box[3] <= 64


# --- helpers and safety -------------------------------------------------------------------------

@given(n_patients=st.integers(2, 40), extra=st.integers(0, 60), seed=st.integers(0, 1000))
def test_every_patient_has_an_image(n_patients, extra, seed):
    pids = demo_nih._assign_patients(n_patients + extra, n_patients, np.random.default_rng(seed))
    assert len(pids) == n_patients + extra and set(pids) == set(range(1, n_patients + 1))
    assert pids == sorted(pids)


@given(box=st.tuples(*[st.floats(0, 300, allow_nan=False)] * 4), w=st.integers(8, 300), h=st.integers(8, 300),
       seed=st.integers(0, 1000))
def test_reader_jitter_stays_inside(box, w, h, seed):
    x0, y0, x1, y1 = demo_vindr._jitter(box, np.random.default_rng(seed), w, h, 0.04)
    assert 0 <= x0 < x1 <= w - 1 and 0 <= y0 < y1 <= h - 1


def test_rerun_with_fewer_images_removes_stale_files(tmp_path):
    small = dict(SIZES, n_nih=10, n_vindr_train=5)
    make_demo_dataset(tmp_path, seed=1, **SIZES)
    make_demo_dataset(tmp_path, seed=1, **small)
    stems = {p.stem for p in (tmp_path / "vindr" / "train").glob("*.dicom")}
    assert stems == set(pd.read_csv(tmp_path / "vindr" / "train.csv")["image_id"])
    pngs = sorted(p.name for p in (tmp_path / "nih").glob("images_*/images/*.png"))
    assert pngs == sorted(pd.read_csv(tmp_path / "nih" / "Data_Entry_2017.csv")["Image Index"])


def test_refuses_foreign_folder(tmp_path):
    (tmp_path / "precious.csv").write_text("not demo data")
    with pytest.raises(FileExistsError, match="refusing"):
        make_demo_dataset(tmp_path, seed=0, **SIZES)
    assert (tmp_path / "precious.csv").read_text() == "not demo data"


def test_rejects_more_patients_than_images(tmp_path):
    with pytest.raises(ValueError, match="n_nih_patients"):
        make_demo_dataset(tmp_path, seed=0, **dict(SIZES, n_nih=8, n_nih_patients=9))


def test_script_help_and_disabled():
    script = REPO / "scripts" / "make_demo_data.py"
    out = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, check=True)
    assert "--n-vindr-train" in out.stdout and "--seed" in out.stdout and "--log" in out.stdout
    bad = subprocess.run([sys.executable, str(script), "--enabled", "false"], capture_output=True, text=True)
    assert bad.returncode != 0 and "nothing to generate" in bad.stderr
