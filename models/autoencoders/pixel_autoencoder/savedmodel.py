"""The ``encoder/`` and ``autoencoder/`` SavedModels, and the export card ``cbir extract`` reads the
encoder's input size from."""

from __future__ import annotations

import json
import os
from typing import Any

from artefacts.manifests import ExportCard, utc_now
from models.autoencoders.pixel_autoencoder.config import EXPORT_CARD, PIXELS_KEY, SIGNATURE, PixelAutoencoderConfig
from models.autoencoders.pixel_autoencoder.network import Networks, build
from models.autoencoders.pixel_autoencoder.weights import model_fingerprint
from models.backbone.imaging import RESIZE_METHOD


def _signature_table(signatures: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for name, concrete in signatures.items():
        _, kwargs = concrete.structured_input_signature
        out[name] = {
            "inputs": {k: {"dtype": v.dtype.name, "shape": v.shape.as_list()} for k, v in kwargs.items()},
            "outputs": {k: {"dtype": v.dtype.name, "shape": v.shape.as_list()}
                        for k, v in concrete.structured_outputs.items()},
        }
    return out


def _save(model: Any, path: str, input_shape: list[int | None], output: str, scale: float,
          flatten_to: int | None = None) -> dict[str, Any]:
    """``flatten_to``: the output is reshaped to (batch, flatten_to), so that a convolutional bottleneck's
    feature map reaches ``cbir extract`` as one vector per image, as a dense code does."""
    import tensorflow as tf

    class Module(tf.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        @tf.function(input_signature=[tf.TensorSpec(input_shape, tf.float32, name=PIXELS_KEY)])
        def serve(self, x):
            y = self.model(x, training=False)
            if flatten_to is not None:
                y = tf.reshape(y, [-1, flatten_to])
            return {output: y * scale if scale != 1.0 else y}

    module = Module()
    concrete = module.serve.get_concrete_function()
    signatures = {SIGNATURE: concrete, "serving_default": concrete}
    tf.saved_model.save(module, path, signatures=signatures)
    return _signature_table(signatures)


def export_savedmodels(nets: Networks, cfg: PixelAutoencoderConfig, folder: str, digest: str
                       ) -> dict[str, dict[str, Any]]:
    """Writes the ``encoder/`` and ``autoencoder/`` SavedModels under local ``folder``.

    Returns, per model, what the manifest records about it (signatures, input, output,
    dimension, files). The autoencoder of a convolutional bottleneck takes any side that is a
    multiple of 2^L; a dense one takes size x size. (The decoder alone is not exported: its
    weights are in the weights data.)
    """
    side = cfg.size
    auto_model, auto_side = nets.autoencoder, side
    if not cfg.dense:
        any_size = build(cfg, any_size=True)
        any_size.autoencoder.set_weights(nets.autoencoder.get_weights())
        auto_model, auto_side = any_size.autoencoder, None
    out: dict[str, dict[str, Any]] = {}
    plan = [
        ("encoder", nets.encoder, [None, side, side, 3], "code", 1.0, cfg.code_size),
        ("autoencoder", auto_model, [None, auto_side, auto_side, 3], "reconstruction", 255.0, None),
    ]
    for name, model, shape, output, scale, dim in plan:
        path = os.path.join(folder, name)
        flat = dim if name == "encoder" and not cfg.dense else None  # (n, g, g, f) map → (n, g·g·f) code
        table = _save(model, path, shape, output, scale, flatten_to=flat)
        if name == "encoder":
            _write_card(path, cfg, digest, table)
        files = sorted(os.path.relpath(os.path.join(r, f), path) for r, _, fs in os.walk(path) for f in fs)
        out[name] = {"path": name, "signatures": sorted(table), "output": output, "dimension": dim, "files": files,
                     "input": f"{PIXELS_KEY} float32 {shape} in [0, 255]"}
    return out


def _write_card(path: str, cfg: PixelAutoencoderConfig, digest: str, signatures: dict[str, Any]) -> None:
    """The export card ``models.backbone.network`` reads the input size from (``savedmodel:`` without --input-size)."""
    import tensorflow as tf

    card = ExportCard(
        created_utc=utc_now(),
        version=1,
        model={"preset": "pixel_autoencoder", "config": cfg.to_dict(), "weights_digest": digest},
        model_fingerprint=model_fingerprint(cfg, digest),
        input_size=cfg.size,
        dimension=cfg.code_size,
        preprocessing="x / 255 inside the graph; input RGB pixels in [0, 255]",
        decode={"in_graph": None, "decoder": "models.backbone.imaging (Pillow)", "resize": RESIZE_METHOD},
        signatures=signatures,
        tensorflow_version=tf.__version__,
    )
    os.makedirs(os.path.join(path, "assets.extra"), exist_ok=True)
    with open(os.path.join(path, EXPORT_CARD), "w") as f:
        f.write(json.dumps(card.to_dict(), indent=2, sort_keys=True) + "\n")
