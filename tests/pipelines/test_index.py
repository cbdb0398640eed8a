"""The index builder: dense ids, stable shards, the transform at build and query, Annoy and LSH
recall on real features, on-disk builds, digests, and publishing that survives a crash."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from annoy import AnnoyIndex

from artefacts import layout
from artefacts.manifests import IndexManifest
from index_builder import lsh
from index_builder.shard import ShardItems, ShardParams, build_shard
from index_builder.types import annoy as annoy_type
from index_builder.types import lsh as lsh_type
from index_builder.types.base import BuildSettings
from pipelines import index
from plumbing import publish as protocol
from search.index_files import resolve, verify_files
from search.searcher import Searcher
from transforms import features_io
from transforms.feature_sets import feature_files

FLOAT16_EPS = 2.0**-11  # half a float16 ulp, relative


def _trees(trees: int) -> ShardParams:
    return ShardParams(type_params={"annoy": annoy_type.Params(trees=trees)})


# -- fixtures -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def published(flowers_index):
    out, manifest = flowers_index
    return out, out / manifest.version, manifest


@pytest.fixture(scope="module")
def raw_features(flowers_features):
    """image_id → (uri, label, sha256, raw float32 vector) from the extract output."""
    out, manifest = flowers_features
    table = pa.concat_tables(features_io.read_table(p) for p in feature_files(str(out), manifest))
    vectors = features_io.feature_matrix(table)
    return {
        iid: (uri, label, sha, vectors[i])
        for i, (iid, uri, label, sha) in enumerate(
            zip(*(table.column(c).to_pylist() for c in ("image_id", "uri", "label", "sha256")), strict=True)
        )
    }


def _shard(version_dir, s: int):
    d = version_dir / layout.shard_dir(s)
    return pq.read_table(d / layout.IDMAP_FILE), np.load(d / layout.VECTORS_FILE), d


# -- ids and shards -------------------------------------------------------------------------------


def test_stable_shard_fixed_values():
    """Changing the hash would move every item to another shard: these values must never change."""
    expected = {
        "flowers17-dev/0/image_0001.jpg": [0, 1, 0, 9, 841],
        "imagenette-dev/n01440764/ILSVRC2012_val_00000293.JPEG": [0, 0, 2, 12, 108],
        "a": [0, 1, 2, 15, 343],
        "": [0, 0, 0, 4, 876],
        "ünïcode/é.jpg": [0, 1, 1, 13, 221],
    }
    for image_id, shards in expected.items():
        assert [layout.stable_shard(image_id, s) for s in (1, 2, 3, 16, 1000)] == shards, image_id


def test_stable_shard_spreads_evenly():
    counts = np.bincount([layout.stable_shard(f"folder/{i:06d}.jpg", 16) for i in range(16000)], minlength=16)
    assert counts.min() > 800 and counts.max() < 1200, counts


def _rows(n: int, dim: int = 8, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [
        {"image_id": f"img/{i:04d}.jpg", "uri": f"file:///img/{i:04d}.jpg", "label": None if i % 5 else "x",
         "sha256": f"{i:064x}", "feature": rng.standard_normal(dim).astype(np.float32)}
        for i in range(n)
    ]


def test_dense_ids_do_not_depend_on_arrival_order():
    rows = _rows(50)
    a = ShardItems.from_rows(rows, 8)
    b = ShardItems.from_rows(list(reversed(rows)), 8)
    assert a.image_ids == sorted(r["image_id"] for r in rows) == b.image_ids
    np.testing.assert_array_equal(a.vectors, b.vectors)
    assert a.labels == b.labels and a.sha256 == b.sha256


def test_shard_items_from_sliced_and_shuffled_batches_equal_the_table_path():
    """A runner hands a shard over as many small batches, some of them slices of a larger one
    (a slice's list values start at its offset): streaming them in gives the same items."""
    rows = _rows(40)
    whole = ShardItems.from_rows(rows, 8)
    table = pa.Table.from_batches([_batch_of(rows)]).combine_chunks()
    batch = table.to_batches()[0]
    pieces = [batch.slice(30, 10), batch.slice(0, 7), batch.slice(7, 0), batch.slice(7, 23)]
    assert pieces[0].column("vector").offset == 30
    streamed = ShardItems.from_batches(iter(pieces), 8)
    assert streamed.image_ids == whole.image_ids and streamed.sha256 == whole.sha256
    np.testing.assert_array_equal(streamed.vectors, whole.vectors)
    assert ShardItems.from_batches(iter([]), 8).size == 0


def _batch_of(rows):  # the rows as the index job's RecordBatch
    from index_builder.shard import row_schema

    dim = len(rows[0]["feature"])
    return pa.RecordBatch.from_arrays([
        pa.array([r["image_id"] for r in rows]), pa.array([r["uri"] for r in rows]),
        pa.array([r["label"] for r in rows], pa.string()), pa.array([r["sha256"] for r in rows]),
        pa.FixedSizeListArray.from_arrays(pa.array(np.stack([r["feature"] for r in rows]).reshape(-1)
                                                   .astype(np.float16)), dim),
    ], schema=row_schema(dim))


def test_duplicate_image_ids_resolve_the_same_way_in_any_order():
    rows = _rows(10)
    dup = dict(rows[3], sha256="0" * 63 + "f", feature=np.full(8, 7.0, np.float32))  # sorts after rows[3]
    for order in ([*rows, dup], [dup, *rows]):
        items = ShardItems.from_rows(order, 8)
        assert items.size == 10 and items.duplicates_dropped == 1
        np.testing.assert_array_equal(items.vectors[3], rows[3]["feature"].astype(np.float16))  # as stored


def test_shard_items_refuse_unsorted_ids_and_non_finite_vectors():
    v = np.ones((2, 4), np.float32)
    with pytest.raises(ValueError, match="sorted"):
        ShardItems(["b", "a"], ["", ""], [None, None], ["", ""], v)
    with pytest.raises(ValueError, match="sorted"):
        ShardItems(["a", "a"], ["", ""], [None, None], ["", ""], v)
    v[1, 2] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        ShardItems(["a", "b"], ["", ""], [None, None], ["", ""], v)


def test_ids_round_trip_through_the_published_index(published, raw_features):
    _, version_dir, manifest = published
    seen = set()
    for s in range(manifest.shards):
        idmap, vectors, d = _shard(version_dir, s)
        ids = idmap.column("image_id").to_pylist()
        assert idmap.column("id").to_pylist() == list(range(idmap.num_rows))
        assert ids == sorted(ids) and len(vectors) == len(ids) == manifest.items_per_shard[s]
        assert all(layout.stable_shard(i, manifest.shards) == s for i in ids)
        for row in idmap.to_pylist():
            uri, label, sha, _ = raw_features[row["image_id"]]
            assert (row["uri"], row["label"], row["sha256"]) == (uri, label, sha)
        seen.update(ids)
    assert seen == set(raw_features) and manifest.items == len(raw_features)


# -- the transform --------------------------------------------------------------------------------


def test_transform_is_identical_at_build_and_query(published, raw_features):
    """The transform as data (what queries apply) equals the fitted transform_fn and reproduces the stored vectors."""
    import tensorflow as tf
    import tensorflow_transform as tft

    from search.index_files import load_transform

    _, version_dir, manifest = published
    assert manifest.transform.projection_file == "transform/projection.npy"
    data = load_transform(str(version_dir), manifest)
    assert data.projection.shape == (256, 128) and data.bias.shape == (128,)
    tft_out = tft.TFTransformOutput(str(version_dir))
    checked = 0
    for s in range(manifest.shards):
        idmap, stored, d = _shard(version_dir, s)
        raw = np.stack([raw_features[i][3] for i in idmap.column("image_id").to_pylist()])
        graph = tft_out.transform_raw_features({"feature": tf.constant(raw)}, drop_unused_features=True)
        query = data(raw)
        assert np.max(np.abs(query - graph["feature"].numpy())) < 1e-5
        assert query.shape == (len(raw), manifest.dimension.output) == stored.shape
        assert stored.dtype == np.float16
        np.testing.assert_allclose(np.linalg.norm(query, axis=1), 1.0, atol=1e-5)
        err = np.abs(stored.astype(np.float32) - query)
        assert np.all(err <= FLOAT16_EPS * np.abs(query) + 1e-6), float(err.max())
        # the Annoy items are exactly the stored vectors (float16 values, float32 in Annoy): what the
        # searcher re-scores is what the trees were built from
        annoy = AnnoyIndex(stored.shape[1], layout.METRIC)
        annoy.load(str(d / layout.ANNOY_FILE))
        for i in (0, len(raw) // 2, len(raw) - 1):
            item = np.asarray(annoy.get_item_vector(i), np.float32)
            np.testing.assert_array_equal(item, stored[i].astype(np.float32))
        annoy.unload()
        checked += len(raw)
    assert checked == manifest.items


# -- recall on real features ----------------------------------------------------------------------


def _exact_top(vectors: np.ndarray, k: int) -> np.ndarray:
    sims = vectors @ vectors.T
    np.fill_diagonal(sims, -np.inf)
    return np.argsort(-sims, axis=1, kind="stable")[:, :k]


def _recall(found: list[list[int]], truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth, strict=True)]))


