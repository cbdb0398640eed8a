"""The backbone's own Keras layers by name, and sub-models from pixels to them.

Every "looking inside" tool (filter ascent, DeepDream, top-activating patches) reads a
layer the user names as Keras names it (``conv_pw_6_relu`` in MobileNet v1, ``mixed5``
in InceptionV3). A name the network does not have is refused with the list of the
names it does have, so a typo never silently picks another layer.

:class:`LayerModel` maps pixels in [0, 255] to that layer's activations with the
backbone's own preprocessing in front, exactly as :class:`models.backbone.network.Backbone`
applies it, so what is visualised is what the product computes. ``flexible=True``
builds the same network with its weights for any input size (DeepDream works on whole
photos at several scales); otherwise the loaded backbone itself is cut at the layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from models.backbone.network import Backbone, preprocess


def keras_model_of(backbone: Backbone) -> Any:
    """The backbone's Keras model; a SavedModel backbone has no named layers to look into."""
    model = getattr(backbone, "keras_model", None)
    if model is None:
        raise ValueError(f"{backbone.spec.name} is a SavedModel: it has no named Keras layers; use a preset "
                         "(e.g. --model mobilenet_v1_025)")
    return model


def spatial_layer_names(keras_model: Any) -> list[str]:
    """Names of the layers whose output is a feature map (batch, height, width, channels), in model order."""
    names = []
    for layer in keras_model.layers:
        if type(layer).__name__ == "InputLayer":
            continue
        try:
            shape = layer.output.shape
        except (AttributeError, ValueError):  # a layer used several times has no single output
            continue
        if len(shape) == 4:
            names.append(layer.name)
    return names


def resolve_layer(keras_model: Any, name: str) -> Any:
    """The layer called ``name``; ValueError listing every valid name when there is none."""
    valid = spatial_layer_names(keras_model)
    if name not in valid:
        raise ValueError(f"{keras_model.name} has no feature-map layer {name!r}; valid layers: {', '.join(valid)}")
    return keras_model.get_layer(name)


def is_relu(layer: Any) -> bool:
    """A ReLU (or ReLU6) layer, whose input is the unit's pre-activation."""
    kind = type(layer).__name__
    return kind == "ReLU" or (kind == "Activation" and layer.get_config().get("activation") == "relu")


def parse_layer_names(text: str) -> list[str]:
    """``--layer a,b`` → ["a", "b"]; an empty list is refused."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise ValueError("--layer names no layer")
    return names


def _flexible_copy(backbone: Backbone) -> Any:
    """The backbone's network rebuilt for inputs of any size, holding the same weights (float32)."""
    import keras

    preset = backbone.spec.preset()
    app = getattr(keras.applications, preset.keras_app)
    model = app(include_top=False, weights=None, pooling=None, input_shape=(None, None, 3),
                **dict(preset.app_kwargs))
    source = keras_model_of(backbone)
    weights = source.get_weights()
    if len(weights) != len(model.get_weights()):
        raise ValueError(f"{preset.name}: the variable-size copy does not hold the same weights")
    model.set_weights([w.astype("float32") for w in weights])
    return model


class LayerModel:
    """Pixels (n, h, w, 3) in [0, 255] → activations of the named layers (one tensor, or a list for several).

    With ``flexible=False`` the input must be the backbone's own size; with ``flexible=True``
    any size the network's strides allow (at least about 32 px for MobileNet and ResNet,
    75 px for InceptionV3). ``pre_activation=True`` (one layer) returns [pre-activation,
    activation]: for a ReLU layer its input, else the output twice.
    """

    def __init__(self, backbone: Backbone, layers: str | Sequence[str], flexible: bool = False,
                 pre_activation: bool = False):
        import keras

        if backbone.spec.precision != "float32":
            raise ValueError("looking inside needs --precision float32 (gradients in float16 under- and overflow)")
        self.backbone = backbone
        self.names = [layers] if isinstance(layers, str) else list(layers)
        source = keras_model_of(backbone)
        for name in self.names:
            resolve_layer(source, name)
        self.keras_model = _flexible_copy(backbone) if flexible else source
        outputs = [self.keras_model.get_layer(n).output for n in self.names]
        self.pre_activation = pre_activation
        if pre_activation:
            if len(self.names) != 1:
                raise ValueError("pre_activation reads one layer")
            layer = self.keras_model.get_layer(self.names[0])
            # a ReLU's input: the gradient does not vanish where the unit is off (or, for ReLU6, saturated)
            outputs = [layer.input if is_relu(layer) else layer.output, outputs[0]]
        self.model = keras.Model(self.keras_model.inputs, outputs if len(outputs) > 1 else outputs[0])
        self.preprocessing = backbone.spec.preset().preprocessing
        self.flexible = flexible
        self.size = None if flexible else backbone.size
        self.channels = [int(self.keras_model.get_layer(n).output.shape[-1]) for n in self.names]

    def __call__(self, pixels: Any) -> Any:
        import tensorflow as tf

        x = preprocess(tf.cast(pixels, tf.float32), self.preprocessing)
        return self.model(x, training=False)
