"""Saliency maps: occlusion finds what a score depends on; guided backpropagation needs ReLUs.

Gradient and guided maps of the real similarity are tested in tests/inspection/test_explain.py.
"""

from __future__ import annotations

import numpy as np
import pytest

from models.inside.saliency import guided_clone, occlusion_map


def test_occlusion_peaks_where_the_score_looks():
    rng = np.random.default_rng(0)
    image = rng.uniform(0, 255, (64, 80, 3)).astype(np.float32)
    image[40:56, 8:24] = 255.0  # the score is the brightness of this square

    def score(x):
        return x[:, 40:56, 8:24].mean(axis=(1, 2, 3)) / 255.0

    heat, base = occlusion_map(score, image, patch=8, stride=4)
    assert heat.shape == (64, 80) and base == pytest.approx(1.0)
    y, x = np.unravel_index(np.argmax(heat), heat.shape)
    assert 40 <= y < 56 and 8 <= x < 24
    assert heat[:30].max() == 0.0  # hiding anything else changes nothing


def test_guided_backpropagation_is_refused_without_relus():
    import keras

    inputs = keras.Input((8, 8, 3))
    swish = keras.Model(inputs, keras.layers.Conv2D(4, 3, activation="swish")(inputs))
    with pytest.raises(ValueError, match="no ReLU layers"):
        guided_clone(swish)
