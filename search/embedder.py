"""Image files → query vectors in the index's space: decode, backbone, the index's transform.

The decode is the pipeline's own (models.backbone.imaging), the backbone is checked against the
index's model fingerprint, and the transform is the data the index applied to its own
vectors (``artefacts.transform``), so a query is embedded exactly as the corpus was
and opening an index never loads code that came with it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import numpy as np

from artefacts import layout
from artefacts.manifests import IndexManifest
from artefacts.vector_space import space_fingerprint
from models.backbone.imaging import DEFAULT_MAX_PIXELS, decode_and_resize
from models.backbone.network import Backbone, ModelSpec
from plumbing.fsutil import read_input
from search.compatibility import ModelMismatchError, check_model
from search.index_files import load_transform

log = logging.getLogger(__name__)


def spec_from_manifest(manifest: IndexManifest, weights_dir: str | None = None, savedmodel: str | None = None,
                       **overrides: Any) -> ModelSpec:
    """The ModelSpec that reproduces the index's features (preset name, weights kind).

    For an index built with a SavedModel backbone, ``savedmodel`` (``savedmodel:PATH``) is the
    path the *user* gives: an index never names code for a reader to load, whatever path its
    manifest recorded. The model is then checked against the index's fingerprint.
    """
    model = manifest.model
    if model.get("preset") == "savedmodel":
        if not (savedmodel and savedmodel.startswith("savedmodel:")):
            raise ModelMismatchError(
                f"this index was built with a SavedModel backbone (recorded at {model.get('path')}); an index never "
                "names code to load: pass --model savedmodel:PATH with the export you built it with")
        name = savedmodel
        extra = {"signature": model["signature"], "output_key": model["output_key"],
                 "input_size": model["input_size"]}
    else:
        name, extra = model["preset"], {}
    weights = "random" if model.get("weights") == "random" else None
    kwargs = {"name": name, "weights_dir": weights_dir, "weights": weights, **extra}
    kwargs.update({k: v for k, v in overrides.items() if v is not None})
    return ModelSpec(**kwargs)


@dataclasses.dataclass
class DecodeFailure:
    path: str
    error: str
    message: str


class FileEmbedding:
    """``embed_files`` on top of an ``embed_bytes``; shared by the local and the TF Serving embedders."""

    def embed_bytes(self, blobs: list[bytes]) -> tuple[np.ndarray, list[int], list[DecodeFailure]]:
        raise NotImplementedError

    def embed_files(self, paths: list[str]) -> tuple[np.ndarray, list[str], list[DecodeFailure]]:
        """Reads each file with the readers' limits (regular files only, size checked before reading)."""
        blobs, readable, failures = [], [], []
        for p in paths:
            try:
                blobs.append(read_input(p))
                readable.append(p)
            except Exception as exc:  # a FIFO, a link, a directory, too large, unreadable
                failures.append(DecodeFailure(p, type(exc).__name__, str(exc)))
        vectors, ok, decode_failures = self.embed_bytes(blobs)
        for fail in decode_failures:
            fail.path = readable[int(fail.path)]
        return vectors, [readable[i] for i in ok], failures + decode_failures


class Embedder(FileEmbedding):
    """Loads the backbone once and the index's transform (data, not a SavedModel); embeds batches of images."""

    def __init__(self, version_dir: str, manifest: IndexManifest, spec: ModelSpec,
                 max_pixels: int = DEFAULT_MAX_PIXELS):
        check_model(spec, manifest)
        self.version_dir = version_dir
        # the vector space this embedder produces: a searcher on another version refuses it
        self.space_fingerprint = space_fingerprint(manifest)
        self.spec = spec
        self.backbone = Backbone(spec)
        self.runtime = self.backbone.resolve_runtime()  # here, so a runtime that cannot run fails at open
        self.max_pixels = max_pixels
        # decode as the corpus was decoded (extract --full-decode turns reduced-scale JPEG off)
        self.reduced_decode = manifest.reduced_decode
        self._encode = self._load_encoder(version_dir, manifest.model.get("encoder"))
        self._transform = load_transform(version_dir, manifest)
        self.dim = manifest.dimension.output

    @staticmethod
    def _load_encoder(version_dir: str, encoder: dict[str, Any] | None):
        """An index of autoencoder codes: its encoder, from the data the index carries (digest-checked)."""
        if not encoder:
            return None
        from models.autoencoders.feature_autoencoder import NumpyEncoder

        return NumpyEncoder.load(os.path.join(version_dir, layout.ENCODER_DIR))

    def transform(self, features: np.ndarray) -> np.ndarray:
        """Raw backbone features (n, D_in) → index space (n, D_out), L2-normalised."""
        if self._encode is not None:
            features = self._encode(features)
        return self._transform(np.asarray(features, dtype=np.float32))

    def decode(self, data: bytes) -> np.ndarray:
        return decode_and_resize(data, self.backbone.size, self.max_pixels, self.reduced_decode).pixels

    def embed_bytes(self, blobs: list[bytes]) -> tuple[np.ndarray, list[int], list[DecodeFailure]]:
        """Embeds every decodable blob as one batch; returns (vectors, their indices, failures)."""
        pixels, ok, failures = [], [], []
        for i, data in enumerate(blobs):
            try:
                pixels.append(self.decode(data))
                ok.append(i)
            except Exception as exc:
                failures.append(DecodeFailure(str(i), type(exc).__name__, str(exc)))
        if not pixels:
            return np.zeros((0, self.dim), np.float32), ok, failures
        raw = self.backbone.predict(np.stack(pixels))
        return self.transform(raw), ok, failures


def open_embedder(version_dir: str, manifest: IndexManifest, weights_dir: str | None = None,
                  model: str | None = None, precision: str | None = None, runtime: str = "auto") -> Embedder:
    """An embedder for ``version_dir``: the index's own model unless ``model`` names another one,
    which is then checked against the index's fingerprint (and refused when it differs).

    ``runtime`` (models/backbone/runtimes.py) is not part of the fingerprint: an index extracted on LiteRT
    answers queries embedded on the graph and back, the vectors agreeing within 1e-4."""
    spec = spec_from_manifest(manifest, weights_dir, savedmodel=model, precision=precision)
    if model and model != spec.name:
        spec = dataclasses.replace(spec, name=model)
    spec = dataclasses.replace(spec, runtime=runtime)
    return Embedder(version_dir, manifest, spec)

