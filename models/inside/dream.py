"""DeepDream: amplify whatever a chosen layer already sees in a photo.

Gradient ascent on the mean activation of one or more layers, starting from the photo
itself, as in Mordvintsev et al.'s original notebook:

* **octaves**: the ascent runs on a pyramid of scales, smallest first (``octaves``
  levels, each ``octave_scale`` times the previous), so patterns grow at several sizes;
* **detail re-injection**: between octaves the change the dream made (the *detail*:
  dreamed image minus that octave's plain resize) is upscaled and added to the next,
  sharper octave, so the photo's own fine structure is never replaced by an upsampled
  blur; the last detail is added to the full-resolution original, which is why the
  output has the input's exact size and sharpness even when the dream ran smaller;
* **random shifts**: the image is rolled by a random offset before each step (and back
  after), which hides tile seams and stops patterns locking onto the network's stride grid;
* **tiled gradients**: the gradient is computed tile by tile (``tile`` pixels), so a
  large image costs the memory of one tile, not of the whole picture;
* **normalised step**: the gradient is divided by its standard deviation, so ``step`` is
  the typical change per step in grey levels whatever the layer;
* the result is clipped to valid pixels [0, 255] after every step.
"""

from __future__ import annotations

import dataclasses
import logging
import math

import numpy as np
from PIL import Image

from models.backbone import imaging
from models.inside.layers import LayerModel

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class DreamOptions:
    octaves: int = 4
    octave_scale: float = 1.4
    steps: int = 10  # per octave
    step: float = 1.5  # grey levels per step (the gradient divided by its standard deviation)
    tile: int = 256  # gradient tiles of at most this side
    max_side: int = 512  # the dream runs at this size at most; its detail is upscaled onto the original
    min_side: int = 64  # octaves smaller than this are skipped
    seed: int = 0

    def __post_init__(self) -> None:
        if self.octaves < 1 or self.octave_scale <= 1.0 or self.steps < 1 or self.step <= 0:
            raise ValueError("dream needs octaves ≥ 1, octave scale > 1, steps ≥ 1 and step > 0")
        if self.tile < 32 or self.min_side < 32:
            raise ValueError("dream tiles and octaves must be at least 32 pixels")


@dataclasses.dataclass
class DreamResult:
    image: np.ndarray  # uint8 (H, W, 3), the input's size
    octave_sizes: list[tuple[int, int]]  # (height, width) of each octave dreamt, smallest first
    losses: list[list[float]]  # mean activation per step, per octave

    def figures(self) -> dict:
        return {"octave_sizes": [list(s) for s in self.octave_sizes],
                "mean_activation": [[round(v, 6) for v in o] for o in self.losses]}


