"""cbir neighbors: every item's top-k, never itself, exact duplicates marked; empty shards searched."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest

from artefacts import layout
from index_builder.types import annoy as annoy_type
from pipelines import cli
from pipelines.neighbors import NeighborsConfig, read_neighbors, run
from search.neighbors import SCHEMA, NeighborOptions, chunks
from search.options import Rerank, SearchOptions
from search.searcher import Searcher

PHOTOS = {"0": (1, 2, 3, 4), "2": (161, 162, 163, 164), "5": (401, 402, 403, 404), "7": (561, 562, 563, 564)}
ORIGINAL, COPY = "2/image_0162.jpg", "2/copy_of_0162.jpg"


def _image_ids() -> list[str]:
    ids = [f"{label}/image_{n:04d}.jpg" for label, nums in PHOTOS.items() for n in nums]
    return sorted(ids + [COPY])


def _shards_with_an_empty_one(ids: list[str]) -> int:
    """The smallest shard count ≥ 4 under which some shard of this corpus gets no item."""
    for shards in range(4, 64):
        if len({layout.stable_shard(i, shards) for i in ids}) < shards:
            return shards
    raise AssertionError("no shard count leaves a shard empty")


@pytest.fixture(scope="module")
def small_index(tmp_path_factory, flowers, mobilenet_spec):
    """17 real photos in 4 labels, one of them also stored byte for byte under another name."""
    from pipelines import extract, index

    root = tmp_path_factory.mktemp("dup_corpus")
    corpus = root / "corpus"
    for label, nums in PHOTOS.items():
        (corpus / label).mkdir(parents=True)
        for n in nums:
            shutil.copyfile(flowers / label / f"image_{n:04d}.jpg", corpus / label / f"image_{n:04d}.jpg")
    shutil.copyfile(corpus / ORIGINAL, corpus / COPY)
    extract.run(extract.ExtractConfig(input=str(corpus), output=str(root / "features"), model=mobilenet_spec))
    shards = _shards_with_an_empty_one(_image_ids())
    manifest = index.run(index.IndexConfig(features=str(root / "features"), output=str(root / "index"),
                                           shards=shards, dims=8, type_params={"annoy": annoy_type.Params(trees=5)}))
    return root, manifest


def test_neighbor_table_never_holds_the_item_and_marks_duplicates(small_index, tmp_path, capsys):
    root, index_manifest = small_index
    out = tmp_path / "neighbors"
    opts = NeighborOptions(SearchOptions(k=5, method="hnsw", batch_size=256, rerank=Rerank(exact=True)))
    m = run(NeighborsConfig(index=str(root / "index"), output=str(out), options=opts, chunk_size=3))
    table = read_neighbors(str(out))
    assert table.schema.equals(SCHEMA)
    rows = {r["image_id"]: r for r in table.to_pylist()}
    assert sorted(rows) == _image_ids() and table.num_rows == 17
    for image_id, r in rows.items():
        assert image_id not in r["neighbor_ids"]
        assert len(r["neighbor_ids"]) == len(r["scores"]) == len(r["duplicate"]) == 5
        assert len(set(r["neighbor_ids"])) == 5
        assert r["scores"] == sorted(r["scores"], reverse=True)
    # the byte-identical pair: each is the other's nearest neighbour, flagged, and listed
    for a, b in ((ORIGINAL, COPY), (COPY, ORIGINAL)):
        assert rows[a]["neighbor_ids"][0] == b and rows[a]["duplicate"][0] is True
        assert rows[a]["scores"][0] == pytest.approx(1.0, abs=1e-3)
        assert rows[a]["duplicate_ids"] == [b] and rows[a]["duplicate_count"] == 1
        assert rows[a]["duplicate"][1:] == [False] * 4
    for image_id, r in rows.items():
        if image_id not in (ORIGINAL, COPY):
            assert not any(r["duplicate"]) and r["duplicate_ids"] == [] and r["duplicate_count"] == 0
    digests = {}
    for s in range(index_manifest.shards):
        idmap = pq.read_table(root / "index" / index_manifest.version / layout.shard_dir(s) / layout.IDMAP_FILE)
        digests.update(zip(idmap.column("image_id").to_pylist(), idmap.column("sha256").to_pylist(), strict=True))
    assert digests[ORIGINAL] == digests[COPY] == hashlib.sha256((root / "corpus" / COPY).read_bytes()).hexdigest()
    # the manifest is the commit record
    assert m.KIND == "neighbors" and (m.counts.rows, m.counts.rows_with_duplicates) == (17, 2)
    assert m.index.version == index_manifest.version and m.options["k"] == 5
    assert json.loads((out / "MANIFEST.json").read_text()) == m.to_dict()
    assert sum(f.rows for f in m.files) == 17
    first_parts = sorted(p.name for p in (out / "neighbors").iterdir())

    # a second run, from the command line with a Beam option passed through, with k beyond the corpus:
    # every other item, still never itself; the first run's parts are replaced
    assert cli.main(["neighbors", "--index", str(root / "index"), "--output", str(out), "-k", "50",
                     "--method", "exact", "--no-rerank", "--chunk-size", "100", "--direct_num_workers", "1"]) == 0
    assert "neighbors: 17 rows (k=50, exact)" in capsys.readouterr().out
    m2 = json.loads((out / "MANIFEST.json").read_text())
    assert m2["options"]["k"] == 50 and m2["run_id"] != m.run_id
    table = read_neighbors(str(out))
    assert table.num_rows == 17
    for r in table.to_pylist():
        assert sorted(r["neighbor_ids"] + [r["image_id"]]) == _image_ids()
    parts = sorted(p.name for p in (out / "neighbors").iterdir())
    assert parts == sorted(f["path"].split("/")[-1] for f in m2["files"])
    assert not set(parts) & set(first_parts)
    assert not (out / "_staging").exists()


def test_empty_shards_are_searched_around(small_index):
    root, manifest = small_index
    assert 0 in manifest.items_per_shard
    with Searcher(str(root / "index")) as s:
        assert any(sh.size == 0 for sh in s.shards) and s.size == 17
        vectors = s.all_vectors()
        sims = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)) @ vectors.T
        np.fill_diagonal(sims, -np.inf)
        for method in ("exact", "annoy", "lsh", "both"):
            ids, scores = s.search_arrays(vectors, k=16, method=method, rerank=True, search_k=1 << 16,
                                          exclude=np.arange(17))
            assert not np.any(ids == np.arange(17)[:, None])
            if method != "lsh":  # LSH may find fewer than 16 candidates within its radius
                assert np.all(np.sort(ids, axis=1) == np.asarray([[j for j in range(17) if j != i]
                                                                   for i in range(17)]))
                np.testing.assert_allclose(scores, -np.sort(-sims, axis=1)[:, :16], atol=1e-5)


def test_chunks_cover_every_item_once():
    work = chunks([5, 0, 7], 3)
    assert work == [(0, 0, 3), (0, 3, 5), (2, 0, 3), (2, 3, 6), (2, 6, 7)]
    with pytest.raises(ValueError):
        chunks([5], 0)


def test_bad_requests_are_refused(small_index, tmp_path):
    root, _ = small_index
    with pytest.raises(ValueError, match="index folder"):
        run(NeighborsConfig(index=str(root / "index"), output=str(root / "index")))
    with pytest.raises(FileNotFoundError, match="LATEST"):
        run(NeighborsConfig(index=str(tmp_path), output=str(tmp_path / "out")))
    with pytest.raises(FileNotFoundError, match="v-none does not exist"):
        run(NeighborsConfig(index=str(root / "index"), output=str(tmp_path / "out"), version="v-none"))
    with pytest.raises(ValueError, match="k must be at least 1"):
        run(NeighborsConfig(index=str(root / "index"), output=str(tmp_path / "out"),
                            options=NeighborOptions(SearchOptions(k=0))))
    assert not (tmp_path / "out").exists()
    args = cli.build_parser().parse_args(["neighbors", "--index", "i", "--output", "o", "-k", "3", "--no-rerank"])
    assert args.beam and args.k == 3 and not args.rerank
