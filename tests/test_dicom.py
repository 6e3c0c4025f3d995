"""DICOM reading (every variant VinDr ships, every bad-input case) and the cached PNG conversion."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pydicom
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate
from pydicom.pixels import apply_modality_lut, apply_voi_lut
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
    generate_uid,
)

import cxrssl.data.dicom as dicom_mod
from cxrssl.data.convert import (
    CACHE_INDEX_NAME,
    METADATA_COLUMNS,
    convert_dicoms,
    run_convert,
    to_display_png,
)
from cxrssl.data.dicom import METADATA_KEYS, read_dicom
from cxrssl.errors import BadInputError, Quarantine

REPO = Path(__file__).resolve().parents[1]
PATIENT_NAME, PATIENT_ID = "Doe^Jane", "PID-SECRET-4711"


def ramp(height: int = 64, width: int = 80, bits: int = 12) -> np.ndarray:
    """A deterministic image spanning the full stored range, with structure in both axes."""
    rng = np.random.default_rng(height * 1000 + width)
    base = np.add.outer(np.linspace(0, 1, height), np.linspace(0, 1, width)) / 2
    noisy = base + rng.normal(0, 0.05, size=base.shape)
    noisy = (noisy - noisy.min()) / (noisy.max() - noisy.min())
    return np.rint(noisy * (2**bits - 1)).astype(np.uint16)


def write_dicom(path: Path, pixels: np.ndarray, photometric: str = "MONOCHROME2", bits: int = 12,
                syntax=ExplicitVRLittleEndian, compress=None, drop_syntax: bool = False, **tags) -> Path:
    """A DX DICOM carrying patient identifiers (so tests can check they never leak)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = syntax
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = PATIENT_NAME, PATIENT_ID, "19500101"
    ds.Modality = "DX"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits, bits - 1, 0
    for key, value in tags.items():
        setattr(ds, key, value)
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    if compress is not None:
        ds.compress(compress, encoding_plugin="pylibjpeg" if compress == JPEG2000Lossless else "")
    path.parent.mkdir(parents=True, exist_ok=True)
    if drop_syntax:  # PhysioNet defect: no (0002,0010) in the file meta
        implicit = ds.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
        del ds.file_meta.TransferSyntaxUID
        ds.save_as(path, implicit_vr=implicit, little_endian=True, enforce_file_format=False)
    else:
        ds.save_as(path, enforce_file_format=True)
    return path


# --- reading -------------------------------------------------------------------------------------

def test_native_monochrome2_decodes_exactly(tmp_path):
    pixels = ramp()
    image, meta = read_dicom(write_dicom(tmp_path / "a.dicom", pixels))
    assert image.dtype == np.float32 and image.shape == pixels.shape
    np.testing.assert_array_equal(image, pixels)
    assert set(meta) == set(METADATA_KEYS)
    assert meta == {"photometric": "MONOCHROME2", "bits_stored": 12, "transfer_syntax": ExplicitVRLittleEndian,
                    "orig_height": 64, "orig_width": 80, "voi": "none"}


def test_monochrome1_is_inverted(tmp_path):
    pixels = ramp()
    mono2, _ = read_dicom(write_dicom(tmp_path / "m2.dicom", pixels))
    mono1, meta = read_dicom(write_dicom(tmp_path / "m1.dicom", pixels, photometric="MONOCHROME1"))
    assert meta["photometric"] == "MONOCHROME1"
    # the darkest stored value is the brightest displayed one, and the mapping is a linear flip
    np.testing.assert_allclose(mono1, pixels.max() + pixels.min() - pixels.astype(np.float32))
    assert np.corrcoef(mono1.ravel(), mono2.ravel())[0, 1] == pytest.approx(-1.0)
    png1, _ = to_display_png(mono1, 80, 8)
    png2, _ = to_display_png(mono2, 80, 8)
    np.testing.assert_array_equal(png1.astype(int), 255 - png2.astype(int))


def test_window_centre_width_is_applied(tmp_path):
    pixels = ramp()
    image, meta = read_dicom(write_dicom(tmp_path / "w.dicom", pixels, WindowCenter=2048, WindowWidth=1024))
    assert meta["voi"] == "window"
    low, high = pixels < 2048 - 512, pixels > 2048 + 512
    assert low.any() and high.any()
    assert np.all(image[low] == image.min()) and np.all(image[high] == image.max())
    inside = ~(low | high)
    assert np.corrcoef(image[inside], pixels[inside])[0, 1] > 0.999


def test_voi_lut_sequence_wins_over_window(tmp_path):
    pixels = ramp()
    lut = np.rint(np.sqrt(np.arange(4096) / 4095) * 65535).astype(np.uint16)  # gamma-like curve
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 16]
    item.LUTData = lut.tolist()
    item["LUTData"].VR = "US"
    path = write_dicom(tmp_path / "lut.dicom", pixels, WindowCenter=100, WindowWidth=10,
                       VOILUTSequence=[item])
    image, meta = read_dicom(path)
    assert meta["voi"] == "lut"
    np.testing.assert_array_equal(image, lut[pixels])


def test_modality_rescale_is_applied_before_display(tmp_path):
    pixels = ramp()
    image, _ = read_dicom(write_dicom(tmp_path / "r.dicom", pixels, RescaleSlope=2, RescaleIntercept=-1000))
    np.testing.assert_allclose(image, pixels * 2.0 - 1000)


