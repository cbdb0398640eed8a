"""The query embedder of ``cbir query --serving``: images to TF Serving, vectors checked against the index.

Before the first image is sent the served signature is read and refused when it does not take
encoded images or return a fingerprint; afterwards every answer's fingerprints are checked, so a
model switch inside TF Serving between two requests is caught, never searched in the wrong space.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import numpy as np

from artefacts.manifests import IndexManifest
from artefacts.vector_space import space_fingerprint
from models.backbone.export import BYTES_SIGNATURE, FEATURES_OUTPUT, FINGERPRINT_OUTPUT, IMAGES_INPUT, read_export_info
from search import compatibility
from search.compatibility import ModelMismatchError
from search.embedder import DecodeFailure, FileEmbedding
from search.index_files import load_transform
from search.tf_serving.client import (
    DEFAULT_MODEL_NAME,
    DEFAULT_TIMEOUT_S,
    PROTOCOLS,
    Prediction,
    ServingClient,
    ServingError,
    ServingRequestError,
    SignatureInfo,
)
from search.tf_serving.grpc_client import GrpcClient
from search.tf_serving.rest_client import RestClient

log = logging.getLogger(__name__)


def make_client(address: str, protocol: str = "grpc", model_name: str = DEFAULT_MODEL_NAME,
                signature: str = BYTES_SIGNATURE, version: int | None = None,
                timeout: float = DEFAULT_TIMEOUT_S) -> ServingClient:
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, not {protocol!r}")
    cls = GrpcClient if protocol == "grpc" else RestClient
    return cls(address, model_name, signature, version, timeout)



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
