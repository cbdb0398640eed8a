"""``<out>/MANIFEST.json`` of ``cbir neighbors``: the commit point of a neighbour table.

It names the index version and both fingerprints the table was computed in, so a reader can
tell which vector space the listed similarities belong to.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from artefacts.manifests.base import Accounting, Manifest, PartFile


@dataclasses.dataclass(kw_only=True)
class NeighborsIndexRef:
    path: str
    version: str
    items: int
    shards: int
    model_fingerprint: str
    space_fingerprint: str


@dataclasses.dataclass
class NeighborsCounts:
    rows: int
    rows_with_duplicates: int | None = None


@dataclasses.dataclass(kw_only=True)
class NeighborsManifest(Manifest):
    KIND: ClassVar[str] = "neighbors"
    REBUILD: ClassVar[str] = "run cbir neighbors again"

    run_id: str
    created_utc: str
    index: NeighborsIndexRef
    counts: NeighborsCounts
    files: list[PartFile]
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    columns: list[str] = dataclasses.field(default_factory=list)
    elapsed_seconds: float = 0.0
    items_per_second: float | None = None
    accounting: Accounting | None = None
