"""HNSW (faiss): each shard's graph memory-mapped, a batch searched across faiss's own threads."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from artefacts import layout
from index_builder.types import hnsw
from search.methods.base import Method
from search.options import SearchOptions


class HnswMethod(Method):
    name = "hnsw"
    parallel = False  # faiss spreads a batch over its OpenMP threads itself

    def open_shard(self, shard_dir: str, n: int, number: int) -> Any:
        index = hnsw.open_mapped(os.path.join(shard_dir, hnsw.HNSW_FILE))
        if index.ntotal != n:
            raise layout.IndexIntegrityError(f"{shard_dir}: the HNSW graph holds {index.ntotal} items, the id map {n}")
        ef = self.calibrated(number, "ef_search") or (self.manifest.hnsw.ef_search if self.manifest.hnsw else 0)
        return index, ef or hnsw.DEFAULT_EF_SEARCH

    def search(self, handle: Any, shard: Any, q: np.ndarray, n: int, opts: SearchOptions
               ) -> tuple[np.ndarray, np.ndarray | None]:
        index, calibrated = handle
        ef = opts.effort.hnsw_ef_search or max(calibrated, n)
        return hnsw.search(index, q, n, ef)
