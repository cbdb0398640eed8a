"""``<base>/<N>/assets.extra/cbir_export.json``: what ``cbir export-model`` (or an autoencoder export) exported.

The card travels inside the SavedModel's folder, so whoever loads the model finds beside it
the model fingerprint, input size and decode settings it must be fed and compared with.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from artefacts.manifests.base import Manifest


@dataclasses.dataclass(kw_only=True)
class ExportCard(Manifest):
    """``<base>/<N>/assets.extra/cbir_export.json``: what ``cbir export-model`` exported."""

    KIND: ClassVar[str] = "cbir-savedmodel"
    KIND_KEY: ClassVar[str] = "format"
    REBUILD: ClassVar[str] = "export the model again with cbir export-model"

    created_utc: str
    version: int
    model: dict[str, Any]
    model_fingerprint: str
    input_size: int
    dimension: int
    preprocessing: str
    decode: dict[str, Any]
    signatures: dict[str, Any]
    index: dict[str, Any] | None = None
    tensorflow_version: str = ""
