"""Decoding untrusted image bytes into the fixed-size RGB arrays a backbone eats.

The batch pipeline and the query path both call :func:`decode_and_resize`, so a
query image is preprocessed exactly like the corpus it is compared with. Every
failure raises :class:`ImageDecodeError` (or a Pillow / OS error) and never
returns a partial image: the caller records it and moves on.
"""

from __future__ import annotations

import dataclasses
import io
import warnings

import numpy as np
from PIL import Image, ImageFile, ImageOps

# Refuse truncated files instead of padding them with grey.
ImageFile.LOAD_TRUNCATED_IMAGES = False

DEFAULT_MAX_PIXELS = 100_000_000  # 100 MP: larger than any camera; smaller than Pillow's bomb limit
RESIZE_METHOD = "bilinear-squash"  # whole frame resized to a square, as the bottleneck recipe does

_EXIF_ORIENTATION = 0x0112
_SWAPPED_ORIENTATIONS = {5, 6, 7, 8}


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


def _to_rgb(im: Image.Image) -> Image.Image:
    """Normalises every Pillow mode to 8-bit RGB; transparency composites onto white."""
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        hi = 65535.0 if im.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        arr = np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        im = Image.fromarray(arr, mode="L")
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(background, rgba)
    if im.mode != "RGB":
        im = im.convert("RGB")
    return im


def decode_and_resize(
    data: bytes,
    size: int,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    reduced_decode: bool = True,
) -> DecodedImage:
    """Decodes ``data`` and resizes it to ``size`` x ``size`` RGB uint8.

    The pixel limit is checked against the header before any pixel is decoded, so a
    file that claims billions of pixels costs nothing. JPEGs much larger than the
    target are decoded at 1/2, 1/4 or 1/8 scale in the DCT domain (Pillow draft
    mode), which is several times faster and moves features very little.
    """
    if not data:
        raise ImageDecodeError("empty file")
    with warnings.catch_warnings():
        # Pillow only warns between one and two times its own limit; we enforce ours.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        im = Image.open(io.BytesIO(data))
        fmt = im.format or "unknown"
        w, h = im.size
        if w <= 0 or h <= 0:
            raise ImageDecodeError(f"invalid size {w}x{h}")
        if w * h > max_pixels:
            raise ImageTooLargeError(f"{w}x{h} = {w * h} pixels exceeds the limit of {max_pixels}")
        orientation = 1
        try:
            orientation = int(im.getexif().get(_EXIF_ORIENTATION, 1))
        except Exception:  # a broken EXIF block is not a reason to lose the image
            orientation = 1
        if getattr(im, "n_frames", 1) > 1:
            im.seek(0)
        scale = 1
        if reduced_decode and fmt == "JPEG" and min(w, h) >= 2 * size:
            im.draft("RGB", (size, size))
            scale = max(1, round(w / im.size[0]))
        im.load()
        if orientation != 1:
            im = ImageOps.exif_transpose(im)
        im = _to_rgb(im)
        if im.size != (size, size):
            im = im.resize((size, size), Image.Resampling.BILINEAR)
        pixels = np.asarray(im, dtype=np.uint8)
    if orientation in _SWAPPED_ORIENTATIONS:
        w, h = h, w
    if pixels.shape != (size, size, 3):
        raise ImageDecodeError(f"unexpected decoded shape {pixels.shape}")
    return DecodedImage(pixels=pixels, width=w, height=h, format=fmt, reduced_scale=scale)
