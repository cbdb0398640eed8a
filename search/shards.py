"""One shard of an opened version: its id map, its memory-mapped vectors, each method's opened structure.

Exact search and exact re-scoring read a shard's vectors as float32. :class:`DenseVectors`
keeps converted copies within a memory budget (converted on first use; 1 GB holds a shard
of 1M × 256); a shard beyond the budget is read from its float16 map, converted block by
block per query.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from artefacts import layout
from index_builder import topk
from index_builder.types.base import IndexType


@dataclasses.dataclass
class Shard:
    number: int
    vectors: np.ndarray  # (n, dim) float16, memory-mapped
    image_ids: list[str]
    uris: list[str]
    labels: list[str | None]
    sha256: list[str]
    handles: dict[str, Any]  # method name → its opened structure for this shard
    dense: Any = None  # () -> float32 (or the float16 map) view for exact search, set by open_shard

    @property
    def size(self) -> int:
        return len(self.image_ids)


class DenseVectors:
    """Shards' vectors as float32 while the budget of ``cache_mb`` allows, else their float16 maps."""

    def __init__(self, cache_mb: int):
        self._left = max(0, cache_mb) << 20
        self._dense: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()

    def of(self, shard: Shard) -> np.ndarray:
        dense = self._dense.get(shard.number)
        if dense is not None:
            return dense
        with self._lock:
            if shard.number not in self._dense and shard.vectors.size * 4 <= self._left:
                self._dense[shard.number] = topk.as_float32(shard.vectors)
                self._left -= shard.vectors.size * 4
        return self._dense.get(shard.number, shard.vectors)


def open_shard(version_dir: str, number: int, dim: int, methods: dict[str, IndexType], dense: DenseVectors
               ) -> Shard:
    """Shard ``number`` with its id map checked against its vectors and each method's structure opened."""
    d = os.path.join(version_dir, layout.shard_dir(number))
    idmap = pq.read_table(os.path.join(d, layout.IDMAP_FILE))
    n = idmap.num_rows
    vectors = np.load(os.path.join(d, layout.VECTORS_FILE), mmap_mode="r")
    if vectors.ndim != 2 or vectors.shape[0] != n or (n and vectors.shape[1] != dim):
        raise layout.IndexIntegrityError(
            f"{d}: the id map holds {n} items but the vectors are {vectors.shape} (index dimension {dim})"
        )
    if idmap.column("id").to_pylist() != list(range(n)):
        raise layout.IndexIntegrityError(f"{d}: the id map is not dense 0..{n - 1}")
    shard = Shard(
        number=number,
        vectors=vectors,
        image_ids=idmap.column("image_id").to_pylist(),
        uris=idmap.column("uri").to_pylist(),
        labels=idmap.column("label").to_pylist(),
        sha256=idmap.column("sha256").to_pylist(),
        handles={},
    )
    shard.dense = lambda s=shard: dense.of(s)
    shard.handles = {name: m.open_shard(d, n, number, shard.dense) for name, m in methods.items()}
    return shard