def test_learned_lsh_beats_the_first_release_codes_at_fewer_candidates(published):
    """The index's ITQ codes with a full Hamming scan against the first release's Gaussian codes with MIH probing.

    Every indexed vector queried against all shards, top-10 after an exact re-rank of the
    candidates: the learned codes reach at least the old recall with fewer candidates.
    """
    _, version_dir, manifest = published
    assert manifest.lsh.method == "itq"
    k, shards = 10, []
    for s in range(manifest.shards):
        _, vectors, d = _shard(version_dir, s)
        shards.append((vectors.astype(np.float32), lsh.as_words(np.load(d / layout.CODES_FILE))))
    base = np.cumsum([0] + [len(v) for v, _ in shards])
    allv = np.concatenate([v for v, _ in shards])
    truth = _exact_top(allv, k)
    planes, offsets = np.load(version_dir / layout.LSH_PLANES), np.load(version_dir / layout.LSH_OFFSETS)
    new_q = lsh.as_words(lsh.encode(allv, planes, offsets))
    old_planes = lsh.hyperplanes(allv.shape[1], manifest.lsh.bits, 1234)
    old = []
    for vectors, _ in shards:
        codes = lsh.encode(vectors, old_planes)
        old.append((codes, lsh.MIHTables.build(codes)))
    old_q = lsh.encode(allv, old_planes)

    def ranked(qi, per_shard_ids):
        hits = [(float(shards[s][0][i] @ allv[qi]), base[s] + int(i)) for s, ids in enumerate(per_shard_ids)
                for i in ids]
        return [g for _, g in sorted(hits, key=lambda h: (-h[0], h[1])) if g != qi][:k]

    old_found, old_candidates = [], []
    for qi in range(len(allv)):
        cands = [lsh.search(old_q[qi], codes, tables, k + 1, min_candidates=100, max_substring_radius=4)[0]
                 for codes, tables in old]
        old_candidates.append(sum(len(c) for c in cands))
        old_found.append(ranked(qi, cands))
    budget = int(np.mean(old_candidates) * 0.75) // len(shards)  # a quarter fewer candidates per shard
    new_found = [ranked(qi, [lsh.hamming_top(new_q[qi], words, budget) for _, words in shards])
                 for qi in range(len(allv))]
    old_recall, new_recall = _recall(old_found, truth), _recall(new_found, truth)
    print(f"recall@10: gaussian+MIH {old_recall:.3f} at {np.mean(old_candidates):.0f} candidates, "
          f"ITQ scan {new_recall:.3f} at {budget * len(shards)}")
    assert new_recall >= old_recall


