"""The index job's settings, and the checks that make a bad one fail at launch rather than after the build."""

from __future__ import annotations

import dataclasses
from typing import Any

from evaluation import gate
from index_builder import augment, calibration
from index_builder.shard import ShardParams
from index_builder.types import registry
from index_builder.types.base import BuildSettings

INDEX_TYPES = registry.DEFAULT_TYPES


class IndexBuildError(RuntimeError):
    """The build did not produce a complete version; nothing was published."""


@dataclasses.dataclass
class IndexConfig:
    features: str
    output: str
    shards: int = 1
    dims: int = 256  # PCA dimension; 0 keeps the input dimension
    seed: int = 1234
    keep_versions: int = 3  # complete versions kept after a publish (LATEST's always is)
    stale_after_seconds: float = 24 * 3600  # a build unpublished this long is dead: its folders may go
    index_types: tuple[str, ...] = INDEX_TYPES
    # index type name -> its build parameters (index_builder.types); a type not named here builds with its defaults
    type_params: dict[str, Any] = dataclasses.field(default_factory=dict)
    target_recall: float = calibration.DEFAULT_TARGET  # 0: no calibration (library defaults)
    lsh_sample: int = 20_000  # vectors the LSH projection is fitted on
    signing_key_file: str | None = None  # sign the manifest (HMAC-SHA256) with this key
    dba: int = 0  # database-side augmentation with each item's top K (0: off)
    dba_alpha: float = augment.DEFAULT_DBA_ALPHA
    graph_k: int = 0  # store the corpus k-NN graph (diffusion re-ranking) with K neighbours per item (0: off)
    local_features: bool = True  # carry the features' local features (when extracted) into the shards
    gate: str = ""  # quality conditions the version must meet before LATEST moves ('map>=0.5,recall@10>=0.95')
    gate_queries: str | None = None  # JSON lines {"image_id", "expected"} for expected@K
    gate_sample: int = 1000  # leave-one-out queries the gate measures on
    base: str | None = None  # --incremental: the version to update (default: the one LATEST names)
    incremental: dict[str, Any] | None = None  # what --incremental decided, recorded in the manifest

    def validate(self) -> None:
        """Raises ValueError on settings no build could honour, before any file is read or written."""
        if self.shards < 1:
            raise ValueError("--shards must be at least 1")
        if self.dims < 0:
            raise ValueError("--dims must be 0 (keep the dimension) or positive")
        if self.keep_versions < 1:
            raise ValueError("keep_versions must be at least 1: the published version is always kept")
        if self.dba < 0 or self.graph_k < 0:
            raise ValueError("--dba and --graph-k must not be negative")
        if self.dba_alpha < 0:
            raise ValueError("--dba-alpha must not be negative")
        if self.gate:
            gate.parse_conditions(self.gate)
        elif self.gate_queries:
            raise ValueError("--gate-queries needs --gate conditions, e.g. --gate 'expected@10>=0.9'")
        self.shard_params()  # each index type checks its own parameters; ShardParams the types and calibration

    def shard_params(self, local_features: bool = False) -> ShardParams:
        """What every shard worker builds with; ShardParams checks its own fields, so validate() calls this too."""
        return ShardParams(index_types=tuple(self.index_types), type_params=dict(self.type_params),
                           settings=BuildSettings(seed=self.seed, target_recall=self.target_recall),
                           local_features=local_features)

    def params_of(self, name: str) -> Any:
        """An index type's build parameters: the ones given, else its defaults."""
        return self.type_params.get(name) or registry.get(name).Params()
