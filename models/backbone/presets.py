"""Backbone presets: everything needed to reproduce a feature vector.

A preset pins the network, its input size, the pixel preprocessing it was trained
with and the pooled layer we read. Every field goes into the features manifest so
that an index can refuse queries embedded by a different network.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from artefacts.manifests import fingerprint

__all__ = ["PRESETS", "SAVEDMODEL_PREFIX", "Preset", "fingerprint", "get_preset"]

SAVEDMODEL_PREFIX = "savedmodel:"


@dataclasses.dataclass(frozen=True)
class Preset:
    """A Keras Applications network used as a bottleneck feature extractor."""

    name: str
    keras_app: str  # attribute of keras.applications
    input_size: int  # square side in pixels
    preprocessing: str  # "tf" ([-1, 1]), "caffe" (BGR, mean-subtracted), "none" (model rescales)
    dim: int
    weights_file: str  # the no-top file name Keras Applications downloads
    weights_origin: str
    app_kwargs: tuple[tuple[str, Any], ...] = ()

    def describe(self) -> dict[str, Any]:
        return {
            "preset": self.name,
            "keras_app": self.keras_app,
            "input_size": self.input_size,
            "preprocessing": self.preprocessing,
            "pooling": "avg",
            "dim": self.dim,
            "weights_file": self.weights_file,
            "app_kwargs": dict(self.app_kwargs),
        }


_KERAS_BASE = "https://storage.googleapis.com/tensorflow/keras-applications/"

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset(
            "inception_v3", "InceptionV3", 299, "tf", 2048,
            "inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5",
            _KERAS_BASE + "inception_v3/inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5",
        ),
        Preset(
            "resnet50", "ResNet50", 224, "caffe", 2048,
            "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
            _KERAS_BASE + "resnet/resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
        ),
        Preset(
            "mobilenet_v2", "MobileNetV2", 224, "tf", 1280,
            "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5",
            _KERAS_BASE + "mobilenet_v2/mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5",
            (("alpha", 1.0),),
        ),
        Preset(
            "mobilenet_v1_025", "MobileNet", 224, "tf", 256,
            "mobilenet_2_5_224_tf_no_top.h5",
            _KERAS_BASE + "mobilenet/mobilenet_2_5_224_tf_no_top.h5",
            (("alpha", 0.25),),
        ),
        Preset(
            "efficientnet_b0", "EfficientNetB0", 224, "none", 1280,
            "efficientnetb0_notop.h5",
            _KERAS_BASE + "efficientnetb0_notop.h5",
        ),
    ]
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(
            f"unknown model {name!r}: choose one of {', '.join(sorted(PRESETS))} or savedmodel:PATH"
        ) from None
