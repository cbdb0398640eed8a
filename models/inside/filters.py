"""Filter visualisation: the first convolution's kernels as a grid of RGB tiles.

First-layer filters of a trained network look like oriented edges and colour blobs;
random ones look like noise, which makes this a quick check of what was loaded.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image


def first_conv_kernels(keras_model) -> tuple[str, np.ndarray]:
    """(layer name, kernels (kh, kw, 3, n)) of the first Conv2D that reads RGB."""
    import keras

    for layer in keras_model.layers:
        if isinstance(layer, keras.layers.Conv2D) and not isinstance(layer, keras.layers.DepthwiseConv2D):
            kernel = np.asarray(layer.get_weights()[0])
            if kernel.ndim == 4 and kernel.shape[2] == 3:
                return layer.name, kernel
    raise ValueError("the model has no Conv2D layer over RGB input")


def filter_grid(kernels: np.ndarray, tile: int = 32, pad: int = 2) -> Image.Image:
    """Each filter min-max scaled to [0, 255] on its own, enlarged to ``tile`` pixels."""
    kh, kw, _, n = kernels.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = Image.new("RGB", (cols * (tile + pad) + pad, rows * (tile + pad) + pad), (255, 255, 255))
    for i in range(n):
        k = kernels[:, :, :, i]
        span = float(k.max() - k.min()) or 1.0
        img = ((k - k.min()) / span * 255).astype(np.uint8)
        im = Image.fromarray(img, "RGB").resize((tile, tile), Image.Resampling.NEAREST)
        r, c = divmod(i, cols)
        grid.paste(im, (pad + c * (tile + pad), pad + r * (tile + pad)))
    return grid