def _lut_item(entries: int, first: int, bits: int = 16) -> Dataset:
    """A LUT item (VOI or modality): a gamma-like curve over ``entries`` values from ``first``."""
    item = Dataset()
    item.LUTDescriptor = [entries, first, bits]
    item.LUTData = np.rint(np.sqrt(np.arange(entries) / (entries - 1)) * (2**bits - 1)).astype(int).tolist()
    item["LUTData"].VR = "US"
    return item


def _signed(bits: int = 12) -> np.ndarray:
    return (ramp(bits=bits).astype(np.int32) - 2 ** (bits - 1)).astype(np.int16)


# name -> (stored pixels, write_dicom keyword arguments): every header variant read_dicom handles
VOI_VARIANTS = {
    "none_12bit": (ramp(), {}),
    "none_14bit": (ramp(bits=14), dict(bits=14)),
    "none_16bit_full_range": (ramp(bits=16), dict(bits=16)),
    "window": (ramp(), dict(WindowCenter=2048, WindowWidth=1024)),
    "window_14bit": (ramp(bits=14), dict(bits=14, WindowCenter=9000, WindowWidth=6000)),
    "window_16bit": (ramp(bits=16), dict(bits=16, WindowCenter=30000, WindowWidth=20001)),
    "window_two_values": (ramp(), dict(WindowCenter=[2048, 1000], WindowWidth=[1024, 500])),
    "window_linear_exact": (ramp(), dict(WindowCenter=2000.5, WindowWidth=999.5, VOILUTFunction="LINEAR_EXACT")),
    "window_sigmoid": (ramp(), dict(WindowCenter=2048, WindowWidth=1500, VOILUTFunction="SIGMOID")),
    "voi_lut_sequence": (ramp(), dict(WindowCenter=100, WindowWidth=10, VOILUTSequence=[_lut_item(4096, 0)])),
    "voi_lut_offset_first_map": (ramp(), dict(VOILUTSequence=[_lut_item(2048, 1000, bits=12)])),
    "monochrome1_window": (ramp(), dict(photometric="MONOCHROME1", WindowCenter=2048, WindowWidth=3000)),
    "monochrome1_voi_lut": (ramp(), dict(photometric="MONOCHROME1", VOILUTSequence=[_lut_item(4096, 0)])),
    "rescale_window": (ramp(), dict(RescaleSlope=2, RescaleIntercept=-1000, WindowCenter=3000, WindowWidth=4000)),
    "signed_rescale_window": (_signed(), dict(PixelRepresentation=1, RescaleSlope=0.5, RescaleIntercept=100,
                                              WindowCenter=150, WindowWidth=700)),
    "signed_16bit_full_range": (_signed(16), dict(bits=16, PixelRepresentation=1, RescaleSlope=1,
                                                  RescaleIntercept=-1024, WindowCenter=0, WindowWidth=30000)),
    "modality_lut_sequence": (ramp(), dict(ModalityLUTSequence=[_lut_item(4096, 0)], WindowCenter=30000,
                                           WindowWidth=40000)),
    "jpeg2000_monochrome1_window": (ramp(96, 72), dict(compress=JPEG2000Lossless, photometric="MONOCHROME1",
                                                       WindowCenter=2048, WindowWidth=2000)),
}


@pytest.mark.parametrize("name", sorted(VOI_VARIANTS))
def test_lookup_table_path_is_identical_to_pydicom_on_the_whole_image(tmp_path, name):
    stored, kwargs = VOI_VARIANTS[name]
    path = write_dicom(tmp_path / f"{name}.dicom", stored, **kwargs)
    ds = pydicom.dcmread(path)
    pixels = ds.pixel_array
    np.testing.assert_array_equal(pixels, stored)  # the variant really holds what it claims
    assert dicom_mod._lookup_table(pixels, ds) is not None  # the fast path is the one under test
    # reference: pydicom's own transforms over every pixel, the pre-optimisation code path
    reference = np.asarray(apply_voi_lut(apply_modality_lut(pixels, ds), ds, prefer_lut=True), dtype=np.float32)
    assert len(np.unique(reference)) > 16  # not a degenerate all-clipped image
    np.testing.assert_array_equal(dicom_mod.voi_transform(pixels, ds), reference)
    np.testing.assert_array_equal(dicom_mod.voi_transform(pixels, ds, use_table=False), reference)
    # end to end, after the MONOCHROME1 flip and the 8-bit PNG quantisation
    image, _ = read_dicom(path)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        reference = reference.max() + reference.min() - reference
    np.testing.assert_array_equal(image, reference)
    png, _ = to_display_png(image, 40, 8)
    expected, _ = to_display_png(reference, 40, 8)
    assert np.abs(png.astype(int) - expected.astype(int)).max() <= 1


