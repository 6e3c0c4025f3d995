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

Reduced resolution. Given the size the image will be shrunk to (``longest_side``), a JPEG 2000
frame is decoded at the coarsest resolution level of its wavelet pyramid whose image still covers
that size on both axes (:func:`reduced_level`): level r has ceil(side / 2**r) pixels per side and
skips the Tier-1 decoding of every finer subband (level 1 decodes about 4x faster). pydicom's
plugins decode full frames only, so this goes through Pillow's openjpeg (``Image.reduce``); the
samples are the same stored values at a coarser grid, so the modality LUT, VOI LUT or window,
MONOCHROME1 inversion and bit depth apply unchanged. Only plain codestreams take this path (one
component, precision = BitsStored in a BitsAllocated container of 8 or 16, signedness =
PixelRepresentation, no image offset or subsampling); HTJ2K is left at full resolution (no HTJ2K
encoder here to test it against). Whenever Pillow fails on a frame, the full decode decides, so
which files are refused is unchanged.

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

import io
import logging
import os
import re
import struct
import warnings
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np
import pydicom
from PIL import Image
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

#: Syntaxes decoded at a reduced resolution level when the output is smaller (see the module doc).
REDUCIBLE_SYNTAXES = (JPEG2000Lossless, JPEG2000)


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


class J2KHeader(NamedTuple):
    """What a JPEG 2000 codestream's main header declares (sample format of component 0)."""

    rows: int
    columns: int
    components: int
    precision: int  # bits per sample; 0 when the SIZ marker ends before the component's entry
    signed: bool
    plain: bool  # no image offset, no subsampling: resolution level r has ceil(side / 2**r) pixels
    levels: int  # wavelet decomposition levels (COC of component 0, else COD; 0 when neither is found)


def _j2k_header(frame: bytes) -> J2KHeader | None:
    """The SIZ and COD/COC markers of a JPEG 2000 codestream (J2K or JP2), or None without SIZ."""
    start = frame.find(b"\xff\x4f\xff\x51")  # SOC then SIZ
    if start < 0 or len(frame) < start + 42:
        return None
    lsiz, _, xsiz, ysiz, xo, yo, *_, csiz = struct.unpack(">HHIIIIIIIIH", frame[start + 4:start + 42])
    ssiz, xr, yr = frame[start + 42:start + 45] if len(frame) >= start + 45 else (0, 0, 0)
    cod = coc = None
    pos = start + 4 + lsiz
    while pos + 4 <= len(frame) and frame[pos] == 0xFF and frame[pos + 1] not in (0x90, 0xD9):  # main header: up to SOT
        marker, length = frame[pos + 1], int.from_bytes(frame[pos + 2:pos + 4], "big")
        if marker == 0x52 and pos + 10 <= len(frame):  # COD: Lcod, Scod, SGcod (4 bytes), then the level count
            cod = frame[pos + 9]
        elif marker == 0x53 and csiz < 257 and pos + 7 <= len(frame) and frame[pos + 4] == 0:  # COC: Ccoc, Scoc, levels
            coc = frame[pos + 6]
        pos += 2 + length
    levels = coc if coc is not None else cod if cod is not None else 0
    return J2KHeader(ysiz - yo, xsiz - xo, csiz, (ssiz & 0x7F) + 1 if xr else 0, bool(ssiz & 0x80),
                     xo == yo == 0 and xr == yr == 1, levels)


def scaled_shape(height: int, width: int, longest_side: int) -> tuple[int, int]:
    """``(height, width)`` resized so that the longest side is ``longest_side`` (aspect kept)."""
    scale = longest_side / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def level_shape(height: int, width: int, level: int) -> tuple[int, int]:
    """Size of JPEG 2000 resolution level ``level`` of a ``height`` x ``width`` image (no offsets)."""
    return -(-height >> level), -(-width >> level)


