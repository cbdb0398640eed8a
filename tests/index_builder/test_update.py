"""A shard updated in place answers as a shard built from scratch on the same items would.

Removed and replaced items never come back from any index type, the item set equals the full
build's, exact search gives the same ranking, and the approximate types keep their recall,
also after a second night on top of the first and when the tombstones call for a rebuild.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from artefacts import layout
from artefacts.manifests import Dimension, IndexManifest, ShardRecord, TransformInfo
from index_builder import calibration, lsh
from index_builder.shard import ShardItems, ShardParams, build_shard
from index_builder.types import registry
from index_builder.types.base import BuildSettings
from index_builder.update import update_shard

DIM, K = 24, 10
PARAMS = ShardParams(settings=BuildSettings(n_jobs=1, target_recall=0.9, calibration_queries=100))


def _vectors(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(0).standard_normal((20, DIM))
    x = centres[rng.integers(0, len(centres), n)] + 0.5 * rng.standard_normal((n, DIM))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float16).astype(np.float32)


def _items(ids: list[str], vectors: np.ndarray) -> ShardItems:
    order = np.argsort(ids)
    ids = [ids[i] for i in order]
    return ShardItems(ids, ids, [None] * len(ids), [""] * len(ids), vectors[order])


@pytest.fixture(scope="module")
def nights(tmp_path_factory):
    """A base shard, one night applied in place, and the same items built from scratch."""
    root = tmp_path_factory.mktemp("update")
    base_ids = [f"b{j:05d}" for j in range(3000)]
    base_vectors = _vectors(3000, 1)
    planes, offsets = lsh.fit_projection(base_vectors, 64, seed=1)
    build_shard(_items(base_ids, base_vectors), 0, str(root / "base"), planes, PARAMS, offsets=offsets)
    removed = base_ids[:30]
    changed = base_ids[30:50]
    new_ids = [f"n{j:05d}" for j in range(100)] + changed
    new_vectors = _vectors(len(new_ids), 2)
    info = update_shard(str(root / "base"), str(root / "night1"), _items(new_ids, new_vectors), removed, 0, planes,
                        PARAMS, offsets)
    final = {i: v for i, v in zip(base_ids, base_vectors, strict=True) if i not in set(removed) | set(changed)}
    final.update(zip(new_ids, new_vectors, strict=True))
    ids = sorted(final)
    build_shard(_items(ids, np.stack([final[i] for i in ids])), 0, str(root / "full"), planes, PARAMS,
                offsets=offsets)
    return root, planes, offsets, info, final, set(removed) | set(changed)


def _open(folder, planes, offsets, name):
    """One index type opened on a shard folder, as the searcher opens it."""
    for path, array in (("lsh_planes.npy", planes), ("lsh_offsets.npy", offsets)):
        np.save(folder.parent / path, array)
    record = ShardRecord.from_dict(json.loads((folder / layout.SHARD_INFO).read_text()))
    records = registry.manifest_records(tuple(record.index_types), {}, 1234, [record], 0.9)
    manifest = IndexManifest(version="v", created_utc="", metric="angular", dimension=Dimension(DIM, DIM),
                             transform=TransformInfo(["l2"], 0), shards=1, items=record.items, model={},
                             model_fingerprint="", files={}, index_types=list(record.index_types), **records)
    stored = np.load(folder / layout.VECTORS_FILE, mmap_mode="r")
    opened = registry.get(name)(str(folder.parent), manifest)
    ids = pq.read_table(folder / layout.IDMAP_FILE).column("image_id").to_pylist()
    return opened, opened.open_shard(str(folder), record.items, 0, lambda: stored), ids, stored


def _top(folder, planes, offsets, name, queries):
    opened, handle, ids, stored = _open(folder, planes, offsets, name)
    n = opened.candidates(handle, K, 0, reranked=False)
    found, scores = opened.search(handle, queries, n, 0)
    if scores is None:  # LSH: re-score exactly, as the searcher does
        scores = np.where(found >= 0, np.einsum("qd,qnd->qn", queries, np.asarray(stored, np.float32)[found]), -np.inf)
        order = np.argsort(-scores, axis=1, kind="stable")
        found = np.take_along_axis(found, order, axis=1)
    return [[ids[i] for i in row[:K] if i >= 0] for row in found]


def test_the_updated_shard_holds_the_full_builds_items(nights):
    root, _, _, info, final, gone = nights
    updated = pq.read_table(root / "night1" / layout.IDMAP_FILE)
    assert sorted(updated.column("image_id").to_pylist()) == sorted(final)
    assert updated.column("id").to_pylist() == list(range(len(final)))  # dense: readers need no notion of removal
    assert info["items"] == len(final) == 3000 - 50 + 120
    assert info["update"] == {"base_items": 3000, "removed": 50, "added": 120}
    assert info["hnsw"]["tombstones"] == 50 and info["annoy"]["removed"] == 50 and info["annoy"]["delta"] == 120
    stored = np.load(root / "night1" / layout.VECTORS_FILE)
    row = {i: r for r, i in enumerate(updated.column("image_id").to_pylist())}
    changed = [i for i in gone if i in final]
    assert changed and all(np.array_equal(stored[row[i]], final[i].astype(np.float16)) for i in changed)


@pytest.mark.parametrize("name", ["exact", "hnsw", "annoy", "lsh"])
def test_removed_items_never_come_back_and_recall_holds(nights, name):
    root, planes, offsets, _, final, gone = nights
    queries = np.stack([final[i] for i in sorted(final)[::20]])
    updated = _top(root / "night1", planes, offsets, name, queries)
    full = _top(root / "full", planes, offsets, "exact", queries)
    assert not {i for row in updated for i in row} & (gone - set(final))
    recall = np.mean([len(set(a) & set(b)) / K for a, b in zip(updated, full, strict=True)])
    assert recall == 1.0 if name == "exact" else recall >= 0.85


def test_a_second_night_builds_on_the_first_and_tombstones_trigger_a_rebuild(nights, tmp_path):
    root, planes, offsets, _, final, _ = nights
    ids = sorted(final)
    night2 = tmp_path / "night2"
    removed = ids[:40]
    info = update_shard(str(root / "night1"), str(night2), _items(["m00001"], _vectors(1, 3)), removed, 0, planes,
                        PARAMS, offsets)
    assert info["items"] == len(final) - 40 + 1
    # ids[:40]: the 20 replaced items (in the exact segment since night 1) and 20 items still in the trees
    assert info["hnsw"]["tombstones"] == 50 + 40
    assert info["annoy"]["removed"] == 50 + 20 and info["annoy"]["delta"] == 120 - 20 + 1
    queries = np.stack([final[i] for i in ids[40::40]])
    for name in ("hnsw", "annoy"):
        assert not {i for row in _top(night2, planes, offsets, name, queries) for i in row} & set(removed)
    heavy = tmp_path / "heavy"
    info = update_shard(str(night2), str(heavy), _items([], np.zeros((0, DIM), np.float32)), ids[40:1200], 0,
                        planes, PARAMS, offsets)
    assert info["hnsw"]["tombstones"] == 0 and "removed" not in info["annoy"]  # both rebuilt from the survivors
    assert not (heavy / "annoy_ids.npy").exists()
    truth = calibration.exact_neighbours(np.load(heavy / layout.VECTORS_FILE).astype(np.float32),
                                         np.arange(0, info["items"], 50), K)
    assert truth.shape[1] == K


def test_local_features_are_refused_with_the_fix(nights, tmp_path):
    root, planes, offsets, *_ = nights
    with pytest.raises(ValueError, match="build the index in full"):
        update_shard(str(root / "night1"), str(tmp_path / "x"), _items([], np.zeros((0, DIM), np.float32)), [], 0,
                     planes, ShardParams(local_features=True), offsets)


def test_a_graph_with_tombstones_searches_safely_from_many_threads(nights):
    """faiss swaps a translating selector into the parameters during an IndexIDMap search: shared
    parameters crashed two-thread calibration (a use after free). Each search now has its own."""
    from concurrent.futures import ThreadPoolExecutor

    root, planes, offsets, _, final, gone = nights
    opened, handle, ids, _ = _open(root / "night1", planes, offsets, "hnsw")
    queries = np.stack([final[i] for i in sorted(final)[:64]])

    def one(i: int) -> set[str]:
        found, _ = opened.search(handle, queries[i % 64:i % 64 + 1], K, 32)
        return {ids[j] for j in found[0] if j >= 0}

    with ThreadPoolExecutor(4) as pool:
        seen = set().union(*pool.map(one, range(2000)))
    assert seen and not seen & (gone - set(final))