# -- Annoy builds ---------------------------------------------------------------------------------


def test_on_disk_annoy_build_matches_in_memory(published, tmp_path):
    """A tiny threshold forces the on-disk path; with one thread it writes the same index."""
    _, version_dir, _ = published
    idmap, vectors, _ = _shard(version_dir, 0)
    vectors = vectors.astype(np.float32)
    items = ShardItems(idmap.column("image_id").to_pylist(), idmap.column("uri").to_pylist(),
                       idmap.column("label").to_pylist(), idmap.column("sha256").to_pylist(), vectors)
    planes = lsh.hyperplanes(vectors.shape[1], 64, seed=5)
    infos = {}
    for name, threshold in (("disk", 1), ("ram", 1 << 40)):
        params = ShardParams(index_types=("annoy", "lsh"), type_params={"annoy": annoy_type.Params(8, threshold)},
                             settings=BuildSettings(seed=9, n_jobs=1, target_recall=0))
        infos[name] = build_shard(items, 0, str(tmp_path / name), planes, params)
    assert infos["disk"]["annoy"]["on_disk_build"] and not infos["ram"]["annoy"]["on_disk_build"]
    disk, ram = (tmp_path / n / layout.ANNOY_FILE for n in ("disk", "ram"))
    assert disk.read_bytes() == ram.read_bytes()
    annoy = AnnoyIndex(vectors.shape[1], layout.METRIC)
    annoy.load(str(disk))
    assert annoy.get_n_items() == len(vectors) and annoy.get_n_trees() == 8
    assert annoy.get_nns_by_item(5, 1) == [5]
    annoy.unload()
    on_disk = json.loads((tmp_path / "disk" / layout.SHARD_INFO).read_text())
    assert on_disk["files"] == infos["ram"]["files"] | {layout.ANNOY_FILE: on_disk["files"][layout.ANNOY_FILE]}


