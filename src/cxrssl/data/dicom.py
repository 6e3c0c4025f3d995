"""Read one chest X-ray DICOM into a display-ready grey image.

The steps are the ones radiology viewers apply: modality LUT (rescale slope/intercept), then the
VOI transform (a VOI LUT sequence if present, else the window centre/width), then MONOCHROME1
inversion so that a bright pixel always means dense tissue. Decoding goes through pydicom's pixel
plugins: JPEG 2000 via pylibjpeg-openjpeg or python-gdcm, JPEG-LS and JPEG lossless via
pylibjpeg-libjpeg or python-gdcm, RLE via pylibjpeg-rle or pydicom's own numpy decoder. JPEG 2000
prefers pylibjpeg-openjpeg (single-threaded, ~20 % less CPU per image than gdcm for the same
lossless result) and falls back to the other plugins if it fails on a file.

Speed: for integer pixel data the modality + VOI transform is evaluated by pydicom once per
distinct stored value (a table over the image's value range) and then looked up per pixel. The
table entries come from the very same pydicom functions on the very same dtype, so the result is
bit-identical to transforming the whole image, at a fraction of the float64 work.

Anything that cannot be used raises :class:`cxrssl.errors.BadInputError` naming the file. The
metadata returned holds technical fields only (see ``METADATA_KEYS``): no patient identifier ever
leaves this module.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import pydicom
from pydicom.pixels import apply_modality_lut, apply_voi_lut, get_decoder
from pydicom.uid import (
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    HTJ2K,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    ImplicitVRLittleEndian,
    JPEG2000,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLSNearLossless,
)

from cxrssl.errors import BadInputError

log = logging.getLogger(__name__)

#: The only fields :func:`read_dicom` reports (technical, never identifying).
METADATA_KEYS = ("photometric", "bits_stored", "transfer_syntax", "orig_height", "orig_width", "voi")

#: Smallest and largest plausible side of a radiograph, in pixels.
MIN_SIDE, MAX_SIDE = 8, 16384

#: Which installable plugin decodes which compressed transfer syntax (for error messages).
_PLUGIN_HINTS = {
    "1.2.840.10008.1.2.4.90": "pylibjpeg-openjpeg or python-gdcm",  # JPEG 2000 lossless
    "1.2.840.10008.1.2.4.91": "pylibjpeg-openjpeg or python-gdcm",  # JPEG 2000
    "1.2.840.10008.1.2.4.201": "pylibjpeg-openjpeg",  # HTJ2K lossless
    "1.2.840.10008.1.2.4.202": "pylibjpeg-openjpeg",  # HTJ2K lossless RPCL
    "1.2.840.10008.1.2.4.203": "pylibjpeg-openjpeg",  # HTJ2K
    "1.2.840.10008.1.2.4.80": "pylibjpeg-libjpeg or python-gdcm",  # JPEG-LS lossless
    "1.2.840.10008.1.2.4.81": "pylibjpeg-libjpeg or python-gdcm",  # JPEG-LS near-lossless
    "1.2.840.10008.1.2.4.57": "pylibjpeg-libjpeg or python-gdcm",  # JPEG lossless
    "1.2.840.10008.1.2.4.70": "pylibjpeg-libjpeg or python-gdcm",  # JPEG lossless SV1
    "1.2.840.10008.1.2.4.50": "pylibjpeg-libjpeg, python-gdcm or pillow",  # JPEG baseline
    "1.2.840.10008.1.2.4.51": "pylibjpeg-libjpeg, python-gdcm or pillow",  # JPEG extended
    "1.2.840.10008.1.2.5": "pylibjpeg-rle (or numpy)",  # RLE lossless
}


#: Decoding plugin tried first per transfer syntax (measured faster per core); others are the fallback.
_PREFERRED_PLUGIN = {uid: "pylibjpeg" for uid in (JPEG2000Lossless, JPEG2000, HTJ2KLossless,
                                                   HTJ2KLosslessRPCL, HTJ2K)}

#: Largest value range (max - min + 1) transformed through a lookup table; 16-bit data always fit.
LUT_MAX_ENTRIES = 2**16


def _not_dicom(path: Path, ds: pydicom.Dataset) -> bool:
    """True when force=True parsed something that has none of an image's defining tags."""
    has_preamble = getattr(ds, "preamble", None) is not None
    image_tags = ("PixelData", "Rows", "Columns", "SOPClassUID", "Modality", "PhotometricInterpretation")
    return not has_preamble and not any(t in ds for t in image_tags)


