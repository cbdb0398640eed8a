"""The float16 → float32 lookup the re-scoring path uses gives numpy's own values, bit for bit."""

from __future__ import annotations

import numpy as np

from index_builder import topk


def test_float16_lookup_equals_numpy_conversion_for_every_bit_pattern():
    every = np.arange(1 << 16, dtype=np.uint16).view(np.float16)
    got = topk.as_float32(every.reshape(256, 256))
    assert got.dtype == np.float32 and got.shape == (256, 256)
    np.testing.assert_array_equal(got.reshape(-1).view(np.uint32), every.astype(np.float32).view(np.uint32))
    mapped = np.asarray(np.ones((3, 4), np.float32))
    assert topk.as_float32(mapped) is mapped  # float32 passes through without a copy


def test_scores_from_float16_vectors_match_float32_arithmetic(tmp_path):
    rng = np.random.default_rng(0)
    v = topk.normalise_rows(rng.standard_normal((500, 32))).astype(np.float16)
    np.save(tmp_path / "v.npy", v)
    mapped = np.load(tmp_path / "v.npy", mmap_mode="r")  # as the searcher holds them
    q = topk.normalise_rows(rng.standard_normal((3, 32)))
    ids = np.array([[4, 9, -1], [0, 499, 250], [7, 7, 3]])
    got = topk.score(mapped, q, ids)
    want = np.einsum("bmd,bd->bm", v.astype(np.float32)[np.maximum(ids, 0)], q)
    np.testing.assert_array_equal(got[ids >= 0], want[ids >= 0])
    assert np.isneginf(got[0, 2])
