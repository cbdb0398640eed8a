"""Nothing lost: a job whose counts do not add up refuses to publish, and the previous output stands.

Each test injects a step that silently loses elements (as Beam 2.77's multi-threaded
DirectRunner did at 100k inputs) into the real pipeline, and checks the refusal: a
non-zero exit with the numbers, the previous manifest and files byte-identical, no
staging left behind.
"""

from __future__ import annotations

import json
import shutil
import zlib

import pyarrow as pa
import pytest

from artefacts import layout
from index_builder.shard import ShardItems
from index_builder.types import annoy as annoy_type
from index_builder.types import lsh as lsh_type
from pipelines import cli, extract, index, neighbors
from plumbing import publish
from transforms.decode import DecodeFn
from transforms.readers import InputSpec, ListedFile
from transforms.readers.accounting import TALLIES_DIR, count_inputs


def _snapshot(root) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _lossy(image_id: str) -> bool:
    return zlib.crc32(image_id.encode()) % 9 == 0


def test_extract_that_loses_images_is_refused_and_the_previous_output_stays(tmp_path, flowers, weights_dir,
                                                                            monkeypatch, capsys):
    photos, out = tmp_path / "photos", tmp_path / "features"
    photos.mkdir()
    for p in sorted((flowers / "1").glob("*.jpg"))[::4]:  # 20 photos, 4 of them lost below
        shutil.copy(p, photos / p.name)
    argv = ["extract", "--input", str(photos), "--output", str(out), "--model", "mobilenet_v1_025"]
    assert cli.main(argv) == 0
    before = _snapshot(out)
    n = len(list(photos.iterdir()))
    lost = sum(_lossy(p.name) for p in photos.iterdir())  # ids are relative to the input root
    assert n == 20 and 0 < lost < n

    real_emit = DecodeFn.emit

    def dropping_emit(self, record, result):  # a step that loses elements without a word
        if _lossy(record.image_id):
            return iter(())
        return real_emit(self, record, result)

    monkeypatch.setattr(DecodeFn, "emit", dropping_emit)
    capsys.readouterr()
    assert cli.main(argv) == cli.EXIT_REFUSED
    err = capsys.readouterr().err
    assert "counts disagree" in err and f"inputs {n}" in err and f"rows written {n - lost}" in err
    assert "Nothing was published" in err
    assert _snapshot(out) == before  # manifest, parts: byte for byte
    assert not (out / publish.STAGING).exists()
    with pytest.raises(publish.PublishRefusedError) as info:
        extract.run(extract.ExtractConfig(input=str(photos), output=str(out),
                                          model=extract.ModelSpec("mobilenet_v1_025", weights_dir=weights_dir)))
    assert info.value.counts["inputs"] == n and info.value.counts["rows written"] == n - lost
    assert _snapshot(out) == before


def test_a_shard_without_its_tally_refuses_the_run(tmp_path):
    staging = tmp_path / "staging"
    (staging / TALLIES_DIR).mkdir(parents=True)
    (staging / TALLIES_DIR / "part-00000-of-00001.jsonl").write_text(
        json.dumps({"unit": "/d/a.tfrecord", "entries": 5}) + "\n")
    spec = InputSpec("tfrecord", "/d/*", "/d")
    listed = [ListedFile("/d/a.tfrecord", 10), ListedFile("/d/b.tfrecord", 10)]
    with pytest.raises(publish.PublishRefusedError, match="no single tally for 1 shard"):
        count_inputs(spec, listed, str(staging))
    total, accounting = count_inputs(spec, listed[:1], str(staging))
    assert total == 5 and accounting.source == "tallies" and accounting.units == 1


def test_index_build_that_loses_items_is_refused(flowers_features, flowers_index, tmp_path, monkeypatch):
    out = tmp_path / "index"
    shutil.copytree(flowers_index[0], out)  # a published index of these features, built once per session
    first = flowers_index[1]
    # the accounting does not depend on the index types, their calibration or how LSH planes are fitted: the cheapest
    cfg = index.IndexConfig(features=str(flowers_features[0]), output=str(out), shards=2, dims=16,
                            type_params={"annoy": annoy_type.Params(trees=5),
                                         "lsh": lsh_type.Params(projection="gaussian")},
                            index_types=("annoy",), target_recall=0)
    before = _snapshot(out)
    real = ShardItems.from_batches.__func__

    def dropping(cls, batches, dim):  # a shard build that loses items without a word
        kept = (b.filter(pa.array([not _lossy(i) for i in b.column("image_id").to_pylist()])) for b in batches)
        return real(cls, kept, dim)

    monkeypatch.setattr(ShardItems, "from_batches", classmethod(dropping))
    with pytest.raises(publish.PublishRefusedError) as info:
        index.run(cfg)
    counts = info.value.counts
    assert counts["feature rows"] == 720 and counts["items + duplicates + non-finite in the shards"] < 720
    assert _snapshot(out) == before
    assert json.loads((out / layout.POINTER).read_text()) == {"version": first.version}
    assert not (out / layout.STAGING).exists()


def test_neighbour_table_that_loses_rows_is_refused(flowers_index, tmp_path, monkeypatch):
    out = tmp_path / "neighbors"
    cfg = neighbors.NeighborsConfig(index=str(flowers_index[0]), output=str(out), chunk_size=200)
    first = neighbors.run(cfg)
    assert first.counts.rows == 720
    before = _snapshot(out)
    real = neighbors.neighbor_table

    def dropping(searcher, gids, opts, dups):
        table = real(searcher, gids, opts, dups)
        return table.slice(1) if table.num_rows > 1 else table

    monkeypatch.setattr(neighbors, "neighbor_table", dropping)
    with pytest.raises(publish.PublishRefusedError) as info:
        neighbors.run(cfg)
    assert info.value.counts["indexed items"] == 720 and info.value.counts["rows written"] < 720
    assert _snapshot(out) == before
    assert not (out / publish.STAGING).exists()
