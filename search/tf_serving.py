"""Query embeddings from a TensorFlow Serving endpoint running ``cbir export-model`` output.

Two transports with one interface (:class:`ServingClient.predict_images`):

* gRPC — ``PredictionService/Predict`` from ``tensorflow-serving-api``, image bytes as a
  ``DT_STRING`` tensor (``tf.make_tensor_proto``); TF Serving listens on 8500 by default.
* REST — ``POST /v1/models/NAME[/versions/N]:predict`` with ``{"instances": [{"b64": ...}]}``,
  TF Serving's convention for binary strings; port 8501 by default. Plain ``urllib``.

Before the first image is sent, :class:`ServingEmbedder` reads the signature from the
model metadata (``GetModelMetadata`` / ``GET /v1/models/NAME/metadata``) and refuses one
that does not take encoded images or does not return a fingerprint. The exported bytes
signatures return ``model_fingerprint`` (and, for ``transformed``, ``index_version`` and
``transform_fingerprint``) next to every vector, so the embedder checks the model that
produced the very vectors it got, even when TF Serving switches versions between two
requests. A mismatch with the index is an error, never a silent search in the wrong space.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
import re
import urllib.error
import urllib.request
from typing import Any

import numpy as np

from artefacts.manifests import IndexManifest
from artefacts.vector_space import space_fingerprint
from models.backbone.export import (
    BYTES_SIGNATURE,
    FEATURES_OUTPUT,
    FINGERPRINT_OUTPUT,
    IMAGES_INPUT,
    INDEX_VERSION_OUTPUT,
    TRANSFORM_FINGERPRINT_OUTPUT,
    read_export_info,
)
from search import compatibility
from search.compatibility import ModelMismatchError
from search.embedder import DecodeFailure, FileEmbedding
from search.index_files import load_transform

log = logging.getLogger(__name__)

PROTOCOLS = ("grpc", "rest")
DEFAULT_MODEL_NAME = "cbir"
DEFAULT_TIMEOUT_S = 30.0
MAX_MESSAGE_BYTES = 256 << 20  # a batch of full-size photos exceeds gRPC's 4 MiB default


class ServingError(RuntimeError):
    """TF Serving refused or failed a request (model or signature missing, internal error)."""


class ServingRequestError(ServingError):
    """The request's data was rejected (INVALID_ARGUMENT / HTTP 400): typically an undecodable image."""


class ServingUnavailableError(ServingError):
    """No answer from the endpoint (connection refused, timeout, server unavailable)."""


@dataclasses.dataclass(frozen=True)
class Prediction:
    """What a bytes signature returned for a batch."""

    features: np.ndarray  # (n, D) float32
    model_fingerprints: list[str] | None  # one per vector; None when the signature returns none
    index_versions: list[str] | None = None  # ``transformed`` only
    transform_fingerprints: list[str] | None = None  # ``transformed`` only

    @property
    def transformed(self) -> bool:
        return self.transform_fingerprints is not None


def _strings(values: Any) -> list[str] | None:
    if values is None:
        return None
    return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in np.asarray(values, dtype=object).ravel()]


def _prediction(outputs: dict[str, Any], n: int) -> Prediction:
    if FEATURES_OUTPUT not in outputs:
        raise ServingError(f"the served signature has no {FEATURES_OUTPUT!r} output (it has {sorted(outputs)})")
    features = np.asarray(outputs[FEATURES_OUTPUT], dtype=np.float32)
    if features.ndim != 2 or features.shape[0] != n:
        raise ServingError(f"expected {n} feature vectors, got an array of shape {features.shape}")
    return Prediction(
        features=features,
        model_fingerprints=_strings(outputs.get(FINGERPRINT_OUTPUT)),
        index_versions=_strings(outputs.get(INDEX_VERSION_OUTPUT)),
        transform_fingerprints=_strings(outputs.get(TRANSFORM_FINGERPRINT_OUTPUT)),
    )


@dataclasses.dataclass(frozen=True)
class SignatureInfo:
    """A served signature as GetModelMetadata describes it: tensor name → dtype name (``DT_STRING``…)."""

    name: str
    inputs: dict[str, str]
    outputs: dict[str, str]


