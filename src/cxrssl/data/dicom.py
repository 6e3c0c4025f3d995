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

Anything that cannot be used raises :class:`cxrssl.errors.BadInputError` naming the file, whatever
failed inside pydicom or a decoder (a Rust decoder's ``PanicException`` is a ``BaseException``).
Before anything is decoded, the header must describe one grey frame whose decoded size stays under
``max_decoded_mb`` (decompression bombs are refused unread), and the pixel data must agree with
Rows x Columns: uncompressed data of exactly that length (plus DICOM's one padding byte), a JPEG
2000 / JPEG / JPEG-LS codestream declaring the same size, RLE segments decoding to exactly
Rows x Columns bytes. A mismatch is an error, never a crop or a sheared reshape. The metadata
returned holds technical fields only (see ``METADATA_KEYS``): no patient identifier ever leaves
this module.
"""

from __future__ import annotations

import logging
import os
import re
import struct
import warnings
from pathlib import Path

import numpy as np
import pydicom
from pydicom.encaps import generate_frames
from pydicom.multival import MultiValue
from pydicom.pixels import apply_modality_lut, apply_voi_lut, get_decoder
from pydicom.pixels.utils import _get_jpg_parameters
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
    JPEGLSTransferSyntaxes,
    JPEGTransferSyntaxes,
    JPEG2000TransferSyntaxes,
    RLELossless,
)

from cxrssl.errors import BadInputError

log = logging.getLogger(__name__)

#: The only fields :func:`read_dicom` reports (technical, never identifying).
METADATA_KEYS = ("photometric", "bits_stored", "transfer_syntax", "orig_height", "orig_width", "voi")

#: Smallest and largest plausible side of a radiograph, in pixels.
MIN_SIDE, MAX_SIDE = 8, 16384
#: Default largest decoded frame in MB (a 5,600 px square at 16 bits); ``vindr.convert.max_decoded_mb``.
DEFAULT_MAX_DECODED_MB = 64
MB = 2**20
#: Exceptions that must stop the program, never be turned into a bad-input report.
_FATAL = (KeyboardInterrupt, SystemExit)
#: pydicom warnings (silenced otherwise) that mean the header and the data disagree.
_MISMATCH_WARNING = re.compile(r"padding|End of file reached|contain \d+ frames", re.IGNORECASE)

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
#: RLE segment lengths are checked before decoding, so the fast pylibjpeg-rle decoder is safe to use.
_PREFERRED_PLUGIN = {uid: "pylibjpeg" for uid in (JPEG2000Lossless, JPEG2000, HTJ2KLossless,
                                                   HTJ2KLosslessRPCL, HTJ2K, RLELossless)}

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


def _int_tag(path: Path, ds: pydicom.Dataset, keyword: str, default: int | None = None) -> int:
    """One integer element; a missing (when no default), multi-valued or non-integer one is bad input."""
    value = ds.get(keyword)
    if value is None or value == "":
        if default is None:
            raise BadInputError(str(path), f"missing {keyword} element")
        return default
    if isinstance(value, (MultiValue, list, tuple)):
        raise BadInputError(str(path), f"{keyword} has {len(value)} values ({list(value)[:4]}); expected one integer")
    try:
        number = int(value)
    except (TypeError, ValueError, OverflowError):
        raise BadInputError(str(path), f"{keyword} is not an integer: {str(value)[:40]!r}") from None
    if number != value and not isinstance(value, (bytes, str)):
        raise BadInputError(str(path), f"{keyword} is not an integer: {value!r}")
    return number


def _check_geometry(path: Path, ds: pydicom.Dataset, max_bytes: int) -> tuple[int, int, int]:
    """``(rows, columns, bits_allocated)`` of a plausible single grey frame within ``max_bytes``."""
    rows, cols = _int_tag(path, ds, "Rows"), _int_tag(path, ds, "Columns")
    allocated = _int_tag(path, ds, "BitsAllocated")
    if ds.get("PhotometricInterpretation") in (None, ""):
        raise BadInputError(str(path), "missing PhotometricInterpretation element")
    if not (MIN_SIDE <= rows <= MAX_SIDE and MIN_SIDE <= cols <= MAX_SIDE):
        raise BadInputError(str(path), f"implausible image size Rows={rows} Columns={cols} "
                                       f"(expected {MIN_SIDE}..{MAX_SIDE} pixels per side)")
    samples = _int_tag(path, ds, "SamplesPerPixel", 1)
    photometric = str(ds.PhotometricInterpretation)
    if samples != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise BadInputError(str(path), f"not a grey radiograph (SamplesPerPixel={samples}, "
                                       f"PhotometricInterpretation={photometric[:40]}); expected MONOCHROME1/2")
    frames = _int_tag(path, ds, "NumberOfFrames", 1)
    if frames != 1:
        raise BadInputError(str(path), f"{frames} frames; expected a single-frame radiograph")
    stored = _int_tag(path, ds, "BitsStored", allocated)
    if allocated not in (8, 16, 32) or not 1 <= stored <= allocated:
        raise BadInputError(str(path), f"implausible bit depth BitsAllocated={allocated} BitsStored={stored}")
    decoded = rows * cols * allocated // 8
    if decoded > max_bytes:
        raise BadInputError(str(path), f"the decoded frame would take {decoded / MB:.0f} MB (Rows {rows} x Columns "
                                       f"{cols} x {allocated} bits), more than the {max_bytes / MB:.0f} MB limit "
                                       "(vindr.convert.max_decoded_mb); refused before decoding")
    return rows, cols, allocated


def _check_luts(path: Path, ds: pydicom.Dataset) -> None:
    """A modality or VOI LUT in use must hold as many entries as its descriptor declares (pydicom
    silently ignores an empty one and reads past or short of a wrong one)."""
    for keyword in ("ModalityLUTSequence", "VOILUTSequence"):
        sequence = ds.get(keyword)
        if not sequence:
            continue
        item = sequence[0]
        descriptor, data = item.get("LUTDescriptor"), item.get("LUTData")
        if descriptor is None or data is None:
            raise BadInputError(str(path), f"{keyword} item without LUTDescriptor or LUTData")
        if not isinstance(descriptor, (MultiValue, list, tuple)) or len(descriptor) != 3:
            raise BadInputError(str(path), f"{keyword} LUTDescriptor must have 3 values, has {descriptor!r}"[:200])
        entries, bits = int(descriptor[0]) or 65536, int(descriptor[2])
        if not 8 <= bits <= 16:
            raise BadInputError(str(path), f"{keyword} with {bits} bits per entry (8 to 16 expected)")
        if isinstance(data, (bytes, bytearray)):
            sizes = (entries, 2 * entries) if bits <= 8 else (2 * entries,)  # 8-bit entries may be packed
            count_ok = len(data) in sizes or len(data) in tuple(n + 1 for n in sizes)
        else:
            count_ok = len(data if isinstance(data, (MultiValue, list, tuple)) else [data]) == entries
        if not count_ok:
            raise BadInputError(str(path), f"{keyword} declares {entries} entries but its LUTData holds another number")


def _j2k_size(frame: bytes) -> tuple[int, int, int] | None:
    """``(rows, columns, components)`` from a JPEG 2000 codestream's SIZ marker (J2K or JP2)."""
    start = frame.find(b"\xff\x4f\xff\x51")  # SOC then SIZ
    if start < 0 or len(frame) < start + 42:
        return None
    _, _, xsiz, ysiz, xo, yo, *_, csiz = struct.unpack(">HHIIIIIIIIH", frame[start + 4:start + 42])
    return ysiz - yo, xsiz - xo, csiz


def _rle_segment_length(segment: bytes, limit: int) -> int:
    """Bytes that one RLE segment decodes to (PackBits, as pydicom reads it), counting stops past ``limit``."""
    n, pos, end = 0, 0, len(segment)
    while pos < end and n <= limit:
        header = segment[pos]
        pos += 1
        if header < 128:  # literal run of header + 1 bytes
            take = min(header + 1, end - pos)
            n, pos = n + take, pos + take
        elif header > 128 and pos < end:  # one byte repeated 257 - header times
            n, pos = n + 257 - header, pos + 1
    return n


def _check_pixel_data(path: Path, ds: pydicom.Dataset, ts: str, rows: int, cols: int, allocated: int) -> None:
    """The pixel data must hold exactly one Rows x Columns frame (checked before decoding)."""
    uid = UID(ts)
    expected = rows * cols * allocated // 8
    if not uid.is_encapsulated:
        actual = len(ds.PixelData)
        if actual not in (expected, expected + expected % 2):
            what = "too short (truncated, or Rows/Columns too large)" if actual < expected else \
                "longer than the frame (excess padding, or Rows/Columns too small)"
            raise BadInputError(str(path), f"the pixel data hold {actual} bytes but Rows {rows} x Columns {cols} x "
                                           f"{allocated} bits need {expected}: {what}")
        return
    try:
        frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    except StopIteration:
        raise BadInputError(str(path), "encapsulated PixelData holds no frame") from None
    if uid in JPEG2000TransferSyntaxes or uid in (HTJ2K, HTJ2KLossless, HTJ2KLosslessRPCL):
        size = _j2k_size(frame)
        if size is None:
            raise BadInputError(str(path), "JPEG 2000 data without a SIZ marker (not a JPEG 2000 codestream)")
        own = size[:2]
    elif uid in JPEGTransferSyntaxes or uid in JPEGLSTransferSyntaxes:
        info = _get_jpg_parameters(frame)
        if not info:
            raise BadInputError(str(path), "JPEG data without a readable SOF marker (not a JPEG codestream)")
        own = (info["height"] or rows, info["width"])  # height 0: defined later by a DNL marker
    elif uid == RLELossless:
        if len(frame) < 64:
            raise BadInputError(str(path), "RLE data shorter than its 64-byte header")
        count, *offsets = struct.unpack("<16I", frame[:64])
        if count != allocated // 8 or any(o < 64 or o > len(frame) for o in offsets[:count]) or \
                list(offsets[:count]) != sorted(offsets[:count]):
            raise BadInputError(str(path), f"RLE header with {count} segment(s) at offsets {offsets[:max(count, 1)]} "
                                           f"does not fit {allocated}-bit data of {len(frame)} bytes")
        bounds = [*offsets[:count], len(frame)]
        for k in range(count):
            length = _rle_segment_length(frame[bounds[k]:bounds[k + 1]], rows * cols)
            if length != rows * cols:
                amount = f"more than {rows * cols}" if length > rows * cols else str(length)
                raise BadInputError(str(path), f"RLE segment {k + 1} decodes to {amount} bytes but Rows {rows} x "
                                               f"Columns {cols} need {rows * cols}")
        return
    else:
        return  # other codecs carry no size of their own: the decoded shape is checked afterwards
    if tuple(own) != (rows, cols):
        raise BadInputError(str(path), f"the {uid.name} codestream is {own[0]} x {own[1]} pixels but the header says "
                                       f"Rows {rows} x Columns {cols}")


def _decoder(path: Path, ts: str):
    """pydicom's decoder for ``ts``; an unknown syntax or a missing plugin is bad input naming it."""
    uid = UID(ts)
    try:
        decoder = get_decoder(uid)
    except NotImplementedError:
        raise BadInputError(str(path), f"unsupported transfer syntax {ts[:64]} ({uid.name}): pydicom has no "
                                       "pixel data decoder for it") from None
    if not decoder.is_available:
        missing = "; ".join(decoder.missing_dependencies) or "no plugin installed"
        hint = _PLUGIN_HINTS.get(ts, "a pydicom pixel data plugin")
        raise BadInputError(str(path), f"transfer syntax {ts} ({uid.name}) cannot be decoded here: install "
                                       f"{hint} ({missing})")
    return decoder


def _decode(path: Path, ds: pydicom.Dataset, ts: str, decoder) -> np.ndarray:
    """Decode with the preferred plugin, then the others; every failure of theirs is bad input."""
    uid = UID(ts)
    plugins = list(decoder.available_plugins) or [""]  # native data: no plugins, pydicom itself
    preferred = _PREFERRED_PLUGIN.get(uid)
    if preferred in plugins:
        plugins.remove(preferred)
        plugins.insert(0, preferred)
    failures = []
    for plugin in plugins:
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")  # recorded, not shown: pydicom warns about fixable quirks
                ds.pixel_array_options(decoding_plugin=plugin)
                pixels = ds.pixel_array
        except _FATAL:
            raise
        except BaseException as exc:  # noqa: BLE001 - any decoder failure (Rust panics included) is this file's
            log.debug("%s: plugin %s failed (%s)", path, plugin, type(exc).__name__)
            failures.append(f"{plugin}: {type(exc).__name__}: {str(exc).strip()[:200]}")
            continue
        mismatch = [str(w.message) for w in caught if _MISMATCH_WARNING.search(str(w.message))]
        if mismatch:
            raise BadInputError(str(path), f"pixel data do not match the header: {mismatch[0][:200]}")
        return pixels
    raise BadInputError(str(path), f"cannot decode pixel data ({uid.name}): " + " | ".join(failures))


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


def read_dicom(path: str | Path, max_decoded_mb: float = DEFAULT_MAX_DECODED_MB) -> tuple[np.ndarray, dict]:
    """Read ``path`` and return ``(image, metadata)``.

    ``image`` is float32 (H, W) in VOI output units after the modality LUT, VOI LUT or windowing
    and MONOCHROME1 inversion: higher values are brighter. ``metadata`` has exactly
    ``METADATA_KEYS``: ``photometric``, ``bits_stored``, ``transfer_syntax`` (the UID, inferred
    when the file meta lacks it), ``orig_height``, ``orig_width`` and ``voi`` (``lut``,
    ``window`` or ``none``: which VOI transform was applied). Frames that would decode to more
    than ``max_decoded_mb`` are refused before decoding. Every failure is a BadInputError naming
    ``path``.
    """
    path = Path(path)
    try:
        return _read_dicom(path, int(max_decoded_mb * MB))
    except BadInputError:
        raise
    except MemoryError:
        raise BadInputError(str(path), "ran out of memory while reading it (lower the worker count, or raise "
                                       "the job's memory)") from None
    except _FATAL:
        raise
    except BaseException as exc:  # noqa: BLE001 - pydicom parses elements lazily: any access can fail
        raise BadInputError(str(path), f"unreadable DICOM content ({type(exc).__name__}: "
                                       f"{str(exc).strip()[:200]})") from None


def _read_dicom(path: Path, max_bytes: int) -> tuple[np.ndarray, dict]:
    try:
        size = os.stat(path).st_size
    except FileNotFoundError:
        raise BadInputError(str(path), "file not found") from None
    if size > 2 * max_bytes + MB:
        raise BadInputError(str(path), f"the file is {size / MB:.0f} MB, more than any frame within the "
                                       f"{max_bytes / MB:.0f} MB limit needs (vindr.convert.max_decoded_mb)")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ds = pydicom.dcmread(path, force=True)
    except _FATAL:
        raise
    except BaseException as exc:  # noqa: BLE001 - pydicom raises many types for garbage/truncated input
        raise BadInputError(str(path), f"not a readable DICOM file (truncated or corrupt): "
                                       f"{type(exc).__name__}: {str(exc).strip()[:200]}") from None
    truncated = [str(w.message) for w in caught if "End of file" in str(w.message)]
    if truncated:
        raise BadInputError(str(path), "truncated file: the data end before the pixel data do")
    if _not_dicom(path, ds):
        raise BadInputError(str(path), "not a DICOM file (no preamble and no image elements)")
    if "PixelData" not in ds:
        raise BadInputError(str(path), "no PixelData element: the file holds no image, or it is truncated before the image")
    rows, cols, allocated = _check_geometry(path, ds, max_bytes)
    ts = _ensure_transfer_syntax(path, ds)
    decoder = _decoder(path, ts)
    _check_pixel_data(path, ds, ts, rows, cols, allocated)
    pixels = _decode(path, ds, ts, decoder)

    if pixels.shape != (rows, cols):
        raise BadInputError(str(path), f"decoded pixel array has shape {pixels.shape}, header says "
                                       f"Rows={rows} Columns={cols}")
    _check_luts(path, ds)
    lut_sequence = ds.get("VOILUTSequence")
    has_lut = bool(lut_sequence) and "LUTData" in lut_sequence[0]
    has_window = ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None
    voi = "lut" if has_lut else "window" if has_window else "none"
    try:
        image = voi_transform(pixels, ds)
    except _FATAL:
        raise
    except BaseException as exc:  # noqa: BLE001 - malformed LUT/window values
        raise BadInputError(str(path), f"invalid modality/VOI LUT or window values: "
                                       f"{type(exc).__name__}: {str(exc).strip()[:200]}") from None
    del pixels
    if image.shape != (rows, cols):
        raise BadInputError(str(path), f"the VOI transform gave shape {image.shape}, expected ({rows}, {cols})")
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
        "bits_stored": _int_tag(path, ds, "BitsStored", allocated),
        "transfer_syntax": ts,
        "orig_height": rows,
        "orig_width": cols,
        "voi": voi,
    }
    return image, meta
