"""Random-hyperplane LSH codes and multi-index hashing (MIH) over them.

A B-bit code is the sign pattern of a vector against B seeded Gaussian
hyperplanes; the Hamming distance between two codes estimates the angle between
the vectors. MIH (Norouzi et al.) splits each code into m = B/16 substrings and
keeps one table per substring: any code within Hamming radius r of the query
agrees with it on at least one substring up to radius floor(r/m), so probing
the few 16-bit values near each query substring finds every candidate within r
without scanning the corpus.

Tables are CSR arrays (``offsets`` of length 2**16 + 1 and ``ids`` sorted by
substring value), stored as ``.npy`` so a shard is data, never code.
"""

from __future__ import annotations

import dataclasses
import itertools
from functools import lru_cache

import numpy as np

SUBSTRING_BITS = 16
SUPPORTED_BITS = (64, 128, 256)


def hyperplanes(dim: int, bits: int, seed: int) -> np.ndarray:
    """(dim, bits) float32 Gaussian matrix; stored with the index so queries hash alike."""
    if bits % SUBSTRING_BITS:
        raise ValueError(f"--lsh-bits must be a multiple of {SUBSTRING_BITS}, one of {SUPPORTED_BITS}")
    return np.random.default_rng(seed).standard_normal((dim, bits)).astype(np.float32)


def encode(vectors: np.ndarray, planes: np.ndarray) -> np.ndarray:
    """Packs sign bits: (n, dim) → (n, bits/8) uint8, big-endian bit order within each byte."""
    bits = np.asarray(vectors, dtype=np.float32) @ planes > 0
    return np.packbits(bits, axis=1)


def as_words(codes: np.ndarray) -> np.ndarray:
    """(n, bytes) uint8 → (n, bytes/8) uint64 for popcount."""
    return np.ascontiguousarray(codes).view(np.uint64)


def hamming(query_words: np.ndarray, code_words: np.ndarray) -> np.ndarray:
    """Hamming distance of one query (words,) to each of (n, words) codes by popcount."""
    return np.bitwise_count(code_words ^ query_words[None, :]).sum(axis=1, dtype=np.int32)


def substrings(codes: np.ndarray) -> np.ndarray:
    """(n, bytes) uint8 → (n, m) uint16 substring values (m = bits / 16)."""
    n, nbytes = codes.shape
    pairs = codes.reshape(n, nbytes // 2, 2).astype(np.uint16)
    return (pairs[:, :, 0] << 8) | pairs[:, :, 1]


@dataclasses.dataclass
class MIHTables:
    offsets: np.ndarray  # (m, 65537) int32 (int64 past 2**31 items)
    ids: np.ndarray  # (m, n) int32, ids sorted by substring value per table

    @classmethod
    def build(cls, codes: np.ndarray) -> MIHTables:
        subs = substrings(codes)
        n, m = subs.shape
        offsets = np.zeros((m, (1 << SUBSTRING_BITS) + 1), dtype=np.int32 if n < 2**31 else np.int64)
        ids = np.zeros((m, n), dtype=np.int32)
        for j in range(m):
            order = np.argsort(subs[:, j], kind="stable")
            ids[j] = order
            counts = np.bincount(subs[:, j], minlength=1 << SUBSTRING_BITS)
            offsets[j, 1:] = np.cumsum(counts)
        return cls(offsets, ids)

    def probe(self, query_code: np.ndarray, substring_radius: int) -> np.ndarray:
        """Ids whose code agrees with the query on some substring within the radius."""
        qsubs = substrings(query_code.reshape(1, -1))[0]
        masks = _flip_masks(substring_radius)
        found = []
        for j, value in enumerate(qsubs):
            keys = np.bitwise_xor(masks, value)
            starts, ends = self.offsets[j, keys], self.offsets[j, keys + 1]
            for s, e in zip(starts[ends > starts], ends[ends > starts], strict=True):
                found.append(self.ids[j, s:e])
        if not found:
            return np.zeros(0, dtype=np.int32)
        return np.unique(np.concatenate(found))


@lru_cache(maxsize=8)
def _flip_masks(radius: int) -> np.ndarray:
    """All 16-bit masks with at most ``radius`` bits set."""
    masks = [0]
    for r in range(1, radius + 1):
        for positions in itertools.combinations(range(SUBSTRING_BITS), r):
            masks.append(sum(1 << p for p in positions))
    return np.asarray(masks, dtype=np.int64)


def search(
    query_code: np.ndarray,
    codes: np.ndarray,
    tables: MIHTables,
    k: int,
    min_candidates: int,
    max_substring_radius: int = 2,
) -> tuple[np.ndarray, np.ndarray]:
    """Candidates by growing MIH radius, ranked by Hamming distance.

    Widens the per-substring radius until at least ``min_candidates`` ids are found
    (or the limit is hit), then returns the ``min_candidates`` nearest in Hamming
    distance (ids, distances). Callers re-rank them exactly to get the top k.
    """
    want = max(k, min_candidates)
    cand = np.zeros(0, dtype=np.int32)
    for radius in range(max_substring_radius + 1):
        cand = tables.probe(query_code, radius)
        if len(cand) >= want:
            break
    if len(cand) == 0:
        return cand, np.zeros(0, dtype=np.int32)
    dist = hamming(as_words(query_code.reshape(1, -1))[0], as_words(codes[cand]))
    take = min(want, len(cand))
    part = np.argpartition(dist, take - 1)[:take]
    order = part[np.lexsort((cand[part], dist[part]))]
    return cand[order], dist[order]
