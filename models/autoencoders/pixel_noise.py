"""Noise models for the denoising autoencoder: ``gaussian:σ``, ``saltpepper:p``, ``jpeg:q``.

One implementation in TensorFlow ops (:func:`corrupt`), used by the training pipeline
(``tf.data``) and, through :func:`add_noise`, by tests and benchmarks that make noisy
photos, so "noisy" means the same thing in training and in every measurement.

* ``gaussian:σ`` adds N(0, σ²) to every channel, σ in units of the full intensity range
  (``gaussian:0.1`` is 25.5 grey levels), then clips;
* ``saltpepper:p`` sets a fraction ``p`` of the pixels (all channels) to white or black,
  half each;
* ``jpeg:q`` re-encodes the image as a baseline JPEG at quality ``q`` (1–100), the
  blocking and ringing of a heavily compressed upload.

Every result is rounded to 8-bit levels, as a noisy image file would be. With several
kinds, each image gets one of them, chosen uniformly by its seed. Randomness is stateless
(``tf.random.stateless_*`` on a per-image seed), so the same seed gives the same noise.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

KINDS = ("gaussian", "saltpepper", "jpeg")


@dataclasses.dataclass(frozen=True)
class Noise:
    kind: str
    amount: float  # gaussian: σ in [0, 1] units; saltpepper: fraction of pixels; jpeg: quality

    def __str__(self) -> str:
        return f"{self.kind}:{int(self.amount) if self.kind == 'jpeg' else f'{self.amount:g}'}"


def parse_one(text: str) -> Noise:
    """``kind:amount`` → :class:`Noise`; ValueError naming the option and the valid range."""
    kind, sep, value = text.strip().partition(":")
    if kind not in KINDS or not sep:
        raise ValueError(f"--noise: {text!r} is not one of gaussian:σ, saltpepper:p, jpeg:q")
    try:
        amount = float(value)
    except ValueError:
        raise ValueError(f"--noise: {text!r}: {value!r} is not a number") from None
    if kind == "gaussian" and not 0.0 < amount <= 1.0:
        raise ValueError(f"--noise: gaussian σ is in units of the full intensity range (0.1 = 25.5 grey levels): "
                         f"0 < σ ≤ 1, not {value}")
    if kind == "saltpepper" and not 0.0 < amount < 1.0:
        raise ValueError(f"--noise: saltpepper p is the fraction of pixels hit: 0 < p < 1, not {value}")
    if kind == "jpeg" and (amount != int(amount) or not 1 <= amount <= 100):
        raise ValueError(f"--noise: jpeg q is a JPEG quality, an integer from 1 to 100, not {value}")
    return Noise(kind, amount)


def parse_noise(text: str | None) -> tuple[Noise, ...]:
    """``gaussian:0.1,saltpepper:0.05,jpeg:20`` → the noise models; empty or None → ()."""
    if not text or not text.strip():
        return ()
    return tuple(parse_one(part) for part in text.split(",") if part.strip())


def _apply(image: Any, noise: Noise, seed: Any) -> Any:
    import tensorflow as tf

    if noise.kind == "gaussian":
        return image + tf.random.stateless_normal(tf.shape(image), seed, stddev=noise.amount)
    if noise.kind == "saltpepper":
        u = tf.random.stateless_uniform(tf.concat([tf.shape(image)[:2], [1]], 0), seed)
        image = tf.where(u < noise.amount / 2, tf.ones_like(image), image)
        return tf.where(u > 1.0 - noise.amount / 2, tf.zeros_like(image), image)
    if noise.kind == "jpeg":
        return tf.image.adjust_jpeg_quality(image, int(noise.amount))
    raise ValueError(f"unknown noise {noise.kind!r}")


def corrupt(image: Any, noises: tuple[Noise, ...], seed: Any) -> Any:
    """One (H, W, 3) float32 image in [0, 1] → its noisy copy (8-bit levels), with an int64 [2] ``seed``.

    With several noise models the seed also picks which one this image gets.
    """
    import tensorflow as tf

    if not noises:
        return image
    seed = tf.cast(seed, tf.int64)
    branches = [lambda n=n, i=i: _apply(image, n, tf.random.experimental.stateless_fold_in(seed, i))
                for i, n in enumerate(noises)]
    if len(branches) == 1:
        noisy = branches[0]()
    else:
        pick = tf.random.stateless_uniform([], seed, minval=0, maxval=len(branches), dtype=tf.int32)
        noisy = tf.switch_case(pick, branches)
    noisy = tf.ensure_shape(noisy, image.shape)
    return tf.round(tf.clip_by_value(noisy, 0.0, 1.0) * 255.0) / 255.0


def add_noise(rgb: np.ndarray, noise: Noise | str, seed: int = 0) -> np.ndarray:
    """A noisy copy of an (H, W, 3) uint8 image of any size, exactly as training corrupts its inputs."""
    import tensorflow as tf

    if isinstance(noise, str):
        noise = parse_one(noise)
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 image, got {rgb.shape} {rgb.dtype}")
    image = tf.convert_to_tensor(rgb, tf.float32) / 255.0
    noisy = corrupt(image, (noise,), tf.constant([seed, 0], tf.int64))
    return np.asarray(tf.round(noisy * 255.0).numpy(), np.uint8)
