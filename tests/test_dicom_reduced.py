"""JPEG 2000 decoded at a reduced resolution level when the output is smaller (issue 15).

The reduced decode must be chosen only when the level still covers the output on both axes, give
the stored values pydicom's full decode gives (at a coarser grid), and leave the modality/VOI
transforms, the MONOCHROME1 inversion and the cache's settings working as for full decodes.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from PIL import Image
from pydicom.uid import JPEG2000, JPEG2000Lossless

import cxrssl.data.dicom as dicom_mod
from cxrssl.data.convert import CACHE_INDEX_NAME, convert_dicoms, to_display_png
from cxrssl.data.dicom import level_shape, read_dicom, reduced_level
from test_dicom import _lut_item, read_png, write_dicom

#: Largest mean and largest single absolute difference (8-bit grey levels) between the PNG of a
#: reduced decode and the PNG of the full decode + resize, on the noisy radiograph-like images below
#: (measured 0.47 to 0.68 and 3 to 4: the wavelet low-pass is not area averaging, and keeps a little
#: more of the noise, which also moves the min-max scaling).
MAE_TOLERANCE, MAX_TOLERANCE = 1.0, 6


def chest(height: int, width: int, bits: int, seed: int = 0) -> np.ndarray:
    """A smooth body with two darker lungs and noise (1 % of the range), spanning ``bits`` bits."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    body = np.exp(-(((yy - height / 2) / (0.45 * height)) ** 2 + ((xx - width / 2) / (0.4 * width)) ** 2))
    lungs = np.exp(-(((yy - height / 2) / (0.25 * height)) ** 2
                     + ((np.abs(xx - width / 2) - 0.18 * width) / (0.1 * width)) ** 2))
    top = 2**bits - 1
    image = top * (0.1 + 0.8 * body - 0.4 * lungs) + rng.normal(0, top / 100, (height, width))
    return np.clip(np.rint(image), 0, top).astype(np.uint16)


def j2k_dicom(path: Path, pixels: np.ndarray, bits: int, lossy: bool = False, **tags) -> Path:
    """A JPEG 2000 DICOM (lossless, or lossy at 10:1) encoded by pylibjpeg-openjpeg."""
    write_dicom(path, pixels, bits=bits, **tags)
    ds = pydicom.dcmread(path)
    if lossy:
        ds.compress(JPEG2000, encoding_plugin="pylibjpeg", j2k_cr=[10])
    else:
        ds.compress(JPEG2000Lossless, encoding_plugin="pylibjpeg")
    ds.save_as(path, enforce_file_format=True)
    return path


def header(path: Path) -> dicom_mod.J2KHeader:
    frame = next(dicom_mod.generate_frames(pydicom.dcmread(path).PixelData, number_of_frames=1))
    return dicom_mod._j2k_header(frame)


@pytest.mark.parametrize("rows,cols,size,levels,expected", [
    (3000, 2500, 1024, 5, 1),  # 1500 x 1250 covers 1024 x 853; 750 x 625 does not
    (2500, 3000, 1024, 5, 1),  # landscape
    (3000, 2500, 1500, 5, 1),  # exactly half
    (3000, 2500, 1501, 5, 0),  # larger than half the image: full resolution
    (3000, 2500, 2048, 5, 0),
    (3000, 2500, 512, 5, 2),
    (3000, 2500, 256, 5, 3),
    (3000, 2500, 256, 2, 2),  # no deeper than the codestream's decomposition levels
    (3000, 2500, 256, 0, 0),
    (4096, 4096, 1024, 5, 2),
    (1024, 800, 1024, 5, 0),  # no shrinking at all
    (800, 600, 2048, 5, 0),  # enlarged
    (4097, 4097, 1024, 5, 1),  # level 2 covers it, but Pillow would size it 1024 where openjpeg gives 1025
    (3003, 2500, 256, 5, 2),  # the same at level 3 (3003 % 8 = 3)
])
def test_the_level_is_the_coarsest_that_covers_the_output(rows, cols, size, levels, expected):
    assert reduced_level(rows, cols, size, levels) == expected


@pytest.mark.parametrize("bits,signed", [(12, False), (14, False), (16, False), (12, True), (16, True)])
def test_pillow_samples_are_the_stored_values_pydicom_decodes(tmp_path, bits, signed):
    pixels = chest(64, 80, bits)
    tags = {}
    if signed:  # two's complement as pydicom writes it: the same picture, centred on 0
        pixels = (pixels.astype(np.int32) - 2 ** (bits - 1)).astype(np.int16)
        tags = dict(PixelRepresentation=1)
    path = j2k_dicom(tmp_path / "s.dcm", pixels.view(np.uint16), bits, **tags)
    ds = pydicom.dcmread(path)
    j2k = header(path)
    assert (j2k.precision, j2k.signed, j2k.components, j2k.plain) == (bits, signed, 1, True) and j2k.levels >= 1
    assert dicom_mod._reducible(ds, j2k, bits, 16)
    reference = ds.pixel_array
    level0 = dicom_mod._decode_level(path, ds, j2k, 0)
    assert level0.dtype == reference.dtype
    np.testing.assert_array_equal(level0, reference)
    np.testing.assert_array_equal(level0, pixels)
    assert dicom_mod._decode_level(path, ds, j2k, 1).shape == (32, 40)


def _pngs(path: Path, size: int) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """(PNG of the reduced decode, PNG of the full decode, shape the reduced decode had)."""
    full, meta = read_dicom(path)
    reduced, reduced_meta = read_dicom(path, longest_side=size)
    assert reduced_meta == meta
    png_full, scale_full = to_display_png(full, size, 8)
    png, scale = to_display_png(reduced, size, 8, orig_shape=(meta["orig_height"], meta["orig_width"]))
    assert png.shape == png_full.shape and scale == scale_full
    return png, png_full, reduced.shape