def reduced_level(height: int, width: int, longest_side: int, levels: int) -> int:
    """The coarsest resolution level ``r <= levels`` whose image still covers the output size.

    The output is :func:`scaled_shape`; ``r`` is the largest with ``side // 2**r`` >= the output on
    both axes (0 when the output is larger than half the image). Then ``r`` is lowered while Pillow
    would size level ``r`` wrongly: it rounds ``side / 2**r`` to nearest where openjpeg rounds up, and
    refuses the frame when the two differ (a remainder in 1 .. 2**(r-1) - 1); level 1 always agrees.
    """
    out_h, out_w = scaled_shape(height, width, longest_side)
    r = 0
    while r < levels and height >> (r + 1) >= out_h and width >> (r + 1) >= out_w:
        r += 1
    while r > 1 and any(0 < side % (1 << r) < 1 << (r - 1) for side in (height, width)):
        r -= 1
    return r


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


def _check_pixel_data(path: Path, ds: pydicom.Dataset, ts: str, rows: int, cols: int,
                      allocated: int) -> J2KHeader | None:
    """The pixel data must hold exactly one Rows x Columns frame (checked before decoding).

    Returns the codestream's header for JPEG 2000 syntaxes, else None."""
    uid = UID(ts)
    expected = rows * cols * allocated // 8
    if not uid.is_encapsulated:
        actual = len(ds.PixelData)
        if actual not in (expected, expected + expected % 2):
            what = "too short (truncated, or Rows/Columns too large)" if actual < expected else \
                "longer than the frame (excess padding, or Rows/Columns too small)"
            raise BadInputError(str(path), f"the pixel data hold {actual} bytes but Rows {rows} x Columns {cols} x "
                                           f"{allocated} bits need {expected}: {what}")
        return None
    try:
        frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    except StopIteration:
        raise BadInputError(str(path), "encapsulated PixelData holds no frame") from None
    header = None
    if uid in JPEG2000TransferSyntaxes or uid in (HTJ2K, HTJ2KLossless, HTJ2KLosslessRPCL):
        header = _j2k_header(frame)
        if header is None:
            raise BadInputError(str(path), "JPEG 2000 data without a SIZ marker (not a JPEG 2000 codestream)")
        own = header.rows, header.columns
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
        return None
    else:
        return None  # other codecs carry no size of their own: the decoded shape is checked afterwards
    if tuple(own) != (rows, cols):
        raise BadInputError(str(path), f"the {uid.name} codestream is {own[0]} x {own[1]} pixels but the header says "
                                       f"Rows {rows} x Columns {cols}")
    return header


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


def _reducible(ds: pydicom.Dataset, j2k: J2KHeader, stored: int, allocated: int) -> bool:
    """A plain codestream whose samples are what pydicom's decode would return as they are (no sign
    or precision correction), with every element that decode requires present."""
    return (j2k.plain and j2k.components == 1 and 8 <= j2k.precision == stored <= 16
            and allocated == (8 if stored == 8 else 16) and ds.get("PixelRepresentation") == int(j2k.signed)
            and all(k in ds for k in ("SamplesPerPixel", "BitsStored")))


def _decode_level(path: Path, ds: pydicom.Dataset, header: J2KHeader, level: int) -> np.ndarray | None:
    """Resolution level ``level`` of the JPEG 2000 frame, as the stored values and dtype pydicom's full
    decode gives; None when Pillow fails on it or returns something else (the full decode decides)."""
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. Pillow's decompression bomb warning: the frame size is checked
            with Image.open(io.BytesIO(frame), formats=("JPEG2000",)) as im:
                im.reduce = level
                im.load()
                raw = np.asarray(im)
    except _FATAL:
        raise
    except BaseException as exc:  # noqa: BLE001 - any failure: the full decode decides about the file
        log.debug("%s: reduced JPEG 2000 decode failed (%s: %s); decoding the full frame", path,
                  type(exc).__name__, str(exc)[:200])
        return None
    bits = 8 if header.precision <= 8 else 16
    if raw.shape != level_shape(header.rows, header.columns, level) or raw.dtype != np.dtype(f"u{bits // 8}"):
        return None
    # Pillow scales N-bit samples up to 8/16 bits and offsets signed ones by half their range
    # (Jpeg2KDecode.c, as pydicom's own Pillow plugin undoes it): both undone exactly.
    values = raw >> (bits - header.precision)
    if header.signed:
        values = (values.astype(np.int32) - (1 << (header.precision - 1))).astype(f"i{bits // 8}")
    return values


