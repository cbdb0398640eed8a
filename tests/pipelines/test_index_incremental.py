"""``cbir index --incremental``: a night's changes applied to the published version, nothing lost.

The night is made from the real flowers features: some photos removed, some replaced by
other content under the same id, some new ones added. The updated version must hold exactly
the night's items, answer exact search as the kept transform says, never return a removed or
replaced item's old content, publish by the same protocol (a failure leaves ``LATEST``), and
refuse a base of another model.
"""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from artefacts import layout
from artefacts.manifests import ExtractCounts, PartFile, new_run_id
from index_builder.types import annoy as annoy_type
from pipelines import cli, index, neighbors
from pipelines.index.incremental import IncrementalRefusedError, run_incremental
from plumbing import publish
from search import index_files
from search.neighbors import NeighborOptions
from search.options import SearchOptions
from search.searcher import Searcher
from transforms.feature_sets import feature_files, read_features_manifest

REMOVED, CHANGED, ADDED = 20, 10, 30


def _night(features_dir, out, fingerprint: str | None = None):
    """The base features with REMOVED rows gone, CHANGED rows given other content, ADDED new rows."""
    manifest = read_features_manifest(str(features_dir))
    table = pa.concat_tables([pq.read_table(p) for p in feature_files(str(features_dir), manifest)])
    table = table.sort_by("image_id")
    ids = table.column("image_id").to_pylist()
    removed, changed = ids[:REMOVED], ids[REMOVED:REMOVED + CHANGED]
    rows = table.slice(REMOVED).to_pylist()
    donors = table.slice(len(ids) - CHANGED - ADDED).to_pylist()
    rng = np.random.default_rng(3)
    for row, donor in zip(rows[:CHANGED], donors, strict=False):  # same id, another photo's content
        row["sha256"], row["feature"] = donor["sha256"][::-1], donor["feature"]
    for j, donor in enumerate(donors[CHANGED:CHANGED + ADDED]):
        noisy = np.asarray(donor["feature"], np.float32) * (1 + 0.05 * rng.standard_normal(len(donor["feature"])))
        rows.append({**donor, "image_id": f"zz-new/{j:03d}.jpg", "uri": f"new/{j:03d}.jpg", "sha256": f"{j:064x}",
                     "feature": noisy.tolist()})
    (out / "features").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), out / "features" / "part-night-00000.parquet")
    n = len(rows)
    night = dataclasses.replace(manifest, run_id=new_run_id(), counts=ExtractCounts(read=n, ok=n, failed=0, inputs=n),
                                files={"features": [PartFile("features/part-night-00000.parquet", n)],
                                       "failures": []}, model_fingerprint=fingerprint or manifest.model_fingerprint)
    publish.write_manifest(str(out / "MANIFEST.json"), night)
    return removed, changed, {r["image_id"]: np.asarray(r["feature"], np.float32) for r in rows}


@pytest.fixture(scope="module")
def updated(tmp_path_factory, flowers_features, flowers_index):
    root = tmp_path_factory.mktemp("incremental")
    out = root / "index"
    shutil.copytree(flowers_index[0], out)  # last night's published index
    removed, changed, final = _night(flowers_features[0], root / "night")
    cfg = index.IndexConfig(features=str(root / "night"), output=str(out), dims=128,
                            type_params={"annoy": annoy_type.Params(trees=20)})
    manifest = run_incremental(cfg, index.run)
    return out, manifest, flowers_index[1], removed, changed, final


def test_the_update_holds_the_nights_items_with_accounting_that_adds_up(updated):
    out, manifest, base, removed, changed, final = updated
    assert json.loads((out / layout.POINTER).read_text())["version"] == manifest.version != base.version
    record = manifest.extra["incremental"]
    assert record["decision"] == "incremental" and record["base"] == base.version
    assert (record["added"], record["removed"], record["changed"]) == (ADDED + CHANGED, REMOVED + CHANGED, CHANGED)
    assert manifest.items == base.items - REMOVED + ADDED == len(final)
    assert manifest.shards == base.shards and manifest.index_types == base.index_types
    with Searcher(str(out)) as s:  # every file checked against the manifest's digests
        assert sorted(s.image_ids) == sorted(final)


def test_exact_search_answers_as_the_kept_transform_says(updated):
    out, manifest, _, _, _, final = updated
    transform = index_files.load_transform(str(out / manifest.version), manifest)
    names = sorted(final)
    vectors = transform(np.stack([final[i] for i in names])).astype(np.float16).astype(np.float32)
    with Searcher(str(out)) as s:
        queries = vectors[::25]
        ids, scores = s.search_arrays(queries, k=10, method="exact")
        want = np.sort(queries @ vectors.T, axis=1)[:, ::-1][:, :10]
        assert np.allclose(scores, want, atol=2e-3)  # the same neighbours' cosines, ties of twins aside


