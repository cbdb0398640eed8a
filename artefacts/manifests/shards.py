"""``<out>/_SHARDS.json`` of ``cbir shard``: the commit point of a set of packed input shards.

Per shard: name, image count, bytes, sha256 and the first and last image id. A re-run reads
the committed names back to know which shards it wrote before, the only ones it may replace.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from artefacts.manifests.base import Manifest


@dataclasses.dataclass
class PackedShard:
    name: str
    images: int
    bytes: int
    sha256: str
    first_id: str
    last_id: str


@dataclasses.dataclass
class ShardsCounts:
    listed: int
    written: int
    unreadable: int
    skipped_not_image: int


@dataclasses.dataclass(kw_only=True)
class ShardsManifest(Manifest):
    """``<out>/_SHARDS.json`` of ``cbir shard``: the commit point of a set of packed input shards."""

    KIND: ClassVar[str] = "shards"
    REBUILD: ClassVar[str] = "run cbir shard again"

    format: str
    run_id: str
    created_utc: str
    input: str
    input_spec: str
    shard_size_mb: float
    counts: ShardsCounts
    shards: list[PackedShard]
    bytes: int = 0
    elapsed_seconds: float = 0.0
    unreadable: list[dict[str, str]] = dataclasses.field(default_factory=list)
    skipped: list[str] = dataclasses.field(default_factory=list)