def test_float_data_and_huge_ranges_take_the_direct_path():
    ds = Dataset()
    ds.PhotometricInterpretation, ds.BitsStored, ds.PixelRepresentation = "MONOCHROME2", 16, 0
    ds.WindowCenter, ds.WindowWidth = 2048, 1024
    pixels = ramp()
    expected = dicom_mod.voi_transform(pixels, ds)
    floats = pixels.astype(np.float32)
    assert dicom_mod._lookup_table(floats, ds) is None
    np.testing.assert_array_equal(dicom_mod.voi_transform(floats, ds), expected)
    wide = pixels.astype(np.int32) * 64  # range 0..262080: more entries than a table is built for
    assert dicom_mod._lookup_table(wide, ds) is None
    np.testing.assert_array_equal(dicom_mod.voi_transform(wide, ds, use_table=False),
                                  dicom_mod.voi_transform(wide, ds))


def test_jpeg2000_prefers_openjpeg_and_falls_back_when_it_fails(tmp_path, monkeypatch):
    from pydicom.pixels.decoders import pylibjpeg as pylibjpeg_plugin

    pixels = ramp(96, 72)
    path = write_dicom(tmp_path / "j2k.dicom", pixels, compress=JPEG2000Lossless)
    calls = []

    def broken(src, **kwargs):
        calls.append(len(src))
        raise RuntimeError("simulated codestream error")

    monkeypatch.setitem(pylibjpeg_plugin._DECODERS, JPEG2000Lossless, {"broken": broken})
    image, meta = read_dicom(path)
    assert calls, "the preferred plugin (pylibjpeg) was not tried first"
    assert meta["transfer_syntax"] == JPEG2000Lossless
    np.testing.assert_array_equal(image, pixels)  # decoded by the next plugin (gdcm or pillow)


@pytest.mark.parametrize("codec", [JPEG2000Lossless, RLELossless])
def test_compressed_syntaxes_decode_losslessly(tmp_path, codec):
    pixels = ramp(96, 72)
    image, meta = read_dicom(write_dicom(tmp_path / "c.dicom", pixels, compress=codec))
    assert meta["transfer_syntax"] == codec
    np.testing.assert_array_equal(image, pixels)


@pytest.mark.parametrize("name", ["MR_small_jpeg_ls_lossless.dcm", "MR_small_jp2klossless.dcm", "MR_small_RLE.dcm",
                                  "MR_small_implicit.dcm", "MR_small_bigendian.dcm"])
def test_pydicom_reference_files_match_the_uncompressed_original(name):
    reference, _ = read_dicom(get_testdata_file("MR_small.dcm", download=False))
    image, meta = read_dicom(get_testdata_file(name, download=False))
    assert meta["voi"] == "window"
    np.testing.assert_array_equal(image, reference)


@pytest.mark.parametrize("syntax,codec", [(ExplicitVRLittleEndian, None), (ImplicitVRLittleEndian, None),
                                          (ExplicitVRLittleEndian, JPEG2000Lossless)])
def test_missing_transfer_syntax_is_inferred(tmp_path, syntax, codec):
    pixels = ramp()
    path = write_dicom(tmp_path / "nots.dicom", pixels, syntax=syntax, compress=codec, drop_syntax=True)
    assert "TransferSyntaxUID" not in pydicom.dcmread(path, force=True).file_meta
    image, meta = read_dicom(path)
    np.testing.assert_array_equal(image, pixels)
    expected = {None: syntax, JPEG2000Lossless: "1.2.840.10008.1.2.4.91"}[codec]
    assert meta["transfer_syntax"] == expected


