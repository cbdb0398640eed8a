"""Query embeddings from a TensorFlow Serving endpoint running ``cbir export-model`` output.

Two transports with one interface (:class:`ServingClient.predict_images`, ``client``):

* gRPC — ``PredictionService/Predict`` from ``tensorflow-serving-api``, image bytes as a
  ``DT_STRING`` tensor (``tf.make_tensor_proto``); TF Serving listens on 8500 by default
  (``grpc_client``).
* REST — ``POST /v1/models/NAME[/versions/N]:predict`` with ``{"instances": [{"b64": ...}]}``,
  TF Serving's convention for binary strings; port 8501 by default. Plain ``urllib`` (``rest_client``).

Before the first image is sent, :class:`ServingEmbedder` (``embedder``) reads the signature from the
model metadata (``GetModelMetadata`` / ``GET /v1/models/NAME/metadata``) and refuses one
that does not take encoded images or does not return a fingerprint. The exported bytes
signatures return ``model_fingerprint`` (and, for ``transformed``, ``index_version`` and
``transform_fingerprint``) next to every vector, so the embedder checks the model that
produced the very vectors it got, even when TF Serving switches versions between two
requests. A mismatch with the index is an error, never a silent search in the wrong space.
"""

from search.tf_serving.client import (
    DEFAULT_MODEL_NAME,
    DEFAULT_TIMEOUT_S,
    PROTOCOLS,
    Prediction,
    ServingClient,
    ServingError,
    ServingRequestError,
    ServingUnavailableError,
    SignatureInfo,
)
from search.tf_serving.embedder import ServingEmbedder, check_prediction, make_client
from search.tf_serving.grpc_client import GrpcClient
from search.tf_serving.rest_client import RestClient

__all__ = ["DEFAULT_MODEL_NAME", "DEFAULT_TIMEOUT_S", "PROTOCOLS", "GrpcClient", "Prediction", "RestClient",
           "ServingClient", "ServingEmbedder", "ServingError", "ServingRequestError", "ServingUnavailableError",
           "SignatureInfo", "check_prediction", "make_client"]
