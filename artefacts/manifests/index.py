"""``<index>/<version>/MANIFEST.json`` of ``cbir index``: the commit point of an index version (format 2).

Writing it is what makes a version exist: every file it lists (with its digest) is in place
before it is written, and the searcher trusts nothing the manifest does not list. The
per-type parameters carry the search efforts calibrated at build time, which is why an
index of format 1 is refused rather than searched with guessed efforts.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from artefacts.manifests.base import Accounting, FileDigest, Manifest


@dataclasses.dataclass
class Dimension:
    input: int
    output: int


@dataclasses.dataclass
class TransformInfo:
    steps: list[str]
    dims: int
    # the transform as data (projection and bias .npy, what queries apply): never a SavedModel
    projection_file: str | None = None
    bias_file: str | None = None


@dataclasses.dataclass
class AnnoyParams:
    trees: int
    metric: str = "angular"
    seed: int = 1234
    search_k: int = -1  # -1: Annoy's own default (trees × candidates)
    on_disk_build_shards: list[int] = dataclasses.field(default_factory=list)
    calibration: dict[str, Any] | None = None


@dataclasses.dataclass
class LshParams:
    bits: int
    seed: int = 1234
    substring_bits: int = 16
    method: str = "gaussian"  # how the projection was made
    candidates: int | None = None  # per shard and query; None: the searcher's rule
    calibration: dict[str, Any] | None = None


@dataclasses.dataclass
class HnswParams:
    m: int
    ef_construction: int
    ef_search: int
    calibration: dict[str, Any] | None = None


@dataclasses.dataclass(kw_only=True)
class IndexManifest(Manifest):
    """``<index>/<version>/MANIFEST.json``: the commit point of an index version."""

    KIND: ClassVar[str] = "index"
    FORMAT_VERSION: ClassVar[int] = 2
    READS: ClassVar[tuple[int, ...]] = (2,)
    REBUILD: ClassVar[str] = ("rebuild the index with cbir index (format 2 stores the transform as data, learned "
                              "LSH codes, HNSW graphs and calibrated search efforts)")

    version: str
    created_utc: str
    metric: str
    dimension: Dimension
    transform: TransformInfo
    shards: int
    items: int
    model: dict[str, Any]
    model_fingerprint: str
    files: dict[str, FileDigest]
    annoy: AnnoyParams | None = None
    lsh: LshParams | None = None
    hnsw: HnswParams | None = None
    index_types: list[str] = dataclasses.field(default_factory=lambda: ["annoy", "lsh"])
    items_per_shard: list[int] = dataclasses.field(default_factory=list)
    duplicates_dropped: int = 0
    sharding: dict[str, str] = dataclasses.field(default_factory=dict)
    ids: str = "dense per shard, 0..n-1 in image_id order"
    features_run_id: str | None = None
    vectors_dtype: str = "float16"
    metrics: dict[str, Any] = dataclasses.field(default_factory=dict)
    elapsed_seconds: float = 0.0
    bytes: int = 0
    accounting: Accounting | None = None
    dba: dict[str, Any] | None = None  # --dba: stored vectors augmented by their neighbours (k, alpha, how)
    graph: dict[str, Any] | None = None  # --graph-k: the corpus k-NN graph for diffusion (k, files, how)
    local_features: dict[str, Any] | None = None  # shards carry local features (detector, max_keypoints, …)

    @property
    def reduced_decode(self) -> bool:
        return bool(self.model.get("reduced_decode", True))

    @property
    def preset(self) -> str | None:
        return self.model.get("preset")
