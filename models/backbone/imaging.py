"""Decoding untrusted image bytes into the fixed-size RGB arrays a backbone eats.

The batch pipeline and the query path both call :func:`decode_and_resize`, so a
query image is preprocessed exactly like the corpus it is compared with. Every
failure raises :class:`ImageDecodeError` (or a Pillow / OS error) and never
returns a partial image: the caller records it and moves on.

Only the formats a photo corpus holds are opened (JPEG incl. MPO, PNG, GIF, WebP,
BMP, TIFF). Pillow knows forty more, some of which hand the bytes to external
programs (EPS → Ghostscript); untrusted bytes never reach those.
"""

from __future__ import annotations

import dataclasses
import io
import warnings

import numpy as np
from PIL import Image, ImageFile

# Refuse truncated files instead of padding them with grey.
ImageFile.LOAD_TRUNCATED_IMAGES = False

DEFAULT_MAX_PIXELS = 100_000_000  # 100 MP: larger than any camera
DEFAULT_MAX_DECODE_BYTES = 1_000_000_000  # the most one image's decode may cost, all copies counted
# Our checks govern (the pixel limit and the byte budget, both on the header before any pixel is
# decoded); Pillow's own bomb check would refuse at twice its built-in 89 MP with its own numbers.
Image.MAX_IMAGE_PIXELS = None
RESIZE_METHOD = "bilinear-squash"  # whole frame resized to a square, as the bottleneck recipe does
SUPPORTED_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF")  # JPEG also opens MPO (camera) files
_DRAFT_FORMATS = ("JPEG", "MPO")

_EXIF_ORIENTATION = 0x0112
_SWAPPED_ORIENTATIONS = {5, 6, 7, 8}
_ORIENTATION_OPS = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


class ImageDecodeError(ValueError):
    """The bytes are not a usable image (empty, too large, unsupported)."""


class ImageTooLargeError(ImageDecodeError):
    """The header claims more pixels than the configured limit."""


class DecodeBudgetError(ImageTooLargeError):
    """Decoding this image (with its conversion copies) would cost more memory than the budget."""


class TruncatedImageError(ImageDecodeError):
    """The file holds far too little data for the size its header claims."""


@dataclasses.dataclass(frozen=True)
class DecodedImage:
    pixels: np.ndarray  # uint8, (size, size, 3)
    width: int  # original width after EXIF orientation
    height: int
    format: str
    reduced_scale: int  # 1 when decoded in full, 2/4/8 when JPEG draft mode was used


_CHUNK_PIXELS = 1 << 20  # high-bit-depth conversion works on this many pixels at a time


