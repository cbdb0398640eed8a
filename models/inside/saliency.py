"""Which pixels a score depends on: occlusion sensitivity, gradient saliency, guided backpropagation.

* **Occlusion** (Zeiler & Fergus): slide a grey patch over the image and record how far the
  score drops with each placement; a pixel's value is the mean drop over the placements that
  cover it. Slow (one forward pass per placement, batched) but honest: it measures what
  happens when the content is really gone.
* **Gradient** (Simonyan et al.): |∂score/∂pixel|, the largest over the three colour channels.
  One backward pass; noisy, since it is a local linearisation.
* **Guided backpropagation** (Springenberg et al.): the same gradient with every ReLU letting
  back only positive gradient where its input was positive: sharper maps of the input
  features that raise the score. Built by cloning the Keras model with guided ReLU layers;
  the forward pass (and so the score) is unchanged.

Scores come from a callable, so the same maps serve any differentiable number (here the
cosine similarity between a query and a result, see :mod:`models.inside.similarity`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

GREY = 127.5  # the occluding patch: mid-grey, which the "tf" preprocessing maps to exactly zero


def _positions(length: int, patch: int, stride: int) -> list[int]:
    last = max(0, length - patch)
    out = list(range(0, last + 1, stride))
    if out[-1] != last:
        out.append(last)
    return out


def occlusion_map(score: Callable[[np.ndarray], np.ndarray], pixels: np.ndarray, patch: int = 32, stride: int = 16,
                  fill: float = GREY, batch: int = 32) -> tuple[np.ndarray, float]:
    """(map (H, W) of the mean score drop where a ``patch`` square is hidden, the unoccluded score).

    ``score`` takes float pixels (n, H, W, 3) and returns (n,) scores. Positive values are
    where hiding the content lowers the score, i.e. what the match relies on.
    """
    x = np.asarray(pixels, np.float32)
    if x.ndim != 3 or patch < 1 or stride < 1:
        raise ValueError("occlusion needs one (H, W, 3) image, patch ≥ 1 and stride ≥ 1")
    h, w = x.shape[:2]
    patch = min(patch, h, w)
    base = float(np.asarray(score(x[None]))[0])
    boxes = [(y, xx) for y in _positions(h, patch, stride) for xx in _positions(w, patch, stride)]
    drops = np.zeros(len(boxes), np.float32)
    for lo in range(0, len(boxes), batch):
        chunk = boxes[lo:lo + batch]
        occluded = np.repeat(x[None], len(chunk), axis=0)
        for i, (y, xx) in enumerate(chunk):
            occluded[i, y:y + patch, xx:xx + patch] = fill
        drops[lo:lo + len(chunk)] = base - np.asarray(score(occluded), np.float32)
    total = np.zeros((h, w), np.float64)
    count = np.zeros((h, w), np.float64)
    for (y, xx), d in zip(boxes, drops, strict=True):
        total[y:y + patch, xx:xx + patch] += d
        count[y:y + patch, xx:xx + patch] += 1
    return (total / np.maximum(count, 1)).astype(np.float32), base


def gradient_map(score: Callable[[Any], Any], pixels: np.ndarray) -> tuple[np.ndarray, float]:
    """(|∂score/∂pixels| max over colour channels (H, W), the score); ``score`` maps a tensor to (1,) scores."""
    import tensorflow as tf

    x = tf.convert_to_tensor(np.asarray(pixels, np.float32)[None])
    with tf.GradientTape() as tape:
        tape.watch(x)
        s = score(x)
        total = tf.reduce_sum(s)
    grad = tape.gradient(total, x)
    if grad is None:
        raise ValueError("the score does not depend on the pixels")
    return np.abs(grad.numpy()[0]).max(axis=-1).astype(np.float32), float(np.asarray(s)[0])


def _guided_relu_layer():
    import keras
    import tensorflow as tf

    class GuidedReLU(keras.layers.Layer):
        """ReLU (optionally capped, as MobileNet's ReLU6) whose gradient passes only where input and gradient are
        positive."""

        def __init__(self, max_value: float | None = None, **kwargs):
            super().__init__(**kwargs)
            self.max_value = max_value

        def call(self, x):
            cap = self.max_value

            @tf.custom_gradient
            def guided(v):
                y = tf.nn.relu(v) if cap is None else tf.clip_by_value(v, 0.0, cap)

                def grad(dy):
                    gate = tf.logical_and(v > 0, dy > 0)
                    if cap is not None:
                        gate = tf.logical_and(gate, v < cap)
                    return dy * tf.cast(gate, dy.dtype)

                return y, grad

            return guided(x)

        def compute_output_shape(self, input_shape):
            return input_shape

        def get_config(self):
            return {**super().get_config(), "max_value": self.max_value}

    return GuidedReLU


def guided_clone(keras_model: Any) -> Any:
    """A copy of ``keras_model`` (same weights) whose ReLU layers backpropagate the guided way.

    Plain ReLU and ReLU6 layers (``keras.layers.ReLU`` without slope or threshold, and
    ``Activation("relu")``) are replaced; a network without any (EfficientNet's swish) is
    refused, since guided backpropagation would silently be the plain gradient.
    """
    import keras

    GuidedReLU = _guided_relu_layer()
    replaced = []

    def swap(layer):
        if isinstance(layer, keras.layers.ReLU):
            cfg = layer.get_config()
            if not cfg.get("negative_slope") and not cfg.get("threshold"):
                replaced.append(layer.name)
                max_value = cfg.get("max_value")
                return GuidedReLU(max_value=None if max_value is None else float(max_value), name=layer.name)
        if isinstance(layer, keras.layers.Activation) and layer.get_config().get("activation") == "relu":
            replaced.append(layer.name)
            return GuidedReLU(name=layer.name)
        return layer.__class__.from_config(layer.get_config())

    clone = keras.models.clone_model(keras_model, clone_function=swap)
    if not replaced:
        raise ValueError(f"{keras_model.name} has no ReLU layers: guided backpropagation does not apply; "
                         "use --method gradient or occlusion")
    clone.set_weights(keras_model.get_weights())
    return clone
