"""The three Keras models (autoencoder, encoder, decoder), built from one set of shared layers."""

from __future__ import annotations

import dataclasses
from typing import Any

from models.autoencoders.pixel_autoencoder.config import PIXELS_KEY, PixelAutoencoderConfig


@dataclasses.dataclass
class Networks:
    autoencoder: Any  # pixels → reconstruction in [0, 1]
    encoder: Any  # pixels → code
    decoder: Any  # code → reconstruction


def build(cfg: PixelAutoencoderConfig, any_size: bool = False) -> Networks:
    """The three Keras models, sharing their layers. ``any_size`` (convolutional bottleneck only)
    leaves the spatial input shape open, for cleaning images of other sizes."""
    import keras

    if any_size and cfg.dense:
        raise ValueError("a dense bottleneck fixes the input size; only code_dim 0 builds for any size")
    keras.utils.set_random_seed(cfg.seed)
    side = None if any_size else cfg.size
    layers = keras.layers
    encode = [layers.Rescaling(1.0 / 255.0, name="scale")]
    encode += [layers.Conv2D(f, 3, strides=2, padding="same", activation="relu", name=f"encode_{i}")
               for i, f in enumerate(cfg.filters)]
    decode = []
    if cfg.dense:
        encode += [layers.Flatten(name="flatten"), layers.Dense(cfg.code_dim, name="code")]
        decode += [layers.Dense(cfg.grid * cfg.grid * cfg.filters[-1], activation="relu", name="expand"),
                   layers.Reshape((cfg.grid, cfg.grid, cfg.filters[-1]), name="unflatten")]
    decode += [layers.Conv2DTranspose(f, 3, strides=2, padding="same", activation="relu", name=f"decode_{i}")
               for i, f in enumerate(reversed(cfg.filters))]
    decode += [layers.Conv2D(3, 3, padding="same", activation="sigmoid", name="reconstruction")]

    pixels = keras.Input((side, side, 3), name=PIXELS_KEY)
    code = pixels
    for layer in encode:
        code = layer(code)
    out = code
    for layer in decode:
        out = layer(out)
    code_in = keras.Input(tuple(code.shape[1:]), name="code")
    again = code_in
    for layer in decode:
        again = layer(again)
    return Networks(keras.Model(pixels, out, name="autoencoder"), keras.Model(pixels, code, name="encoder"),
                    keras.Model(code_in, again, name="decoder"))
