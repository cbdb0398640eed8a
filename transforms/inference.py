"""Bottleneck extraction through Beam's RunInference.

The handler subclasses Beam's ``TFModelHandlerNumpy`` so that RunInference keeps
its batching, model sharing and metrics, but loads our :class:`Backbone`
(Keras preset with resolved weights, or a TF SavedModel through
``tf.saved_model.load``; Keras 3 refuses SavedModel folders in the stock path).
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterable, Sequence
from typing import Any

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import KeyedModelHandler, PredictionResult, RunInference
from apache_beam.ml.inference.tensorflow_inference import ModelType, TFModelHandlerNumpy

from models.backbone.network import Backbone, ModelSpec
from models.backbone.weights import RANDOM
from transforms.decode import count_failure
from transforms.records import FAILURES_TAG, FeatureRow, ImageMeta, failure


@dataclasses.dataclass(frozen=True)
class BatchingOptions:
    """Bounds on RunInference batches; Beam grows them to 10,000 otherwise."""

    min_batch_size: int = 8
    max_batch_size: int = 64
    share_across_processes: bool = False  # one model per VM (GPU workers with several processes)
    model_copies: int | None = None


def _backbone_inference_fn(
    model: Backbone, batch: Sequence[np.ndarray], inference_args: dict[str, Any], model_id: str | None = None
) -> Iterable[PredictionResult]:
    features = model.predict(np.stack(batch, axis=0))
    # which runtime each worker chose under --runtime auto: the manifest records it from these counters
    Metrics.counter("cbir_inference", f"batches_runtime_{model.runtime}").inc()
    return [PredictionResult(x, y, model_id) for x, y in zip(batch, features, strict=True)]


_LOADED: dict[ModelSpec, Backbone] = {}  # per process: one model per spec (ModelSpec is frozen, hashable)
_LOADING = threading.Lock()


class BackboneModelHandler(TFModelHandlerNumpy):
    """TFModelHandlerNumpy whose model is a :class:`Backbone` built from a ModelSpec."""

    def __init__(self, spec: ModelSpec, batching: BatchingOptions):
        super().__init__(
            model_uri=spec.name,
            model_type=ModelType.SAVED_WEIGHTS,
            create_model_fn=None,
            inference_fn=_backbone_inference_fn,
            min_batch_size=batching.min_batch_size,
            max_batch_size=batching.max_batch_size,
            large_model=batching.share_across_processes,
            model_copies=batching.model_copies,
        )
        self._spec = spec

    def load_model(self) -> Backbone:
        """The worker process's model: built once, then shared by every later pipeline in the process.

        An extract in chunks runs one pipeline per chunk; on the local runner their workers are this
        process, and building the model again cost about 0.5 s a chunk. Random weights are never
        shared: each load is meant to draw its own.
        """
        if self._spec.weights == RANDOM:
            return Backbone(self._spec)
        with _LOADING:
            if self._spec not in _LOADED:
                _LOADED[self._spec] = Backbone(self._spec)
            return _LOADED[self._spec]

    def get_metrics_namespace(self) -> str:
        return "cbir_inference"

    def get_num_bytes(self, batch: Sequence[np.ndarray]) -> int:
        return sum(x.nbytes for x in batch)


class _ToFeatureRowFn(beam.DoFn):
    def __init__(self, feature_dtype: str):
        self._dtype = feature_dtype
        self._ok = Metrics.counter("cbir", "ok")

    def process(self, keyed: tuple[ImageMeta, PredictionResult]):
        meta, result = keyed
        vec = np.asarray(result.inference, dtype=np.float32)
        if not np.all(np.isfinite(vec)):
            count_failure("inference", "NonFiniteFeature")
            yield beam.pvalue.TaggedOutput(
                FAILURES_TAG,
                failure(meta.image_id, meta.uri, "inference", "NonFiniteFeature", "NaN or inf", unit=meta.unit),
            )
            return
        self._ok.inc()
        yield FeatureRow(meta, vec.astype(self._dtype))


def _failed_batch_rows(failed: tuple[Any, BaseException]):
    batch, exc = failed
    count_failure("inference", type(exc).__name__, len(batch))
    for meta, _ in batch:
        yield failure(meta.image_id, meta.uri, "inference", exc, unit=meta.unit)


class ExtractFeatures(beam.PTransform):
    """``(ImageMeta, pixels)`` → ``FeatureRow`` main output and failure rows."""

    def __init__(self, spec: ModelSpec, batching: BatchingOptions, feature_dtype: str = "float32"):
        super().__init__()
        self._handler = KeyedModelHandler(BackboneModelHandler(spec, batching))
        self._dtype = feature_dtype

    def expand(self, pcoll):
        results, dlq = pcoll | "RunInference" >> RunInference(self._handler).with_exception_handling()
        rows = results | "ToRows" >> beam.ParDo(_ToFeatureRowFn(self._dtype)).with_outputs(
            FAILURES_TAG, main="rows"
        )
        batch_failures = dlq.failed_inferences | "FailedBatches" >> beam.FlatMap(_failed_batch_rows)
        failures = (rows[FAILURES_TAG], batch_failures) | "MergeFailures" >> beam.Flatten()
        return rows.rows, failures
