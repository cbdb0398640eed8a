"""``<index>/<version>/shards/shard-NNNNN/SHARD.json``: what one shard build wrote, as a typed record.

The shard builder writes it last, so its presence marks a whole build attempt, and the
index job reads every attempt's record back to choose a complete one (each listed file at
its recorded size), to check its counts (items + duplicates dropped + non-finite rows
skipped = the feature rows the shard received) and to gather the calibrated search efforts
into the index manifest. It is not a manifest (no ``kind``, no format version), but it
follows the same rules: fields a build from before them lacks take their one default here,
keys this code does not know survive a read and a write in ``extra``, and :meth:`to_dict`
gives exactly the JSON the builder writes today.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from artefacts.manifests.base import FileDigest, ManifestError, record_from_dict, record_to_json

# What a build recorded before it chose index types: it always built Annoy and LSH (the index
# manifest's default for ``index_types`` says the same).
LEGACY_INDEX_TYPES = ("annoy", "lsh")


@dataclasses.dataclass
class ShardAnnoy:
    """The Annoy build: whether it went straight to disk, decided by the size estimate beside it."""

    trees: int
    on_disk_build: bool
    estimated_bytes: int
    extra: dict[str, Any] = dataclasses.field(default_factory=dict, repr=False, compare=False)


@dataclasses.dataclass
class ShardHnsw:
    """The HNSW graph's construction parameters (its search effort is in the calibration)."""

    m: int
    ef_construction: int
    extra: dict[str, Any] = dataclasses.field(default_factory=dict, repr=False, compare=False)


@dataclasses.dataclass(kw_only=True)
class ShardRecord:
    """``SHARD.json``; fields in the order the builder lists them (the file itself is written with sorted keys)."""

    shard: int
    items: int
    dimension: int
    duplicates_dropped: int = 0
    non_finite_skipped: int = 0
    index_types: list[str] = dataclasses.field(default_factory=lambda: list(LEGACY_INDEX_TYPES))
    annoy: ShardAnnoy | None = None  # None when Annoy is not among the index types
    hnsw: ShardHnsw | None = None  # None when HNSW is not among the index types
    lsh_bits: int | None = None  # the width of the LSH projection (written even when LSH codes are not)
    # k, target_recall, queries, and per index type the chosen effort and what it measured
    # (index_builder.calibration.Calibrated.to_dict); None when calibration did not run
    calibration: dict[str, Any] | None = None
    # counts from index_builder.local_store.write_shard plus its vote_index; None without local features
    local_features: dict[str, Any] | None = None
    files: dict[str, FileDigest]  # every file of the shard but SHARD.json itself
    seconds: dict[str, float] = dataclasses.field(default_factory=dict)  # per build step, and "total"
    extra: dict[str, Any] = dataclasses.field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_dict(cls, data: Any, source: str = "SHARD.json") -> ShardRecord:
        """Reads a ``SHARD.json`` object; refuses one that lacks a required field or has a wrong type."""
        if not isinstance(data, dict):
            raise ManifestError(f"{source} is not a JSON object")
        return record_from_dict(cls, data, source)

    def to_dict(self) -> dict[str, Any]:
        return record_to_json(self)

    def to_json_text(self) -> str:
        """The file's text exactly as the shard builder writes it (two-space indent, sorted keys)."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @property
    def accounted(self) -> int:
        """Input rows this shard accounts for: stored items, dropped duplicates and skipped non-finite rows."""
        return self.items + self.duplicates_dropped + self.non_finite_skipped

    @property
    def on_disk_build(self) -> bool:
        return self.annoy is not None and self.annoy.on_disk_build

    def calibrated(self, kind: str) -> dict[str, Any] | None:
        """What calibration chose and measured for one index type, or None when it did not run for it."""
        return (self.calibration or {}).get(kind)