@pytest.mark.parametrize(("n", "dim", "trees"), [(2000, 64, 10), (3000, 128, 30)])
def test_annoy_size_estimate_is_close(tmp_path, n, dim, trees):
    vectors = np.random.default_rng(n).standard_normal((n, dim)).astype(np.float32)
    path = tmp_path / "a.ann"
    annoy_type.build_file(vectors, str(path), annoy_type.Params(trees=trees), seed=1234)
    estimate = annoy_type.bytes_estimate(n, dim, trees)
    assert 0.75 < estimate / path.stat().st_size < 1.25


def test_an_empty_shard_is_a_valid_shard(tmp_path):
    items = ShardItems([], [], [], [], np.zeros((0, 16), np.float32))
    info = build_shard(items, 3, str(tmp_path), lsh.hyperplanes(16, 64, 1), _trees(5))
    assert info["items"] == 0 and info["shard"] == 3
    assert np.load(tmp_path / layout.VECTORS_FILE).shape == (0, 16)
    assert pq.read_table(tmp_path / layout.IDMAP_FILE).num_rows == 0
    annoy = AnnoyIndex(16, layout.METRIC)
    annoy.load(str(tmp_path / layout.ANNOY_FILE))
    assert annoy.get_n_items() == 0


# -- digests --------------------------------------------------------------------------------------


def test_reader_refuses_a_version_whose_digests_do_not_match(published, tmp_path):
    out, version_dir, manifest = published
    copy = tmp_path / "index"
    shutil.copytree(out, copy)
    copy_version = copy / manifest.version
    verify_files(str(copy_version), manifest)  # intact copy passes
    target = copy_version / layout.shard_dir(1) / layout.VECTORS_FILE
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit, same size
    target.write_bytes(bytes(data))
    with pytest.raises(layout.IndexIntegrityError, match="vectors.f16.npy"):
        verify_files(str(copy_version), manifest)
    with pytest.raises(layout.IndexIntegrityError):
        Searcher(str(copy))
    # a truncated file is caught even by the size-only check
    target.write_bytes(bytes(data[:-10]))
    with pytest.raises(layout.IndexIntegrityError):
        Searcher(str(copy), verify=False)
    (copy_version / layout.MANIFEST).unlink()
    with pytest.raises(layout.IndexIntegrityError, match="not a complete index version"):
        resolve(str(copy))


def test_manifest_lists_every_file_it_publishes(published):
    _, version_dir, manifest = published
    on_disk = {
        str(p.relative_to(version_dir)) for p in version_dir.rglob("*") if p.is_file() and p.name != layout.MANIFEST
    }
    assert on_disk == set(manifest.files)
    assert manifest.sharding["key"] == "image_id"
    assert (manifest.dimension.input, manifest.dimension.output) == (256, 128)
    assert IndexManifest.from_dict(json.loads((version_dir / layout.MANIFEST).read_text())) == manifest


