"""Compact descriptors learned by an autoencoder, optionally denoising.

The encoder maps L2-normalised bottleneck features to a short code; trained to
reconstruct its input (from a corrupted copy, for the denoising variant) it keeps
what distinguishes images in this corpus, which PCA can only do linearly. The
encoder is exported as a SavedModel whose ``serving_default`` signature takes
raw features and returns ``{"code": ...}``, so a Beam job, the query path and TF
Serving all apply the same graph.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class AutoencoderConfig:
    code_dim: int = 64
    hidden: tuple[int, ...] = (512,)
    noise_stddev: float = 0.0  # denoising: Gaussian noise added to the (normalised) input while training
    mask_fraction: float = 0.0  # denoising: fraction of input dimensions zeroed while training
    epochs: int = 30
    batch_size: int = 256
    learning_rate: float = 1e-3
    validation_fraction: float = 0.1
    seed: int = 1234

    @property
    def denoising(self) -> bool:
        return self.noise_stddev > 0 or self.mask_fraction > 0


def _l2(x):
    import tensorflow as tf

    return tf.math.l2_normalize(x, axis=-1)


def build(input_dim: int, cfg: AutoencoderConfig):
    """Returns (autoencoder, encoder) Keras models sharing their layers."""
    import keras

    keras.utils.set_random_seed(cfg.seed)
    inputs = keras.Input((input_dim,), name="features")
    x = keras.layers.UnitNormalization(name="l2")(inputs)
    clean = x
    if cfg.noise_stddev > 0:
        x = keras.layers.GaussianNoise(cfg.noise_stddev, seed=cfg.seed, name="noise")(x)
    if cfg.mask_fraction > 0:
        x = keras.layers.Dropout(cfg.mask_fraction, seed=cfg.seed, name="mask")(x)
    for i, width in enumerate(cfg.hidden):
        x = keras.layers.Dense(width, activation="relu", name=f"enc_{i}")(x)
    code = keras.layers.Dense(cfg.code_dim, name="code")(x)
    y = code
    for i, width in enumerate(reversed(cfg.hidden)):
        y = keras.layers.Dense(width, activation="relu", name=f"dec_{i}")(y)
    recon = keras.layers.Dense(input_dim, name="reconstruction")(y)
    autoencoder = keras.Model(inputs, [recon, clean], name="autoencoder")
    encoder = keras.Model(inputs, code, name="encoder")
    return autoencoder, encoder


@dataclasses.dataclass
class TrainedEncoder:
    encoder: Any
    config: AutoencoderConfig
    input_dim: int
    history: dict[str, list[float]]

    def encode(self, features: np.ndarray, batch_size: int = 4096) -> np.ndarray:
        return np.asarray(self.encoder.predict(np.asarray(features, np.float32), batch_size=batch_size, verbose=0))


def train(features: np.ndarray, cfg: AutoencoderConfig) -> TrainedEncoder:
    """Fits the autoencoder to reconstruct normalised features; early-stops on held-out loss."""
    import keras
    import tensorflow as tf

    x = np.asarray(features, dtype=np.float32)
    n, dim = x.shape
    if n < 10:
        raise ValueError(f"need at least 10 feature vectors to train an autoencoder, got {n}")
    autoencoder, encoder = build(dim, cfg)
    recon_out = autoencoder.outputs[0]
    clean_out = autoencoder.outputs[1]
    trainer = keras.Model(autoencoder.inputs, recon_out - clean_out)  # residual: loss is its mean square
    trainer.compile(optimizer=keras.optimizers.Adam(cfg.learning_rate), loss=lambda _, r: tf.reduce_mean(r * r))
    rng = np.random.default_rng(cfg.seed)
    order = rng.permutation(n)
    n_val = max(1, int(n * cfg.validation_fraction))
    val, fit = x[order[:n_val]], x[order[n_val:]]
    history = trainer.fit(
        fit, np.zeros((len(fit), dim), np.float32),
        validation_data=(val, np.zeros((len(val), dim), np.float32)),
        epochs=cfg.epochs, batch_size=cfg.batch_size, shuffle=True, verbose=0,
        callbacks=[keras.callbacks.EarlyStopping(patience=5, restore_best_weights=True)],
    )
    hist = {k: [float(v) for v in vals] for k, vals in history.history.items()}
    log.info("autoencoder %d→%d: %d epochs, val loss %.5f", dim, cfg.code_dim, len(hist["loss"]),
             min(hist["val_loss"]))
    return TrainedEncoder(encoder, cfg, dim, hist)


def export(trained: TrainedEncoder, path: str, extra: dict[str, Any] | None = None) -> None:
    """Writes the encoder as a SavedModel (``serving_default``: features → {"code"}) plus a JSON card."""
    import tensorflow as tf

    encoder = trained.encoder

    class Encoder(tf.Module):
        def __init__(self):
            super().__init__()
            self.model = encoder

        @tf.function(input_signature=[tf.TensorSpec([None, trained.input_dim], tf.float32, name="features")])
        def serve(self, features):
            return {"code": self.model(features, training=False)}

    module = Encoder()
    tf.saved_model.save(module, path, signatures={"serving_default": module.serve})
    card = {"config": dataclasses.asdict(trained.config), "input_dim": trained.input_dim,
            "history": trained.history, **(extra or {})}
    with open(os.path.join(path, "assets.extra.json"), "w") as f:
        json.dump(card, f, indent=2, sort_keys=True)


def load_encoder(path: str):
    """A callable features (n, D) → codes (n, code_dim); SavedModels are code: load only your own."""
    import tensorflow as tf

    loaded = tf.saved_model.load(path)
    fn = loaded.signatures["serving_default"]

    def encode(features: np.ndarray) -> np.ndarray:
        return fn(features=tf.constant(np.asarray(features, np.float32)))["code"].numpy()

    encode.loaded = loaded
    return encode


ENCODER_DATA_DIR = "weights"  # inside an encoder folder: the encoder as data (layers.json + .npy)
LAYERS_FILE = "layers.json"


def export_weights(trained: TrainedEncoder, folder: str) -> list[str]:
    """Writes the encoder as data: ``layers.json`` (activations, shapes) and one .npy per kernel and bias.

    The encoder is an L2 step followed by dense layers; as data it can be applied by numpy
    (:class:`NumpyEncoder`) wherever the codes are made or queried, so an index of codes never
    has to load a SavedModel. Returns the file names written.
    """
    import keras

    os.makedirs(folder, exist_ok=True)
    layers, names = [], []
    for layer in trained.encoder.layers:
        if not isinstance(layer, keras.layers.Dense):
            continue
        kernel, bias = (np.asarray(w, np.float32) for w in layer.get_weights())
        i = len(layers)
        for kind, value in (("kernel", kernel), ("bias", bias)):
            name = f"dense_{i}_{kind}.npy"
            np.save(os.path.join(folder, name), value, allow_pickle=False)
            names.append(name)
        activation = keras.activations.serialize(layer.activation)
        activation = activation if isinstance(activation, str) else activation.get("config", {}).get("name", "linear")
        layers.append({"kernel": f"dense_{i}_kernel.npy", "bias": f"dense_{i}_bias.npy", "activation": activation})
    with open(os.path.join(folder, LAYERS_FILE), "w") as f:
        json.dump({"input": "l2", "input_dim": trained.input_dim, "layers": layers}, f, indent=2, sort_keys=True)
    return [LAYERS_FILE, *names]


class NumpyEncoder:
    """The feature encoder applied from its data: features (n, D) → codes (n, C); no TensorFlow, no code loaded."""

    ACTIVATIONS = {"linear": lambda x: x, "relu": lambda x: np.maximum(x, 0)}

    def __init__(self, layers: list[tuple[np.ndarray, np.ndarray, str]]):
        for _, _, activation in layers:
            if activation not in self.ACTIVATIONS:
                raise ValueError(f"encoder activation {activation!r} is not one of {sorted(self.ACTIVATIONS)}")
        self.layers = layers

    @classmethod
    def load(cls, folder: str, read: Any = None) -> NumpyEncoder:
        """From ``folder`` (local, or through ``read(path) -> bytes`` for other filesystems)."""
        import io

        read = read or (lambda p: open(p, "rb").read())
        spec = json.loads(read(os.path.join(folder, LAYERS_FILE)))
        layers = []
        for layer in spec["layers"]:
            kernel = np.load(io.BytesIO(read(os.path.join(folder, layer["kernel"]))), allow_pickle=False)
            bias = np.load(io.BytesIO(read(os.path.join(folder, layer["bias"]))), allow_pickle=False)
            layers.append((kernel.astype(np.float32), bias.astype(np.float32), layer["activation"]))
        return cls(layers)

    def __call__(self, features: np.ndarray) -> np.ndarray:
        x = np.asarray(features, np.float32)
        x = x / np.maximum(np.sqrt(np.einsum("ij,ij->i", x, x))[:, None], np.float32(1e-12))
        for kernel, bias, activation in self.layers:
            x = self.ACTIVATIONS[activation](x @ kernel + bias)
        return x


def weights_digest(folder: str) -> str:
    """sha256 over the encoder's data files (names and contents, sorted): what its codes depend on."""
    h = hashlib.sha256()
    for name in sorted(os.listdir(folder)):
        h.update(name.encode() + b"\0")
        with open(os.path.join(folder, name), "rb") as f:
            h.update(hashlib.sha256(f.read()).digest())
    return h.hexdigest()
