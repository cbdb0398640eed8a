"""The index's embedding as TensorFlow ops, so a similarity can be differentiated with respect to pixels.

The product embeds a query as: pixels → backbone (its preprocessing inside) → optional
autoencoder → ``l2(l2(x) @ P + b)`` (the index's transform, stored as data) → cosine with
a stored vector. "Why did these match?" maps and adversarial examples must follow the
gradient of *that* number, not of some proxy, so this module builds the same chain from
the same data (the backbone's Keras model, the encoder's and transform's arrays) in
TensorFlow. :meth:`EmbeddingGraph.embed` agrees with the numpy query path to float32
rounding (tests/inspection/test_explain.py checks it on real photos).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from models.backbone.network import Backbone, preprocess
from models.inside.layers import keras_model_of

EncoderLayers = Sequence[tuple[np.ndarray, np.ndarray, str]]  # (kernel, bias, "linear" | "relu")


class EmbeddingGraph:
    """Pixels (n, size, size, 3) in [0, 255] → the index's unit vectors (n, D), as differentiable ops.

    ``guided=True`` runs the backbone with guided-backpropagation ReLUs (the forward pass is
    unchanged; only gradients differ), for :func:`models.inside.saliency.gradient_map`.
    """

    def __init__(self, backbone: Backbone, projection: np.ndarray | None = None, bias: np.ndarray | None = None,
                 encoder: EncoderLayers | None = None, guided: bool = False):
        import tensorflow as tf

        if backbone.spec.precision != "float32":
            raise ValueError("gradients need the backbone in float32 (--precision float32)")
        model = keras_model_of(backbone)
        if guided:
            from models.inside.saliency import guided_clone

            model = guided_clone(model)
        self.backbone = backbone
        self.size = backbone.size
        self.keras_model = model
        self.preprocessing = backbone.spec.preset().preprocessing
        self.projection = None if projection is None else tf.constant(np.asarray(projection, np.float32))
        self.bias = None if bias is None else tf.constant(np.asarray(bias, np.float32))
        self.encoder = [(tf.constant(np.asarray(k, np.float32)), tf.constant(np.asarray(b, np.float32)), a)
                        for k, b, a in (encoder or ())]
        self.guided = guided

    @staticmethod
    def _l2(x: Any) -> Any:
        import tensorflow as tf

        # as artefacts.transform.l2_normalise: x / sqrt(max(|x|², 1e-12))
        return x * tf.math.rsqrt(tf.maximum(tf.reduce_sum(tf.square(x), axis=-1, keepdims=True), 1e-12))

    def features(self, pixels: Any) -> Any:
        """Raw backbone features, exactly as :class:`Backbone` computes them."""
        import tensorflow as tf

        x = preprocess(tf.cast(pixels, tf.float32), self.preprocessing)
        return tf.cast(self.keras_model(x, training=False), tf.float32)

    def embed(self, pixels: Any) -> Any:
        import tensorflow as tf

        x = self.features(pixels)
        if self.encoder:
            x = self._l2(x)
            for kernel, bias, activation in self.encoder:
                x = tf.matmul(x, kernel) + bias
                if activation == "relu":
                    x = tf.nn.relu(x)
        x = self._l2(x)
        if self.projection is not None:
            x = self._l2(tf.matmul(x, self.projection) + self.bias)
        return x

    def similarity(self, pixels: Any, targets: Any) -> Any:
        """Each image's embedding · its target vector (n, D), or one vector (D,) for all: the product's score.

        Targets are used as given (stored vectors are unit length to float16 rounding), as the
        searcher scores a normalised query against the stored vectors.
        """
        import tensorflow as tf

        t = tf.convert_to_tensor(np.asarray(targets, np.float32))
        if len(t.shape) == 1:
            t = t[None, :]
        return tf.reduce_sum(self.embed(pixels) * t, axis=-1)

    def embed_numpy(self, pixels: np.ndarray, batch: int = 64) -> np.ndarray:
        out = [self.embed(np.asarray(pixels[i:i + batch], np.float32)).numpy() for i in range(0, len(pixels), batch)]
        return np.concatenate(out) if out else np.zeros((0, 0), np.float32)