def _signature_info(signature_defs: dict[str, Any], name: str, endpoint: str) -> SignatureInfo:
    """From the JSON form of a SignatureDefMap (REST metadata, or the gRPC proto turned into a dict)."""
    defs = {k: v for k, v in signature_defs.items() if not k.startswith("__")}
    if name not in defs:
        raise ServingError(f"{endpoint}: the model has no signature {name!r} (it has {', '.join(sorted(defs))})")
    sig = defs[name]
    return SignatureInfo(
        name=name,
        inputs={k: v.get("dtype", "") for k, v in sig.get("inputs", {}).items()},
        outputs={k: v.get("dtype", "") for k, v in sig.get("outputs", {}).items()},
    )


class ServingClient:
    """Sends encoded images to one model and signature of a TF Serving endpoint."""

    protocol = ""

    def __init__(self, address: str, model_name: str = DEFAULT_MODEL_NAME, signature: str = BYTES_SIGNATURE,
                 version: int | None = None, timeout: float = DEFAULT_TIMEOUT_S):
        self.address = address
        self.model_name = model_name
        self.signature = signature
        self.version = version
        self.timeout = timeout

    def describe(self) -> str:
        v = f" version {self.version}" if self.version is not None else ""
        return f"{self.protocol}://{self.address} model {self.model_name!r}{v} signature {self.signature!r}"

    def predict_images(self, blobs: list[bytes]) -> Prediction:
        raise NotImplementedError

    def signature_info(self) -> SignatureInfo:
        """The served signature's inputs and outputs (TF Serving's model metadata)."""
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self) -> ServingClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class GrpcClient(ServingClient):
    """PredictionService over gRPC (insecure channel: put TLS in front of TF Serving if needed)."""

    protocol = "grpc"

    def __init__(self, address: str, model_name: str = DEFAULT_MODEL_NAME, signature: str = BYTES_SIGNATURE,
                 version: int | None = None, timeout: float = DEFAULT_TIMEOUT_S):
        import grpc
        from tensorflow_serving.apis import prediction_service_pb2_grpc

        super().__init__(address, model_name, signature, version, timeout)
        self._channel = grpc.insecure_channel(address, options=[
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ])
        self._stub = prediction_service_pb2_grpc.PredictionServiceStub(self._channel)

    def predict_images(self, blobs: list[bytes]) -> Prediction:
        import tensorflow as tf
        from tensorflow_serving.apis import predict_pb2

        request = predict_pb2.PredictRequest()
        request.model_spec.name = self.model_name
        request.model_spec.signature_name = self.signature
        if self.version is not None:
            request.model_spec.version.value = self.version
        request.inputs[IMAGES_INPUT].CopyFrom(tf.make_tensor_proto(list(blobs), dtype=tf.string, shape=[len(blobs)]))
        response = self._call(self._stub.Predict, request)
        return _prediction({k: tf.make_ndarray(v) for k, v in response.outputs.items()}, len(blobs))

    def signature_info(self) -> SignatureInfo:
        from google.protobuf import json_format
        from tensorflow_serving.apis import get_model_metadata_pb2

        request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
        request.model_spec.name = self.model_name
        if self.version is not None:
            request.model_spec.version.value = self.version
        response = self._call(self._stub.GetModelMetadata, request)
        defs = get_model_metadata_pb2.SignatureDefMap()
        response.metadata["signature_def"].Unpack(defs)
        as_json = json_format.MessageToDict(defs, preserving_proto_field_name=True).get("signature_def", {})
        return _signature_info(as_json, self.signature, self.describe())

    def _call(self, method, request):
        import grpc

        try:
            return method(request, timeout=self.timeout)
        except grpc.RpcError as exc:
            code, details = exc.code(), exc.details()
            if code == grpc.StatusCode.INVALID_ARGUMENT:
                raise _rejected(details, self.describe()) from None
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise ServingUnavailableError(f"{self.describe()}: {code.name}: {details}") from None
            raise ServingError(f"{self.describe()}: {code.name}: {details}") from None

    def close(self) -> None:
        self._channel.close()


