"""What both TF Serving transports share: the client interface, the errors, and reading an answer.

A served bytes signature answers with named outputs; ``Prediction`` is that answer with the
fingerprints that let the embedder check the model behind every vector.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import numpy as np

from models.backbone.export import (
    BYTES_SIGNATURE,
    FEATURES_OUTPUT,
    FINGERPRINT_OUTPUT,
    INDEX_VERSION_OUTPUT,
    TRANSFORM_FINGERPRINT_OUTPUT,
)

PROTOCOLS = ("grpc", "rest")
DEFAULT_MODEL_NAME = "cbir"
DEFAULT_TIMEOUT_S = 30.0


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


def read_outputs(outputs: dict[str, Any], n: int) -> Prediction:
    """A signature's named outputs for a batch of ``n`` as a ``Prediction``; a missing or misshapen output
    is an error."""
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


def read_signature(signature_defs: dict[str, Any], name: str, endpoint: str) -> SignatureInfo:
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


# TF Serving answers INVALID_ARGUMENT for these too, but they are about the request's shape, not its images.
_SIGNATURE_ERRORS = re.compile(
    r'signature key "[^"]*" not found|not found in signature|does not match signature', re.IGNORECASE
)


def rejected(message: str, endpoint: str) -> ServingError:
    """INVALID_ARGUMENT is about the images, unless it is about the signature (wrong --serving-signature,
    or one that does not take encoded images): then no image would ever pass, and retrying them one by
    one would only report every image as failed."""
    if _SIGNATURE_ERRORS.search(message):
        return ServingError(f"{endpoint}: {message}")
    return ServingRequestError(message)
