"""``<out>/MANIFEST.json`` of ``cbir extract`` and ``cbir autoencode``: the commit point of a features output.

Downstream jobs (index, neighbours, incremental re-extraction) read the model description and
its fingerprint from here, so they can refuse vectors from another space before using them.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from artefacts.manifests.base import Accounting, Manifest, PartFile


@dataclasses.dataclass
class ExtractCounts:
    read: int
    ok: int
    failed: int
    inputs: int | None = None  # counted where inputs are first known (absent in old manifests)


@dataclasses.dataclass(kw_only=True)
class FeaturesManifest(Manifest):
    """``<out>/MANIFEST.json`` of an extract (or autoencode) output."""

    KIND: ClassVar[str] = "features"
    REBUILD: ClassVar[str] = "run cbir extract again"

    run_id: str
    created_utc: str
    model: dict[str, Any]  # the model description (ModelSpec.describe()); its digest is the fingerprint
    model_fingerprint: str
    dimension: int
    counts: ExtractCounts
    files: dict[str, list[PartFile]]
    input_size: int | None = None
    preprocessing: str | None = None
    feature_dtype: str = "float32"
    precision: str = "float32"
    failures_by_reason: dict[str, int] = dataclasses.field(default_factory=dict)
    elapsed_seconds: float = 0.0
    images_per_second: float | None = None
    metrics: dict[str, Any] = dataclasses.field(default_factory=dict)
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    accounting: Accounting | None = None
    source_features: str | None = None  # autoencode: the features the codes were made from
    local_features: dict[str, Any] | None = None  # --local-features: detector, max_keypoints, rows, keypoints
    # the runtime(s) the batches ran on (keras, graph, xla, litert; "+"-joined when workers chose differently);
    # None when no batch ran (everything reused from --previous)
    runtime: str | None = None

    @property
    def reduced_decode(self) -> bool:
        """Whether JPEGs were decoded at reduced scale (the query path must decode alike)."""
        return bool(self.model.get("reduced_decode", True))

    @property
    def encoder(self) -> dict[str, Any] | None:
        return self.model.get("encoder")

    def parts(self, kind: str = "features") -> list[PartFile]:
        return list(self.files.get(kind, []))
