"""Binary codes for the index's vectors, a full Hamming scan over them, and multi-index hashing (MIH).

A B-bit code is the sign pattern of a vector against B hyperplanes (``planes``, with
``offsets`` as thresholds). The hyperplanes are learned when the index is fitted
(:func:`fit_projection`): PCA-ITQ (Gong & Lazebnik, 2011), which rotates the top
principal directions so that quantising them loses as little as possible, when B ≤ D;
ITQ on all D directions plus random orthogonal rotations of them for the bits beyond
D. Random Gaussian hyperplanes (P[bit differs] = angle / π) were three times worse in
candidates needed for the same recall on these features; they remain as ``gaussian``.

Candidates for a query are its Hamming top-N by a full popcount scan over the codes
(:func:`hamming_top`), re-ranked exactly from the stored vectors by the searcher. MIH (Norouzi, Punjani and Fleet, 2012)
splits each code into m = B/16 substrings and keeps one table per substring. By
the pigeonhole principle, a code within Hamming radius r of the query agrees
with it on at least one substring up to radius floor(r/m), so probing the few
16-bit values near each query substring finds every code within r without
scanning the corpus; :func:`radius_search` then filters the candidates by their
full Hamming distance.

Codes are packed with ``np.packbits`` (big-endian bit order within a byte), so
bit i of a code is hyperplane i and substring j is bytes 2j and 2j+1. Tables are
CSR arrays (``offsets`` of length 2**16 + 1 per table and ``ids`` sorted by
substring value), stored as ``.npy`` so a shard is data, never code.
"""

from __future__ import annotations

import dataclasses
import itertools
from functools import lru_cache

import numpy as np

SUBSTRING_BITS = 16
SUPPORTED_BITS = (64, 128, 256)
PROJECTIONS = ("itq", "orthogonal", "gaussian")
_BUCKETS = 1 << SUBSTRING_BITS
_ITQ_ITERATIONS = 50


def hyperplanes(dim: int, bits: int, seed: int) -> np.ndarray:
    """(dim, bits) float32 Gaussian matrix; stored with the index so that queries hash alike.

    Gaussian (not uniform) entries make the hyperplane normals isotropic, which is
    what makes P[bit differs] depend on the angle alone.
    """
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"--lsh-bits must be one of {SUPPORTED_BITS}, not {bits}")
    if dim < 1:
        raise ValueError(f"dimension must be positive, not {dim}")
    return np.random.default_rng(seed).standard_normal((dim, bits)).astype(np.float32)


def _random_rotation(dim: int, rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((dim, dim)))
    return q * np.sign(np.diag(r))  # a uniformly random orthogonal matrix


def _itq(y: np.ndarray, rng: np.random.Generator, iterations: int = _ITQ_ITERATIONS) -> np.ndarray:
    """ITQ: the rotation R minimising ||sign(Y R) − Y R||² by alternating quantisation and Procrustes."""
    rotation = _random_rotation(y.shape[1], rng)
    for _ in range(iterations):
        codes = np.where(y @ rotation >= 0, 1.0, -1.0)
        u, _, vt = np.linalg.svd(codes.T @ y)
        rotation = (u @ vt).T
    return rotation


