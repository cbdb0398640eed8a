"""The feature extractor as a SavedModel for TensorFlow Serving.

One exported graph serves both the batch pipeline (``savedmodel:DIR/N`` with the
``pixels`` signature) and online queries (``serving_default``: encoded image
bytes in, bottleneck features out), so a query is embedded by the same weights
and the same preprocessing arithmetic as the corpus.

Layout, as ``tensorflow_model_server --model_base_path=DIR`` expects::

    DIR/<N>/saved_model.pb
    DIR/<N>/variables/...
    DIR/<N>/assets.extra/cbir_export.json          # fingerprint and export parameters
    DIR/<N>/assets.extra/tf_serving_warmup_requests  # one request TF Serving replays on load

Signatures (all batched on the first axis):

``serving_default``  ``images`` string [None] → ``features`` float32 [None, D], ``model_fingerprint`` string [None]
``pixels``           ``pixels`` float32 [None, S, S, 3] in [0, 255] → ``features`` float32 [None, D]
``transformed``      (with an index) ``images`` → ``features`` float32 [None, D_out] after the index's
                     transform (stored as data: projection and bias), plus ``model_fingerprint``,
                     ``index_version``, ``transform_fingerprint``

The bytes signatures return the fingerprint with every vector, so a client checks
the model that actually computed the vectors it got, even while TF Serving swaps
versions underneath it. The ``pixels`` signature has a single output so that the
pipeline's SavedModel loader needs no ``--output-key``.

In-graph decoding (``models/backbone/graph_decode.py``) reproduces
:func:`models.backbone.imaging.decode_and_resize`, so a query sent as bytes is decoded as the
corpus was.

Nothing here imports Beam; file I/O goes through ``tf.io.gfile`` so ``gs://``
bases work as TF Serving reads them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

from artefacts.manifests import ExportCard, utc_now
from models.backbone.graph_decode import RESIZE, decode_batch
from models.backbone.imaging import DEFAULT_MAX_PIXELS
from models.backbone.network import Backbone, ModelSpec, preprocess

log = logging.getLogger(__name__)

EXPORT_FORMAT = ExportCard.KIND
EXPORT_INFO_FILE = "cbir_export.json"
ASSETS_EXTRA = "assets.extra"
WARMUP_FILE = "tf_serving_warmup_requests"

BYTES_SIGNATURE = "serving_default"
PIXELS_SIGNATURE = "pixels"
TRANSFORMED_SIGNATURE = "transformed"

IMAGES_INPUT = "images"
PIXELS_INPUT = "pixels"
FEATURES_OUTPUT = "features"
FINGERPRINT_OUTPUT = "model_fingerprint"
INDEX_VERSION_OUTPUT = "index_version"
TRANSFORM_FINGERPRINT_OUTPUT = "transform_fingerprint"

class ExportError(RuntimeError):
    """The export cannot be written as asked (existing version, bad model, index of another model)."""


@dataclasses.dataclass(frozen=True)
class IndexTransform:
    """The part of an index version the ``transformed`` signature embeds."""

    version_dir: str
    version: str
    model_fingerprint: str
    transform_fingerprint: str  # search.searcher.transform_fingerprint() of the index manifest
    dimension: int  # output dimension of the transform
    projection: Any = None  # (D_in, D_out) float32, or None for the L2 step alone
    bias: Any = None  # (D_out,) float32


@dataclasses.dataclass(frozen=True)
class ExportResult:
    path: str  # DIR/N
    version: int
    info: ExportCard


def _fill(value: Any, images: Any) -> Any:
    """``value`` once per image of the batch (the fingerprint outputs)."""
    import tensorflow as tf

    return tf.fill(tf.shape(images)[:1], value)


def _transformed_fn(features: Callable[[Any], Any], index: IndexTransform, fingerprint: str, size: int,
                    max_pixels: int, reduced_decode: bool) -> Any:
    """The ``transformed`` signature: the bytes signature's features put through the index's transform.

    The transform is the index's as data (projection and bias, read and checked at build time): the
    export never loads a SavedModel that came with an index.
    """
    import tensorflow as tf

    projection = None if index.projection is None else tf.constant(index.projection, tf.float32)
    bias = None if index.bias is None else tf.constant(index.bias, tf.float32)

    def transform(x):
        x = tf.math.l2_normalize(x, axis=1)
        if projection is None:
            return x
        return tf.math.l2_normalize(tf.matmul(x, projection) + bias, axis=1)

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name=IMAGES_INPUT)], autograph=False)
    def transformed_fn(images):
        raw = features(decode_batch(images, size, max_pixels, reduced_decode))
        return {
            FEATURES_OUTPUT: transform(raw),
            FINGERPRINT_OUTPUT: _fill(fingerprint, images),
            INDEX_VERSION_OUTPUT: _fill(index.version, images),
            TRANSFORM_FINGERPRINT_OUTPUT: _fill(index.transform_fingerprint, images),
        }

    return transformed_fn


def _servable(backbone: Backbone, fingerprint: str, max_pixels: int, reduced_decode: bool,
              index: IndexTransform | None):
    """A tf.Module owning the Keras model (and the tf.Transform layer) with one tf.function per signature."""
    import tensorflow as tf

    size = backbone.size
    mode = backbone.spec.preset().preprocessing
    module = tf.Module()
    module.model = backbone.keras_model
    model = module.model

    def features(pixels):
        def run():
            x = preprocess(tf.cast(pixels, tf.float32), mode)
            return tf.cast(model(x, training=False), tf.float32)

        # an empty batch is a valid request; some CPU kernels reject zero-sized inputs
        return tf.cond(tf.shape(pixels)[0] > 0, run, lambda: tf.zeros([0, backbone.dim], tf.float32))

    # autograph=False: the graph code below uses tf.cond / tf.while_loop explicitly, and converting
    # it anyway multiplies the tracing time.
    @tf.function(input_signature=[tf.TensorSpec([None, size, size, 3], tf.float32, name=PIXELS_INPUT)],
                 autograph=False)
    def pixels_fn(pixels):
        return {FEATURES_OUTPUT: features(pixels)}

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name=IMAGES_INPUT)], autograph=False)
    def bytes_fn(images):
        return {
            FEATURES_OUTPUT: features(decode_batch(images, size, max_pixels, reduced_decode)),
            FINGERPRINT_OUTPUT: _fill(fingerprint, images),
        }

    signatures = {BYTES_SIGNATURE: bytes_fn, PIXELS_SIGNATURE: pixels_fn}

    if index is not None:
        signatures[TRANSFORMED_SIGNATURE] = _transformed_fn(features, index, fingerprint, size, max_pixels,
                                                            reduced_decode)
    # Concrete functions, traced once here: handing tf.functions to tf.saved_model.save (or
    # attaching them to the module) traces them again in its save context.
    return module, {name: fn.get_concrete_function() for name, fn in signatures.items()}


def _signature_table(signatures: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for name, concrete in signatures.items():
        args, kwargs = concrete.structured_input_signature
        inputs = {**{spec.name: spec for spec in args}, **kwargs}
        out[name] = {
            "inputs": {k: {"dtype": v.dtype.name, "shape": v.shape.as_list()} for k, v in inputs.items()},
            "outputs": {k: {"dtype": v.dtype.name, "shape": v.shape.as_list()}
                        for k, v in concrete.structured_outputs.items()},
        }
    return out


def _tiny_jpeg(size: int) -> bytes:
    import tensorflow as tf

    grid = tf.cast(tf.linspace(0.0, 255.0, size), tf.uint8)
    image = tf.stack([tf.tile(grid[None, :], [size, 1])] * 3, axis=-1)
    return tf.io.encode_jpeg(image, quality=90).numpy()


def _write_warmup(path: str, size: int) -> None:
    """One PredictionLog record TF Serving replays at load time, so the first query is not the slow one."""
    import tensorflow as tf
    from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2

    request = predict_pb2.PredictRequest(
        model_spec=model_pb2.ModelSpec(signature_name=BYTES_SIGNATURE)
    )
    request.inputs[IMAGES_INPUT].CopyFrom(tf.make_tensor_proto([_tiny_jpeg(size)], dtype=tf.string, shape=[1]))
    record = prediction_log_pb2.PredictionLog(predict_log=prediction_log_pb2.PredictLog(request=request))
    with tf.io.TFRecordWriter(path) as writer:
        writer.write(record.SerializeToString())


def _join(*parts: str) -> str:
    return "/".join(p.rstrip("/") for p in parts)


def existing_versions(output: str) -> list[int]:
    """Numeric version folders under a model base path (what TF Serving would serve)."""
    import tensorflow as tf

    if not tf.io.gfile.isdir(output):
        return []
    return sorted(int(n.rstrip("/")) for n in tf.io.gfile.listdir(output) if n.rstrip("/").isdigit())


def export_savedmodel(
    spec: ModelSpec,
    output: str,
    version: int = 1,
    index: IndexTransform | None = None,
    force: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    reduced_decode: bool = True,
    warmup: bool = True,
) -> ExportResult:
    """Writes ``output/<version>/`` (staged under ``output/_staging-…`` then renamed into place).

    Refuses an existing version unless ``force``: TF Serving may be serving it, and
    replacing a version in place changes the vectors under a running index.
    """
    import tensorflow as tf

    final = _check_request(spec, output, version, force)
    started = time.time()
    description = spec.describe()  # resolves weights now: a missing file fails before any work
    fingerprint = spec.fingerprint()
    if index is not None and index.model_fingerprint != fingerprint:
        raise ExportError(
            f"the index {index.version} was built with model fingerprint {index.model_fingerprint}, but "
            f"{spec.name} has {fingerprint}: its transform does not fit this model's features"
        )
    backbone = Backbone(spec)
    module, signatures = _servable(backbone, fingerprint, max_pixels, reduced_decode, index)
    staging = _join(output, f"_staging-{version}-{uuid.uuid4().hex[:8]}")
    tf.io.gfile.makedirs(output)
    info = _card(spec, description, fingerprint, backbone, version, signatures, index, max_pixels, reduced_decode)
    try:
        tf.saved_model.save(module, staging, signatures=signatures)
        extra = _join(staging, ASSETS_EXTRA)
        tf.io.gfile.makedirs(extra)
        with tf.io.gfile.GFile(_join(extra, EXPORT_INFO_FILE), "w") as f:
            f.write(json.dumps(info.to_dict(), indent=2, sort_keys=True) + "\n")
        if warmup:
            _write_warmup(_join(extra, WARMUP_FILE), backbone.size)
        _publish(staging, final, force)
    except BaseException:
        if tf.io.gfile.exists(staging):
            tf.io.gfile.rmtree(staging)
        raise
    log.info("exported %s (%d-d, fingerprint %s) to %s in %.1fs", spec.name, backbone.dim, fingerprint, final,
             time.time() - started)
    return ExportResult(path=final, version=version, info=info)


def _check_request(spec: ModelSpec, output: str, version: int, force: bool) -> str:
    """The version folder to write, or an ``ExportError`` saying why this export cannot be made."""
    import tensorflow as tf

    if spec.is_savedmodel:
        raise ExportError("export-model takes a preset; a savedmodel: is already exported")
    if spec.precision != "float32":
        raise ExportError("export float32 models; serve reduced precision with TF Serving's own options")
    if version < 1:
        raise ExportError(f"version must be a positive integer, not {version}")
    final = _join(output, str(version))
    if tf.io.gfile.exists(final) and not force:
        raise ExportError(f"{final} exists: choose another --version or pass --force to replace it")
    return final


def _card(spec: ModelSpec, description: dict[str, Any], fingerprint: str, backbone: Backbone, version: int,
          signatures: dict[str, Any], index: IndexTransform | None, max_pixels: int, reduced_decode: bool
          ) -> ExportCard:
    """The export card written beside the SavedModel: what made it, how it decodes, what it serves."""
    import tensorflow as tf

    return ExportCard(
        created_utc=utc_now(),
        version=version,
        model=description,
        model_fingerprint=fingerprint,
        input_size=backbone.size,
        dimension=backbone.dim,
        preprocessing=spec.preset().preprocessing,
        decode={
            "in_graph": "tf.io.decode_jpeg(dct_method=INTEGER_ACCURATE) / tf.io.decode_image",
            "reduced_jpeg_decode": reduced_decode,
            "exif_orientation": True,
            "alpha": "composited on white",
            "resize": RESIZE,
            "max_pixels": max_pixels,
        },
        signatures=_signature_table(signatures),
        index=None if index is None else {
            "version": index.version,
            "transform_fingerprint": index.transform_fingerprint,
            "dimension": index.dimension,
        },
        tensorflow_version=tf.__version__,
    )


def _publish(staging: str, final: str, force: bool) -> None:
    import tensorflow as tf

    if tf.io.gfile.exists(final):
        if not force:
            raise ExportError(f"{final} appeared while exporting; the export is left out")
        aside = f"{staging}-replaced"
        tf.io.gfile.rename(final, aside)
        tf.io.gfile.rename(staging, final)
        tf.io.gfile.rmtree(aside)
    else:
        tf.io.gfile.rename(staging, final)


def read_export_info(path: str) -> ExportCard | None:
    """The export card of a SavedModel folder, or None when it was not written by this module."""
    import tensorflow as tf

    info_path = _join(path, ASSETS_EXTRA, EXPORT_INFO_FILE)
    if not tf.io.gfile.exists(info_path):
        return None
    with tf.io.gfile.GFile(info_path) as f:
        info = json.load(f)
    if not isinstance(info, dict) or info.get(ExportCard.KIND_KEY) != ExportCard.KIND:
        return None
    return ExportCard.from_dict(info, source=info_path)
