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

DEFAULT_MAX_PIXELS = 100_000_000  # 100 MP: larger than any camera; smaller than Pillow's bomb limit
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


@dataclasses.dataclass(frozen=True)
class DecodedImage:
    pixels: np.ndarray  # uint8, (size, size, 3)
    width: int  # original width after EXIF orientation
    height: int
    format: str
    reduced_scale: int  # 1 when decoded in full, 2/4/8 when JPEG draft mode was used


def _high_bit_depth_to_l(im: Image.Image) -> Image.Image:
    """16-bit and 32-bit single-channel modes → 8-bit 'L', scaled by the range the mode implies.

    ``I;16*`` is 16-bit by definition. ``I`` (32-bit int) and ``F`` (float) carry no
    declared range, so the data decides: floats within [0, 1] are unit-scaled, values
    above 255 are taken as 16-bit.
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
    scaled = np.nan_to_num(arr.astype(np.float64) / hi * 255.0 + 0.5, nan=0.0)
    return Image.fromarray(np.clip(scaled, 0, 255).astype(np.uint8), mode="L")


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


def _ensure_pillow_allows(max_pixels: int) -> None:
    """Pillow refuses images above twice its own limit in ``Image.open``; ours must govern.

    Raised (never lowered) only when a caller asks for a limit above Pillow's, so the
    check below stays the single source of the refusal.
    """
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and max_pixels > limit:
        Image.MAX_IMAGE_PIXELS = max_pixels


def open_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Opens ``data`` lazily (header only) and refuses it before any pixel is decoded.

    Raises :class:`ImageDecodeError` for empty input, :class:`ImageTooLargeError` when the
    header claims more than ``max_pixels``, and Pillow's ``UnidentifiedImageError`` for bytes
    that are not one of :data:`SUPPORTED_FORMATS`.
    """
    if not data:
        raise ImageDecodeError("empty file")
    _ensure_pillow_allows(max_pixels)
    with warnings.catch_warnings():
        # Pillow only warns between one and two times its own limit; we enforce ours.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            im = Image.open(io.BytesIO(data), formats=SUPPORTED_FORMATS)
        except Image.DecompressionBombError as exc:
            raise ImageTooLargeError(str(exc)) from exc
    w, h = im.size
    if w <= 0 or h <= 0:
        raise ImageDecodeError(f"invalid size {w}x{h}")
    if w * h > max_pixels:
        raise ImageTooLargeError(f"{w}x{h} = {w * h} pixels exceeds the limit of {max_pixels}")
    return im


def decode_and_resize(
    data: bytes,
    size: int,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    reduced_decode: bool = True,
    draft_side: int | None = None,
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
    im = open_image(data, max_pixels)
    fmt = im.format or "unknown"
    w, h = im.size
    scale = 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        side = max(size, draft_side or size)
        if reduced_decode and fmt in _DRAFT_FORMATS and min(w, h) >= 2 * side:
            im.draft("RGB", (side, side))
            scale = max(1, round(w / im.size[0]))
        im.load()
        # After load: PNG may keep its eXIf chunk behind the pixel data.
        orientation = _orientation(im)
        if orientation != 1:
            im = im.transpose(_ORIENTATION_OPS[orientation])
        im = _to_rgb(im)
        if im.size != (size, size):
            im = im.resize((size, size), Image.Resampling.BILINEAR)
        pixels = np.asarray(im, dtype=np.uint8)
    if orientation in _SWAPPED_ORIENTATIONS:
        w, h = h, w
    if pixels.shape != (size, size, 3):
        raise ImageDecodeError(f"unexpected decoded shape {pixels.shape}")
    return DecodedImage(pixels=pixels, width=w, height=h, format=fmt, reduced_scale=scale)