def _high_bit_depth_to_l(im: Image.Image) -> Image.Image:
    """16-bit and 32-bit single-channel modes → 8-bit 'L', scaled by the range the mode implies.

    ``I;16*`` is 16-bit by definition. ``I`` (32-bit int) and ``F`` (float) carry no
    declared range, so the data decides: floats within [0, 1] are unit-scaled, values
    above 255 are taken as 16-bit. The conversion runs on row blocks in float32, so its
    temporaries stay at a few MB whatever the image size (float64 over a whole 100 MP
    image cost 2.5 GB).
    """
    arr = np.asarray(im)
    if im.mode.startswith("I;16"):
        hi = 65535.0
    else:
        top = float(np.nanmax(arr)) if arr.size else 0.0
        if im.mode == "F" and top <= 1.0:
            hi = 1.0
        elif top <= 255.0:
            hi = 255.0
        else:
            hi = 65535.0
    out = np.empty(arr.shape, np.uint8)
    rows = max(1, _CHUNK_PIXELS // max(1, arr.shape[1] if arr.ndim > 1 else 1))
    scale = np.float32(255.0 / hi)
    for start in range(0, arr.shape[0], rows):
        block = arr[start:start + rows].astype(np.float32) * scale + np.float32(0.5)
        np.nan_to_num(block, copy=False, nan=0.0)
        np.clip(block, 0, 255, out=block)
        out[start:start + rows] = block
    return Image.fromarray(out, mode="L")


def _to_rgb(im: Image.Image) -> Image.Image:
    """Normalises every Pillow mode to 8-bit RGB; transparency composites onto white."""
    if im.mode == "F" or im.mode.startswith("I"):
        im = _high_bit_depth_to_l(im)
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("L", "RGB") and "transparency" in im.info:  # a tRNS colour key
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(background, rgba)
    if im.mode != "RGB":
        im = im.convert("RGB")
    return im


def _orientation(im: Image.Image) -> int:
    """The EXIF orientation (1..8); 1 when absent or unreadable.

    A broken EXIF block is not a reason to lose the image.
    """
    try:
        value = int(im.getexif().get(_EXIF_ORIENTATION, 1))
    except Exception:
        return 1
    return value if value in _ORIENTATION_OPS else 1


_BYTES_PER_PIXEL = {"1": 1, "L": 1, "P": 1, "LA": 2, "PA": 2, "La": 2, "RGB": 3, "YCbCr": 3, "LAB": 3, "HSV": 3,
                    "RGBA": 4, "RGBa": 4, "RGBX": 4, "CMYK": 4, "I;16": 2, "I;16B": 2, "I;16L": 2, "I;16N": 2,
                    "I": 4, "F": 4}


def decode_cost(mode: str, fmt: str, pixels: int, transparent: bool = False) -> int:
    """Bytes at the peak of decoding ``pixels`` pixels of this mode and format into RGB, all copies counted.

    Per decoded pixel: the decoded buffer, the EXIF transpose copy, and what :func:`_to_rgb`
    makes on the way to RGB: transparency composited on white (an RGBA copy, a white RGBA
    canvas and the composite), high-bit-depth conversion (a uint8 plane; row blocks), the RGB
    result. WebP decodes through an RGBA buffer of libwebp's own first. Measured peaks on
    25 MP images stayed below these estimates (tests/models/backbone/test_imaging.py).
    """
    bpp = _BYTES_PER_PIXEL.get(mode, 4)
    cost = 2 * bpp + 3  # decoded, transposed, RGB
    if transparent or mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        cost += 12  # RGBA copy, white canvas, composite
    if mode in ("F", "I") or mode.startswith("I;16"):
        cost += 1 + 3  # L plane, then RGB
    if fmt == "WEBP":
        cost += 8  # libwebp's RGBA output before Pillow copies it
    return cost * pixels


def open_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Opens ``data`` lazily (header only) and refuses it before any pixel is decoded.

    Raises :class:`ImageDecodeError` for empty input, :class:`ImageTooLargeError` when the
    header claims more than ``max_pixels``, :class:`TruncatedImageError` for a JPEG with far
    too little data for its size, and Pillow's ``UnidentifiedImageError`` for bytes that are
    not one of :data:`SUPPORTED_FORMATS`.
    """
    if not data:
        raise ImageDecodeError("empty file")
    im = Image.open(io.BytesIO(data), formats=SUPPORTED_FORMATS)
    w, h = im.size
    if w <= 0 or h <= 0:
        raise ImageDecodeError(f"invalid size {w}x{h}")
    if w * h > max_pixels:
        raise ImageTooLargeError(f"{w}x{h} = {w * h} pixels exceeds the limit of {max_pixels} (--max-pixels)")
    if im.format in _DRAFT_FORMATS:
        # A baseline JPEG spends at least about one bit on each 8x8 luma block even when the picture is
        # flat; far less than that means the entropy-coded data was cut off, and libjpeg would pad the
        # missing blocks with grey instead of failing.
        floor = (-(-w // 8)) * (-(-h // 8)) // 8
        if len(data) < floor // 4:
            raise TruncatedImageError(f"{len(data):,} bytes cannot hold a {w}x{h} JPEG (at least ~{floor:,} "
                                      "expected): the file is truncated")
    return im


def decode_and_resize(
    data: bytes,
    size: int,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    reduced_decode: bool = True,
    draft_side: int | None = None,
    max_decode_bytes: int = DEFAULT_MAX_DECODE_BYTES,
) -> DecodedImage:
    """Decodes ``data`` and resizes it to ``size`` x ``size`` RGB uint8.

    The pixel limit is checked against the header before any pixel is decoded, so a
    file that claims billions of pixels costs nothing. JPEGs at least twice the
    target on their short side are decoded at 1/2, 1/4 or 1/8 scale in the DCT domain
    (Pillow draft mode), never below the target size: several times faster, and the
    features move very little (benchmarks/bench_decode.py measures how little).
    ``draft_side`` (default ``size``) is the smallest side the reduced decode may go down
    to; a larger value trades speed for fidelity. Animated GIF / WebP and multi-page TIFF
    give their first frame, which is what ``Image.open`` leaves selected.
    """
    side = max(size, draft_side or size)
    im, w, h, fmt, scale = _decode_rgb(data, max_pixels, side if reduced_decode else 0, max_decode_bytes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        if im.size != (size, size):
            im = im.resize((size, size), Image.Resampling.BILINEAR)
        pixels = np.asarray(im, dtype=np.uint8)
    if pixels.shape != (size, size, 3):
        raise ImageDecodeError(f"unexpected decoded shape {pixels.shape}")
    return DecodedImage(pixels=pixels, width=w, height=h, format=fmt, reduced_scale=scale)


def decode_to_fit(
    data: bytes,
    max_side: int,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_decode_bytes: int = DEFAULT_MAX_DECODE_BYTES,
) -> DecodedImage:
    """Decodes ``data`` to RGB uint8 with its aspect ratio kept, the long side at most ``max_side``.

    For local features (geometric verification): a squashed square would distort the
    local structure that keypoint descriptors encode. Same limits, reduced-scale JPEG decode
    and orientation handling as :func:`decode_and_resize`; never enlarges.
    """
    im, w, h, fmt, scale = _decode_rgb(data, max_pixels, 0, max_decode_bytes, fit_side=max_side)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        long_side = max(im.size)
        if long_side > max_side:
            ratio = max_side / long_side
            im = im.resize((max(1, round(im.size[0] * ratio)), max(1, round(im.size[1] * ratio))),
                           Image.Resampling.BILINEAR)
        pixels = np.asarray(im, dtype=np.uint8)
    return DecodedImage(pixels=pixels, width=w, height=h, format=fmt, reduced_scale=scale)


def _decode_rgb(data: bytes, max_pixels: int, draft_side: int, max_decode_bytes: int, fit_side: int = 0
                ) -> tuple[Image.Image, int, int, str, int]:
    """(RGB image, original width and height after orientation, format, JPEG reduction) with every limit checked.

    ``draft_side`` > 0: a JPEG may be decoded at reduced scale while its short side stays at
    least that; ``fit_side`` > 0: while its long side stays at least that.
    """
    im = open_image(data, max_pixels)
    fmt = im.format or "unknown"
    w, h = im.size
    scale = 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        if fmt in _DRAFT_FORMATS:
            if draft_side and min(w, h) >= 2 * draft_side:
                im.draft("RGB", (draft_side, draft_side))
            elif fit_side and max(w, h) >= 2 * fit_side:
                # draft keeps each side at least the requested one: ask for the long side's share
                im.draft("RGB", (max(1, fit_side * w // max(w, h)), max(1, fit_side * h // max(w, h))))
            scale = max(1, round(w / im.size[0]))
        dw, dh = im.size  # what will actually be decoded (after a JPEG draft reduction)
        cost = decode_cost(im.mode, fmt, dw * dh, "transparency" in im.info)
        if cost > max_decode_bytes:
            raise DecodeBudgetError(
                f"decoding this {fmt} {w}x{h} ({im.mode}) would need about {cost / 1e6:,.0f} MB, more than the "
                f"budget of {max_decode_bytes / 1e6:,.0f} MB per image")
        im.load()
        # After load: PNG may keep its eXIf chunk behind the pixel data.
        orientation = _orientation(im)
        if orientation != 1:
            im = im.transpose(_ORIENTATION_OPS[orientation])
        im = _to_rgb(im)
    if orientation in _SWAPPED_ORIENTATIONS:
        w, h = h, w
    return im, w, h, fmt, scale
