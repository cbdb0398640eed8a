"""Corpus-side re-ranking data built once per index: the k-NN graph (for diffusion) and database-side
augmentation (DBA).

Both start from every indexed item's nearest neighbours among the others. Exact (faiss
``IndexFlatIP``, blockwise) up to :data:`EXACT_UP_TO` items, an HNSW graph beyond; both
use every core of the launcher. DBA (αDBA, Radenović et al.) replaces each vector by the
normalised sum of itself and its top K neighbours weighted by ``max(similarity, 0)^alpha``:
queries stay as they are and land among vectors that have absorbed their near neighbours.
"""

from __future__ import annotations

import logging
import time

import numpy as np

log = logging.getLogger(__name__)

EXACT_UP_TO = 200_000
DEFAULT_DBA_ALPHA = 3.0


def method_for(n: int) -> str:
    """How :func:`knn` finds neighbours for ``n`` items (recorded in the manifest)."""
    return "exact (faiss IndexFlatIP)" if n <= EXACT_UP_TO else "HNSW (faiss, M=32, efSearch>=128)"


def knn(vectors: np.ndarray, k: int, batch: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """(ids (n, k) int64, cosines (n, k) float32) of each row's k nearest other rows; -1 pads tiny sets."""
    import faiss

    x = np.ascontiguousarray(vectors, dtype=np.float32)
    n, dim = x.shape
    want = min(k + 1, n)
    started = time.monotonic()
    if n <= EXACT_UP_TO:
        index = faiss.IndexFlatIP(dim)
        index.add(x)
        search = index.search
    else:
        index = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = 100
        index.add(x)
        params = faiss.SearchParametersHNSW()
        params.efSearch = max(128, 2 * want)

        def search(q, m):
            return index.search(q, m, params=params)
    ids = np.full((n, k), -1, np.int64)
    sims = np.full((n, k), -np.inf, np.float32)
    for lo in range(0, n, batch):
        d, i = search(x[lo:lo + batch], want)
        for row in range(len(i)):
            keep = i[row] != lo + row
            got_i, got_d = i[row][keep][:k], d[row][keep][:k]
            ids[lo + row, : len(got_i)] = got_i
            sims[lo + row, : len(got_d)] = got_d
    log.info("k-NN (k=%d) of %d items in %.1fs (%s)", k, n, time.monotonic() - started,
             "exact" if n <= EXACT_UP_TO else "HNSW")
    return ids, sims


def dba(vectors: np.ndarray, ids: np.ndarray, sims: np.ndarray, k: int, alpha: float = DEFAULT_DBA_ALPHA
        ) -> np.ndarray:
    """Each vector replaced by the normalised similarity^alpha-weighted sum of itself and its top ``k``."""
    x = np.asarray(vectors, np.float32)
    ids, sims = ids[:, :k], sims[:, :k]
    weights = np.where(ids >= 0, np.maximum(sims, 0) ** alpha, 0).astype(np.float32)
    out = x.copy()
    for j in range(ids.shape[1]):
        out += weights[:, j:j + 1] * x[np.maximum(ids[:, j], 0)]
    norms = np.sqrt(np.einsum("ij,ij->i", out, out))[:, None]
    return out / np.maximum(norms, np.float32(1e-12))