@pytest.mark.parametrize("method", ["hnsw", "annoy", "lsh", "exact"])
def test_removed_and_replaced_content_never_comes_back(updated, method):
    out, manifest, _, removed, changed, final = updated
    with Searcher(str(out)) as s:
        found = {s.image_ids[g] for row in s.search_arrays(np.stack([s.vector(*s.locate(g)) for g in
                                                                     range(0, s.size, 7)]), k=20, method=method)[0]
                 for g in row if g >= 0}
        assert not found & set(removed)
        for image_id in changed:  # the id is back, with its new vector only
            g = s.find(image_id)
            assert np.allclose(s.vectors_of(np.asarray([g]))[0], s.vector(*s.locate(g)))


def test_a_failed_update_leaves_latest_and_can_be_run_again(tmp_path, flowers_features, flowers_index, monkeypatch):
    out = tmp_path / "index"
    shutil.copytree(flowers_index[0], out)
    _night(flowers_features[0], tmp_path / "night")
    latest = (out / layout.POINTER).read_bytes()
    cfg = index.IndexConfig(features=str(tmp_path / "night"), output=str(out), dims=128)
    import pipelines.index.incremental as incremental

    def crash(*args, **kwargs):
        raise OSError("worker lost mid-update")

    monkeypatch.setattr(incremental, "update_shard", crash)
    with pytest.raises(OSError, match="worker lost"):
        run_incremental(cfg, index.run)
    assert (out / layout.POINTER).read_bytes() == latest
    monkeypatch.undo()
    manifest = run_incremental(cfg, index.run)  # the lease knew its holder: no wait for the next night
    assert manifest.items == flowers_index[1].items - REMOVED + ADDED


def test_a_base_of_another_model_is_refused_with_the_fix(tmp_path, flowers_features, flowers_index, capsys):
    out = tmp_path / "index"
    shutil.copytree(flowers_index[0], out)
    _night(flowers_features[0], tmp_path / "night", fingerprint="0" * 64)
    cfg = index.IndexConfig(features=str(tmp_path / "night"), output=str(out), dims=128)
    with pytest.raises(IncrementalRefusedError, match="--full"):
        run_incremental(cfg, index.run)
    code = cli.main(["index", "--features", str(tmp_path / "night"), "--output", str(out), "--incremental"])
    assert code == 2 and "cbir index --full" in capsys.readouterr().err


def test_a_night_the_fit_no_longer_describes_is_built_in_full_and_says_why(tmp_path, flowers_features,
                                                                           flowers_index, monkeypatch):
    out = tmp_path / "index"
    shutil.copytree(flowers_index[0], out)
    _night(flowers_features[0], tmp_path / "night")
    import pipelines.index.incremental as incremental

    monkeypatch.setattr(incremental, "FIT_TOLERANCE", 10.0)  # no night can keep ten times the unchanged energy
    cfg = index.IndexConfig(features=str(tmp_path / "night"), output=str(out), dims=128)
    manifest = run_incremental(cfg, index.run)
    record = manifest.extra["incremental"]
    assert record["decision"] == "full" and "energy" in record["reason"]
    assert set(record["energy_kept"]) == {"new", "unchanged"} and 0 < record["energy_kept"]["new"] <= 1
    assert manifest.items == flowers_index[1].items - REMOVED + ADDED and manifest.shards == flowers_index[1].shards


def test_an_incremental_table_equals_a_full_one_and_copies_what_cannot_change(tmp_path, flowers_features,
                                                                             flowers_index):
    out = tmp_path / "index"
    shutil.copytree(flowers_index[0], out)
    exact = NeighborOptions(search=SearchOptions(k=5, method="exact", batch_size=64))
    table = tmp_path / "table"
    neighbors.run(neighbors.NeighborsConfig(index=str(out), output=str(table), options=exact))  # last night's
    removed, changed, final = _night(flowers_features[0], tmp_path / "night")
    run_incremental(index.IndexConfig(features=str(tmp_path / "night"), output=str(out), dims=128), index.run)
    m = neighbors.run(neighbors.NeighborsConfig(index=str(out), output=str(table), options=exact, incremental=True))
    full = tmp_path / "full"
    neighbors.run(neighbors.NeighborsConfig(index=str(out), output=str(full), options=exact))
    record = m.extra["incremental"]
    assert record["decision"] == "incremental" and 0 < record["rows_computed"] < len(final)
    assert record["rows_copied"] + record["rows_computed"] == m.counts.rows == len(final)
    got = {r["image_id"]: r for r in neighbors.read_neighbors(str(table)).to_pylist()}
    want = {r["image_id"]: r for r in neighbors.read_neighbors(str(full)).to_pylist()}
    assert got.keys() == want.keys() == final.keys()
    for image_id, row in want.items():  # exact search: the same cosines (twins may swap places at a tie)
        assert np.allclose(got[image_id]["scores"], row["scores"], atol=1e-4), image_id
    assert not {n for r in got.values() for n in r["neighbor_ids"]} & set(removed)
    # a second run with nothing new to apply computes every row and says why
    again = neighbors.run(neighbors.NeighborsConfig(index=str(out), output=str(table), options=exact,
                                                    incremental=True))
    assert again.extra["incremental"]["decision"] == "full" and again.counts.rows == len(final)
