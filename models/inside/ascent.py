"""Filter visualisation by gradient ascent: the input pattern a chosen channel responds to most.

Start from a noisy grey image and repeatedly move the pixels along the gradient of the
channel's mean activation. The gradient is L2-normalised per image and scaled so that
one step changes the pixels by ``step`` grey levels (root mean square): the step size
then means the same thing for every layer, whose activations differ by orders of
magnitude. Two regularisers keep higher layers readable instead of high-frequency noise:
a random shift (jitter) of the image before each gradient, so the pattern cannot hide
in one pixel grid, and a light Gaussian blur every few steps.

Several filters are ascended together as one batch (the network's BatchNorm runs in
inference mode, so images in a batch do not interact), and the whole loop of steps runs
as one TensorFlow graph (``tf.function``): 20 filters of MobileNet's last layer take
about 35 s on two CPU cores, start-up included.

For a ReLU layer (MobileNet's ``conv_pw_*_relu`` are ReLU6) the objective is the unit's
pre-activation, the ReLU's input, built with ``LayerModel(..., pre_activation=True)``: the
activation itself has no gradient where the unit is off, which is everywhere on a grey
start image for most filters of a late layer, and none where ReLU6 saturates at 6. The
activation is what is recorded. A filter whose activation stays at zero for the whole
ascent is reported and skipped, and the next channel takes its place when the caller
asked for "the first N filters".
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

import numpy as np
from PIL import Image

from models.inside import tiles
from models.inside.layers import LayerModel

log = logging.getLogger(__name__)

DEAD_ACTIVATION = 1e-6  # a final mean activation at or below this means the filter never fired


@dataclasses.dataclass(frozen=True)
class AscentOptions:
    size: int = 128  # image side in pixels (any size with a flexible layer model)
    steps: int = 60
    step: float = 3.0  # RMS change of the pixels per step, in grey levels
    jitter: int = 8  # random shift of up to ± this many pixels before each gradient
    blur_every: int = 5  # Gaussian blur every N steps (0: never)
    blur_sigma: float = 0.6
    noise: float = 20.0  # start: grey 128 plus uniform noise of ± this many grey levels
    border: int = 1  # activation-map cells left out of the mean on each side (edge effects)
    batch: int = 10  # filters ascended at once
    seed: int = 0

    def __post_init__(self) -> None:
        if self.size < 32 or self.steps < 1 or self.step <= 0 or self.batch < 1:
            raise ValueError("ascent needs size ≥ 32, steps ≥ 1, step > 0 and batch ≥ 1")


@dataclasses.dataclass
class AscentResult:
    channels: list[int]
    images: np.ndarray  # uint8 (n, size, size, 3), normalised for display
    history: np.ndarray  # (n, steps + 1) mean activation of each channel before each step and at the end
    skipped: list[int]  # channels whose activation stayed at zero

    def figures(self) -> dict:
        return {
            "channels": self.channels,
            "skipped_dead": self.skipped,
            "activation_start": [round(float(h[0]), 6) for h in self.history],
            "activation_end": [round(float(h[-1]), 6) for h in self.history],
            "history": [[round(float(v), 6) for v in h] for h in self.history],
        }


def _gaussian_kernel(sigma: float) -> np.ndarray:
    radius = max(1, int(round(2 * sigma)))
    x = np.arange(-radius, radius + 1, dtype=np.float32)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def _build_ascent(layer_model: LayerModel, opts: AscentOptions):
    """The whole ascent loop as one graph: (images, channels) → (images, history)."""
    import tensorflow as tf

    channels_total = layer_model.channels[0]
    k1 = _gaussian_kernel(opts.blur_sigma)
    kernel = tf.constant(np.tile(np.outer(k1, k1)[:, :, None, None], (1, 1, 3, 1)), tf.float32)
    pad = len(k1) // 2
    steps, jitter, border = opts.steps, opts.jitter, opts.border
    step, blur_every, seed = float(opts.step), opts.blur_every, opts.seed

    def channel_means(images, onehot):
        """(objective, activation): the channel's mean pre-activation (when the model gives it) and activation."""
        out = layer_model(images)
        maps = (out[0], out[1]) if layer_model.pre_activation else (out, out)
        means = []
        for act in maps:
            h, w = tf.shape(act)[1], tf.shape(act)[2]
            b = tf.minimum(border, tf.maximum(0, (tf.minimum(h, w) - 1) // 2))
            act = act[:, b:h - b, b:w - b, :]
            means.append(tf.reduce_mean(tf.reduce_sum(act * onehot[:, None, None, :], axis=-1), axis=[1, 2]))
        return means[0], means[1]

    def blur(images):
        padded = tf.pad(images, [[0, 0], [pad, pad], [pad, pad], [0, 0]], mode="REFLECT")
        return tf.nn.depthwise_conv2d(padded, kernel, strides=[1, 1, 1, 1], padding="VALID")

    @tf.function(reduce_retracing=True)
    def ascend(images, channels):
        onehot = tf.one_hot(channels, channels_total, dtype=tf.float32)
        history = tf.TensorArray(tf.float32, size=steps + 1)
        for i in tf.range(steps):
            shift = tf.random.stateless_uniform([2], seed=[seed, i], minval=-jitter, maxval=jitter + 1,
                                                dtype=tf.int32)
            shifted = tf.roll(images, shift, axis=[1, 2])
            with tf.GradientTape() as tape:
                tape.watch(shifted)
                objective, activation = channel_means(shifted, onehot)
                loss = tf.reduce_sum(objective)
            history = history.write(i, activation)  # before this step (of the shifted image)
            grad = tf.roll(tape.gradient(loss, shifted), -shift, axis=[1, 2])
            rms = tf.sqrt(tf.reduce_mean(tf.square(grad), axis=[1, 2, 3], keepdims=True))
            images = tf.clip_by_value(images + step * grad / (rms + 1e-12), 0.0, 255.0)
            if blur_every > 0:
                images = tf.cond((i + 1) % blur_every == 0, lambda x=images: blur(x), lambda x=images: x)
        history = history.write(steps, channel_means(images, onehot)[1])
        return images, tf.transpose(history.stack())

    return ascend


def display(image: np.ndarray, crop: int = 0) -> np.ndarray:
    """An ascended image standardised for display (mean grey, ± 3.3 standard deviations span the range)."""
    x = np.asarray(image, np.float32)
    if crop and min(x.shape[:2]) > 4 * crop:
        x = x[crop:-crop, crop:-crop]
    x = (x - x.mean()) / (x.std() + 1e-5) * 0.15 + 0.5
    return (np.clip(x, 0, 1) * 255).astype(np.uint8)


def live(history: np.ndarray) -> np.ndarray:
    """Which filters fired: the activation rose above zero at some point of the ascent."""
    return np.asarray(history).max(axis=1) > DEAD_ACTIVATION


def ascend_filters(layer_model: LayerModel, channels: Sequence[int] | None = None, count: int = 16,
                   opts: AscentOptions = AscentOptions()) -> AscentResult:
    """Ascends ``channels`` (all shown, dead ones reported), or the first ``count`` live channels in order."""
    if len(layer_model.names) != 1:
        raise ValueError("filter ascent reads one layer")
    total = layer_model.channels[0]
    wanted = list(channels) if channels is not None else list(range(total))
    bad = [c for c in wanted if not 0 <= c < total]
    if bad:
        raise ValueError(f"{layer_model.names[0]} has channels 0..{total - 1}, not {bad}")
    need = len(wanted) if channels is not None else min(count, total)
    size = opts.size if layer_model.flexible else layer_model.size
    # one graph per model and options: a second call (another set of filters) reuses the trace; the graph
    # reads the model's variables, so it sees weights set after it was built
    cache = layer_model.__dict__.setdefault("_ascent_graphs", {})
    ascend = cache.get(opts) or cache.setdefault(opts, _build_ascent(layer_model, opts))
    rng = np.random.default_rng(opts.seed)
    kept_c: list[int] = []
    kept_img: list[np.ndarray] = []
    kept_hist: list[np.ndarray] = []
    skipped: list[int] = []
    pos = 0
    while len(kept_c) < need and pos < len(wanted):
        batch = wanted[pos:pos + opts.batch]
        pos += len(batch)
        start = 128.0 + rng.uniform(-opts.noise, opts.noise, size=(len(batch), size, size, 3)).astype(np.float32)
        images, history = ascend(start, np.asarray(batch, np.int32))
        images, history = images.numpy(), history.numpy()
        fired = live(history)
        for c, img, hist, ok in zip(batch, images, history, fired, strict=True):
            if not ok:
                skipped.append(c)
            elif len(kept_c) < need:
                kept_c.append(c)
                kept_img.append(img)
                kept_hist.append(hist)
        log.info("ascent: %d of %d filters of %s done (%d dead so far)", len(kept_c), need, layer_model.names[0],
                 len(skipped))
    shown = np.stack([display(i, crop=opts.jitter) for i in kept_img]) if kept_img else np.zeros((0, 1, 1, 3),
                                                                                                   np.uint8)
    hist = np.stack(kept_hist) if kept_hist else np.zeros((0, opts.steps + 1), np.float32)
    return AscentResult(kept_c, shown, hist, skipped)


def ascent_grid(result: AscentResult, layer: str, tile: int = 112) -> Image.Image:
    """The ascended filters as one captioned grid: channel number and the mean activation reached."""
    images = [Image.fromarray(i) for i in result.images]
    captions = [f"#{c}: {h[-1]:.2f}" for c, h in zip(result.channels, result.history, strict=True)]
    title = f"{layer}: {len(images)} filters by gradient ascent"
    if result.skipped:
        title += f"; {len(result.skipped)} dead skipped"
    return tiles.grid(images, captions, tile=tile, title=title)