def _principal_basis(xc: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(dim, dim) orthonormal basis, principal directions of ``xc`` first (completed when n < dim)."""
    dim = xc.shape[1]
    _, _, vt = np.linalg.svd(xc, full_matrices=False)
    basis = vt.T
    if basis.shape[1] < dim:
        q, _ = np.linalg.qr(np.concatenate([basis, rng.standard_normal((dim, dim - basis.shape[1]))], axis=1))
        basis = q
    return basis


def fit_projection(sample: np.ndarray, bits: int, seed: int, method: str = "itq") -> tuple[np.ndarray, np.ndarray]:
    """(planes (dim, bits) float32, offsets (bits,) float32) learned from a sample of index vectors.

    ``itq``: centre, take the principal directions, rotate them by ITQ (the first ``dim``
    bits) and by random orthogonal rotations (bits beyond ``dim``). ``orthogonal``: random
    orthogonal rotations of the centred data. ``gaussian``: seeded Gaussian hyperplanes
    through the origin (the first release's codes).
    """
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"--lsh-bits must be one of {SUPPORTED_BITS}, not {bits}")
    if method not in PROJECTIONS:
        raise ValueError(f"LSH projection must be one of {PROJECTIONS}, not {method!r}")
    x = np.asarray(sample, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"an LSH fit needs a (n ≥ 2, dim) sample, not {x.shape}")
    dim = x.shape[1]
    rng = np.random.default_rng(seed)
    if method == "gaussian":
        return hyperplanes(dim, bits, seed), np.zeros(bits, np.float32)
    mean = x.mean(axis=0)
    xc = x - mean
    blocks, left = [], bits
    if method == "itq":
        basis = _principal_basis(xc, rng)
        take = min(bits, dim)
        blocks.append(basis[:, :take] @ _itq(xc @ basis[:, :take], rng))
        left -= take
    else:
        basis = np.eye(dim)
    while left > 0:  # random orthogonal rotations (of the principal basis, for ITQ's bits beyond dim)
        take = min(left, dim)
        blocks.append(basis @ _random_rotation(dim, rng)[:, :take])
        left -= take
    planes = np.concatenate(blocks, axis=1)[:, :bits]
    return planes.astype(np.float32), (mean @ planes).astype(np.float32)


def encode(vectors: np.ndarray, planes: np.ndarray, offsets: np.ndarray | None = None) -> np.ndarray:
    """Packs sign bits of ``vectors @ planes − offsets``: (n, dim) → (n, bits/8) uint8, big-endian within a byte."""
    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.ndim != 2 or vectors.shape[1] != planes.shape[0]:
        raise ValueError(f"vectors of shape {vectors.shape} do not match hyperplanes {planes.shape}")
    projected = vectors @ planes
    if offsets is not None:
        projected -= offsets
    return np.packbits(projected > 0, axis=1)


def hamming_top(query_words: np.ndarray, code_words: np.ndarray, n: int) -> np.ndarray:
    """Ids of the ``n`` codes nearest to one query in Hamming distance, nearest first (ties by id).

    A full scan: XOR and popcount over every code (``code_words`` is (n_codes, words)
    uint64, row-major), then a counting selection over the few possible distances instead
    of a sort, so the cost is two linear passes.
    """
    total = code_words.shape[0]
    if total == 0 or n <= 0:
        return np.zeros(0, np.int64)
    dist = np.bitwise_count(code_words ^ query_words[None, :]).sum(axis=1, dtype=np.int32)
    if n >= total:
        return np.lexsort((np.arange(total), dist)).astype(np.int64)
    counts = np.cumsum(np.bincount(dist, minlength=code_words.shape[1] * 64 + 1))
    cut = int(np.searchsorted(counts, n))  # the distance at which the n-th code lies
    inside = np.flatnonzero(dist < cut)
    at_cut = np.flatnonzero(dist == cut)[: n - len(inside)]
    chosen = np.concatenate([inside, at_cut])
    return chosen[np.lexsort((chosen, dist[chosen]))].astype(np.int64)


class HammingScan:
    """Hamming top-N over one shard's codes by faiss's binary flat scan: the search path and calibration.

    The numpy scan (:func:`hamming_top`) costs ~48 ms per query at 1M 256-bit codes on one
    core; faiss's ``IndexBinaryFlat`` ~4 ms (measured, flat in N with the counting
    selection), which is what puts LSH at hundreds of queries per second at a million
    items. It holds a copy of the codes (bits/8 bytes per item: 16 MB per million at 128
    bits). Codes at equal distance at the cut may be chosen differently from
    :func:`hamming_top` (whose ties go by id); candidates are re-scored exactly either way.
    """

    def __init__(self, codes: np.ndarray):
        import faiss

        codes = np.ascontiguousarray(codes, dtype=np.uint8)
        self.size = int(codes.shape[0])
        self._index = faiss.IndexBinaryFlat(int(codes.shape[1]) * 8)
        self._index.use_heap = False  # counting selection: its cost does not grow with N
        if self.size:
            self._index.add(codes)

    def top(self, query_codes: np.ndarray, n: int) -> np.ndarray:
        """(queries, min(n, size)) ids, nearest first; queries of one batch run on faiss's threads."""
        query_codes = np.ascontiguousarray(np.atleast_2d(query_codes), dtype=np.uint8)
        n = min(int(n), self.size)
        if n <= 0:
            return np.zeros((len(query_codes), 0), np.int64)
        _, ids = self._index.search(query_codes, n)
        return ids.astype(np.int64, copy=False)


def as_words(codes: np.ndarray) -> np.ndarray:
    """(n, bytes) uint8 → (n, bytes/8) uint64, so popcount runs on 64 bits at a time."""
    codes = np.ascontiguousarray(codes, dtype=np.uint8)
    if codes.shape[-1] % 8:
        raise ValueError(f"codes of {codes.shape[-1]} bytes are not a whole number of 64-bit words")
    return codes.view(np.uint64)


def hamming(query_words: np.ndarray, code_words: np.ndarray) -> np.ndarray:
    """Hamming distance of one query (words,) to each of (n, words) codes by popcount."""
    return np.bitwise_count(code_words ^ query_words[None, :]).sum(axis=1, dtype=np.int32)


def hamming_codes(query_code: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """Hamming distance of one packed code (bytes,) to each of (n, bytes) packed codes."""
    return hamming(as_words(query_code.reshape(1, -1))[0], as_words(codes))


def substrings(codes: np.ndarray) -> np.ndarray:
    """(n, bytes) uint8 → (n, m) uint16 substring values (m = bits / 16)."""
    codes = np.asarray(codes, dtype=np.uint8)
    n, nbytes = codes.shape
    pairs = codes.reshape(n, nbytes // 2, 2).astype(np.uint16)
    return (pairs[:, :, 0] << 8) | pairs[:, :, 1]


def guaranteed_radius(bits: int, substring_radius: int) -> int:
    """The largest full Hamming radius a probe at ``substring_radius`` is sure to cover."""
    return (bits // SUBSTRING_BITS) * (substring_radius + 1) - 1


@dataclasses.dataclass
class MIHTables:
    offsets: np.ndarray  # (m, 65537) int32 (int64 past 2**31 items)
    ids: np.ndarray  # (m, n) int32, ids sorted by substring value per table

    @classmethod
    def build(cls, codes: np.ndarray) -> MIHTables:
        subs = substrings(codes)
        n, m = subs.shape
        offsets = np.zeros((m, _BUCKETS + 1), dtype=np.int32 if n < 2**31 else np.int64)
        ids = np.zeros((m, n), dtype=np.int32)
        for j in range(m):
            # stable sort: ids inside a bucket stay ascending, so the tables are deterministic
            ids[j] = np.argsort(subs[:, j], kind="stable")
            offsets[j, 1:] = np.cumsum(np.bincount(subs[:, j], minlength=_BUCKETS))
        return cls(offsets, ids)

    @property
    def size(self) -> int:
        return int(self.ids.shape[1])

    def probe(self, query_code: np.ndarray, substring_radius: int) -> np.ndarray:
        """Sorted unique ids whose code agrees with the query on some substring within the radius.

        Vectorised over every (table, bucket) pair: at a million items nearly every
        probed bucket is non-empty, and a Python loop over them cost more than the
        Hamming ranking that follows.
        """
        qsubs = substrings(query_code.reshape(1, -1))[0].astype(np.int64)
        m = len(qsubs)
        keys = np.bitwise_xor(_flip_masks(substring_radius)[None, :], qsubs[:, None])  # (m, masks)
        rows = np.arange(m)[:, None]
        starts = self.offsets[rows, keys].astype(np.int64).reshape(-1)
        lengths = self.offsets[rows, keys + 1].astype(np.int64).reshape(-1) - starts
        starts += np.repeat(np.arange(m, dtype=np.int64) * self.size, keys.shape[1])  # into the flat ids
        total = int(lengths.sum())
        if total == 0:
            return np.zeros(0, dtype=np.int32)
        # positions start_i .. start_i + len_i - 1 of every bucket, concatenated without a loop
        run_starts = np.repeat(starts - np.concatenate(([0], np.cumsum(lengths)[:-1])), lengths)
        flat = np.asarray(self.ids).reshape(-1)
        return np.unique(flat[run_starts + np.arange(total)])


@lru_cache(maxsize=8)
def _flip_masks(radius: int) -> np.ndarray:
    """All 16-bit masks with at most ``radius`` bits set (137 at radius 2, 697 at radius 3)."""
    if not 0 <= radius <= SUBSTRING_BITS:
        raise ValueError(f"substring radius must be within 0..{SUBSTRING_BITS}, not {radius}")
    masks = [0]
    for r in range(1, radius + 1):
        for positions in itertools.combinations(range(SUBSTRING_BITS), r):
            masks.append(sum(1 << p for p in positions))
    return np.asarray(masks, dtype=np.int64)


def radius_search(
    query_code: np.ndarray, codes: np.ndarray, tables: MIHTables, radius: int
) -> tuple[np.ndarray, np.ndarray]:
    """Every id within Hamming ``radius`` of the query (exact), nearest first: (ids, distances).

    Probes each table at floor(radius / m), which the pigeonhole argument makes
    sufficient, then keeps the candidates whose full distance is within the radius.
    """
    m = codes.shape[1] * 8 // SUBSTRING_BITS
    cand = tables.probe(query_code, min(radius // m, SUBSTRING_BITS))
    if len(cand) == 0:
        return cand, np.zeros(0, dtype=np.int32)
    dist = hamming_codes(query_code, codes[cand])
    keep = dist <= radius
    cand, dist = cand[keep], dist[keep]
    order = np.lexsort((cand, dist))
    return cand[order], dist[order]


def search(
    query_code: np.ndarray,
    codes: np.ndarray,
    tables: MIHTables,
    k: int,
    min_candidates: int,
    max_substring_radius: int = 2,
) -> tuple[np.ndarray, np.ndarray]:
    """Candidates by growing MIH radius, ranked by Hamming distance.

    Widens the per-substring radius until at least ``max(k, min_candidates)`` ids
    are found (or ``max_substring_radius`` is reached), then returns that many
    nearest in Hamming distance, ties broken by id (ids, distances). Hamming
    distances are coarse (B + 1 values), so callers re-rank them exactly.
    """
    want = max(k, min_candidates)
    cand = np.zeros(0, dtype=np.int32)
    for radius in range(max_substring_radius + 1):
        cand = tables.probe(query_code, radius)
        if len(cand) >= want:
            break
    if len(cand) == 0:
        return cand, np.zeros(0, dtype=np.int32)
    dist = hamming_codes(query_code, codes[cand])
    take = min(want, len(cand))
    # the take nearest by (distance, id): all below the take-th distance, then the lowest ids at it
    cut = np.partition(dist, take - 1)[take - 1]
    inside = np.flatnonzero(dist < cut)
    at_cut = np.flatnonzero(dist == cut)
    chosen = np.concatenate([inside, at_cut[np.argsort(cand[at_cut], kind="stable")][: take - len(inside)]])
    order = chosen[np.lexsort((cand[chosen], dist[chosen]))]
    return cand[order], dist[order]