def _resize(x: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Float image (h, w, 3) → (H, W, 3), bilinear, per channel (Pillow float mode keeps the values exact)."""
    h, w = hw
    if x.shape[:2] == (h, w):
        return x.copy()
    return np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(x[..., c]), "F").resize(
        (w, h), Image.Resampling.BILINEAR)) for c in range(x.shape[2])], axis=-1).astype(np.float32)


def _bounds(length: int, tile: int) -> list[tuple[int, int]]:
    """Near-equal tiles covering ``length``: no sliver at the end for the network to choke on."""
    n = max(1, math.ceil(length / tile))
    edges = np.linspace(0, length, n + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:], strict=True)]


def octave_shapes(height: int, width: int, opts: DreamOptions) -> list[tuple[int, int]]:
    """(height, width) of each octave, smallest first, the last one the working size itself."""
    shapes = []
    for k in range(opts.octaves - 1, -1, -1):
        f = opts.octave_scale ** k
        h, w = int(round(height / f)), int(round(width / f))
        if min(h, w) >= opts.min_side or k == 0:
            shapes.append((h, w))
    return shapes


class Dreamer:
    """DeepDream on one layer model (build it with ``flexible=True``: octaves have every size)."""

    def __init__(self, layer_model: LayerModel, opts: DreamOptions = DreamOptions()):
        import tensorflow as tf

        if not layer_model.flexible:
            raise ValueError("DeepDream needs a LayerModel built with flexible=True")
        self.layer_model = layer_model
        self.opts = opts

        @tf.function(input_signature=[tf.TensorSpec([None, None, 3], tf.float32)], reduce_retracing=True)
        def tile_gradient(tile):
            with tf.GradientTape() as tape:
                tape.watch(tile)
                acts = layer_model(tile[None])
                acts = acts if isinstance(acts, list | tuple) else [acts]
                loss = tf.add_n([tf.reduce_mean(a) for a in acts])
            return loss, tape.gradient(loss, tile)

        self._tile_gradient = tile_gradient

    def gradient(self, image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, float]:
        """The loss gradient of ``image`` (h, w, 3), tile by tile after a random roll; and the mean loss."""
        h, w = image.shape[:2]
        dy, dx = (int(rng.integers(-(min(self.opts.tile, n) // 2), min(self.opts.tile, n) // 2 + 1))
                  for n in (h, w))
        rolled = np.roll(image, (dy, dx), axis=(0, 1))
        grad = np.zeros_like(rolled)
        losses = []
        for y0, y1 in _bounds(h, self.opts.tile):
            for x0, x1 in _bounds(w, self.opts.tile):
                loss, g = self._tile_gradient(rolled[y0:y1, x0:x1])
                grad[y0:y1, x0:x1] = g.numpy()
                losses.append(float(loss))
        return np.roll(grad, (-dy, -dx), axis=(0, 1)), float(np.mean(losses))

    def dream(self, image: np.ndarray) -> DreamResult:
        """``image`` uint8 (H, W, 3) → the dreamt image at the same size."""
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected an (H, W, 3) image, got {image.shape}")
        opts = self.opts
        original = image.astype(np.float32)
        H, W = original.shape[:2]
        scale = min(1.0, opts.max_side / max(H, W)) if opts.max_side else 1.0
        work_hw = (max(1, int(round(H * scale))), max(1, int(round(W * scale))))
        if min(work_hw) < 32:
            raise ValueError(f"the image ({W}x{H}) is too small to dream on (at least 32 px a side)")
        work = _resize(original, work_hw)
        shapes = octave_shapes(*work_hw, opts)
        if len(shapes) < opts.octaves:
            log.info("dream: %d of %d octaves (smaller ones would be under %d px)", len(shapes), opts.octaves,
                     opts.min_side)
        rng = np.random.default_rng(opts.seed)
        detail = np.zeros(shapes[0] + (3,), np.float32)
        losses: list[list[float]] = []
        for n, hw in enumerate(shapes):
            base = _resize(work, hw)
            img = base + _resize(detail, hw)
            octave_losses = []
            for _ in range(opts.steps):
                grad, loss = self.gradient(img, rng)
                img = np.clip(img + opts.step * grad / (grad.std() + 1e-8), 0.0, 255.0)
                octave_losses.append(loss)
            detail = img - base
            losses.append(octave_losses)
            log.info("dream: octave %d/%d (%dx%d) mean activation %.3f → %.3f", n + 1, len(shapes), hw[1], hw[0],
                     octave_losses[0], octave_losses[-1])
        out = np.clip(original + _resize(detail, (H, W)), 0.0, 255.0)
        if not np.isfinite(out).all():
            raise FloatingPointError("the dream produced non-finite pixels")
        return DreamResult(np.round(out).astype(np.uint8), shapes, losses)


def decode_photo(data: bytes, max_pixels: int = imaging.DEFAULT_MAX_PIXELS,
                 max_decode_bytes: int = imaging.DEFAULT_MAX_DECODE_BYTES) -> np.ndarray:
    """Untrusted bytes → uint8 (H, W, 3) at the photo's own size and orientation.

    The product's limits apply before a pixel is decoded (:func:`models.backbone.imaging.open_image`:
    formats, pixel count; :func:`models.backbone.imaging.decode_cost`: the memory budget), and every mode
    is converted to RGB by the decoder's own rule (16-bit scaled, transparency on white).
    """
    from PIL import ImageOps

    im = imaging.open_image(data, max_pixels)
    cost = imaging.decode_cost(im.mode, im.format or "unknown", im.size[0] * im.size[1], "transparency" in im.info)
    if cost > max_decode_bytes:
        raise imaging.DecodeBudgetError(f"decoding this {im.size[0]}x{im.size[1]} image would need about "
                                        f"{cost / 1e6:,.0f} MB, more than the budget of "
                                        f"{max_decode_bytes / 1e6:,.0f} MB")
    im.load()
    im = ImageOps.exif_transpose(im)
    return np.asarray(imaging._to_rgb(im), dtype=np.uint8)  # the decoder's own mode conversion (16-bit, alpha)