def _on_pixel_grid(image: np.ndarray, level: int) -> np.ndarray:
    """Resolution level ``level`` moved onto the grid a resize assumes (float32, same shape).

    The wavelet low-pass puts sample k of level r at original pixel 2**r * k, while a resize takes
    it for the centre of the 2**r pixels it stands for, (2**r - 1) / 2 pixels further on: the image
    is moved back by that much (bilinear, edges replicated). Without it the PNGs are shifted by
    half an original pixel at level 1, 0.2 output pixels at 1024 px, and differ more from full
    decodes (mean 1.1 against 0.6 grey levels in tests/test_dicom_reduced.py's images).
    """
    shift = -(2**level - 1) / 2 ** (level + 1)  # in pixels of the level
    height, width = image.shape
    return cv2.warpAffine(image, np.float32([[1, 0, shift], [0, 1, shift]]), (width, height),
                          flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


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


def read_dicom(path: str | Path, max_decoded_mb: float = DEFAULT_MAX_DECODED_MB,
               longest_side: int | None = None) -> tuple[np.ndarray, dict]:
    """Read ``path`` and return ``(image, metadata)``.

    ``image`` is float32 (H, W) in VOI output units after the modality LUT, VOI LUT or windowing
    and MONOCHROME1 inversion: higher values are brighter. It is Rows x Columns, except when
    ``longest_side`` (the size the caller shrinks the image to) allows a JPEG 2000 frame to be
    decoded at resolution level r (:func:`reduced_level`): then it is :func:`level_shape`, on the
    pixel grid of a resize (:func:`_on_pixel_grid`). ``metadata`` has exactly ``METADATA_KEYS``:
    ``photometric``, ``bits_stored``, ``transfer_syntax`` (the UID, inferred when the file meta
    lacks it), ``orig_height``, ``orig_width`` and ``voi`` (``lut``, ``window`` or ``none``: which
    VOI transform was applied). Frames that would decode to more than ``max_decoded_mb`` are
    refused before decoding. Every failure is a BadInputError naming ``path``.
    """
    path = Path(path)
    try:
        return _read_dicom(path, int(max_decoded_mb * MB), longest_side)
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


def _read_dicom(path: Path, max_bytes: int, longest_side: int | None) -> tuple[np.ndarray, dict]:
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
    j2k = _check_pixel_data(path, ds, ts, rows, cols, allocated)
    stored = _int_tag(path, ds, "BitsStored", allocated)
    level = 0
    if longest_side and ts in REDUCIBLE_SYNTAXES and _reducible(ds, j2k, stored, allocated):
        level = reduced_level(rows, cols, longest_side, j2k.levels)
    pixels = _decode_level(path, ds, j2k, level) if level else None
    if pixels is None:
        level, pixels = 0, _decode(path, ds, ts, decoder)
    else:
        log.debug("%s: JPEG 2000 decoded at resolution level %d", path, level)
    shape = level_shape(rows, cols, level)

    if pixels.shape != shape:
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
    if level:
        image = _on_pixel_grid(image, level)
    if image.shape != shape:
        raise BadInputError(str(path), f"the VOI transform gave shape {image.shape}, expected {shape}")
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
        "bits_stored": stored,
        "transfer_syntax": ts,
        "orig_height": rows,
        "orig_width": cols,
        "voi": voi,
    }
    return image, meta
