"""Exact search: a blockwise matrix product over the shard's stored vectors (the ground truth)."""

from __future__ import annotations

from typing import Any

import numpy as np

from index_builder import topk
from search.methods.base import Method
from search.options import SearchOptions


class ExactMethod(Method):
    name = "exact"
    # BLAS is multi-threaded already: running shards side by side would only oversubscribe the cores
    # (measured: 4 shards in parallel were slower than one after another).
    parallel = False

    def search(self, handle: Any, shard: Any, q: np.ndarray, n: int, opts: SearchOptions
               ) -> tuple[np.ndarray, np.ndarray | None]:
        ids = topk.exact_top(shard.dense(), q, min(n, shard.size))
        return ids, topk.score(shard.dense(), q, ids)
