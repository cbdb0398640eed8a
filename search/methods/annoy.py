"""Annoy (angular): trees memory-mapped, searched per query with the GIL released."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from annoy import AnnoyIndex

from artefacts import layout
from search.methods.base import Method
from search.options import SearchOptions

RERANK_FACTOR = 4  # Annoy candidates per shard = RERANK_FACTOR * k when they are re-scored


class AnnoyMethod(Method):
    name = "annoy"

    @property
    def default_search_k(self) -> int:
        """The largest search_k calibration chose over the shards; -1 (Annoy's own default) when none."""
        params = self.manifest.annoy
        return int(params.search_k) if params and params.search_k else -1

    def open_shard(self, shard_dir: str, n: int, number: int) -> Any:
        if not n:
            return None
        index = AnnoyIndex(self.dim, layout.METRIC)
        index.load(os.path.join(shard_dir, layout.ANNOY_FILE))  # memory-mapped, shared between processes
        if index.get_n_items() != n:
            raise layout.IndexIntegrityError(f"{shard_dir}: Annoy holds {index.get_n_items()} items, the id map {n}")
        return index, self.calibrated(number, "search_k") or self.default_search_k

    def close_shard(self, handle: Any) -> None:
        if handle is not None:
            handle[0].unload()

    def default_candidates(self, opts: SearchOptions, union: bool) -> int:
        return RERANK_FACTOR * opts.k if (opts.rerank.exact or union) else opts.k

    def search(self, handle: Any, shard: Any, q: np.ndarray, n: int, opts: SearchOptions
               ) -> tuple[np.ndarray, np.ndarray | None]:
        index, calibrated = handle
        if opts.effort.annoy_search_k != -1:
            search_k = opts.effort.annoy_search_k
        elif calibrated > 0:  # calibrated for k candidates: keep at least trees × n for more
            search_k = max(calibrated, self.manifest.annoy.trees * n)
        else:
            search_k = -1
        ids = np.full((len(q), n), -1, np.int64)
        dists = np.full((len(q), n), np.inf, np.float32)
        for row, vec in enumerate(q.tolist()):  # lists convert faster than arrays in Annoy's binding
            r, d = index.get_nns_by_vector(vec, n, search_k=search_k, include_distances=True)
            ids[row, : len(r)] = r
            dists[row, : len(d)] = d
        scores = np.where(ids >= 0, 1.0 - np.square(dists) / 2.0, -np.inf).astype(np.float32)  # angular → cosine
        return ids, scores
