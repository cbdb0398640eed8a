"""Size-limited thumbnails of indexed items, read and decoded under the readers' limits, cached by content.

An item's ``uri`` is where its bytes came from; the service reads it again for a thumbnail.
That read is as careful as the corpus read was: ``plumbing.fsutil.read_input`` (regular
files only, no links followed, size checked before a byte is read, any Beam filesystem)
and ``models.backbone.imaging.open_image`` (supported formats only, the pixel limit and truncation
checked on the header) plus the per-image decode-memory budget. The bytes must still hash
to the ``sha256`` the index recorded, so a file replaced since indexing is never shown as
the indexed item. Thumbnails are cached under that digest and size, in a bounded LRU, so
they stay valid across index versions.
"""

from __future__ import annotations

import hashlib
import io
import threading
import warnings
from collections import OrderedDict

import numpy as np
from PIL import Image, ImageOps

from models.backbone.imaging import DEFAULT_MAX_DECODE_BYTES, DEFAULT_MAX_PIXELS, decode_cost, open_image
from plumbing.fsutil import read_input

DEFAULT_SIDE = 160
MAX_SIDE = 512
DEFAULT_MAX_INPUT_BYTES = 64 * 1024 * 1024


class ThumbnailUnavailable(LookupError):
    """The item's bytes cannot be shown: not readable as a file, changed since indexing, or not an image."""


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any decoded mode as 8-bit RGB; transparency on white, high bit depths scaled by their maximum."""
    if im.mode in ("I", "F") or im.mode.startswith("I;16"):
        arr = np.asarray(im, dtype=np.float32)
        top = float(np.nanmax(arr)) if arr.size else 0.0
        scale = 255.0 / (65535.0 if im.mode.startswith("I;16") or top > 255 else (1.0 if top <= 1.0 else 255.0))
        im = Image.fromarray(np.clip(np.nan_to_num(arr * scale), 0, 255).astype(np.uint8), mode="L")
    if im.mode == "P" or "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, rgba)
    return im.convert("RGB") if im.mode != "RGB" else im


def make_thumbnail(data: bytes, side: int, max_pixels: int = DEFAULT_MAX_PIXELS,
                   max_decode_bytes: int = DEFAULT_MAX_DECODE_BYTES) -> bytes:
    """JPEG bytes of ``data`` fitted inside ``side`` x ``side`` (aspect kept, EXIF orientation applied)."""
    im = open_image(data, max_pixels)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        if im.format in ("JPEG", "MPO"):
            im.draft("RGB", (side, side))  # decode at 1/2..1/8 scale in the DCT domain when that is enough
        cost = decode_cost(im.mode, im.format or "", im.size[0] * im.size[1], "transparency" in im.info)
        if cost > max_decode_bytes:
            raise ThumbnailUnavailable(f"decoding this {im.format} {im.size[0]}x{im.size[1]} image would need about "
                                       f"{cost / 1e6:,.0f} MB, more than the budget of "
                                       f"{max_decode_bytes / 1e6:,.0f} MB")
        im.load()
        im = _to_rgb(ImageOps.exif_transpose(im))
        im.thumbnail((side, side), Image.Resampling.BILINEAR)
    out = io.BytesIO()
    im.save(out, format="JPEG", quality=82)
    return out.getvalue()


class ThumbnailCache:
    """Thumbnails by (content digest, side), least recently used dropped beyond ``max_bytes``."""

    def __init__(self, max_bytes: int = 32 << 20, max_input_bytes: int = DEFAULT_MAX_INPUT_BYTES):
        self.max_bytes = max_bytes
        self.max_input_bytes = max_input_bytes
        self._items: OrderedDict[tuple[str, int], bytes] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def get(self, uri: str, sha256: str | None, side: int = DEFAULT_SIDE) -> bytes:
        """The thumbnail of the item stored at ``uri`` with digest ``sha256`` (raises ThumbnailUnavailable)."""
        if not 16 <= side <= MAX_SIDE:
            raise ValueError(f"size must be between 16 and {MAX_SIDE} pixels, not {side}")
        key = (sha256 or f"uri:{uri}", side)
        with self._lock:
            found = self._items.get(key)
            if found is not None:
                self._items.move_to_end(key)
                self.hits += 1
                return found
            self.misses += 1
        thumb = self._make(uri, sha256, side)
        with self._lock:
            if key not in self._items and len(thumb) <= self.max_bytes:
                self._items[key] = thumb
                self._bytes += len(thumb)
                while self._bytes > self.max_bytes:
                    _, dropped = self._items.popitem(last=False)
                    self._bytes -= len(dropped)
        return thumb

    def _make(self, uri: str, sha256: str | None, side: int) -> bytes:
        try:
            data = read_input(uri, limit=self.max_input_bytes)
        except FileNotFoundError:
            raise ThumbnailUnavailable(f"{uri} is not a readable file (items read from inside shards or tables "
                                       "have no file of their own to show)") from None
        except Exception as exc:  # a link, a FIFO, too large, a permission error
            raise ThumbnailUnavailable(f"{uri} cannot be read: {exc}") from None
        if sha256 and hashlib.sha256(data).hexdigest() != sha256:
            raise ThumbnailUnavailable(f"{uri} changed since it was indexed: its bytes no longer match the digest "
                                       "the index recorded")
        try:
            return make_thumbnail(data, side)
        except ThumbnailUnavailable:
            raise
        except Exception as exc:
            raise ThumbnailUnavailable(f"{uri} could not be decoded: {type(exc).__name__}: {exc}") from None

    @property
    def size_bytes(self) -> int:
        return self._bytes
