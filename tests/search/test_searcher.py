"""The searcher: sharded merge equals a one-shard build, batch equals single, re-rank, QE, refusals."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from artefacts import layout
from index_builder.types import annoy as annoy_type
from models.backbone.network import ModelSpec
from search.compatibility import ModelMismatchError, TransformMismatchError
from search.index_files import available_versions
from search.searcher import Searcher, normalise_rows

K = 10


@pytest.fixture(scope="module")
def two_builds(tmp_path_factory, flowers_features):
    """The flowers features indexed twice into one folder: 1 shard, then 3 shards (LATEST)."""
    from pipelines import index

    out = tmp_path_factory.mktemp("serving_index")
    one = index.run(index.IndexConfig(features=str(flowers_features[0]), output=str(out), shards=1, dims=32,
                                      type_params={"annoy": annoy_type.Params(trees=10)}))
    three = index.run(index.IndexConfig(features=str(flowers_features[0]), output=str(out), shards=3, dims=32,
                                        type_params={"annoy": annoy_type.Params(trees=10)}))
    return out, one, three


@pytest.fixture(scope="module")
def one_shard(two_builds):
    out, one, _ = two_builds
    with Searcher(str(out), version=one.version) as s:
        yield s


@pytest.fixture(scope="module")
def three_shards(two_builds):
    out, _, _ = two_builds
    with Searcher(str(out)) as s:
        yield s


def _leave_one_out(s: Searcher, **kwargs):
    vectors = s.all_vectors()
    return s.search_arrays(vectors, k=K, exclude=np.arange(s.size), **kwargs)


def _by_image(s: Searcher, ids: np.ndarray, scores: np.ndarray) -> dict[str, tuple[list[str], np.ndarray]]:
    names = np.asarray(s.image_ids, dtype=object)
    return {s.image_ids[q]: (names[ids[q]].tolist(), scores[q]) for q in range(s.size)}


def _brute_force_topk(vectors: np.ndarray, image_ids: list[str], k: int):
    """Leave-one-out top-k by a full sort in float64: score descending, ties by image_id.

    Also returns, per query, whether two of its first k + 1 scores lie within float32 error
    (2e-6) of each other: there a float32 search may order them either way.
    """
    v64 = vectors.astype(np.float64)
    sims = v64 @ v64.T
    np.fill_diagonal(sims, -np.inf)
    names = np.asarray(image_ids)
    out, tied = [], []
    for row in sims:
        order = np.lexsort((names, -row))
        out.append(order[:k])
        tied.append(bool(np.any(-np.diff(row[order[:k + 1]]) < 2e-6)))
    return np.asarray(out), np.asarray(tied), sims


def test_latest_and_named_versions_open(two_builds, one_shard, three_shards):
    out, one, three = two_builds
    assert available_versions(str(out)) == sorted([one.version, three.version])
    assert three_shards.version == three.version and len(three_shards.shards) == 3
    assert one_shard.version == one.version and len(one_shard.shards) == 1
    assert one_shard.size == three_shards.size == 720
    assert sorted(one_shard.image_ids) == sorted(three_shards.image_ids)
    assert all(s.size > 0 for s in three_shards.shards)


def test_merged_exact_topk_equals_brute_force_over_the_same_vectors(three_shards):
    """Fan-out, per-shard top-k, merge: identical to one sort over every stored vector."""
    ids, scores = _leave_one_out(three_shards, method="exact")
    expected, tied, sims = _brute_force_topk(three_shards.all_vectors(), three_shards.image_ids, K)
    assert tied.mean() < 0.1  # the check below is about the other rows
    assert np.array_equal(ids[~tied], expected[~tied])
    # where neighbours are closer than float32 can tell, the list still holds the best scores
    rows = np.arange(len(ids))[:, None]
    np.testing.assert_allclose(sims[rows, ids], sims[rows, expected], atol=2e-6)
    assert np.all(np.diff(scores, axis=1) <= 0)
    assert not np.any(ids == np.arange(three_shards.size)[:, None])


@pytest.mark.parametrize("method,rerank,search_k", [("exact", False, -1), ("annoy", True, 1 << 20)])
def test_three_shards_give_the_top_k_of_a_one_shard_build(one_shard, three_shards, method, rerank, search_k):
    """The same features indexed as 1 and as 3 shards: the same neighbours, the same scores.

    The two builds fit tf.Transform separately, so stored float16 vectors differ by
    about 1e-4; neighbours whose scores are that close may swap, nothing else. Annoy
    is given a search_k that visits every node, so both builds' candidate lists are
    complete and only the fan-out, re-rank and merge are compared."""
    tol = 2e-3
    ia, sa = _leave_one_out(one_shard, method=method, rerank=rerank, search_k=search_k)
    ib, sb = _leave_one_out(three_shards, method=method, rerank=rerank, search_k=search_k)
    a, b = _by_image(one_shard, ia, sa), _by_image(three_shards, ib, sb)
    mismatched = 0
    for image_id, (names_a, scores_a) in a.items():
        names_b, scores_b = b[image_id]
        assert image_id not in names_a and image_id not in names_b
        np.testing.assert_allclose(scores_a, scores_b, atol=tol)
        # every neighbour clearly inside one top-k (above the k-th score by more than tol) is in the other
        sure_a = {n for n, s in zip(names_a, scores_a, strict=True) if s > scores_a[-1] + tol}
        sure_b = {n for n, s in zip(names_b, scores_b, strict=True) if s > scores_b[-1] + tol}
        assert sure_a <= set(names_b) and sure_b <= set(names_a), image_id
        mismatched += names_a != names_b
    assert mismatched <= 0.05 * len(a)


def test_annoy_rerank_recall_and_both_dominates_annoy(three_shards):
    exact, _ = _leave_one_out(three_shards, method="exact")
    annoy, s_annoy = _leave_one_out(three_shards, method="annoy", rerank=True)
    both, s_both = _leave_one_out(three_shards, method="both")
    lsh_ids, s_lsh = _leave_one_out(three_shards, method="lsh")
    recall = np.mean([len(set(a) & set(e)) / K for a, e in zip(annoy, exact, strict=True)])
    assert recall > 0.95, recall
    # "both" re-ranks a superset of Annoy's candidates exactly: never a worse score at any rank
    assert np.all(s_both >= s_annoy - 1e-6)
    # LSH lists are exactly scored, sorted, padded with -1 / -inf when MIH finds fewer than k
    valid = lsh_ids >= 0
    assert valid[:, 0].all()
    assert np.all(np.isneginf(s_lsh[~valid]))
    finite = np.where(valid, s_lsh, -2.0)
    assert np.all(np.diff(finite, axis=1) <= 0)
    # scores are inner products of the normalised query with the stored vectors
    vectors = three_shards.all_vectors()
    expected = np.einsum("qkd,qd->qk", vectors[np.maximum(lsh_ids, 0)], normalise_rows(vectors))
    np.testing.assert_allclose(np.where(valid, expected, 0), np.where(valid, s_lsh, 0), atol=1e-5)


@pytest.mark.parametrize("method", ["annoy", "lsh", "both", "exact", "hnsw", "hnsw+lsh"])
def test_single_batch_and_array_searches_agree(three_shards, method):
    s = three_shards
    picks = [0, 250, 480, 719]
    vectors = s.all_vectors()[picks]
    ids, scores = s.search_arrays(vectors, k=5, method=method, exclude=np.asarray(picks))
    batch = s.search_batch(vectors, k=5, method=method, exclude=np.asarray(picks))
    for row, gid in enumerate(picks):
        shard, local = s.locate(gid)
        hits = s.search(vectors[row], k=5, method=method, exclude=(shard, local))
        assert [s.global_id(h.shard, h.id) for h in hits] == [g for g in ids[row].tolist() if g >= 0]
        assert hits == batch[row]
        assert (shard, local) not in [(h.shard, h.id) for h in hits]
        # without the exclusion the item finds itself first (its own stored vector, cosine 1)
        own = s.search(vectors[row], k=5, method=method)
        assert (own[0].shard, own[0].id) == (shard, local) or own[0].score >= 0.999
        assert own[0].score == pytest.approx(1.0, abs=2e-3)
        described = [s.describe(h, r + 1) for r, h in enumerate(hits)]
        assert [d["image_id"] for d in described] == [s.image_ids[g] for g in ids[row] if g >= 0]


def test_each_index_type_reaches_its_calibrated_recall_through_the_real_job(three_shards):
    """Leave-one-out over all 720 dev photos, merged over three shards, against exact search."""
    s = three_shards
    assert s.available_methods == ("exact", "annoy", "lsh", "hnsw") and s.manifest.index_types == [
        "annoy", "lsh", "hnsw"]
    exact, _ = _leave_one_out(s, method="exact")
    for method, params in (("hnsw", s.manifest.hnsw), ("annoy", s.manifest.annoy), ("lsh", s.manifest.lsh)):
        assert params.calibration["target_recall"] == 0.95 and len(params.calibration["per_shard"]) == 3
        ids, _ = _leave_one_out(s, method=method)
        recall = np.mean([len(set(a) & set(e)) / K for a, e in zip(ids.tolist(), exact.tolist(), strict=True)])
        assert recall >= 0.93, (method, recall)
    auto, _ = _leave_one_out(s)  # the default method is HNSW when the index has it
    hnsw_ids, _ = _leave_one_out(s, method="hnsw")
    assert np.array_equal(auto, hnsw_ids)


def test_near_duplicates_are_exact_radius_queries_over_the_codes(three_shards):
    s = three_shards
    picks = [5, 300]
    found = s.near_duplicates(s.all_vectors()[picks], max_hamming=0)
    for gid, hits in zip(picks, found, strict=True):
        assert (gid, 0) in hits and all(d == 0 for _, d in hits)
    wide = s.near_duplicates(s.all_vectors()[picks], max_hamming=40)
    assert all(len(w) >= len(f) for w, f in zip(wide, found, strict=True))
    assert all([d for _, d in w] == sorted(d for _, d in w) for w in wide)
    bits = s.methods["lsh"].planes.shape[1]
    assert s.near_duplicates(s.all_vectors()[picks]) == s.near_duplicates(s.all_vectors()[picks],
                                                                          max_hamming=bits // 16)


def test_an_index_of_the_first_format_is_refused_with_a_rebuild_message(two_builds, tmp_path):
    out, one, _ = two_builds
    shutil.copytree(out / one.version, tmp_path / one.version)
    path = tmp_path / one.version / layout.MANIFEST
    manifest = json.loads(path.read_text())
    manifest["format_version"] = 1
    path.write_text(json.dumps(manifest))
    with pytest.raises(layout.IndexIntegrityError, match="rebuild the index with cbir index"):
        Searcher(str(tmp_path), version=one.version)


def test_query_expansion_searches_again_with_the_averaged_query(three_shards):
    s = three_shards
    picks = np.asarray([3, 111, 400])
    q = normalise_rows(s.all_vectors()[picks])
    first, _ = s.search_arrays(q, k=K, method="exact", exclude=picks)
    expanded = normalise_rows(q + s.all_vectors()[first[:, :3]].sum(axis=1))
    again, again_scores = s.search_arrays(expanded, k=K, method="exact", exclude=picks)
    ids, scores = s.search_arrays(q, k=K, method="exact", qe=3, exclude=picks)
    assert np.array_equal(ids, again)
    np.testing.assert_allclose(scores, again_scores, atol=1e-6)
    assert not np.array_equal(ids, first)  # expansion changed at least one list


def test_bad_queries_are_refused(three_shards):
    s = three_shards
    with pytest.raises(ValueError, match="dimension"):
        s.search(np.ones(s.dim + 1, np.float32))
    with pytest.raises(ValueError, match="method"):
        s.search(np.ones(s.dim, np.float32), method="faiss")
    with pytest.raises(ValueError, match="k must"):
        s.search(np.ones(s.dim, np.float32), k=0)
    with pytest.raises(ValueError, match="NaN"):
        s.search(np.full(s.dim, np.nan, np.float32))
    # a zero vector is a valid (if useless) query: every score is 0
    hits = s.search(np.zeros(s.dim, np.float32), k=3, method="exact")
    assert [h.score for h in hits] == [0.0, 0.0, 0.0]


def test_missing_incomplete_or_renamed_versions_are_refused(two_builds, tmp_path):
    out, one, _ = two_builds
    with pytest.raises(FileNotFoundError, match=one.version):
        Searcher(str(out), version="v20000101T000000-abcdef")
    for bad in ("../etc", "_staging", ".hidden"):
        with pytest.raises(layout.IndexIntegrityError):
            Searcher(str(out), version=bad)
    with pytest.raises(FileNotFoundError, match="LATEST"):
        Searcher(str(tmp_path))
    # LATEST pointing at a version whose build never finished (no manifest)
    root = tmp_path / "idx"
    shutil.copytree(out / one.version, root / "v-incomplete")
    (root / "v-incomplete" / layout.MANIFEST).unlink()
    (root / layout.POINTER).write_text(json.dumps({"version": "v-incomplete"}))
    with pytest.raises(layout.IndexIntegrityError, match="not a complete index version"):
        Searcher(str(root))
    # a version folder copied under another name: its manifest names another version
    shutil.copytree(out / one.version, root / "v-renamed")
    with pytest.raises(layout.IndexIntegrityError, match="manifest of version"):
        Searcher(str(root), version="v-renamed")


def test_damaged_files_are_refused(two_builds, tmp_path):
    out, one, _ = two_builds
    version = one.version
    shutil.copytree(out / version, tmp_path / version)
    graph = tmp_path / version / layout.shard_dir(0) / "hnsw.faiss"
    original = graph.read_bytes()
    graph.write_bytes(original[:100] + bytes([original[100] ^ 1]) + original[101:])
    with pytest.raises(layout.IndexIntegrityError, match="hnsw.faiss"):
        Searcher(str(tmp_path), version=version)
    graph.write_bytes(original)
    vectors = tmp_path / version / layout.shard_dir(0) / layout.VECTORS_FILE
    data = bytearray(vectors.read_bytes())
    data[-1] ^= 0xFF  # same size, different content
    vectors.write_bytes(bytes(data))
    with pytest.raises(layout.IndexIntegrityError, match="do not match the manifest"):
        Searcher(str(tmp_path), version=version)
    Searcher(str(tmp_path), version=version, verify=False).close()  # sizes only: documented trade-off
    vectors.write_bytes(bytes(data[:-8]))
    with pytest.raises(layout.IndexIntegrityError, match="vectors.f16.npy"):
        Searcher(str(tmp_path), version=version, verify=False)


def test_another_model_is_refused(two_builds, weights_dir):
    out, one, _ = two_builds
    with pytest.raises(ModelMismatchError, match="weights"):
        Searcher(str(out), expected_model=ModelSpec("mobilenet_v1_025", weights="random"))
    with pytest.raises(ModelMismatchError, match="fingerprint"):
        Searcher(str(out), expected_model="0123456789abcdef")
    Searcher(str(out), expected_model=ModelSpec("mobilenet_v1_025", weights_dir=weights_dir)).close()
    Searcher(str(out), expected_model=one.model_fingerprint, verify=False).close()


def test_another_transform_is_refused(two_builds, one_shard, three_shards, weights_dir, flowers):
    """An embedder holds one version's transform_fn: another version's searcher refuses its vectors."""
    out, one, three = two_builds
    assert one_shard.model_fingerprint == three_shards.model_fingerprint
    assert one_shard.space_fingerprint != three_shards.space_fingerprint
    embedder = one_shard.open_embedder(weights_dir)
    assert embedder.space_fingerprint == one_shard.space_fingerprint
    one_shard.check_embedder(embedder)
    with pytest.raises(TransformMismatchError, match="transform"):
        three_shards.check_embedder(embedder)
    with pytest.raises(TransformMismatchError):
        Searcher(str(out), expected_fingerprint=embedder.space_fingerprint)
    Searcher(str(out), version=one.version, expected_fingerprint=embedder.space_fingerprint).close()
    # and the embedder's vectors do belong to its own version: a photo finds itself
    path = flowers / "3" / "image_0241.jpg"
    vectors, ok, failures = embedder.embed_files([str(path)])
    assert not failures
    top = one_shard.search(vectors[0], k=1, rerank=True)[0]
    assert one_shard.describe(top, 1)["image_id"] == "3/image_0241.jpg" or top.score > 0.999
    assert top.score > 0.99


def test_search_k_defaults_to_the_calibrated_value_per_shard(two_builds, tmp_path):
    """Each shard searches with the search_k calibration chose for it; -1 means that value."""
    out, _, three = two_builds
    version = three.version
    per_shard = [p["search_k"] for p in three.annoy.calibration["per_shard"]]
    assert three.annoy.search_k == max(per_shard) > three.annoy.trees * K  # more than Annoy's own default
    shutil.copytree(out / version, tmp_path / version)
    with Searcher(str(tmp_path), version=version, verify=False) as plain:
        assert [sh.handles["annoy"].calibrated for sh in plain.shards] == per_shard
        queries = plain.all_vectors()
    manifest = json.loads((tmp_path / version / layout.MANIFEST).read_text())
    for entry in manifest["annoy"]["calibration"]["per_shard"]:
        entry["search_k"] = 1  # a single node per shard: clearly worse than Annoy's default
    (tmp_path / version / layout.MANIFEST).write_text(json.dumps(manifest))
    with Searcher(str(tmp_path), version=version, verify=False) as tuned:
        exact, _ = tuned.search_arrays(queries, k=K, method="exact")
        starved, _ = tuned.search_arrays(queries, k=K, method="annoy")
        generous, _ = tuned.search_arrays(queries, k=K, method="annoy", search_k=1 << 20)

    def recall(ids):
        return np.mean([len(set(a) & set(e)) / K for a, e in zip(ids, exact, strict=True)])

    assert recall(starved) < recall(generous) and recall(generous) > 0.99
