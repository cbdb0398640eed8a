"""Loading a backbone once per process and running it on pixel batches.

A :class:`Backbone` takes uint8 (or float) RGB pixels in [0, 255] and returns
float32 pooled features. Preprocessing lives inside the compiled function, so
the batch pipeline, the query path and the exported SavedModel all apply the
same arithmetic.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
from typing import Any

import numpy as np

from models.backbone import imaging, runtimes
from models.backbone.presets import SAVEDMODEL_PREFIX, Preset, fingerprint, get_preset
from models.backbone.weights import RANDOM, file_digest, resolve_weights

log = logging.getLogger(__name__)

PRECISIONS = ("float32", "float16", "bfloat16")
_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """What the user asked for; picklable, so Beam can ship it to workers."""

    name: str = "inception_v3"
    weights_dir: str | None = None
    weights: str | None = None  # None: pretrained (resolved); "random"; or an explicit file path
    precision: str = "float32"
    jit: bool = False  # the older spelling of runtime="xla"
    signature: str = "serving_default"
    output_key: str | None = None
    input_size: int | None = None  # SavedModels only: the pixel size their input expects
    # How the network runs (models/backbone/runtimes.py). Not part of describe(): every runtime computes the same
    # vectors within runtimes.PARITY_TOLERANCE, so an index or --previous run made with one serves the others.
    runtime: str = "graph"

    def requested_runtime(self) -> str:
        """The runtime asked for, with ``jit`` folded in; a contradiction is refused."""
        if self.runtime not in runtimes.CHOICES:
            raise ValueError(f"runtime must be one of {runtimes.CHOICES}, not {self.runtime!r}")
        if not self.jit:
            return self.runtime
        if self.runtime in ("auto", "graph", "xla"):
            return "xla"
        raise ValueError(f"--jit means --runtime xla; it contradicts --runtime {self.runtime}")

    @property
    def is_savedmodel(self) -> bool:
        return self.name.startswith(SAVEDMODEL_PREFIX)

    @property
    def savedmodel_path(self) -> str:
        return self.name[len(SAVEDMODEL_PREFIX):]

    def preset(self) -> Preset:
        return get_preset(self.name)

    def size(self) -> int:
        if self.is_savedmodel:
            return self.input_size or _exported_input_size(self.savedmodel_path) or 224
        return self.preset().input_size

    def weights_path(self) -> str | None:
        """Resolves weights on the machine that calls it (driver or worker)."""
        if self.is_savedmodel or self.weights == RANDOM:
            return None
        if self.weights:
            if not os.path.isfile(self.weights):
                raise FileNotFoundError(f"weights file {self.weights} does not exist")
            return self.weights
        return resolve_weights(self.preset(), self.weights_dir)

    def describe(self) -> dict[str, Any]:
        """Everything that determines the vectors; its digest is the model fingerprint."""
        if self.is_savedmodel:
            path = self.savedmodel_path
            desc: dict[str, Any] = {
                "preset": "savedmodel",
                "path": path,
                "signature": self.signature,
                "output_key": self.output_key,
                "input_size": self.size(),
                "saved_model_digest": _savedmodel_digest(path),
            }
        else:
            desc = self.preset().describe()
            wpath = self.weights_path()
            desc["weights"] = RANDOM if wpath is None else "pretrained"
            desc["weights_sha256"] = None if wpath is None else file_digest(wpath)
        desc["resize"] = imaging.RESIZE_METHOD
        return desc

    def fingerprint(self) -> str:
        return fingerprint(self.describe())


def _exported_input_size(path: str) -> int | None:
    """The input side recorded by ``cbir export-model`` (assets.extra/cbir_export.json), if any."""
    card = os.path.join(path, "assets.extra", "cbir_export.json")
    try:
        with open(card) as f:
            return int(json.load(f)["input_size"])
    except (OSError, ValueError, KeyError):
        return None


def _savedmodel_digest(path: str) -> str:
    pb = os.path.join(path, "saved_model.pb")
    return file_digest(pb) if os.path.isfile(pb) else "unknown"


def configure_devices() -> list[str]:
    """Turns on GPU memory growth (must happen before the first op); returns GPU names."""
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    for gpu in gpus:
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError:  # already initialised in this process: growth was set then
            pass
    return [g.name for g in gpus]


def preprocess(pixels: Any, mode: str) -> Any:
    """Backbone-specific pixel scaling as TensorFlow ops (input float32 in [0, 255])."""
    import tensorflow as tf

    if mode == "tf":
        return pixels / 127.5 - 1.0
    if mode == "caffe":
        bgr = pixels[..., ::-1]
        return bgr - tf.constant(_CAFFE_MEAN_BGR, dtype=pixels.dtype)
    if mode == "none":
        return pixels
    raise ValueError(f"unknown preprocessing {mode!r}")


class Backbone:
    """A loaded network plus its feature function on the chosen runtime.

    The runtime is resolved on the first :meth:`predict` (or :meth:`resolve_runtime`), not at
    construction: the tools that only need ``keras_model`` (inspect, export, visualise) never pay
    for a LiteRT conversion or a parity probe.
    """

    def __init__(self, spec: ModelSpec):
        import tensorflow as tf

        if spec.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, not {spec.precision!r}")
        self.spec = spec
        self._requested = spec.requested_runtime()
        self.devices = configure_devices()
        self.size = spec.size()
        self.keras_model = None
        signature = [tf.TensorSpec([None, self.size, self.size, 3], tf.float32)]
        if spec.is_savedmodel:
            call = self._load_savedmodel(spec)
            self._graph = tf.function(call, input_signature=signature, reduce_retracing=True)
            self._xla = tf.function(call, input_signature=signature, jit_compile=True)
            self.dim = int(self._graph(tf.zeros((1, self.size, self.size, 3), tf.float32)).shape[-1])
        else:
            self.keras_model = self._build_keras(spec)
            self.dim = int(self.keras_model.output_shape[-1])
            mode = spec.preset().preprocessing
            model = self.keras_model

            def features(pixels):
                x = preprocess(tf.cast(pixels, tf.float32), mode)
                return tf.cast(model(x, training=False), tf.float32)

            self._graph = tf.function(features, input_signature=signature, reduce_retracing=True)
            self._xla = tf.function(features, input_signature=signature, jit_compile=True)
        self.runtime: str | None = None
        self._run = None
        self._resolving = threading.Lock()  # a service's threads may all send their first batch at once
        log.info("loaded %s (%d-d, %d px, %s) on %s", spec.name, self.dim, self.size, spec.precision,
                 ", ".join(self.devices) or "CPU")

    # -- runtimes -------------------------------------------------------------------------------------

    @property
    def graph(self) -> Any:
        """The traced feature function (float32 pixels in [0, 255] → features): what LiteRT and peers convert."""
        return self._graph

    def _tf_runner(self, fn):
        import tensorflow as tf

        return lambda pixels: fn(tf.convert_to_tensor(pixels, tf.float32)).numpy()

    def _keras_runner(self):
        import tensorflow as tf

        if self.keras_model is None:
            raise runtimes.RuntimeUnavailableError(
                f"--runtime keras needs a Keras preset; {self.spec.name} is a SavedModel: use --runtime graph")
        model, mode = self.keras_model, self.spec.preset().preprocessing
        return lambda pixels: np.asarray(
            model.predict_on_batch(preprocess(tf.convert_to_tensor(pixels, tf.float32), mode)), np.float32)

    def _litert_runner(self):
        if self.spec.precision != "float32":
            raise runtimes.RuntimeUnavailableError(
                f"--runtime litert runs float32 models; with --precision {self.spec.precision} use --runtime graph")
        runtimes.interpreter_class()  # a missing package fails before a conversion is paid for
        flat = runtimes.litert_flatbuffer(self._graph, self.spec.fingerprint(), self.size, self.spec.name,
                                          cache=self.spec.weights != RANDOM)  # random weights differ per process
        return runtimes.LiteRTRunner(flat, self.size)

    def runner(self, name: str):
        """A callable float32 pixels → features on runtime ``name``; raises RuntimeUnavailableError."""
        if name == "keras":
            return self._keras_runner()
        if name == "graph":
            return self._tf_runner(self._graph)
        if name == "xla":
            return self._tf_runner(self._xla)
        if name == "litert":
            return self._litert_runner()
        raise ValueError(f"runtime must be one of {runtimes.RUNTIMES}, not {name!r}")

    def _reference(self):
        return self._keras_runner() if self.keras_model is not None else self._tf_runner(self._graph)

    def resolve_runtime(self) -> str:
        """Chooses (once) and returns the runtime this process runs the network on."""
        with self._resolving:
            if self.runtime is not None:
                return self.runtime
            name = self._requested
            if name == "auto":
                name, run = self._auto()
            else:
                run = self.runner(name)
            self._run, self.runtime = run, name
            log.info("running %s on %s", self.spec.name, name)
            return name

    def _auto(self):
        if self.devices:  # GPUs: TensorFlow, where the precision options apply
            return "graph", self.runner("graph")
        cacheable = self.spec.weights != RANDOM
        try:
            run = self.runner("litert")
            diff = runtimes.cached_parity(self.spec.fingerprint(), self.size) if cacheable else None
            if diff is None:
                diff = runtimes.max_difference(run, self._reference(), runtimes.probe_pixels(self.size))
                if cacheable:
                    runtimes.store_parity(self.spec.fingerprint(), self.size, diff)
        except runtimes.RuntimeUnavailableError as exc:
            log.warning("runtime auto: not LiteRT (%s); running the TensorFlow graph", exc)
            return "graph", self.runner("graph")
        if diff > runtimes.PARITY_TOLERANCE:
            log.warning("runtime auto: LiteRT differs from Keras by %.2e (> %.0e) on the probe batch; running "
                        "the TensorFlow graph", diff, runtimes.PARITY_TOLERANCE)
            return "graph", self.runner("graph")
        log.info("runtime auto: LiteRT matches Keras within %.1e on the probe batch", diff)
        return "litert", run

    @staticmethod
    def _build_keras(spec: ModelSpec):
        import keras

        preset = spec.preset()
        weights_path = spec.weights_path()
        previous = keras.mixed_precision.global_policy().name
        if spec.precision != "float32":
            keras.mixed_precision.set_global_policy(f"mixed_{spec.precision}")
        try:
            app = getattr(keras.applications, preset.keras_app)
            model = app(
                include_top=False,
                weights=None,
                pooling="avg",
                input_shape=(preset.input_size, preset.input_size, 3),
                **dict(preset.app_kwargs),
            )
        finally:
            keras.mixed_precision.set_global_policy(previous)
        if weights_path is not None:
            # Keras Applications load their own no-top files exactly like this.
            model.load_weights(weights_path)
        return model

    @staticmethod
    def _load_savedmodel(spec: ModelSpec):
        import tensorflow as tf

        # A SavedModel is code: only load models you built yourself (see README).
        loaded = tf.saved_model.load(spec.savedmodel_path)
        if spec.signature not in loaded.signatures:
            raise ValueError(
                f"SavedModel {spec.savedmodel_path} has no signature {spec.signature!r}; "
                f"it has {sorted(loaded.signatures)}"
            )
        fn = loaded.signatures[spec.signature]
        _, kwargs = fn.structured_input_signature
        if len(kwargs) != 1:
            raise ValueError(f"signature {spec.signature!r} must take one tensor, takes {sorted(kwargs)}")
        (input_name, input_spec), = kwargs.items()
        outputs = fn.structured_outputs
        key = spec.output_key or (next(iter(outputs)) if len(outputs) == 1 else None)
        if key not in outputs:
            raise ValueError(f"choose --output-key from {sorted(outputs)}")

        def call(pixels):
            out = fn(**{input_name: tf.cast(pixels, input_spec.dtype)})[key]
            return tf.cast(tf.reshape(out, (tf.shape(out)[0], -1)), tf.float32)

        call.loaded = loaded  # keep the trackable alive as long as the function
        return call

    def predict(self, pixels: np.ndarray) -> np.ndarray:
        """Features for a batch of (n, size, size, 3) pixels in [0, 255]."""
        if pixels.ndim != 4 or pixels.shape[1:] != (self.size, self.size, 3):
            raise ValueError(f"expected (n, {self.size}, {self.size}, 3) pixels, got {pixels.shape}")
        if self._run is None:
            self.resolve_runtime()
        return self._run(pixels)

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        return self.predict(pixels)
