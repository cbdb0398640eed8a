"""Cleaning photos of any size with a denoising autoencoder that ``cbir train-autoencoder --noise`` trained.

**Tiled, not resized.** The network was trained on small images (``--size``, 128 px by
default); a photo is cut into overlapping tiles, each tile is cleaned, and only each
tile's centre is kept (a margin on every side is cleaned and thrown away, so no seam
shows where tiles meet), then the centres are put back together at the photo's own size.
Resizing the photo down to the training size, cleaning and resizing back up would return
the same size too, but would blur away exactly the detail a query needs and that noise
removal is meant to keep. A fully convolutional denoiser (``--code-dim 0``, the default with
``--noise``) cleans 256-px tiles with a 32-px margin; one with a dense bottleneck can only take
its training size, so it is tiled at that size with a margin of an eighth of it. Edges are
padded by reflection. Memory is bounded by a batch of tiles, whatever the photo's size.

**Loaded from data.** :meth:`Denoiser.load` reads the training output's manifest, checks the
weights files against the digest it records, rebuilds the network from this module's own
code and sets the weights from the ``.npy`` data: a denoiser folder never makes a reader run
code that came with it (the SavedModels next to it are for TF Serving and other tools).
"""

from __future__ import annotations

import io
import json
import math
import os
import warnings
from collections.abc import Callable

import numpy as np
from PIL import Image

from artefacts.manifests import PixelAutoencoderManifest
from models.autoencoders.pixel_autoencoder import (
    WEIGHTS_DIR,
    PixelAutoencoderConfig,
    build,
    load_weights_data,
    set_weights,
    weights_digest,
)
from models.backbone import imaging

MANIFEST = "MANIFEST.json"
CONV_TILE = 256
CONV_MARGIN = 32
TILE_BATCH = 8


def decode_rgb(data: bytes, max_pixels: int = imaging.DEFAULT_MAX_PIXELS,
               max_decode_bytes: int = imaging.DEFAULT_MAX_DECODE_BYTES) -> np.ndarray:
    """Image bytes → (H, W, 3) uint8 at the image's own size, by the product's decoding rules.

    The same formats, pixel limit, memory budget (checked on the header, before any pixel
    is decoded), EXIF orientation and mode conversions as :func:`models.backbone.imaging.decode_and_resize`,
    without the resize: a denoiser returns the size it was given.
    """
    im = imaging.open_image(data, max_pixels)
    fmt = im.format or "unknown"
    w, h = im.size
    cost = imaging.decode_cost(im.mode, fmt, w * h, "transparency" in im.info)
    if cost > max_decode_bytes:
        raise imaging.DecodeBudgetError(
            f"decoding this {fmt} {w}x{h} ({im.mode}) would need about {cost / 1e6:,.0f} MB, more than the "
            f"budget of {max_decode_bytes / 1e6:,.0f} MB per image")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        im.load()
        orientation = imaging._orientation(im)
        if orientation != 1:
            im = im.transpose(imaging._ORIENTATION_OPS[orientation])
        im = imaging._to_rgb(im)
        return np.asarray(im, dtype=np.uint8)


def encode_png(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.asarray(rgb, np.uint8), mode="RGB").save(buf, format="PNG")
    return buf.getvalue()


def _local_read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