# -- publishing and garbage collection ------------------------------------------------------------


def test_cleanup_plan_keeps_newest_and_latest():
    now = layout.version_time("v20260101T120000-aaaaaa")
    complete = ["v20260101T000000-000001", "v20260101T010000-000002", "v20260101T020000-000003",
                "v20260101T030000-000004"]
    plan = layout.plan_cleanup(complete, [], [], latest="v20260101T030000-000004", keep=2, now=now,
                               stale_after=0)
    assert plan.versions == complete[:2]
    # LATEST rolled back to an old version: it stays even beyond the newest N
    plan = layout.plan_cleanup(complete, [], [], latest=complete[0], keep=1, now=now, stale_after=0)
    assert plan.versions == complete[1:3]
    with pytest.raises(ValueError):
        layout.plan_cleanup(complete, [], [], latest=complete[-1], keep=0, now=now, stale_after=0)


def test_cleanup_plan_spares_builds_that_may_still_run():
    latest = "v20260101T110000-000009"
    now = layout.version_time("v20260101T120000-aaaaaa")
    staging = ["v20260101T080000-00000a", "v20260101T115000-00000b", "v20260101T113000-00000c"]
    incomplete = ["v20260101T090000-00000d", "not-a-version", "v20260101T115900-00000e"]
    plan = layout.plan_cleanup([latest], incomplete, staging, latest=latest, keep=3, now=now, stale_after=3600)
    assert plan.staging == ["v20260101T080000-00000a"]  # older than an hour and than LATEST
    assert plan.incomplete == ["v20260101T090000-00000d"]  # foreign names are never touched
    assert plan.versions == []
    assert plan.all == ["v20260101T090000-00000d", "_staging/v20260101T080000-00000a"]


def test_config_is_checked_before_any_work(tmp_path):
    for bad in ({"dims": -1}, {"shards": 0}, {"index_types": ("annoy", "ivf")}, {"keep_versions": 0}):
        with pytest.raises(ValueError):
            index.run(index.IndexConfig(features=str(tmp_path), output=str(tmp_path / "o"), **bad))
    with pytest.raises(FileNotFoundError, match="not a finished extract output"):
        index.run(index.IndexConfig(features=str(tmp_path), output=str(tmp_path / "o")))
    assert not (tmp_path / "o").exists()
    for bad in ({"bits": 96}, {"projection": "random"}):
        with pytest.raises(ValueError, match="--lsh-"):
            lsh_type.Params(**bad)
    with pytest.raises(ValueError, match="--trees"):
        annoy_type.Params(trees=0)


def _staged_shard(staging, shard: int, attempt: str, planes, n: int = 30) -> str:
    folder = staging / "attempts" / f"shard-{shard:05d}-{attempt}"
    rows = _rows(n, dim=planes.shape[0], seed=shard)
    build_shard(ShardItems.from_rows(rows, planes.shape[0]), shard, str(folder), planes, _trees(2))
    return str(folder)


def test_publish_picks_a_complete_attempt_per_shard(tmp_path):
    """A retried or zombie shard build leaves several attempts: only a whole one is published."""
    staging = tmp_path / "_staging" / "v20260101T000000-abcdef"
    planes = lsh.hyperplanes(8, 64, seed=1)
    broken = _staged_shard(staging, 0, "aaaa", planes)
    with open(os.path.join(broken, layout.ANNOY_FILE), "ab") as f:
        f.write(b"x")  # an upload that does not match its SHARD.json
    whole = _staged_shard(staging, 0, "bbbb", planes)
    unfinished = _staged_shard(staging, 1, "cccc", planes)
    os.remove(os.path.join(unfinished, layout.SHARD_INFO))  # SHARD.json is uploaded last
    with pytest.raises(index.IndexBuildError, match="shard 1 has no complete build"):
        index.choose_attempts(str(staging), 2)
    finished = _staged_shard(staging, 1, "dddd", planes)
    chosen = index.choose_attempts(str(staging), 2)
    assert [folder for folder, _ in chosen] == [whole, finished]
    assert [info.shard for _, info in chosen] == [0, 1]


