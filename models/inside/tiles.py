"""Captioned image grids and heat-map colouring, shared by the "looking inside" pictures.

Each tool writes one PNG a person reads at a glance: tiles of equal size, a caption
under each, a title line on top. Tiles keep their aspect ratio (letterboxed), so a
crop clipped at an image border is shown as it is, not stretched.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

BACKGROUND = (255, 255, 255)
TILE_BACKGROUND = (235, 235, 235)
CAPTION_HEIGHT = 14
TITLE_HEIGHT = 18


def fit(image: Image.Image, box: int, background: tuple[int, int, int] = TILE_BACKGROUND,
        resample: Image.Resampling = Image.Resampling.BILINEAR) -> Image.Image:
    """``image`` scaled to fit a ``box`` × ``box`` square, aspect ratio kept, centred on ``background``."""
    w, h = image.size
    scale = box / max(w, h)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    out = Image.new("RGB", (box, box), background)
    out.paste(image.convert("RGB").resize(size, resample), ((box - size[0]) // 2, (box - size[1]) // 2))
    return out


def grid(images: Sequence[Image.Image], captions: Sequence[str] | None = None, tile: int = 96, cols: int | None = None,
         pad: int = 4, title: str | None = None, resample: Image.Resampling = Image.Resampling.BILINEAR
         ) -> Image.Image:
    """Tiles in rows of ``cols`` (default: as square as possible), each with its caption below."""
    n = len(images)
    cols = cols or max(1, math.ceil(math.sqrt(n)))
    rows = max(1, math.ceil(n / cols))
    cap = CAPTION_HEIGHT if captions else 0
    top = TITLE_HEIGHT if title else 0
    width = cols * (tile + pad) + pad
    sheet = Image.new("RGB", (max(width, 6 * len(title or "") + 2 * pad), top + rows * (tile + cap + pad) + pad),
                      BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    if title:
        draw.text((pad, 3), title, fill=(0, 0, 0), font=font)
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        x, y = pad + c * (tile + pad), top + pad + r * (tile + cap + pad)
        sheet.paste(fit(im, tile, resample=resample), (x, y))
        if captions:
            draw.text((x + 1, y + tile + 1), str(captions[i])[: max(4, tile // 6)], fill=(40, 40, 40), font=font)
    return sheet


def heat_colours(values: np.ndarray, colormap: str = "jet") -> np.ndarray:
    """Values in [0, 1] (any shape) → uint8 RGB of the same shape plus a last axis of 3."""
    from matplotlib import colormaps

    v = np.clip(np.nan_to_num(np.asarray(values, np.float32)), 0.0, 1.0)
    return (colormaps[colormap](v)[..., :3] * 255).astype(np.uint8)


def overlay(image: Image.Image, heat: np.ndarray, alpha: float = 0.6) -> Image.Image:
    """``heat`` (h, w) in [0, 1], resized to ``image``, blended over it; zero is transparent, one ``alpha`` opaque."""
    w, h = image.size
    heat_img = Image.fromarray((np.clip(heat, 0, 1) * 255).astype(np.uint8), "L").resize((w, h),
                                                                                         Image.Resampling.BILINEAR)
    v = np.asarray(heat_img, np.float32) / 255.0
    colours = heat_colours(v).astype(np.float32)
    base = np.asarray(image.convert("RGB"), np.float32)
    a = (alpha * v)[..., None]
    return Image.fromarray((base * (1 - a) + colours * a).astype(np.uint8), "RGB")


def normalise_map(m: np.ndarray, percentile: float = 99.0) -> np.ndarray:
    """A non-negative map scaled to [0, 1] by its ``percentile`` (one hot pixel does not flatten the rest)."""
    m = np.maximum(np.nan_to_num(np.asarray(m, np.float32)), 0.0)
    top = float(np.percentile(m, percentile)) if m.size else 0.0
    if top <= 0:
        top = float(m.max()) if m.size else 0.0
    return np.clip(m / top, 0.0, 1.0) if top > 0 else np.zeros_like(m)