class RestClient(ServingClient):
    """TF Serving's REST API, row ("instances") format, binary inputs as ``{"b64": ...}``."""

    protocol = "rest"

    def __init__(self, address: str, model_name: str = DEFAULT_MODEL_NAME, signature: str = BYTES_SIGNATURE,
                 version: int | None = None, timeout: float = DEFAULT_TIMEOUT_S):
        super().__init__(address, model_name, signature, version, timeout)
        base = address if address.startswith(("http://", "https://")) else f"http://{address}"
        path = f"/v1/models/{model_name}" + (f"/versions/{version}" if version is not None else "")
        self.model_url = base.rstrip("/") + path
        self.url = self.model_url + ":predict"

    def predict_images(self, blobs: list[bytes]) -> Prediction:
        body = json.dumps({
            "signature_name": self.signature,
            "instances": [{"b64": base64.b64encode(b).decode("ascii")} for b in blobs],
        }).encode()
        request = urllib.request.Request(self.url, data=body, method="POST",
                                         headers={"Content-Type": "application/json"})
        payload = self._send(request)
        return _prediction(_rows_to_columns(payload, len(blobs)), len(blobs))

    def signature_info(self) -> SignatureInfo:
        payload = self._send(urllib.request.Request(self.model_url + "/metadata", method="GET"))
        defs = payload.get("metadata", {}).get("signature_def", {}).get("signature_def", {})
        return _signature_info(defs, self.signature, self.describe())

    def _send(self, request: urllib.request.Request) -> dict[str, Any]:
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            message = _error_message(exc)
            if exc.code == 400:
                raise _rejected(message, self.describe()) from None
            if exc.code in (502, 503, 504):
                raise ServingUnavailableError(f"{self.describe()}: HTTP {exc.code}: {message}") from None
            raise ServingError(f"{self.describe()}: HTTP {exc.code}: {message}") from None
        except (TimeoutError, urllib.error.URLError, ConnectionError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ServingUnavailableError(f"{self.describe()}: {reason}") from None


# TF Serving answers INVALID_ARGUMENT for these too, but they are about the request's shape, not its images.
_SIGNATURE_ERRORS = re.compile(
    r'signature key "[^"]*" not found|not found in signature|does not match signature', re.IGNORECASE
)


def _rejected(message: str, endpoint: str) -> ServingError:
    """INVALID_ARGUMENT is about the images, unless it is about the signature (wrong --serving-signature,
    or one that does not take encoded images): then no image would ever pass, and retrying them one by
    one would only report every image as failed."""
    if _SIGNATURE_ERRORS.search(message):
        return ServingError(f"{endpoint}: {message}")
    return ServingRequestError(message)


def _error_message(exc: urllib.error.HTTPError) -> str:
    try:
        return str(json.loads(exc.read()).get("error", exc.reason))
    except Exception:
        return str(exc.reason)


def _rows_to_columns(payload: dict[str, Any], n: int) -> dict[str, Any]:
    """``{"predictions": [...]}`` (row format) or ``{"outputs": ...}`` (columnar) → output name → array."""
    if "predictions" in payload:
        rows = payload["predictions"]
        if len(rows) != n:
            raise ServingError(f"expected {n} predictions, got {len(rows)}")
        if rows and isinstance(rows[0], dict):
            return {k: [r[k] for r in rows] for k in rows[0]}
        return {FEATURES_OUTPUT: rows}  # a single-output signature returns bare values
    if "outputs" in payload:
        out = payload["outputs"]
        return out if isinstance(out, dict) else {FEATURES_OUTPUT: out}
    raise ServingError(f"unexpected REST response keys {sorted(payload)}")


def make_client(address: str, protocol: str = "grpc", model_name: str = DEFAULT_MODEL_NAME,
                signature: str = BYTES_SIGNATURE, version: int | None = None,
                timeout: float = DEFAULT_TIMEOUT_S) -> ServingClient:
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, not {protocol!r}")
    cls = GrpcClient if protocol == "grpc" else RestClient
    return cls(address, model_name, signature, version, timeout)


# -- query embedding through the client --------------------------------------------------------------


def _export_card(manifest: IndexManifest) -> Any:
    """The export card of the SavedModel the index was extracted with (``savedmodel:DIR/N``), if readable."""
    model = manifest.model
    if model.get("preset") != "savedmodel" or not model.get("path"):
        return None
    try:
        return read_export_info(model["path"])
    except Exception as exc:  # unreadable from here: the index's own fingerprint still applies
        log.warning("could not read the export record of %s: %s", model["path"], exc)
        return None


def check_prediction(prediction: Prediction, manifest: IndexManifest, endpoint: str) -> None:
    """Refuses vectors from another model, or transformed for another index version."""
    compatibility.check_served(
        manifest, endpoint, int(prediction.features.shape[1]), prediction.model_fingerprints,
        prediction.transform_fingerprints if prediction.transformed else None, prediction.index_versions,
        _export_card(manifest), FINGERPRINT_OUTPUT,
    )


class ServingEmbedder(FileEmbedding):
    """The query embedder of ``cbir query --serving``: same interface as :class:`search.embedder.Embedder`.

    Images go to TF Serving in batches; the index's ``transform_fn`` is applied
    locally unless the served signature already applied it. A batch the server rejects
    (one undecodable image fails the whole request) is retried image by image so the
    failures name the files, as the local path does.
    """

    def __init__(self, version_dir: str, manifest: IndexManifest, client: ServingClient, batch_size: int = 32):
        self.version_dir = version_dir
        self.manifest = manifest
        self.client = client
        self.batch_size = max(1, batch_size)
        self.dim = manifest.dimension.output
        self.space_fingerprint = space_fingerprint(manifest)
        self._transform = load_transform(version_dir, manifest)
        self._signature: SignatureInfo | None = None

    def transform(self, features: np.ndarray) -> np.ndarray:
        """Raw served features → the index space, with the index's own transform (as data)."""
        return self._transform(np.asarray(features, dtype=np.float32))

    def check_signature(self) -> SignatureInfo:
        """Fails before any image is sent when the signature cannot embed encoded images.

        Without this, a signature taking pixels would reject every image, and each would be
        reported as an undecodable file.
        """
        info = self.client.signature_info()
        endpoint = self.client.describe()
        if info.inputs != {IMAGES_INPUT: "DT_STRING"}:
            raise ServingError(
                f"{endpoint} takes {info.inputs}, not encoded images ({{{IMAGES_INPUT!r}: 'DT_STRING'}}): "
                f"use the {BYTES_SIGNATURE} or transformed signature of a cbir export-model export"
            )
        missing = {FEATURES_OUTPUT, FINGERPRINT_OUTPUT} - set(info.outputs)
        if missing:
            raise ModelMismatchError(
                f"{endpoint} does not return {', '.join(sorted(missing))}: it was not exported by cbir export-model, "
                "so its vectors cannot be checked against the index"
            )
        return info

    def _predict(self, blobs: list[bytes]) -> np.ndarray:
        if self._signature is None:
            self._signature = self.check_signature()
        prediction = self.client.predict_images(blobs)
        check_prediction(prediction, self.manifest, self.client.describe())
        return prediction.features if prediction.transformed else self.transform(prediction.features)

    def embed_bytes(self, blobs: list[bytes]) -> tuple[np.ndarray, list[int], list[DecodeFailure]]:
        vectors, ok, failures = [], [], []
        for start in range(0, len(blobs), self.batch_size):
            chunk = list(range(start, min(start + self.batch_size, len(blobs))))
            try:
                vectors.append(self._predict([blobs[i] for i in chunk]))
                ok += chunk
                continue
            except ServingRequestError as exc:
                if len(chunk) == 1:
                    failures.append(DecodeFailure(str(chunk[0]), type(exc).__name__, _first_line(exc)))
                    continue
                log.info("TF Serving rejected a batch of %d (%s); retrying one by one", len(chunk), _first_line(exc))
            for i in chunk:
                try:
                    vectors.append(self._predict([blobs[i]]))
                    ok.append(i)
                except ServingRequestError as exc:
                    failures.append(DecodeFailure(str(i), type(exc).__name__, _first_line(exc)))
        if not vectors:
            return np.zeros((0, self.dim), np.float32), ok, failures
        return np.concatenate(vectors).astype(np.float32), ok, failures


    def close(self) -> None:
        self.client.close()


_BOILERPLATE = re.compile(r"^(Graph execution error:|Detected at node |<stack traces unavailable>|\[\[|\(\d+\) )")


def _first_line(exc: BaseException) -> str:
    """The reason in a TensorFlow error message, without its graph-execution boilerplate."""
    text = re.sub(r"\{\{function_node [^}]*\}\}\s*", "", str(exc))
    for line in text.splitlines():
        line = line.strip()
        if line and not _BOILERPLATE.match(line):
            return line[:300]
    return type(exc).__name__
