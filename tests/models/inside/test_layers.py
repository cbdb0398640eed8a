"""Backbone layers by their Keras names: refusal of unknown names, sub-models from pixels."""

from __future__ import annotations

import numpy as np
import pytest

from models.backbone.network import Backbone
from models.inside.layers import LayerModel, resolve_layer, spatial_layer_names


@pytest.fixture(scope="module")
def backbone(mobilenet_spec):
    return Backbone(mobilenet_spec)


def test_unknown_layer_is_refused_with_the_valid_names(backbone):
    names = spatial_layer_names(backbone.keras_model)
    assert {"conv_pw_6_relu", "conv_pw_13_relu", "conv1"} <= set(names)
    with pytest.raises(ValueError, match="valid layers: conv1, conv1_bn") as err:
        resolve_layer(backbone.keras_model, "conv_pw_6_rel")
    assert "conv_pw_6_relu" in str(err.value) and "conv_pw_13_relu" in str(err.value)
    with pytest.raises(ValueError, match="no feature-map layer 'global_average_pooling"):
        LayerModel(backbone, [names[3], "global_average_pooling2d"])


def test_flexible_copy_holds_the_same_weights_at_any_size(backbone):
    x = np.random.default_rng(0).uniform(0, 255, (2, 224, 224, 3)).astype(np.float32)
    fixed = LayerModel(backbone, "conv_pw_6_relu")
    flexible = LayerModel(backbone, "conv_pw_6_relu", flexible=True)
    np.testing.assert_allclose(np.asarray(flexible(x)), np.asarray(fixed(x)), atol=1e-5)
    assert tuple(flexible(x[:, :96, :80]).shape) == (2, 6, 5, 128)
    pre, post = LayerModel(backbone, "conv_pw_6_relu", pre_activation=True)(x)
    np.testing.assert_allclose(np.asarray(post), np.clip(np.asarray(pre), 0, 6), atol=1e-5)
