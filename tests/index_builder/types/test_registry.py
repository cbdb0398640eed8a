"""Every registered index type builds, calibrates, opens from its files and searches one small set.

The registry is the only list the shard builder, the manifest and the searcher loop over, so a
type that is registered but cannot do one of these would break an index at build or query time.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from artefacts.manifests import Dimension, IndexManifest, ShardRecord, TransformInfo
from index_builder import calibration, local_store, lsh
from index_builder.shard import ShardItems, ShardParams, build_shard
from index_builder.types import registry
from index_builder.types.base import BuildSettings, IndexType

N, DIM, K = 1500, 32, 10
KEYPOINTS = 12


def _local_rows(ids: list[str]) -> tuple[pa.Table, np.ndarray]:
    """Every item with its own random SIFT-like descriptors (uint8), as extract writes them."""
    rng = np.random.default_rng(5)
    desc = rng.integers(0, 256, (len(ids), KEYPOINTS, local_store.DESCRIPTOR_DIM), dtype=np.uint8)
    points = rng.random((len(ids), KEYPOINTS, 2), dtype=np.float32) * 100
    table = pa.Table.from_pylist([
        {"image_id": i, "sha256": "", "keypoints": KEYPOINTS, "width": 100, "height": 100,
         "points": points[j].astype("<f4").tobytes(), "descriptors": desc[j].tobytes(), "error": None}
        for j, i in enumerate(ids)], schema=local_store.LOCAL_SCHEMA)
    return table, desc


def _clustered(n: int, dim: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((30, dim))
    x = centres[rng.integers(0, len(centres), n)] + 0.4 * rng.standard_normal((n, dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float16).astype(np.float32)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One shard with every selectable type, calibrated to recall 0.9, and the manifest records for it."""
    out = tmp_path_factory.mktemp("shard")
    vectors = _clustered(N, DIM)
    ids = [f"i{j:05d}" for j in range(N)]
    planes, offsets = lsh.fit_projection(vectors[:1000], 64, seed=1)
    np.save(out / "lsh_planes.npy", planes)
    np.save(out / "lsh_offsets.npy", offsets)
    params = ShardParams(index_types=registry.SELECTABLE, type_params=registry.default_params(registry.SELECTABLE),
                         settings=BuildSettings(n_jobs=1, target_recall=0.9, calibration_queries=100),
                         local_features=True)
    local_rows, descriptors = _local_rows(ids)
    info = build_shard(ShardItems(ids, ids, [None] * N, [""] * N, vectors), 0, str(out / "shard"), planes, params,
                       offsets=offsets, local_rows=local_rows)
    records = registry.manifest_records(registry.SELECTABLE, params.type_params, 1234, [ShardRecord.from_dict(info)],
                                       0.9)
    manifest = IndexManifest(version="v", created_utc="", metric="angular", dimension=Dimension(DIM, DIM),
                             transform=TransformInfo(["l2"], 0), shards=1, items=N, model={}, model_fingerprint="",
                             files={}, index_types=list(registry.SELECTABLE), **records)
    return out, vectors, info, manifest, descriptors


def test_the_registry_lists_every_type_once_with_its_files():
    assert set(registry.SELECTABLE) == {"annoy", "lsh", "hnsw"}
    assert set(registry.TYPES) == {"annoy", "lsh", "hnsw", "exact", "votes"} and registry.LOCAL == ("votes",)
    for name, t in registry.TYPES.items():
        assert issubclass(t, IndexType) and t.name == name
    files = registry.shard_files(registry.SELECTABLE)
    assert len(files) == len(set(files)), "two types write the same file"
    with pytest.raises(ValueError, match="unknown index type"):
        registry.get("ivf")


@pytest.mark.parametrize("name", list(registry.TYPES))
def test_every_type_builds_calibrates_opens_and_searches(built, name):
    out, vectors, info, manifest, descriptors = built
    t = registry.get(name)
    shard_dir = out / "shard"
    for f in t.files:
        assert (shard_dir / f).stat().st_size > 0 and f in info["files"]
    if t.effort_key:  # calibrated on held-out items of the shard, and recorded where the searcher reads it
        cal = info["calibration"][name]
        assert cal["reached_target"] and cal[t.effort_key] > 0
    opened = t(str(out), manifest)
    stored = np.load(shard_dir / "vectors.f16.npy", mmap_mode="r")
    handle = opened.open_shard(str(shard_dir), N, 0, lambda: stored)
    if t.effort_key:
        assert opened.calibrated(0) == info["calibration"][name][t.effort_key]
    queries = np.arange(0, N, 15)
    if t.local_record:  # searched with a query's local descriptors: each item's own come first
        assert info["local_features"][t.local_record]
        for item in queries[:20]:
            ids, votes = opened.search(handle, descriptors[item], 3, 0)
            assert ids[0, 0] == item and votes[0, 0] == KEYPOINTS
        return
    n = opened.candidates(handle, K + 1, 0, reranked=False)
    ids, scores = opened.search(handle, vectors[queries], n, 0)
    assert ids.shape[0] == len(queries) and ids.dtype == np.int64
    if scores is None:  # not ranked by cosine: re-score as the searcher does
        assert not t.exact_scores
        scores = np.where(ids >= 0, np.einsum("qd,qnd->qn", vectors[queries], vectors[np.maximum(ids, 0)]), -np.inf)
        order = np.argsort(-scores, axis=1, kind="stable")
        ids = np.take_along_axis(ids, order, axis=1)[:, : K + 1]
    else:
        cos = np.einsum("qd,qnd->qn", vectors[queries], vectors[np.maximum(ids, 0)])
        assert np.allclose(np.where(ids >= 0, scores, 0), np.where(ids >= 0, cos, 0), atol=2e-3)
    truth = calibration.exact_neighbours(vectors, queries, K)
    assert calibration.recall_without_self(ids, queries, truth) >= (1.0 if name == "exact" else 0.85)
    opened.close_shard(handle)


def test_a_selection_outside_the_registry_is_refused():
    with pytest.raises(ValueError, match="--index-types"):
        registry.check_selection(("annoy", "exact"))
    with pytest.raises(ValueError, match="--index-types"):
        registry.check_selection(())
    registry.check_selection((), allow_empty=True)