def mae(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(int) - b.astype(int)).mean())


# name -> (bits, size, lossy, write_dicom tags)
VARIANTS = {
    "12bit": (12, 128, False, {}),
    "14bit_monochrome1_window": (14, 128, False, dict(photometric="MONOCHROME1", WindowCenter=9000, WindowWidth=9000)),
    "16bit": (16, 128, False, {}),
    "12bit_voi_lut": (12, 128, False, dict(VOILUTSequence=[_lut_item(4096, 0)])),
    "12bit_level2": (12, 80, False, {}),
    "12bit_lossy": (12, 128, True, {}),
    "16bit_lossy_monochrome1": (16, 128, True, dict(photometric="MONOCHROME1")),
}


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_a_reduced_decode_matches_the_full_decode_and_resize(tmp_path, name):
    bits, size, lossy, tags = VARIANTS[name]
    pixels = chest(360, 300, bits)
    path = j2k_dicom(tmp_path / f"{name}.dcm", pixels, bits, lossy=lossy, **tags)
    png, png_full, shape = _pngs(path, size)
    level = 2 if size == 80 else 1
    assert shape == level_shape(360, 300, level)  # 180 x 150 (or 90 x 75) covers 128 x 107 (80 x 67)
    assert mae(png, png_full) <= MAE_TOLERANCE and np.abs(png.astype(int) - png_full.astype(int)).max() <= MAX_TOLERANCE
    # the VOI transform and the inversion were applied: the variant's own PNG, not the plain one
    plain, _, _ = _pngs(j2k_dicom(tmp_path / "plain.dcm", pixels, bits, lossy=lossy), size)
    if tags:
        assert mae(png, plain) > 10 * MAE_TOLERANCE
    if tags.get("photometric") == "MONOCHROME1" and "WindowCenter" not in tags:
        np.testing.assert_array_equal(png.astype(int), 255 - plain.astype(int))


def test_odd_sides_fall_back_to_the_level_pillow_sizes_right(tmp_path):
    path = j2k_dicom(tmp_path / "odd.dcm", chest(401, 333, 12), 12)
    assert reduced_level(401, 333, 64, header(path).levels) == 1  # level 2 covers 64 px, but 401 % 4 == 1
    image, _ = read_dicom(path, longest_side=64)
    assert image.shape == (201, 167)
    frame = next(dicom_mod.generate_frames(pydicom.dcmread(path).PixelData, number_of_frames=1))
    with Image.open(io.BytesIO(frame)) as im:  # why: Pillow cannot decode level 2 of this frame
        im.reduce = 2
        with pytest.raises(OSError, match="broken data stream"):
            im.load()


def test_full_resolution_when_not_allowed_or_not_plain(tmp_path):
    pixels = chest(200, 160, 12)
    path = j2k_dicom(tmp_path / "a.dcm", pixels, 12)
    assert read_dicom(path)[0].shape == (200, 160)  # no size given
    assert read_dicom(path, longest_side=101)[0].shape == (200, 160)  # more than half the image
    assert read_dicom(path, longest_side=100)[0].shape == (100, 80)
    # a codestream whose precision is not BitsStored: pydicom corrects it, so the full decode decides
    ds = pydicom.dcmread(path)
    ds.BitsStored, ds.HighBit = 14, 13
    ds.save_as(tmp_path / "b.dcm")
    assert read_dicom(tmp_path / "b.dcm", longest_side=50)[0].shape == (200, 160)
    native = write_dicom(tmp_path / "n.dcm", pixels)
    assert read_dicom(native, longest_side=50)[0].shape == (200, 160)


def test_a_pillow_failure_leaves_the_full_decode_to_decide(tmp_path, monkeypatch):
    path = j2k_dicom(tmp_path / "a.dcm", chest(200, 160, 12), 12)
    expected, _ = read_dicom(path)

    def broken(*args, **kwargs):
        raise OSError("simulated decoder failure")

    monkeypatch.setattr(dicom_mod.Image, "open", broken)
    image, _ = read_dicom(path, longest_side=64)
    np.testing.assert_array_equal(image, expected)


def test_the_setting_is_part_of_the_cache_key_for_jpeg2000_only(tmp_path):
    j2k = j2k_dicom(tmp_path / "vindr" / "train" / "j.dicom", chest(200, 160, 12), 12)
    native = write_dicom(tmp_path / "vindr" / "train" / "n.dicom", chest(200, 160, 12, seed=1))
    out, meta_csv = tmp_path / "img", tmp_path / "metadata.csv"
    first = convert_dicoms([j2k, native], out, meta_csv, size=64)
    reduced = read_png(out / "j.png")
    full = convert_dicoms([j2k, native], out, meta_csv, size=64, j2k_reduce=False)
    assert full.converted == ["j"] and full.cached == ["n"]
    assert reduced.shape == read_png(out / "j.png").shape and 0 < mae(reduced, read_png(out / "j.png")) <= MAE_TOLERANCE
    pd.testing.assert_frame_equal(first.metadata, full.metadata)  # same sizes and scale: only pixels differ
    # a cache record from before the setting existed holds full decodes
    cache = pd.read_csv(out / CACHE_INDEX_NAME)
    cache.drop(columns="j2k_reduce").to_csv(out / CACHE_INDEX_NAME, index=False)
    again = convert_dicoms([j2k, native], out, meta_csv, size=64)
    assert again.converted == ["j"] and again.cached == ["n"]
    np.testing.assert_array_equal(read_png(out / "j.png"), reduced)