def _bad_files(tmp: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, expected words in the message)."""
    good = write_dicom(tmp / "good.dicom", ramp())
    data = good.read_bytes()
    out = {}
    (tmp / "text.dicom").write_text("this is not a DICOM file\n" * 20)
    out["not_dicom"] = (tmp / "text.dicom", "not a DICOM")
    (tmp / "empty.dicom").write_bytes(b"")
    out["empty"] = (tmp / "empty.dicom", "not a DICOM")
    (tmp / "trunc.dicom").write_bytes(data[: len(data) - 4000])
    out["truncated"] = (tmp / "trunc.dicom", "pixel data")
    (tmp / "header_only.dicom").write_bytes(data[:200])
    out["truncated_header"] = (tmp / "header_only.dicom", "truncated")
    ds = pydicom.dcmread(good)
    del ds.PixelData
    ds.save_as(tmp / "nopix.dicom")
    out["no_pixel_data"] = (tmp / "nopix.dicom", "no PixelData")
    ds = pydicom.dcmread(good)
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2 video
    ds.PixelData = encapsulate([ds.PixelData])
    ds["PixelData"].VR, ds["PixelData"].is_undefined_length = "OB", True
    ds.save_as(tmp / "mpeg.dicom")
    out["unsupported_syntax"] = (tmp / "mpeg.dicom", "unsupported transfer syntax 1.2.840.10008.1.2.4.100")
    ds = pydicom.dcmread(good)
    ds.Rows = 40000
    ds.save_as(tmp / "huge.dicom")
    out["nonsense_dims"] = (tmp / "huge.dicom", "implausible image size")
    ds = pydicom.dcmread(good)
    ds.Rows = 0
    ds.save_as(tmp / "zero.dicom")
    out["zero_dims"] = (tmp / "zero.dicom", "implausible image size")
    out["blank"] = (write_dicom(tmp / "blank.dicom", np.full((64, 64), 700, np.uint16)), "blank image")
    return out


BAD_CASES = ["not_dicom", "empty", "truncated", "truncated_header", "no_pixel_data", "unsupported_syntax",
             "nonsense_dims", "zero_dims"]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_names_the_file(tmp_path, case):
    path, words = _bad_files(tmp_path)[case]
    with pytest.raises(BadInputError) as info:
        read_dicom(path)
    assert info.value.item == str(path)
    assert str(path) in str(info.value) and words in str(info.value)


def test_missing_decoder_plugin_says_which_to_install(tmp_path, monkeypatch):
    path = write_dicom(tmp_path / "j2k.dicom", ramp(), compress=JPEG2000Lossless)

    class Unavailable:
        is_available = False
        missing_dependencies = ["pylibjpeg-openjpeg not installed"]

    monkeypatch.setattr(dicom_mod, "get_decoder", lambda uid: Unavailable())
    with pytest.raises(BadInputError, match="install pylibjpeg-openjpeg or python-gdcm") as info:
        read_dicom(path)
    assert info.value.item == str(path) and "1.2.840.10008.1.2.4.90" in str(info.value)


# --- conversion ----------------------------------------------------------------------------------

def make_dataset(root: Path, n_train: int = 3, n_test: int = 2) -> list[Path]:
    """PhysioNet-like train/ and test/ folders with varied DICOMs (portrait and landscape)."""
    paths = []
    variants = [dict(), dict(photometric="MONOCHROME1"), dict(compress=JPEG2000Lossless),
                dict(WindowCenter=2000, WindowWidth=3000), dict(compress=RLELossless)]
    for split, n in (("train", n_train), ("test", n_test)):
        for i in range(n):
            shape = (72, 56) if i % 2 else (56, 72)
            kwargs = variants[(len(paths)) % len(variants)]
            paths.append(write_dicom(root / split / f"{split}{i:03d}.dicom", ramp(*shape), **kwargs))
    return paths


def read_png(path: Path) -> np.ndarray:
    return cv2.imread(str(path), cv2.IMREAD_UNCHANGED)


def test_conversion_writes_contract_metadata_and_pngs(tmp_path):
    paths = make_dataset(tmp_path / "vindr")
    meta_csv = tmp_path / "out" / "metadata.csv"
    result = convert_dicoms(paths, tmp_path / "out" / "images_36px_8bit", meta_csv, size=36, bit_depth=8)
    meta = pd.read_csv(meta_csv)
    assert list(meta.columns) == METADATA_COLUMNS
    assert sorted(result.converted) == sorted(meta["image_id"]) and len(meta) == len(paths)
    assert set(meta["source_split"]) == {"train", "test"}
    for row in meta.itertuples():
        png = read_png(meta_csv.parent / row.png)
        assert row.png == f"images_36px_8bit/{row.image_id}.png"
        assert png.dtype == np.uint8 and png.shape == (row.height, row.width)
        assert max(png.shape) == 36 and png.min() == 0 and png.max() == 255
        assert row.scale == pytest.approx(36 / max(row.orig_height, row.orig_width))
        assert row.height == round(row.orig_height * row.scale) and row.width == round(row.orig_width * row.scale)
    assert set(meta["photometric"]) == {"MONOCHROME1", "MONOCHROME2"}
    assert "1.2.840.10008.1.2.4.90" in set(meta["transfer_syntax"])


def test_sixteen_bit_output(tmp_path):
    paths = make_dataset(tmp_path / "vindr", 1, 0)
    result = convert_dicoms(paths, tmp_path / "img", tmp_path / "metadata.csv", size=48, bit_depth=16)
    png = read_png(tmp_path / result.metadata.loc[0, "png"])
    assert png.dtype == np.uint16 and png.min() == 0 and png.max() == 65535
    assert len(np.unique(png)) > 256  # really uses the extra precision


def test_no_patient_identifiers_in_outputs(tmp_path):
    paths = make_dataset(tmp_path / "vindr", 2, 1)
    paths.append(_bad_files(tmp_path / "bad")["no_pixel_data"][0])
    run_convert(paths, [], tmp_path / "out" / "img", tmp_path / "out" / "metadata.csv",
                tmp_path / "out" / "quarantine.csv", size=32, on_bad_input="skip")
    for path in (tmp_path / "out").rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            for secret in (PATIENT_NAME, PATIENT_ID, "19500101"):
                assert secret.encode() not in data, f"{secret} leaked into {path}"
    _, meta = read_dicom(paths[0])
    assert set(meta) == set(METADATA_KEYS)


def test_skip_policy_quarantines_bad_files_and_converts_the_rest(tmp_path):
    good = make_dataset(tmp_path / "vindr", 2, 1)
    bad = {name: path for name, (path, _) in _bad_files(tmp_path / "bad").items()}
    meta_csv, quarantine_csv = tmp_path / "out" / "metadata.csv", tmp_path / "out" / "quarantine.csv"
    result = run_convert([*good, *bad.values()], [], tmp_path / "out" / "img", meta_csv, quarantine_csv,
                         size=32, on_bad_input="skip")
    quarantined = pd.read_csv(quarantine_csv)
    assert list(quarantined.columns) == ["stage", "item", "reason"]
    assert sorted(quarantined["item"]) == sorted(str(p) for p in bad.values())
    assert all(quarantined["reason"].str.len() > 10) and set(quarantined["stage"]) == {"convert_dicom"}
    meta = pd.read_csv(meta_csv)
    assert sorted(meta["image_id"]) == sorted(p.stem for p in good)
    assert sorted(result.quarantined) == sorted(map(str, bad.values()))


def test_duplicate_image_ids_are_bad_input(tmp_path):
    a = write_dicom(tmp_path / "train" / "same.dicom", ramp())
    b = write_dicom(tmp_path / "test" / "same.dicom", ramp())
    quarantine = Quarantine("skip")
    result = convert_dicoms([a, b], tmp_path / "img", tmp_path / "metadata.csv", size=32, quarantine=quarantine)
    # paths are processed in sorted order: test/ comes first, the train/ copy is the duplicate
    assert result.metadata["source_split"].tolist() == ["test"]
    assert quarantine.items[0][0] == str(a) and f"also {b}" in quarantine.items[0][1]


def test_fail_policy_mid_run_leaves_no_metadata(tmp_path):
    paths = make_dataset(tmp_path / "vindr", 3, 0)
    meta_csv = tmp_path / "metadata.csv"
    convert_dicoms(paths, tmp_path / "img", meta_csv, size=32)  # a complete earlier run
    assert meta_csv.exists()
    bad = _bad_files(tmp_path / "bad")["truncated"][0]
    bad = bad.rename(tmp_path / "vindr" / "train" / "train001x.dicom")  # sorts between good files
    with pytest.raises(BadInputError, match="train001x.dicom"):
        convert_dicoms([*paths, bad], tmp_path / "img", meta_csv, size=32)
    assert not meta_csv.exists()  # no table claiming the new input set was converted
    assert not list((tmp_path / "img").glob(".*.png"))  # no temporary leftovers
    # finished PNGs are kept in the cache: the skip rerun only looks at the bad file
    result = convert_dicoms([*paths, bad], tmp_path / "img", meta_csv, size=32, quarantine=Quarantine("skip"))
    assert result.converted == [] and len(result.cached) == 3 and result.quarantined == [str(bad)]


def test_cache_second_run_converts_nothing_and_new_file_only_itself(tmp_path):
    paths = make_dataset(tmp_path / "vindr", 3, 1)
    out, meta_csv = tmp_path / "img", tmp_path / "metadata.csv"
    first = convert_dicoms(paths, out, meta_csv, size=32)
    assert len(first.converted) == 4 and (out / CACHE_INDEX_NAME).exists()
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")}

    second = convert_dicoms(paths, out, meta_csv, size=32)
    assert second.converted == [] and len(second.cached) == 4
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")} == stamps
    pd.testing.assert_frame_equal(second.metadata, first.metadata)

    new = write_dicom(tmp_path / "vindr" / "test" / "new.dicom", ramp(40, 60))
    third = convert_dicoms([*paths, new], out, meta_csv, size=32)
    assert third.converted == ["new"] and len(third.metadata) == 5

    # a changed source (new mtime) is converted again; a removed one leaves the table
    os.utime(paths[0], ns=(paths[0].stat().st_atime_ns, paths[0].stat().st_mtime_ns + 10**9))
    fourth = convert_dicoms([*paths[:-1], new], out, meta_csv, size=32)
    assert fourth.converted == [paths[0].stem]
    assert paths[-1].stem not in set(pd.read_csv(meta_csv)["image_id"])

    # other settings: everything again
    fifth = convert_dicoms([*paths, new], out, meta_csv, size=40)
    assert len(fifth.converted) == 5


def test_parallel_workers_give_the_same_result(tmp_path):
    paths = make_dataset(tmp_path / "vindr", 3, 2)
    serial = convert_dicoms(paths, tmp_path / "a" / "img", tmp_path / "a" / "metadata.csv", size=32, workers=1)
    parallel = convert_dicoms(paths, tmp_path / "b" / "img", tmp_path / "b" / "metadata.csv", size=32, workers=2)
    pd.testing.assert_frame_equal(serial.metadata, parallel.metadata)
    for row in serial.metadata.itertuples():
        np.testing.assert_array_equal(read_png(tmp_path / "a" / row.png), read_png(tmp_path / "b" / row.png))


@settings(max_examples=40, deadline=None)
@given(height=st.integers(8, 300), width=st.integers(8, 300), size=st.integers(8, 128),
       bit_depth=st.sampled_from([8, 16]), seed=st.integers(0, 2**16))
def test_display_png_keeps_aspect_and_full_range(height, width, size, bit_depth, seed):
    image = np.random.default_rng(seed).normal(size=(height, width)).astype(np.float32)
    out, scale = to_display_png(image, size, bit_depth)
    assert max(out.shape) == size and scale == pytest.approx(size / max(height, width))
    # each side is the scaled side rounded (a side never collapses below one pixel)
    assert abs(out.shape[0] - max(1.0, height * scale)) <= 0.5 + 1e-9
    assert abs(out.shape[1] - max(1.0, width * scale)) <= 0.5 + 1e-9
    assert out.dtype == (np.uint8 if bit_depth == 8 else np.uint16)
    assert out.min() == 0 and out.max() == (255 if bit_depth == 8 else 65535)


def test_script_runs_standalone(tmp_path):
    make_dataset(tmp_path / "vindr", 2, 1)
    (tmp_path / "vindr" / "train" / "junk.dicom").write_text("junk")
    env = dict(os.environ, CXRSSL_PROGRESS="0")
    cmd = [sys.executable, str(REPO / "scripts" / "convert_dicom.py"), "--dicom-dirs", str(tmp_path / "vindr" / "train"),
           str(tmp_path / "vindr" / "test"), str(tmp_path / "vindr" / "missing"), "--out-dir", str(tmp_path / "o" / "img"),
           "--metadata", str(tmp_path / "o" / "metadata.csv"), "--quarantine", str(tmp_path / "o" / "q.csv"),
           "--size", "24", "--bit-depth", "8", "--workers", "1", "--on-bad-input", "skip", "--log", str(tmp_path / "log")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert len(pd.read_csv(tmp_path / "o" / "metadata.csv")) == 3
    assert pd.read_csv(tmp_path / "o" / "q.csv")["item"].str.endswith("junk.dicom").all()
    assert "quarantined" in (tmp_path / "log").read_text()
    proc = subprocess.run([*cmd[:2], "--on-bad-input", "fail", *cmd[2:-6], "--log", str(tmp_path / "log2")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode != 0 and "junk.dicom" in proc.stderr


def test_nothing_convertible_is_an_error_after_the_quarantine_is_written(tmp_path):
    bad = _bad_files(tmp_path / "bad")
    quarantine_csv = tmp_path / "q.csv"
    with pytest.raises(BadInputError, match="none of the 2 DICOMs could be converted"):
        run_convert([bad["empty"][0], bad["no_pixel_data"][0]], [], tmp_path / "img", tmp_path / "metadata.csv",
                    quarantine_csv, size=32, on_bad_input="skip")
    assert len(pd.read_csv(quarantine_csv)) == 2
    with pytest.raises(BadInputError, match="no DICOM files found"):
        run_convert([], [tmp_path / "nowhere"], tmp_path / "img", tmp_path / "metadata.csv", quarantine_csv)


# --- hostile files (issue 11) --------------------------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(value=st.floats(-5e4, 7e4, allow_nan=False, width=32), height=st.integers(8, 600),
       width=st.integers(8, 600), size=st.integers(8, 256), bit_depth=st.sampled_from([8, 16]))
def test_constant_images_are_blank_whatever_the_resize(value, height, width, size, bit_depth):
    image = np.full((height, width), value, dtype=np.float32)
    with pytest.raises(BadInputError, match="blank image"):
        to_display_png(image, size, bit_depth)


def test_blank_check_comes_before_the_resize_and_keeps_faint_real_contrast():
    # A constant image whose float resize leaves ~1e-7 ripples: the old post-resize check let it
    # through and min-max stretching wrote full-range noise.
    constant = np.full((517, 311), 1234.567, dtype=np.float32)
    resized = cv2.resize(constant, (112, 186), interpolation=cv2.INTER_AREA)
    assert resized.max() > resized.min()  # the ripple the check must not be fooled by
    with pytest.raises(BadInputError, match="blank image"):
        to_display_png(constant, 186, 8)
    faint = constant.copy()
    faint[:, 150:] += 1.0  # one stored level of contrast is an image
    out, _ = to_display_png(faint, 186, 8, source_bits=12)
    assert out.min() == 0 and out.max() == 255


def _retag(path: Path, out: Path, **tags) -> Path:
    ds = pydicom.dcmread(path)
    for key, value in tags.items():
        setattr(ds, key, value)
    ds.save_as(out)
    return out


@pytest.mark.parametrize("tag", ["Rows", "Columns", "BitsAllocated", "BitsStored", "SamplesPerPixel"])
def test_multi_valued_geometry_is_bad_input(tmp_path, tag):
    good = write_dicom(tmp_path / "good.dicom", ramp())
    ds = pydicom.dcmread(good)
    value = ds.get(tag, 1)
    ds[tag].value = [value, value] if tag in ds else None
    if tag not in ds:
        ds.SamplesPerPixel = [1, 1]
    ds.save_as(tmp_path / "multi.dicom")
    with pytest.raises(BadInputError, match=f"{tag} has 2 values") as info:
        read_dicom(tmp_path / "multi.dicom")
    assert info.value.item == str(tmp_path / "multi.dicom")


def test_unknown_vr_is_bad_input(tmp_path):
    data = bytearray(write_dicom(tmp_path / "good.dicom", ramp()).read_bytes())
    at = data.find(b"\x28\x00\x10\x00US")  # (0028,0010) Rows, explicit VR little endian
    assert at > 0
    data[at + 4:at + 6] = b"ZZ"
    (tmp_path / "vr.dicom").write_bytes(bytes(data))
    with pytest.raises(BadInputError) as info:
        read_dicom(tmp_path / "vr.dicom")
    assert info.value.item == str(tmp_path / "vr.dicom")


def test_a_panicking_decoder_is_bad_input(tmp_path, monkeypatch):
    """pylibjpeg-rle panics (pyo3 PanicException, a BaseException) on this stream; the pre-decode
    RLE check would refuse it first, so it is switched off to reach the decoder."""
    good = write_dicom(tmp_path / "c.dicom", ramp(64, 80), compress=RLELossless)
    path = _retag(good, tmp_path / "panic.dicom", Columns=78)
    monkeypatch.setattr(dicom_mod, "_check_pixel_data", lambda *a: None, raising=False)
    ds = pydicom.dcmread(path)
    ds.pixel_array_options(decoding_plugin="pylibjpeg")
    with pytest.raises(BaseException) as raw:
        ds.pixel_array
    assert not isinstance(raw.value, Exception)  # really the BaseException the issue is about
    with pytest.raises(BadInputError) as info:  # the panic is caught; the next plugin sees the mismatch
        read_dicom(path)
    assert info.value.item == str(path)


def _mismatched(tmp: Path) -> dict[str, Path]:
    pixels = ramp(64, 80)
    native = write_dicom(tmp / "native.dicom", pixels)
    j2k = write_dicom(tmp / "j2k.dicom", pixels, compress=JPEG2000Lossless)
    rle = write_dicom(tmp / "rle.dicom", pixels, compress=RLELossless)
    return {
        "native_excess_padding": _retag(native, tmp / "n_pad.dicom", Rows=60),  # would crop 4 rows
        "native_too_short": _retag(native, tmp / "n_short.dicom", Rows=70),
        "j2k_swapped": _retag(j2k, tmp / "j_swap.dicom", Rows=80, Columns=64),  # would shear
        "j2k_fewer_rows": _retag(j2k, tmp / "j_rows.dicom", Rows=60),
        "rle_longer_segments": _retag(rle, tmp / "r_pad.dicom", Rows=60),
        "rle_narrower": _retag(rle, tmp / "r_cols.dicom", Columns=78),  # would shear
    }


@pytest.mark.parametrize("case", ["native_excess_padding", "native_too_short", "j2k_swapped", "j2k_fewer_rows",
                                  "rle_longer_segments", "rle_narrower"])
def test_header_and_data_disagreeing_is_an_error(tmp_path, case):
    path = _mismatched(tmp_path)[case]
    with pytest.raises(BadInputError, match="Rows") as info:
        read_dicom(path)
    assert info.value.item == str(path)


def test_decompression_bomb_is_refused_before_decoding(tmp_path, monkeypatch):
    good = write_dicom(tmp_path / "c.dicom", ramp(64, 80), compress=RLELossless)
    bomb = _retag(good, tmp_path / "bomb.dicom", Rows=16384, Columns=16384)  # 512 MB at 16 bits, file ~10 kB
    assert bomb.stat().st_size < 100_000

    def never(*args):
        raise AssertionError("decoded a bomb")

    monkeypatch.setattr(dicom_mod, "_decode", never)
    with pytest.raises(BadInputError, match=r"512 MB .*more than the 64 MB limit.*refused before decoding"):
        read_dicom(bomb)
    with pytest.raises(BadInputError, match="more than the 4 MB limit"):
        read_dicom(write_dicom(tmp_path / "big.dicom", ramp(1500, 1500)), max_decoded_mb=4)  # 4.3 MB native
    quarantine = Quarantine("skip")
    convert_dicoms([bomb, good], tmp_path / "img", tmp_path / "metadata.csv", size=32, quarantine=quarantine,
                   max_decoded_mb=64)
    assert [item for item, _ in quarantine.items] == [str(bomb)]


def test_skip_run_survives_every_hostile_file(tmp_path):
    """One bad file of each kind never aborts a skip run: each is quarantined, named, and the rest converted."""
    good = make_dataset(tmp_path / "vindr", 2, 1)
    hostile = {**_mismatched(tmp_path / "m"), **{k: p for k, (p, _) in _bad_files(tmp_path / "b").items()}}
    multi = pydicom.dcmread(good[0])
    multi["Rows"].value = [64, 64]
    multi.save_as(tmp_path / "multi.dicom")
    hostile["multi"] = tmp_path / "multi.dicom"
    hostile["bomb"] = _retag(write_dicom(tmp_path / "s.dicom", ramp(), compress=RLELossless), tmp_path / "bomb.dicom",
                             Rows=16000, Columns=16000)
    paths = [*good, *hostile.values()]
    result = run_convert(paths, [], tmp_path / "out" / "img", tmp_path / "out" / "metadata.csv",
                         tmp_path / "out" / "q.csv", size=32, workers=2, on_bad_input="skip")
    assert sorted(result.metadata["image_id"]) == sorted(p.stem for p in good)
    quarantined = pd.read_csv(tmp_path / "out" / "q.csv")
    assert sorted(quarantined["item"]) == sorted(map(str, hostile.values()))


def _fifo(path: Path) -> Path:
    """A named pipe with no writer: opening it blocks forever (a stand-in for a decoder that hangs)."""
    os.mkfifo(path)
    return path


def test_a_hanging_file_is_stopped_and_quarantined(tmp_path):
    paths = make_dataset(tmp_path / "vindr", 2, 0)
    stuck = _fifo(tmp_path / "vindr" / "train" / "stuck.dicom")
    quarantine = Quarantine("skip")
    result = convert_dicoms([*paths, stuck], tmp_path / "img", tmp_path / "metadata.csv", size=32,
                            quarantine=quarantine, timeout_s=2)
    assert len(result.metadata) == 2
    assert quarantine.items[0][0] == str(stuck) and "stopped after 2 s" in quarantine.items[0][1]


def test_a_killed_worker_is_retried_then_quarantined_and_the_run_finishes(tmp_path):
    """SIGKILL of the conversion worker (as the OOM killer would) must not hang the stage."""
    import signal
    import threading

    import psutil
    import worker_tasks

    paths = make_dataset(tmp_path / "vindr", 3, 0)
    stuck = _fifo(tmp_path / "vindr" / "train" / "stuck.dicom")
    out, quarantine, done = tmp_path / "img", Quarantine("skip"), {}
    thread = threading.Thread(target=lambda: done.setdefault("result", convert_dicoms(
        [*paths, stuck], out, tmp_path / "metadata.csv", size=32, quarantine=quarantine, workers=1)), daemon=True)
    thread.start()
    for _ in range(2):  # the first attempt and its retry
        deadline, stuck_on_it = time.monotonic() + 60, []
        while not stuck_on_it and time.monotonic() < deadline:
            stuck_on_it = [w for w in worker_tasks.pool_workers() if worker_tasks.blocked_on_fifo(w)]
            time.sleep(0.05)
        assert stuck_on_it, "no conversion worker on the stuck file"
        for worker in stuck_on_it:
            worker.send_signal(signal.SIGKILL)
        psutil.wait_procs(stuck_on_it, timeout=10)
    thread.join(timeout=60)
    assert not thread.is_alive(), "the stage hung after its worker was killed"
    assert sorted(done["result"].metadata["image_id"]) == sorted(p.stem for p in paths)
    (item, reason), = quarantine.items
    assert item == str(stuck) and "killed by SIGKILL" in reason and "2 attempts" in reason


def test_full_disk_names_the_file_and_never_hides_the_first_error(tmp_path, monkeypatch, caplog):
    import errno

    import cxrssl.data.convert as convert_mod

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, f"could not write {tmp_path / 'img' / CACHE_INDEX_NAME}: No space left on device")

    paths = make_dataset(tmp_path / "vindr", 2, 0)
    bad = _bad_files(tmp_path / "bad")["truncated"][0]
    monkeypatch.setattr(convert_mod, "atomic_write_csv", full)
    # the cache record cannot be written in `finally`: the user still sees the bad file, not ENOSPC
    with pytest.raises(BadInputError, match="trunc.dicom"):
        convert_dicoms([*paths, bad], tmp_path / "img", tmp_path / "metadata.csv", size=32)
    assert "No space left on device" in caplog.text and CACHE_INDEX_NAME in caplog.text
    # no other error: the failed write itself is the error, naming the file and the reason
    with pytest.raises(OSError, match=rf"{CACHE_INDEX_NAME}: No space left on device") as info:
        convert_dicoms(paths, tmp_path / "img", tmp_path / "metadata.csv", size=32)
    assert info.value.errno == errno.ENOSPC
    monkeypatch.undo()
    # a PNG that cannot be written stops the run (not bad input), naming the PNG
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device")))
    with pytest.raises(OSError, match=r"could not write .*\.png: No space left on device"):
        convert_dicoms(paths[:1], tmp_path / "img2", tmp_path / "metadata2.csv", size=32, workers=0)


def test_two_jobs_on_one_output_folder(tmp_path):
    from worker_tasks import hold_lock

    from cxrssl.io import OutputBusyError

    paths = make_dataset(tmp_path / "vindr", 2, 0)
    holder = hold_lock(tmp_path / "img" / ".lock")
    try:
        with pytest.raises(OutputBusyError, match=f"image folder {tmp_path / 'img'} is being written by another job"):
            convert_dicoms(paths, tmp_path / "img", tmp_path / "metadata.csv", size=32)
    finally:
        holder.kill()
        holder.wait()
    convert_dicoms(paths, tmp_path / "img", tmp_path / "metadata.csv", size=32)
    assert len(pd.read_csv(tmp_path / "metadata.csv")) == 2


def test_outputs_hold_relative_paths_only(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_dataset(Path("vindr"), 2, 1)
    Path("vindr/train/junk.dicom").write_text("junk")
    run_convert([], ["vindr/train", "vindr/test"], "out/img", "out/metadata.csv", "out/q.csv", size=32,
                on_bad_input="skip")
    cache = pd.read_csv("out/img/" + CACHE_INDEX_NAME)
    assert sorted(cache["source"]) == ["test/test000.dicom", "train/train000.dicom", "train/train001.dicom"]
    assert pd.read_csv("out/q.csv")["item"].tolist() == ["vindr/train/junk.dicom"]
    for path in Path("out").rglob("*"):
        if path.is_file():
            assert str(tmp_path).encode() not in path.read_bytes(), path


@pytest.mark.parametrize("descriptor, data, words", [([3, 0, 16], [0, 1], "declares 3 entries"),
                                                      ([4, 0, 33], [0, 1, 2, 3], "33 bits per entry"),
                                                      ([1, 0, 8], None, "without LUTDescriptor or LUTData")])
def test_a_lut_that_does_not_match_its_descriptor_is_refused(tmp_path, descriptor, data, words):
    """Found by the fuzz suite: pydicom read past a short LUT, or ignored an empty one."""
    item = Dataset()
    item.LUTDescriptor = descriptor
    item.LUTData = data
    item["LUTData"].VR = "US"
    path = write_dicom(tmp_path / "lut.dicom", ramp(), VOILUTSequence=[item])
    with pytest.raises(BadInputError, match=words):
        read_dicom(path)
