"""Exact search: a blockwise matrix product over the shard's stored vectors (the ground truth).

Nothing to build beyond the vectors every shard stores (``vectors.f16.npy``), nothing to
calibrate: it is what the other types are calibrated against.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from index_builder import topk
from index_builder.types.base import IndexType


class ExactType(IndexType):
    name = "exact"
    selectable = False  # every index has it
    # BLAS is multi-threaded already: running shards side by side would only oversubscribe the cores
    # (measured: 4 shards in parallel were slower than one after another).
    parallel = False

    def open_shard(self, shard_dir: str, n: int, number: int, dense: Any) -> Any:
        return dense

    def search(self, handle: Any, q: np.ndarray, n: int, effort: int) -> tuple[np.ndarray, np.ndarray | None]:
        vectors = handle()
        ids = topk.exact_top(vectors, q, min(n, len(vectors)))
        return ids, topk.score(vectors, q, ids)
