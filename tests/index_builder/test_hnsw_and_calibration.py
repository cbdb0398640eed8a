"""HNSW shards (faiss, memory-mapped) and search effort chosen by measurement."""

from __future__ import annotations

import os

import numpy as np
import pytest

from artefacts import layout
from index_builder import calibration, lsh
from index_builder.shard import ShardItems, ShardParams, build_shard
from index_builder.types import annoy as annoy_type
from index_builder.types import hnsw
from index_builder.types.base import BuildSettings


def _clustered(n: int, dim: int, seed: int = 0) -> np.ndarray:
    """Unit vectors in 40 clusters of varied spread: neighbours are close but not trivially so."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((40, dim))
    x = centres[rng.integers(0, 40, n)] + rng.uniform(0.6, 1.4, (n, 1)) * rng.standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_hnsw_opens_memory_mapped_without_reading_the_file(tmp_path):
    vectors = _clustered(40_000, 256).astype(np.float16).astype(np.float32)  # a shard's values are float16
    path = str(tmp_path / hnsw.HNSW_FILE)
    hnsw.build(vectors, path, m=16, ef_construction=40)
    size = os.path.getsize(path)
    # the vectors are stored as float16: 20 MB, where float32 storage alone would be 41 MB
    assert 40_000 * 256 * 2 < size < 40_000 * 256 * 4
    before = _rss_bytes()
    index = hnsw.open_mapped(path)
    grown = _rss_bytes() - before
    assert index.ntotal == 40_000
    vector_bytes = 40_000 * 256 * 2  # reading them in would grow RSS by all of these; the links are the rest
    assert grown < vector_bytes / 2, f"opening grew RSS by {grown / 1e6:.1f} MB for a {size / 1e6:.1f} MB file"
    ids, scores = hnsw.search(index, vectors[:20], 3, ef_search=256)
    import faiss

    in_memory = faiss.read_index(path)  # the same graph read the ordinary way searches the same
    np.testing.assert_array_equal(ids, hnsw.search(in_memory, vectors[:20], 3, ef_search=256)[0])
    found_self = ids[:, 0] == np.arange(20)
    assert found_self.mean() > 0.5
    # the graph's scores are the cosines exact scoring computes from the same float16 values
    exact = np.einsum("bd,bkd->bk", vectors[:20], vectors[np.maximum(ids, 0)])
    np.testing.assert_allclose(scores, exact, atol=1e-6)


def test_a_flat_graph_from_an_earlier_build_still_opens_and_searches(tmp_path):
    import faiss

    vectors = _clustered(3000, 32).astype(np.float16).astype(np.float32)
    graph = faiss.IndexHNSWFlat(32, 16, faiss.METRIC_INNER_PRODUCT)  # what builds wrote before float16 storage
    index = faiss.IndexIDMap(graph)
    index.add_with_ids(vectors, np.arange(len(vectors), dtype=np.int64))
    path = str(tmp_path / hnsw.HNSW_FILE)
    faiss.write_index(index, path)
    ids, _ = hnsw.search(hnsw.open_mapped(path), vectors[:50], 5, ef_search=64)
    assert (ids[:, 0] == np.arange(50)).mean() > 0.9


def test_calibration_meets_its_target_on_items_it_did_not_tune_on(tmp_path):
    vectors = _clustered(6000, 48, seed=3)
    ids = [f"i{j:05d}" for j in range(len(vectors))]
    items = ShardItems(ids, ids, [None] * len(ids), [""] * len(ids), vectors)
    planes, offsets = lsh.fit_projection(vectors[:3000], 128, seed=1)
    params = ShardParams(type_params={"annoy": annoy_type.Params(trees=20)},
                         settings=BuildSettings(seed=7, target_recall=0.9, calibration_queries=150))
    info = build_shard(items, 0, str(tmp_path), planes, params, offsets=offsets)
    cal = info["calibration"]
    assert cal["target_recall"] == 0.9 and cal["queries"] == 150
    tuned = set(calibration.held_out_queries(len(vectors), 150, params.settings.seed + 0).tolist())
    fresh = np.asarray([i for i in range(0, len(vectors), 7) if i not in tuned][:300])
    truth = calibration.exact_neighbours(vectors, fresh, 10)

    index = hnsw.open_mapped(str(tmp_path / hnsw.HNSW_FILE))
    found = hnsw.search(index, vectors[fresh], 11, cal["hnsw"]["ef_search"])[0]
    assert calibration.recall_without_self(found, fresh, truth) >= 0.9 - 0.03

    from annoy import AnnoyIndex

    annoy = AnnoyIndex(48, layout.METRIC)
    annoy.load(str(tmp_path / layout.ANNOY_FILE))
    found = np.asarray([annoy.get_nns_by_vector(v, 11, search_k=cal["annoy"]["search_k"]) for v in vectors[fresh]])
    assert calibration.recall_without_self(found, fresh, truth) >= 0.9 - 0.03
    annoy.unload()

    words = lsh.as_words(np.load(tmp_path / layout.CODES_FILE))
    qwords = lsh.as_words(lsh.encode(vectors[fresh], planes, offsets))
    rows = []
    for q, qw in zip(vectors[fresh], qwords, strict=True):
        cand = lsh.hamming_top(qw, words, cal["lsh"]["candidates"])
        rows.append(cand[np.argsort(-(vectors[cand] @ q), kind="stable")[:11]])
    assert calibration.recall_without_self(np.asarray(rows), fresh, truth) >= 0.9 - 0.03
    # efforts are the smallest of their grids that reached the target: one step less does not
    assert all(cal[t]["reached_target"] for t in ("hnsw", "annoy", "lsh"))
    assert cal["lsh"]["candidates"] < len(vectors) / 4


def test_geometric_grid_and_exact_neighbours():
    assert calibration.geometric_grid(10, 100, 2.0) == [10, 20, 40, 80, 100]
    assert calibration.geometric_grid(3, 3) == [3]
    v = _clustered(300, 8)
    q = np.asarray([0, 17, 299])
    truth = calibration.exact_neighbours(v, q, 5)
    sims = v @ v.T
    np.fill_diagonal(sims, -np.inf)
    expected = np.argsort(-sims[q], axis=1)[:, :5]
    assert [set(r) for r in truth.tolist()] == [set(r) for r in expected.tolist()]
    assert all(qid not in row for qid, row in zip(q, truth, strict=True))


def test_index_types_are_checked():
    with pytest.raises(ValueError, match="--index-types"):
        ShardParams(index_types=("annoy", "ivf"))
    with pytest.raises(ValueError, match="--index-types"):
        ShardParams(index_types=())
    with pytest.raises(ValueError, match="--target-recall"):
        ShardParams(settings=BuildSettings(target_recall=1.5))
