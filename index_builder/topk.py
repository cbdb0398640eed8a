"""Top-k arithmetic shared by every search method: exact scoring, blockwise top-n, merging.

All of it is numpy over padded arrays (-1 ids, -inf scores), so a batch of queries
never builds a Python object per candidate.
"""

from __future__ import annotations

import numpy as np

EXACT_BLOCK = 32768  # stored vectors converted to float32 at a time by exact search
SCORE_ELEMENTS = 1 << 22  # float32 elements gathered at a time when re-scoring candidates

# Every float16 bit pattern's float32 value. numpy converts float16 one element at a time
# (0.86 ms for the 1,000 candidates × 256 dims of an LSH query here); a lookup in this
# 256 KB table gives the same values bit for bit in 0.37 ms (benchmarks/RESULTS.md, bench_index).
_F16_TO_F32 = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float32)


def as_float32(a: np.ndarray) -> np.ndarray:
    """``a`` as float32: float16 (the stored vectors) through the lookup table, anything else by numpy."""
    if a.dtype == np.float16:
        return _F16_TO_F32.take(np.asarray(a).view(np.uint16))
    return np.asarray(a, dtype=np.float32)


def normalise_rows(v: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero)."""
    v = np.asarray(v, dtype=np.float32)
    norms = np.sqrt(np.einsum("...i,...i->...", v, v))[..., None]
    return v / np.maximum(norms, np.float32(1e-30))  # a zero row divides to zero


def pad(a: np.ndarray, width: int, value: float) -> np.ndarray:
    if a.shape[1] >= width:
        return a
    return np.concatenate([a, np.full((a.shape[0], width - a.shape[1]), value, a.dtype)], axis=1)


def union_rows(*arrays: np.ndarray) -> np.ndarray:
    """Per-row union of padded id arrays, padded with -1."""
    rows = [np.unique(np.concatenate([x[x >= 0] for x in parts])) for parts in zip(*arrays, strict=True)]
    out = np.full((len(rows), max([len(r) for r in rows] + [1])), -1, np.int64)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


def exact_top(vectors: np.ndarray, q: np.ndarray, n: int) -> np.ndarray:
    """Local ids of the n highest inner products per query, blockwise over the stored vectors.

    Each block is cut to its own top n before it meets the running best, so no array
    wider than the block's similarities (and no id array that wide) is ever built.
    """
    best_ids = np.zeros((len(q), 0), np.int64)
    best = np.zeros((len(q), 0), np.float32)
    for start in range(0, vectors.shape[0], EXACT_BLOCK):
        block = as_float32(vectors[start:start + EXACT_BLOCK])
        sims = q @ block.T
        if sims.shape[1] > n:
            part = np.argpartition(-sims, n - 1, axis=1)[:, :n]
            sims = np.take_along_axis(sims, part, axis=1)
        else:
            part = np.broadcast_to(np.arange(sims.shape[1]), sims.shape)
        sims = np.concatenate([best, sims], axis=1)
        ids = np.concatenate([best_ids, part + start], axis=1)
        if sims.shape[1] > n:
            keep = np.argpartition(-sims, n - 1, axis=1)[:, :n]
            sims, ids = np.take_along_axis(sims, keep, axis=1), np.take_along_axis(ids, keep, axis=1)
        best, best_ids = sims, ids
    return best_ids


def score(vectors: np.ndarray, q: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Exact cosine of each query with its candidate ids (-1 → -inf) from the stored vectors.

    Computed element by element (einsum, not BLAS) so a score does not depend on the
    shape of the batch it was computed in: the same pair scores the same in a
    one-shard and a many-shard index.
    """
    out = np.full(ids.shape, -np.inf, np.float32)
    if ids.size == 0:
        return out
    rows = max(1, SCORE_ELEMENTS // max(1, ids.shape[1] * q.shape[1]))
    for lo in range(0, len(ids), rows):
        sub = ids[lo:lo + rows]
        cand = as_float32(vectors[np.maximum(sub, 0)])  # (b, m, d)
        s = np.einsum("bmd,bd->bm", cand, q[lo:lo + rows])
        out[lo:lo + rows] = np.where(sub >= 0, s, -np.inf)
    return out


def merge(ids: np.ndarray, scores: np.ndarray, k: int, exclude: np.ndarray,
          id_rank: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Global top-k of candidates (global ids): best score first, ties by image-id rank; ``exclude`` dropped."""
    if len(ids) == 1 and ids.shape[1] >= k and _already_ordered(ids[0], scores[0], k, int(exclude[0])):
        return ids[:, :k], scores[:, :k].astype(np.float32, copy=False)  # one query, one sorted list: the serving path
    drop = (ids < 0) | (ids == exclude[:, None])
    scores = np.where(drop, -np.inf, scores).astype(np.float32)
    ids = np.where(drop, -1, ids)
    rank = np.where(ids >= 0, id_rank[np.maximum(ids, 0)], len(id_rank))
    if len(ids) == 1:  # one query (the serving path): plain 1-d indexing is several times cheaper
        order = np.lexsort((rank[0], -scores[0]))[:k]
        top_ids, top_scores = ids[:, order], scores[:, order]
    else:
        order = np.lexsort((rank, -scores), axis=1)[:, :k]
        top_ids = np.take_along_axis(ids, order, axis=1)
        top_scores = np.take_along_axis(scores, order, axis=1)
    if top_ids.shape[1] < k:
        top_ids, top_scores = pad(top_ids, k, -1), pad(top_scores, k, -np.inf)
    return top_ids, top_scores


def _already_ordered(ids: np.ndarray, scores: np.ndarray, k: int, exclude: int) -> bool:
    """Whether a single list's first k are already its top k with no tie to break and nothing to drop."""
    head = scores[: k + 1] if len(scores) > k else scores
    if (ids[:k] < 0).any() or (exclude >= 0 and (ids == exclude).any()):
        return False
    if not (np.diff(head) < 0).all():
        return False  # a tie (broken by image id) or an unsorted list: the general path
    return len(scores) <= k + 1 or bool(scores[k - 1] > scores[k + 1:].max())