def _sniff_codec(pixel_data: bytes) -> UID | None:
    """Guess the codec of encapsulated pixel data from its first codestream bytes."""
    head = bytes(pixel_data[:4096])
    if b"\xff\x4f\xff\x51" in head or b"jP  \r\n\x87\n" in head:
        return JPEG2000
    soi = head.find(b"\xff\xd8\xff")
    if soi >= 0:
        if b"\xff\xf7" in head[soi:]:  # SOF55: JPEG-LS
            return JPEGLSNearLossless
        if b"\xff\xc3" in head[soi:]:  # SOF3: lossless (process 14)
            return JPEGLosslessSV1
    return None


def _ensure_transfer_syntax(path: Path, ds: pydicom.Dataset) -> str:
    """Return the transfer syntax, inferring it when the file meta lacks one (PhysioNet files).

    Uncompressed data are read as the encoding pydicom detected while parsing (implicit/explicit
    VR, endianness); compressed data are identified from their codestream markers.
    """
    meta = ds.file_meta
    ts = meta.get("TransferSyntaxUID")
    if ts:
        return str(ts)
    element = ds["PixelData"]
    if element.is_undefined_length:  # encapsulated = compressed
        guessed = _sniff_codec(element.value)
        if guessed is None:
            raise BadInputError(str(path), "compressed pixel data but no TransferSyntaxUID in the file meta, "
                                           "and the codec could not be recognised from the codestream")
        inferred = guessed
    else:
        implicit, little = ds.original_encoding
        if little is False:
            inferred = ExplicitVRBigEndian
        else:
            inferred = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    log.debug("%s: no TransferSyntaxUID, inferred %s", path, inferred.name)
    meta.TransferSyntaxUID = inferred
    return str(inferred)


def _check_geometry(path: Path, ds: pydicom.Dataset) -> None:
    for tag in ("Rows", "Columns", "BitsAllocated", "PhotometricInterpretation"):
        if ds.get(tag) in (None, ""):
            raise BadInputError(str(path), f"missing {tag} element")
    rows, cols = int(ds.Rows), int(ds.Columns)
    if not (MIN_SIDE <= rows <= MAX_SIDE and MIN_SIDE <= cols <= MAX_SIDE):
        raise BadInputError(str(path), f"implausible image size Rows={rows} Columns={cols} "
                                       f"(expected {MIN_SIDE}..{MAX_SIDE} pixels per side)")
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    photometric = str(ds.PhotometricInterpretation)
    if samples != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise BadInputError(str(path), f"not a grey radiograph (SamplesPerPixel={samples}, "
                                       f"PhotometricInterpretation={photometric}); expected MONOCHROME1/2")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames != 1:
        raise BadInputError(str(path), f"{frames} frames; expected a single-frame radiograph")
    allocated = int(ds.BitsAllocated)
    stored = int(ds.get("BitsStored", allocated) or allocated)
    if allocated not in (8, 16, 32) or not 1 <= stored <= allocated:
        raise BadInputError(str(path), f"implausible bit depth BitsAllocated={allocated} BitsStored={stored}")


def _decode(path: Path, ds: pydicom.Dataset, ts: str) -> np.ndarray:
    uid = UID(ts)
    try:
        decoder = get_decoder(uid)
    except NotImplementedError:
        raise BadInputError(str(path), f"unsupported transfer syntax {ts} ({uid.name}): pydicom has no "
                                       "pixel data decoder for it") from None
    if not decoder.is_available:
        missing = "; ".join(decoder.missing_dependencies) or "no plugin installed"
        hint = _PLUGIN_HINTS.get(ts, "a pydicom pixel data plugin")
        raise BadInputError(str(path), f"transfer syntax {ts} ({uid.name}) cannot be decoded here: install "
                                       f"{hint} ({missing})")
    preferred = _PREFERRED_PLUGIN.get(uid)
    if preferred in decoder.available_plugins and len(decoder.available_plugins) > 1:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds.pixel_array_options(decoding_plugin=preferred)
                return ds.pixel_array
        except Exception as exc:  # noqa: BLE001 - let the other plugins try before giving up
            log.debug("%s: plugin %s failed (%s: %s), trying the others", path, preferred, type(exc).__name__, exc)
        ds.pixel_array_options(decoding_plugin="")  # pydicom's own order over every available plugin
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom warns about fixable header quirks per file
            return ds.pixel_array
    except Exception as exc:  # noqa: BLE001 - any decoder failure is a property of this file
        raise BadInputError(str(path), f"cannot decode pixel data ({uid.name}): "
                                       f"{type(exc).__name__}: {exc}") from None