def _snapshot(version_dir) -> dict[str, bytes]:
    return {str(p.relative_to(version_dir)): p.read_bytes() for p in sorted(version_dir.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_interrupted_builds_leave_the_published_index_and_the_next_build_cleans_up(
    flowers_features, flowers_index, raw_features, tmp_path, monkeypatch
):
    """Crash a build in a shard worker, then kill one between moving files and the commit."""
    out = tmp_path / "index"
    shutil.copytree(flowers_index[0], out)  # a published index, as last night's build left it
    first = flowers_index[1]
    first_dir = out / first.version
    # publishing does not depend on the index types, their calibration or how LSH planes are fitted: the cheapest
    cfg = dict(features=str(flowers_features[0]), output=str(out), shards=2, dims=32,
               type_params={"annoy": annoy_type.Params(trees=5), "lsh": lsh_type.Params(64, "gaussian")},
               index_types=("annoy",), target_recall=0)
    before = _snapshot(first_dir)
    latest = (out / layout.POINTER).read_bytes()

    def still_published():
        assert (out / layout.POINTER).read_bytes() == latest
        assert _snapshot(first_dir) == before
        s = Searcher(str(out))  # verifies every digest
        assert s.manifest.version == first.version and s.size == first.items
        s.close()

    # 1. a shard build dies on its worker: the pipeline fails, nothing is published
    import transforms.index_build as index_build

    real_build = index_build.build_shard

    def failing_build(items, shard, *args, **kwargs):
        if shard == 1:
            raise OSError("simulated worker crash")
        return real_build(items, shard, *args, **kwargs)

    monkeypatch.setattr(index_build, "build_shard", failing_build)
    with pytest.raises(Exception, match="simulated worker crash"):
        index.run(index.IndexConfig(**cfg))
    monkeypatch.undo()
    still_published()
    leftovers = sorted(p.name for p in (out / layout.STAGING).iterdir())
    assert len(leftovers) == 1  # the dead build's staging folder stays until it is stale

    # 2. killed after moving files into the new version folder, before its manifest
    def killed(*args, **kwargs):
        raise KeyboardInterrupt("simulated kill before the commit")

    monkeypatch.setattr(protocol, "commit", killed)
    with pytest.raises(KeyboardInterrupt):
        index.run(index.IndexConfig(**cfg))
    monkeypatch.undo()
    still_published()
    half = [p.name for p in out.iterdir() if layout.is_version(p.name) and p.name != first.version]
    assert len(half) == 1 and not (out / half[0] / layout.MANIFEST).exists()
    assert (out / half[0] / layout.shard_dir(1) / layout.ANNOY_FILE).exists()
    with pytest.raises(layout.IndexIntegrityError, match="not a complete index version"):
        Searcher(str(out), version=half[0])

    # 3. the next build (keeping the input dimension) publishes over the leftovers and cleans up
    (out / "notes").mkdir()
    (out / "notes" / "keep.txt").write_text("not ours")
    third = index.run(index.IndexConfig(**cfg | {"dims": 0}, keep_versions=1, stale_after_seconds=0))
    assert json.loads((out / layout.POINTER).read_text()) == {"version": third.version}
    assert sorted(p.name for p in out.iterdir()) == sorted([layout.POINTER, third.version, "notes"])
    assert (out / "notes" / "keep.txt").read_text() == "not ours"
    assert (third.dimension.input, third.dimension.output) == (256, 256)
    assert third.transform.steps == ["l2"]
    s = Searcher(str(out))
    vectors = s.all_vectors()
    ids = [i for sh in s.shards for i in sh.image_ids]
    raw = np.stack([raw_features[i][3] for i in ids])
    expected = raw / np.linalg.norm(raw, axis=1, keepdims=True)
    assert np.all(np.abs(vectors - expected) <= FLOAT16_EPS * np.abs(expected) + 1e-6)
    s.close()
    assert os.listdir(out / third.version / layout.TRANSFORM_DIR)
