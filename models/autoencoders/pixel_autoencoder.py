"""Convolutional autoencoders on pixels: a compact descriptor, and a denoiser for query images.

The recipe this product follows trains autoencoders on images. The encoder is a stack of
strided 3×3 convolutions (each halves the side) ending, by default, in a small dense layer
whose output, the *code*, is a compact descriptor of the whole image; the decoder mirrors it
with transposed convolutions back to an RGB image, and the pair is trained on reconstruction
error (mean squared error in [0, 1]). Trained on noisy inputs against clean targets
(``noise``, see :mod:`models.autoencoders.pixel_noise`) the same network is a denoising autoencoder.

``code_dim = 0`` drops the dense layers: the bottleneck is then the last feature map
(side / 2^L × side / 2^L × filters[-1]) and the network is fully convolutional, which is
the denoising recipe's shape and what lets :class:`models.autoencoders.denoiser.Denoiser` clean an
image of any size tile by tile. A dense code has to squeeze a whole image through a few
hundred numbers, so its reconstructions are blurred: good for retrieval codes, poor for
cleaning photos.

Inputs are RGB pixels in [0, 255] (float32), as :func:`models.backbone.imaging.decode_and_resize`
produces them and as the backbone's ``pixels`` signature takes them: the scaling to [0, 1]
is the first layer, inside every exported graph. Outputs are in [0, 1] (sigmoid); the
exported signatures return [0, 255].

Exports (:func:`export_savedmodels`): ``encoder/`` (signatures ``pixels`` and
``serving_default``: pixels → ``{"code"}``, one flat vector per image, the feature map flattened
for a convolutional bottleneck; with an export card so that
``cbir extract --model savedmodel:DIR/encoder --signature pixels`` finds its input size) and
``autoencoder/`` (pixels → ``{"reconstruction"}``, the denoiser when trained with noise).
The weights (the decoder's too) are also written as data (:func:`save_weights_data`: ``layers.json``
and one ``.npy`` per variable, no pickle), which is what the denoiser rebuilds the network from.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from artefacts.manifests import ExportCard, fingerprint, utc_now
from models.autoencoders.pixel_noise import Noise, corrupt, parse_noise
from models.backbone.imaging import RESIZE_METHOD

log = logging.getLogger(__name__)

PIXELS_KEY = "pixels"  # the pixel records' raw uint8 (S, S, 3) bytes, and the signatures' input name
ID_KEY = "image_id"
SIGNATURE = "pixels"
WEIGHTS_DIR = "weights"
LAYERS_FILE = "layers.json"
EXPORT_CARD = os.path.join("assets.extra", "cbir_export.json")  # where models.backbone.network reads the input size
# Default convolutions: three for a dense code (a 16x16x128 map at 128 px goes into the dense layer); two for
# the convolutional bottleneck, which keeps detail a denoiser needs (on 200 flowers photos at 64 px, 10 epochs,
# gaussian:0.1: held-out PSNR 20.4 dB with two, 17.4 dB with three).
DENSE_FILTERS = (32, 64, 128)
CONV_FILTERS = (32, 64)


def default_filters(code_dim: int) -> tuple[int, ...]:
    return DENSE_FILTERS if code_dim > 0 else CONV_FILTERS


@dataclasses.dataclass(frozen=True)
class PixelAutoencoderConfig:
    """The network and its training. Defaults keep a CPU run short (128 px, 5 epochs)."""

    size: int = 128  # images are decoded and squashed to size x size (models.backbone.imaging)
    code_dim: int = 128  # 0: convolutional bottleneck (no dense code), fully convolutional
    filters: tuple[int, ...] = DENSE_FILTERS  # one stride-2 convolution per entry (default_filters(code_dim))
    noise: tuple[Noise, ...] = ()  # denoising: each training input gets one of these
    epochs: int = 5
    batch_size: int = 32
    learning_rate: float = 2e-3
    validation_fraction: float = 0.1
    seed: int = 1234
    shuffle_buffer: int = 2048  # training examples shuffled in a window this large (streamed, not all in memory)

    def __post_init__(self) -> None:
        step = 2 ** len(self.filters)
        if not self.filters or any(int(f) < 1 for f in self.filters):
            raise ValueError(f"filters must be positive channel counts, not {self.filters}")
        if self.size < 2 * step or self.size % step:
            raise ValueError(f"--size must be a multiple of {step} and at least {2 * step} (the encoder halves it "
                             f"{len(self.filters)} times), not {self.size}")
        if self.code_dim < 0:
            raise ValueError(f"--code-dim must be 0 (convolutional bottleneck) or positive, not {self.code_dim}")
        for name in ("epochs", "batch_size", "shuffle_buffer"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, not {getattr(self, name)}")
        if not 0.0 < self.validation_fraction < 1.0:
            raise ValueError(f"validation fraction must be between 0 and 1, not {self.validation_fraction}")

    @property
    def denoising(self) -> bool:
        return bool(self.noise)

    @property
    def dense(self) -> bool:
        return self.code_dim > 0

    @property
    def grid(self) -> int:
        """Side of the last feature map."""
        return self.size // 2 ** len(self.filters)

    @property
    def code_size(self) -> int:
        """Numbers in one code: the dense width, or the flattened feature map."""
        return self.code_dim if self.dense else self.grid * self.grid * self.filters[-1]

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["filters"] = list(self.filters)
        d["noise"] = [str(n) for n in self.noise]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PixelAutoencoderConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in known}
        kwargs["filters"] = tuple(int(f) for f in kwargs.get("filters", cls.filters))
        kwargs["noise"] = parse_noise(",".join(kwargs.get("noise", [])))
        return cls(**kwargs)


# -- pixel records: what the Beam pass writes and tf.data streams -------------------------------------


def encode_pixels(pixels: np.ndarray, image_id: str) -> bytes:
    """One decoded image as a serialized ``tf.train.Example`` (raw uint8 bytes; deterministic)."""
    import tensorflow as tf

    pixels = np.ascontiguousarray(pixels, np.uint8)
    feature = {
        PIXELS_KEY: tf.train.Feature(bytes_list=tf.train.BytesList(value=[pixels.tobytes()])),
        ID_KEY: tf.train.Feature(bytes_list=tf.train.BytesList(value=[image_id.encode("utf-8")])),
    }
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString(deterministic=True)


def pixel_dataset(files: list[str], size: int, count: int | None = None) -> Any:
    """TFRecord files of :func:`encode_pixels` → a ``tf.data.Dataset`` of uint8 (size, size, 3), read in order.

    ``count``, when known (the launcher counted the records), is asserted as the dataset's
    cardinality, so Keras knows the steps per epoch.
    """
    import tensorflow as tf

    spec = {PIXELS_KEY: tf.io.FixedLenFeature([], tf.string)}

    def parse(record):
        raw = tf.io.parse_single_example(record, spec)[PIXELS_KEY]
        return tf.reshape(tf.io.decode_raw(raw, tf.uint8), (size, size, 3))

    ds = tf.data.TFRecordDataset(list(files)).map(parse, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds if count is None else ds.apply(tf.data.experimental.assert_cardinality(count))


def datasets(cfg: PixelAutoencoderConfig, train_images: Any, validation_images: Any) -> tuple[Any, Any]:
    """(training, validation) pair datasets from two datasets of uint8 images, seeded from ``cfg.seed``.

    The global seeds are set first: TensorFlow combines them with each op's own seed, so a
    dataset made after an earlier run in the same process would otherwise shuffle and draw
    noise differently.
    """
    import keras

    keras.utils.set_random_seed(cfg.seed)
    return (training_pairs(train_images, cfg, cfg.seed, training=True),
            training_pairs(validation_images, cfg, cfg.seed + 1, training=False))


def training_pairs(images: Any, cfg: PixelAutoencoderConfig, seed: int, training: bool) -> Any:
    """uint8 images → batches of (input pixels in [0, 255], clean target in [0, 1]).

    Training shuffles within ``cfg.shuffle_buffer`` and draws new noise every epoch;
    validation keeps its order and the same noise every epoch, so its loss is comparable
    across epochs. Both are deterministic for a seed.
    """
    import tensorflow as tf

    ds = images
    if training:
        ds = ds.shuffle(cfg.shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=training).batch(2)
    noises = cfg.noise

    def pair(image, s):
        clean = tf.cast(image, tf.float32) / 255.0
        return corrupt(clean, noises, s) * 255.0, clean

    ds = tf.data.Dataset.zip((ds, seeds)).map(pair, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.batch(cfg.batch_size).prefetch(tf.data.AUTOTUNE)


# -- the networks -------------------------------------------------------------------------------------


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


def _epoch_timer(epochs: int) -> Any:
    """A Keras callback that keeps seconds per epoch and logs one progress line per epoch."""
    import keras

    class EpochTimer(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.seconds: list[float] = []
            self._t = 0.0

        def on_epoch_begin(self, epoch, logs=None):
            self._t = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.seconds.append(time.perf_counter() - self._t)
            logs = logs or {}
            log.info("epoch %d/%d: loss %.5f, val_loss %.5f (%.1fs)", epoch + 1, epochs, logs.get("loss", np.nan),
                     logs.get("val_loss", np.nan), self.seconds[-1])

    return EpochTimer()


def _tensorboard(log_dir: str, preview: tuple[np.ndarray, np.ndarray] | None, denoising: bool) -> Any:
    """A Keras callback writing TensorBoard logs after every epoch: the loss under ``train/`` and
    ``validation/`` (tag ``epoch_loss``, as Keras's own callback names it) and, for a fixed held-out
    batch, image summaries under ``images/`` (input, noisy input when denoising, reconstruction),
    as the recipe shows them. Written with :mod:`models.autoencoders.tb_summaries` (no ``tensorboard`` package)."""
    import keras
    import tensorflow as tf

    from models.autoencoders import tb_summaries

    class TensorBoardLogs(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.writers = {name: tf.summary.create_file_writer(os.path.join(log_dir, name))
                            for name in ("train", "validation", "images")}

        def on_epoch_end(self, epoch, logs=None):
            logs = logs or {}
            step = epoch + 1
            for name, key in (("train", "loss"), ("validation", "val_loss")):
                if key in logs:
                    with self.writers[name].as_default():
                        tb_summaries.scalar("epoch_loss", logs[key], step)
            if preview is not None:
                noisy, clean = preview
                recon = self.model(noisy, training=False)
                with self.writers["images"].as_default():
                    tb_summaries.images("1_input", clean, step, len(clean))
                    if denoising:
                        tb_summaries.images("2_noisy_input", noisy / 255.0, step, len(clean))
                    tb_summaries.images("3_reconstruction", recon, step, len(clean))
            for writer in self.writers.values():
                writer.flush()

        def on_train_end(self, logs=None):
            for writer in self.writers.values():
                writer.close()

    return TensorBoardLogs()


@dataclasses.dataclass
class Trained:
    networks: Networks
    config: PixelAutoencoderConfig
    history: dict[str, list[float]]
    epoch_seconds: list[float]


def preview_batch(validation: Any, n: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """The first ``n`` held-out (input, clean) pairs: the fixed batch of the pictures and image summaries."""
    noisy, clean = [], []
    for x, y in validation.unbatch().take(n):
        noisy.append(x.numpy())
        clean.append(y.numpy())
    if not clean:
        raise ValueError("the validation split is empty")
    return np.stack(noisy), np.stack(clean)


def fit(cfg: PixelAutoencoderConfig, train: Any, validation: Any, log_dir: str | None = None,
        preview: tuple[np.ndarray, np.ndarray] | None = None) -> Trained:
    """Trains on ``train`` pairs (from :func:`training_pairs`), validating on ``validation`` every epoch.

    With ``log_dir``, TensorBoard gets the loss scalars (``train/``, ``validation/``) and,
    with ``preview``, image summaries (``images/``).
    """
    import keras

    nets = build(cfg)
    nets.autoencoder.compile(optimizer=keras.optimizers.Adam(cfg.learning_rate), loss="mse")
    timer = _epoch_timer(cfg.epochs)
    callbacks = [timer]
    if log_dir:
        callbacks.append(_tensorboard(log_dir, preview, cfg.denoising))
    history = nets.autoencoder.fit(train, validation_data=validation, epochs=cfg.epochs, verbose=0, shuffle=False,
                                   callbacks=callbacks)
    hist = {k: [float(v) for v in values] for k, values in sorted(history.history.items())}
    return Trained(nets, cfg, hist, list(timer.seconds))


def held_out_scores(model: Any, validation: Any, denoising: bool) -> dict[str, float]:
    """Mean MSE, PSNR and SSIM (in [0, 1], reconstruction rounded to 8 bits as a saved image is) of the
    reconstructions of the held-out pairs; for a denoiser also of its noisy inputs, the do-nothing baseline."""
    import tensorflow as tf

    sums = {"mse": 0.0, "psnr": 0.0, "ssim": 0.0, "psnr_input": 0.0, "ssim_input": 0.0, "mse_input": 0.0}
    n = 0
    for noisy, clean in validation:
        out = tf.round(model(noisy, training=False) * 255.0) / 255.0
        sums["mse"] += float(tf.reduce_sum(tf.reduce_mean(tf.square(out - clean), axis=[1, 2, 3])))
        sums["psnr"] += float(tf.reduce_sum(tf.image.psnr(out, clean, 1.0)))
        sums["ssim"] += float(tf.reduce_sum(tf.image.ssim(out, clean, 1.0)))
        if denoising:
            x = noisy / 255.0
            sums["mse_input"] += float(tf.reduce_sum(tf.reduce_mean(tf.square(x - clean), axis=[1, 2, 3])))
            sums["psnr_input"] += float(tf.reduce_sum(tf.image.psnr(x, clean, 1.0)))
            sums["ssim_input"] += float(tf.reduce_sum(tf.image.ssim(x, clean, 1.0)))
        n += int(clean.shape[0])
    keys = sums if denoising else ("mse", "psnr", "ssim")
    out = {k: round(sums[k] / max(n, 1), 6) for k in keys}
    out["images"] = n
    return out


# -- weights as data ----------------------------------------------------------------------------------


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def save_weights_data(model: Any, cfg: PixelAutoencoderConfig, folder: str) -> dict[str, str]:
    """``layers.json`` (config, layer names, files and shapes) and one ``.npy`` per variable; returns
    {file name: sha256}. The bytes depend on the weights only, so equal weights give equal digests."""
    os.makedirs(folder, exist_ok=True)
    digests: dict[str, str] = {}
    layers = []
    for layer in model.layers:
        weights = layer.get_weights()
        if not weights:
            continue
        names = []
        for j, w in enumerate(weights):
            name = f"{layer.name}.{j}.npy"
            buf = io.BytesIO()
            np.save(buf, np.asarray(w, np.float32), allow_pickle=False)
            with open(os.path.join(folder, name), "wb") as f:
                f.write(buf.getvalue())
            digests[name] = _sha256(buf.getvalue())
            names.append(name)
        layers.append({"name": layer.name, "files": names, "shapes": [list(np.shape(w)) for w in weights]})
    spec = json.dumps({"config": cfg.to_dict(), "layers": layers}, indent=2, sort_keys=True).encode() + b"\n"
    with open(os.path.join(folder, LAYERS_FILE), "wb") as f:
        f.write(spec)
    digests[LAYERS_FILE] = _sha256(spec)
    return dict(sorted(digests.items()))


def weights_digest(file_digests: dict[str, str]) -> str:
    """One sha256 over the weights files' names and digests (sorted)."""
    h = hashlib.sha256()
    for name, digest in sorted(file_digests.items()):
        h.update(name.encode() + b"\0" + digest.encode() + b"\n")
    return h.hexdigest()


def load_weights_data(folder: str, read: Callable[[str], bytes] | None = None
                      ) -> tuple[PixelAutoencoderConfig, dict[str, list[np.ndarray]], dict[str, str]]:
    """(config, {layer: arrays}, {file: sha256}) from a weights folder (local, or through ``read(path)``)."""
    read = read or (lambda p: open(p, "rb").read())
    raw = read(os.path.join(folder, LAYERS_FILE))
    spec = json.loads(raw)
    digests = {LAYERS_FILE: _sha256(raw)}
    weights = {}
    for layer in spec["layers"]:
        arrays = []
        for name, shape in zip(layer["files"], layer["shapes"], strict=True):
            if "/" in name or name.startswith("."):
                raise ValueError(f"{folder}/{LAYERS_FILE} names {name!r}, not a file of the folder")
            data = read(os.path.join(folder, name))
            digests[name] = _sha256(data)
            array = np.load(io.BytesIO(data), allow_pickle=False)
            if list(array.shape) != list(shape):
                raise ValueError(f"{folder}/{name} holds {array.shape}, {LAYERS_FILE} says {tuple(shape)}")
            arrays.append(array.astype(np.float32, copy=False))
        weights[layer["name"]] = arrays
    return PixelAutoencoderConfig.from_dict(spec["config"]), weights, dict(sorted(digests.items()))


def set_weights(model: Any, weights: dict[str, list[np.ndarray]]) -> None:
    """Loads {layer: arrays} into ``model``; every layer with variables must be given, with matching shapes."""
    for layer in model.layers:
        expected = layer.get_weights()
        if not expected:
            continue
        given = weights.get(layer.name)
        if given is None or [np.shape(w) for w in given] != [np.shape(w) for w in expected]:
            raise ValueError(f"weights for layer {layer.name!r} are missing or of the wrong shape")
        layer.set_weights(given)


def model_fingerprint(cfg: PixelAutoencoderConfig, digest: str) -> str:
    """What an encoder's codes depend on: the network's shape and its trained weights."""
    shape = {k: v for k, v in cfg.to_dict().items() if k in ("size", "code_dim", "filters")}
    return fingerprint({"pixel_autoencoder": shape, "weights": digest})


# -- SavedModels ----------------------------------------------------------------------------------------


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