def _lookup_table(pixels: np.ndarray, ds: pydicom.Dataset) -> tuple[np.ndarray, np.ndarray] | None:
    """``(table, index)`` with ``table[index]`` equal to the modality + VOI transform of ``pixels``.

    ``table`` (float32) is pydicom's transform of every value from the image's minimum to its
    maximum, computed in the pixels' own dtype so that every branch (signed arithmetic, LUT
    clipping, windowing) behaves exactly as on the full image. ``index`` is ``pixels - minimum``
    as unsigned integers. ``None`` when the data are not integers or their range is too large.
    """
    if pixels.dtype.kind not in "iu" or pixels.size == 0:
        return None
    lo, hi = int(pixels.min()), int(pixels.max())
    if hi - lo + 1 > LUT_MAX_ENTRIES:
        return None
    values = np.arange(lo, hi + 1, dtype=pixels.dtype)
    table = apply_voi_lut(apply_modality_lut(values, ds), ds, prefer_lut=True)
    table = np.asarray(table, dtype=np.float32)
    if lo == 0 and pixels.dtype.kind == "u":
        return table, pixels
    # Offsets in the same-width unsigned type: wrap-around subtraction is exact because
    # 0 <= pixel - lo < 2**bits, and it never widens the (large) pixel array.
    unsigned = np.dtype(pixels.dtype.str.replace("i", "u"))
    index = np.subtract(pixels.view(unsigned), unsigned.type(lo % 2 ** (8 * unsigned.itemsize)))
    return table, index


def voi_transform(pixels: np.ndarray, ds: pydicom.Dataset, use_table: bool = True) -> np.ndarray:
    """Modality LUT then VOI LUT or window (pydicom's), as float32 (H, W); no MONOCHROME1 flip.

    Integer data go through :func:`_lookup_table` (bit-identical and much faster) unless
    ``use_table`` is false; float data or huge value ranges are transformed directly.
    """
    lookup = _lookup_table(pixels, ds) if use_table else None
    if lookup is not None:
        table, index = lookup
        return table[index]
    image = np.asarray(apply_voi_lut(apply_modality_lut(pixels, ds), ds, prefer_lut=True), dtype=np.float32)
    return image if image.flags.writeable else image.copy()  # callers flip MONOCHROME1 in place


def read_dicom(path: str | Path) -> tuple[np.ndarray, dict]:
    """Read ``path`` and return ``(image, metadata)``.

    ``image`` is float32 (H, W) in VOI output units after the modality LUT, VOI LUT or windowing
    and MONOCHROME1 inversion: higher values are brighter. ``metadata`` has exactly
    ``METADATA_KEYS``: ``photometric``, ``bits_stored``, ``transfer_syntax`` (the UID, inferred
    when the file meta lacks it), ``orig_height``, ``orig_width`` and ``voi`` (``lut``,
    ``window`` or ``none``: which VOI transform was applied).
    """
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path, force=True)
    except FileNotFoundError:
        raise BadInputError(str(path), "file not found") from None
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types for garbage/truncated input
        raise BadInputError(str(path), f"not a readable DICOM file (truncated or corrupt): "
                                       f"{type(exc).__name__}: {exc}") from None
    if _not_dicom(path, ds):
        raise BadInputError(str(path), "not a DICOM file (no preamble and no image elements)")
    if "PixelData" not in ds:
        raise BadInputError(str(path), "no PixelData element: the file holds no image, or it is truncated before the image")
    _check_geometry(path, ds)
    ts = _ensure_transfer_syntax(path, ds)
    pixels = _decode(path, ds, ts)

    rows, cols = int(ds.Rows), int(ds.Columns)
    if pixels.shape != (rows, cols):
        raise BadInputError(str(path), f"decoded pixel array has shape {pixels.shape}, header says "
                                       f"Rows={rows} Columns={cols}")
    has_lut = bool(ds.get("VOILUTSequence")) and "LUTData" in ds.VOILUTSequence[0]
    has_window = ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None
    voi = "lut" if has_lut else "window" if has_window else "none"
    try:
        image = voi_transform(pixels, ds)
    except Exception as exc:  # noqa: BLE001 - malformed LUT/window values
        raise BadInputError(str(path), f"invalid modality/VOI LUT or window values: "
                                       f"{type(exc).__name__}: {exc}") from None
    del pixels
    lo, hi = image.min(), image.max()  # NaN propagates into these, inf is caught by the check
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise BadInputError(str(path), "non-finite pixel values after the VOI transform")
    photometric = str(ds.PhotometricInterpretation)
    if photometric == "MONOCHROME1":
        # Linear flip within the image's own range: after min-max scaling this equals inverting
        # against the full VOI output range. In place: no second full-size array.
        np.subtract(hi + lo, image, out=image)
    meta = {
        "photometric": photometric,
        "bits_stored": int(ds.get("BitsStored", ds.BitsAllocated)),
        "transfer_syntax": ts,
        "orig_height": rows,
        "orig_width": cols,
        "voi": voi,
    }
    return image, meta