class Denoiser:
    """A trained denoising autoencoder and the tiling that applies it to images of any size."""

    def __init__(self, model, cfg: PixelAutoencoderConfig, tile: int, margin: int, source: str = ""):
        import tensorflow as tf

        if tile - 2 * margin < 1:
            raise ValueError(f"tile {tile} leaves nothing inside a margin of {margin}")
        self.config = cfg
        self.tile = tile
        self.margin = margin
        self.source = source
        self._fn = tf.function(lambda x: model(x, training=False), reduce_retracing=True,
                               input_signature=[tf.TensorSpec([None, tile, tile, 3], tf.float32)])

    @classmethod
    def load(cls, folder: str, read: Callable[[str], bytes] | None = None) -> Denoiser:
        """From a ``cbir train-autoencoder --noise`` output folder (local, or through ``read(path) -> bytes``)."""
        read = read or _local_read
        path = os.path.join(folder, MANIFEST)
        try:
            raw = read(path)
        except OSError:  # a local FileNotFoundError, Beam's BeamIOError (an IOError) elsewhere
            raise FileNotFoundError(f"{path} cannot be read: {folder} is not a cbir train-autoencoder output") from None
        try:
            manifest = PixelAutoencoderManifest.from_dict(json.loads(raw), source=path)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None
        if not manifest.denoising:
            raise ValueError(f"{folder} was trained without --noise: it reconstructs images but was never taught to "
                             "remove noise; train one with cbir train-autoencoder --noise ...")
        cfg, weights, digests = load_weights_data(os.path.join(folder, manifest.weights.folder or WEIGHTS_DIR), read)
        recorded = {name: d.sha256 for name, d in manifest.weights.files.items()}
        if digests != recorded or weights_digest(digests) != manifest.weights.digest:
            changed = sorted(set(digests.items()) ^ set(recorded.items()))
            raise ValueError(f"{folder}/{manifest.weights.folder}: the weights differ from what {MANIFEST} records "
                             f"({', '.join(sorted({n for n, _ in changed})) or 'digest'}): re-run the training")
        nets = build(cfg, any_size=not cfg.dense)
        set_weights(nets.autoencoder, weights)
        return cls.from_model(nets.autoencoder, cfg, source=folder)

    @classmethod
    def from_model(cls, autoencoder, cfg: PixelAutoencoderConfig, tile: int | None = None, margin: int | None = None,
                   source: str = "") -> Denoiser:
        """Around a trained autoencoder (as training returns it; rebuilt open-sized when it is convolutional).

        Default tiles: the training size with a margin of an eighth for a dense bottleneck, else
        256 px with a 32-px margin.
        """
        if not cfg.dense and autoencoder.input_shape[1] is not None:
            open_sized = build(cfg, any_size=True).autoencoder
            open_sized.set_weights(autoencoder.get_weights())
            autoencoder = open_sized
        step = 2 ** len(cfg.filters)
        if cfg.dense:
            if tile not in (None, cfg.size):
                raise ValueError(f"a dense bottleneck takes {cfg.size}-px tiles only, not {tile}")
            tile, margin = cfg.size, cfg.size // 8 if margin is None else margin
        else:
            tile = CONV_TILE if tile is None else tile
            if tile % step:
                raise ValueError(f"tiles must be a multiple of {step} px for this network, not {tile}")
            margin = CONV_MARGIN if margin is None else margin
        return cls(autoencoder, cfg, tile, margin, source=source)

    def clean(self, rgb: np.ndarray) -> np.ndarray:
        """An (H, W, 3) uint8 image → its cleaned copy, same shape and dtype."""
        rgb = np.asarray(rgb)
        if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
            raise ValueError(f"expected an RGB (H, W, 3) uint8 image, got shape {rgb.shape} of {rgb.dtype}")
        h, w = rgb.shape[:2]
        if h == 0 or w == 0:
            raise ValueError(f"cannot clean an empty {w}x{h} image")
        t, m = self.tile, self.margin
        step = t - 2 * m
        ny, nx = math.ceil(h / step), math.ceil(w / step)
        pad = ((m, ny * step + m - h), (m, nx * step + m - w), (0, 0))
        padded = np.pad(rgb, pad, mode="reflect" if min(h, w) > 1 else "edge").astype(np.float32)
        origins = [(y, x) for y in range(0, ny * step, step) for x in range(0, nx * step, step)]
        out = np.empty_like(rgb)
        for lo in range(0, len(origins), TILE_BATCH):
            batch = origins[lo:lo + TILE_BATCH]
            tiles = np.stack([padded[y:y + t, x:x + t] for y, x in batch])
            cleaned = self._fn(tiles).numpy()
            cleaned = np.clip(np.round(cleaned[:, m:m + step, m:m + step] * 255.0), 0, 255).astype(np.uint8)
            for (y, x), tile in zip(batch, cleaned, strict=True):
                hh, ww = min(step, h - y), min(step, w - x)
                out[y:y + hh, x:x + ww] = tile[:hh, :ww]
        return out

    def clean_bytes(self, data: bytes, max_pixels: int = imaging.DEFAULT_MAX_PIXELS) -> bytes:
        """Image bytes → the cleaned image as PNG bytes (lossless, same size)."""
        return encode_png(self.clean(decode_rgb(data, max_pixels)))
