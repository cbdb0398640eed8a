"""LSH codes and multi-index hashing against brute force: packing, popcount, probe completeness."""

from __future__ import annotations

import numpy as np
import pytest

from index_builder import lsh

BITS = lsh.SUPPORTED_BITS


def _random_codes(rng: np.random.Generator, n: int, bits: int) -> np.ndarray:
    return rng.integers(0, 256, size=(n, bits // 8), dtype=np.uint8)


def _naive_hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.count_nonzero(np.unpackbits(a[None, :], axis=1) != np.unpackbits(b, axis=1), axis=1)


def _flip(code: np.ndarray, positions: np.ndarray) -> np.ndarray:
    bits = np.unpackbits(code)
    bits[positions] ^= 1
    return np.packbits(bits)


def _codes_with_neighbours(rng: np.random.Generator, bits: int, n_random: int = 2000):
    """Random codes plus, around one query, codes at every Hamming distance 0..bits/2.

    Uniform random codes sit near bits/2 from any query, so without planted
    neighbours a radius test would only ever check the empty set.
    """
    query = _random_codes(rng, 1, bits)[0]
    planted = [_flip(query, rng.choice(bits, size=d, replace=False)) for d in range(bits // 2 + 1) for _ in range(3)]
    codes = np.concatenate([_random_codes(rng, n_random, bits), np.stack(planted)])
    return query, codes[rng.permutation(len(codes))]


def test_encode_packs_bits_big_endian_one_per_hyperplane():
    planes = np.eye(64, dtype=np.float32)  # bit i is the sign of coordinate i
    v = -np.ones((1, 64), dtype=np.float32)
    v[0, [0, 9, 63]] = 1.0
    code = lsh.encode(v, planes)[0]
    expected = np.zeros(8, dtype=np.uint8)
    expected[0], expected[1], expected[7] = 0b1000_0000, 0b0100_0000, 0b0000_0001
    np.testing.assert_array_equal(code, expected)
    assert lsh.substrings(code[None, :])[0, 0] == 0x8040


@pytest.mark.parametrize("bits", BITS)
def test_encode_matches_sign_pattern(bits):
    rng = np.random.default_rng(bits)
    planes = lsh.hyperplanes(32, bits, seed=7)
    vectors = rng.standard_normal((50, 32)).astype(np.float32)
    codes = lsh.encode(vectors, planes)
    assert codes.shape == (50, bits // 8) and codes.dtype == np.uint8
    np.testing.assert_array_equal(np.unpackbits(codes, axis=1).astype(bool), vectors @ planes > 0)


def test_hyperplanes_are_seeded_and_checked():
    a, b = lsh.hyperplanes(16, 128, seed=3), lsh.hyperplanes(16, 128, seed=3)
    assert a.shape == (16, 128) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, lsh.hyperplanes(16, 128, seed=4))
    with pytest.raises(ValueError, match="lsh-bits"):
        lsh.hyperplanes(16, 96, seed=3)
    with pytest.raises(ValueError, match="do not match"):
        lsh.encode(np.zeros((2, 8), np.float32), a)


@pytest.mark.parametrize("bits", BITS)
def test_popcount_hamming_equals_bitwise_count(bits):
    rng = np.random.default_rng(bits + 1)
    codes = _random_codes(rng, 500, bits)
    query = codes[0]
    expected = _naive_hamming(query, codes)
    np.testing.assert_array_equal(lsh.hamming_codes(query, codes), expected)
    np.testing.assert_array_equal(lsh.hamming(lsh.as_words(query[None, :])[0], lsh.as_words(codes)), expected)
    assert lsh.hamming_codes(query, codes)[0] == 0
    assert lsh.hamming_codes(query, ~query[None, :])[0] == bits


def test_as_words_refuses_partial_words():
    with pytest.raises(ValueError, match="64-bit"):
        lsh.as_words(np.zeros((3, 12), np.uint8))


def test_hamming_estimates_the_angle():
    """P[bit differs] = angle / pi: the mean over many pairs must match within sampling error."""
    rng = np.random.default_rng(0)
    planes = lsh.hyperplanes(64, 256, seed=11)
    a = rng.standard_normal((400, 64)).astype(np.float32)
    b = a + rng.uniform(0.1, 2.0, size=(400, 1)).astype(np.float32) * rng.standard_normal((400, 64)).astype(
        np.float32
    )
    cos = np.sum(a * b, axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    angle_fraction = np.arccos(np.clip(cos, -1, 1)) / np.pi
    ca, cb = lsh.encode(a, planes), lsh.encode(b, planes)
    ham = np.array([lsh.hamming_codes(ca[i], cb[i : i + 1])[0] for i in range(400)]) / 256
    assert abs(ham.mean() - angle_fraction.mean()) < 0.01
    assert np.corrcoef(ham, angle_fraction)[0, 1] > 0.95


@pytest.mark.parametrize("bits", BITS)
def test_tables_are_csr_buckets_sorted_by_id(bits):
    rng = np.random.default_rng(bits + 2)
    codes = _random_codes(rng, 3000, bits)
    codes[:200] = codes[0]  # a crowded bucket
    tables = lsh.MIHTables.build(codes)
    subs = lsh.substrings(codes)
    m = bits // 16
    assert tables.offsets.shape == (m, 65537) and tables.ids.shape == (m, 3000)
    for j in range(m):
        off = tables.offsets[j]
        assert off[0] == 0 and off[-1] == 3000 and np.all(np.diff(off) >= 0)
        for value in (int(subs[0, j]), int(subs[1234, j])):
            bucket = tables.ids[j, off[value] : off[value + 1]]
            np.testing.assert_array_equal(bucket, np.flatnonzero(subs[:, j] == value))


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("substring_radius", [0, 1, 2])
def test_probe_returns_exactly_the_substring_matches(bits, substring_radius):
    rng = np.random.default_rng(bits * 10 + substring_radius)
    query, codes = _codes_with_neighbours(rng, bits)
    tables = lsh.MIHTables.build(codes)
    found = tables.probe(query, substring_radius)
    # brute force: some 16-bit substring within the radius of the query's
    qs, cs = lsh.substrings(query[None, :])[0], lsh.substrings(codes)
    per_sub = np.bitwise_count(cs ^ qs[None, :])
    expected = np.flatnonzero((per_sub <= substring_radius).any(axis=1))
    np.testing.assert_array_equal(found, expected)
    # and it covers every code within the radius the pigeonhole argument guarantees
    ham = _naive_hamming(query, codes)
    within = np.flatnonzero(ham <= lsh.guaranteed_radius(bits, substring_radius))
    assert len(within) > 0 and np.isin(within, found).all()


@pytest.mark.parametrize("bits", BITS)
def test_radius_search_finds_every_code_within_r(bits):
    rng = np.random.default_rng(bits + 3)
    query, codes = _codes_with_neighbours(rng, bits)
    tables = lsh.MIHTables.build(codes)
    ham = _naive_hamming(query, codes)
    for r in (0, 1, bits // 16, bits // 8, bits // 4 - 1, bits // 4, 3 * bits // 8):
        ids, dist = lsh.radius_search(query, codes, tables, r)
        expected = np.flatnonzero(ham <= r)
        assert sorted(ids.tolist()) == expected.tolist(), r
        np.testing.assert_array_equal(dist, ham[ids])
        assert np.all(np.diff(dist) >= 0)  # nearest first


@pytest.mark.parametrize("bits", BITS)
def test_search_returns_hamming_nearest_of_its_candidates(bits):
    rng = np.random.default_rng(bits + 4)
    query, codes = _codes_with_neighbours(rng, bits)
    tables = lsh.MIHTables.build(codes)
    ham = _naive_hamming(query, codes)
    for want, max_radius in ((5, 0), (40, 1), (200, 2)):
        ids, dist = lsh.search(query, codes, tables, k=5, min_candidates=want, max_substring_radius=max_radius)
        # the candidate pool is the smallest probe radius with enough ids
        for radius in range(max_radius + 1):
            pool = tables.probe(query, radius)
            if len(pool) >= want:
                break
        expected = sorted(pool.tolist(), key=lambda i: (ham[i], i))[:want]
        assert ids.tolist() == expected
        np.testing.assert_array_equal(dist, ham[ids])


def test_empty_tables_find_nothing():
    codes = np.zeros((0, 16), np.uint8)
    tables = lsh.MIHTables.build(codes)
    query = np.zeros(16, np.uint8)
    assert tables.probe(query, 2).size == 0
    ids, dist = lsh.search(query, codes, tables, k=10, min_candidates=10)
    assert ids.size == 0 and dist.size == 0
    assert lsh.radius_search(query, codes, tables, 5)[0].size == 0


# -- learned projections and the full scan ------------------------------------------------------------


def _anisotropic(n: int, dim: int, seed: int = 0) -> np.ndarray:
    """Unit vectors whose variance falls off across dimensions, as PCA-transformed features do."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, dim)) * np.linspace(2.0, 0.2, dim) + 0.3
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("bits,dim", [(64, 96), (128, 64), (256, 256)])
def test_learned_projections_have_the_asked_shape_and_balanced_bits(bits, dim):
    x = _anisotropic(3000, dim)
    fitted = {}
    for method in lsh.PROJECTIONS:
        planes, offsets = fitted[method] = lsh.fit_projection(x, bits, seed=3, method=method)
        assert planes.shape == (dim, bits) and offsets.shape == (bits,) and planes.dtype == np.float32
        ones = np.unpackbits(lsh.encode(x, planes, offsets), axis=1).mean(axis=0)
        if method != "gaussian":  # centred: every bit splits the data about in half
            assert np.all((ones > 0.3) & (ones < 0.7)), (method, ones.min(), ones.max())
    again = lsh.fit_projection(x, bits, seed=3)  # the default (ITQ) fitted again: the same planes
    np.testing.assert_array_equal(again[0], fitted["itq"][0])


def test_itq_codes_need_fewer_candidates_than_gaussian_hyperplanes():
    x = _anisotropic(8000, 64, seed=5)
    queries, truth = np.arange(0, 8000, 40), []
    sims = x[queries] @ x.T
    sims[np.arange(len(queries)), queries] = -np.inf
    truth = np.argsort(-sims, axis=1)[:, :10]

    def recall(method: str, candidates: int) -> float:
        planes, offsets = lsh.fit_projection(x[:4000], 128, seed=1, method=method)
        words = lsh.as_words(lsh.encode(x, planes, offsets))
        hits = 0
        for q, want in zip(queries, truth, strict=True):
            cand = lsh.hamming_top(words[q], words, candidates + 1)
            hits += len(set(cand.tolist()) & set(want.tolist()))
        return hits / truth.size

    assert recall("itq", 400) > recall("gaussian", 400) + 0.05


@pytest.mark.parametrize("n,take", [(1000, 1), (1000, 37), (1000, 999), (50, 80)])
def test_hamming_top_is_the_nearest_by_distance_then_id(n, take):
    rng = np.random.default_rng(n + take)
    codes = rng.integers(0, 256, (n, 16), dtype=np.uint8)
    words = lsh.as_words(codes)
    q = words[3]
    dist = np.bitwise_count(words ^ q).sum(axis=1)
    expected = np.lexsort((np.arange(n), dist))[:take]
    np.testing.assert_array_equal(lsh.hamming_top(q, words, take), expected)


@pytest.mark.parametrize("bits", [64, 128, 256])
def test_faiss_scan_takes_the_nearest_codes_like_the_numpy_scan(bits):
    rng = np.random.default_rng(bits)
    codes = rng.integers(0, 256, (3000, bits // 8), dtype=np.uint8)
    queries = codes[:5] ^ rng.integers(0, 2, (5, bits // 8), dtype=np.uint8)  # near a few codes, not on them
    scan = lsh.HammingScan(codes)
    found = scan.top(queries, 50)
    assert found.shape == (5, 50)
    for q, ids in zip(queries, found, strict=True):
        dist = lsh.hamming_codes(q, codes)
        reference = lsh.hamming_top(lsh.as_words(q[None, :])[0], lsh.as_words(codes), 50)
        # the same distances (ties at the cut may pick other ids), nearest first
        np.testing.assert_array_equal(np.sort(dist[ids]), np.sort(dist[reference]))
        assert np.all(np.diff(dist[ids]) >= 0)
    assert scan.top(queries, 10_000).shape == (5, 3000)  # never more than the shard holds
    assert lsh.HammingScan(codes[:0]).top(queries, 10).shape == (5, 0)
