"""SHARD.json as a typed record: what the builder writes reads back and re-writes to the same text; old builds read."""

from __future__ import annotations

import json

import numpy as np
import pytest

from artefacts import layout
from artefacts.manifests import FileDigest, ManifestError, ShardAnnoy, ShardHnsw, ShardRecord
from index_builder import lsh
from index_builder.shard import ShardItems, ShardParams, build_shard
from index_builder.types import annoy as annoy_type
from index_builder.types.base import BuildSettings

# SHARD.json as builds before index types, HNSW, calibration and local features wrote it.
OLD_BUILD = {
    "shard": 1, "items": 40, "dimension": 64, "duplicates_dropped": 2,
    "annoy": {"trees": 50, "on_disk_build": False, "estimated_bytes": 123456},
    "lsh_bits": 128,
    "files": {"annoy.ann": {"sha256": "ab" * 32, "bytes": 1000},
              "vectors.f16.npy": {"sha256": "cd" * 32, "bytes": 5248}},
    "seconds": {"annoy": 0.5, "lsh": 0.25, "total": 1.0},
}


def _shard(tmp_path, params: ShardParams) -> tuple[str, dict]:
    """Builds a small real shard; returns the SHARD.json text and what the builder returned."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((400, 16)).astype(np.float32)
    vectors = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16).astype(np.float32)
    ids = [f"i{j:04d}" for j in range(len(vectors))]
    items = ShardItems(ids, ids, [None] * len(ids), [""] * len(ids), vectors, duplicates_dropped=3)
    planes, offsets = lsh.fit_projection(vectors, 64, seed=1)
    info = build_shard(items, 2, str(tmp_path), planes, params, non_finite_skipped=1, offsets=offsets)
    return (tmp_path / layout.SHARD_INFO).read_text(), info


@pytest.mark.parametrize("params", [
    ShardParams(type_params={"annoy": annoy_type.Params(trees=4)},
                settings=BuildSettings(n_jobs=1, calibration_queries=30)),  # every index type, calibrated
    ShardParams(vectors_only=True),  # the first pass of a --dba build: no index types, no calibration
], ids=["all-types", "vectors-only"])
def test_what_the_builder_writes_reads_back_and_rewrites_to_the_same_text(tmp_path, params):
    text, info = _shard(tmp_path, params)
    record = ShardRecord.from_dict(json.loads(text))
    assert record.to_json_text() == text
    assert record.to_dict() == info
    assert ShardRecord.from_dict(record.to_dict()) == record
    assert record.shard == 2 and record.items == 400 and record.accounted == 404
    assert set(record.files) == set(info["files"])
    assert all(isinstance(d, FileDigest) for d in record.files.values())
    if params.vectors_only:
        assert record.index_types == [] and record.annoy is None and record.hnsw is None
        assert record.calibration is None and record.calibrated("hnsw") is None and not record.on_disk_build
    else:
        assert record.annoy == ShardAnnoy(4, False, info["annoy"]["estimated_bytes"])
        assert record.hnsw == ShardHnsw(params.params_of("hnsw").m, params.params_of("hnsw").ef_construction)
        assert record.calibrated("hnsw")["ef_search"] == info["calibration"]["hnsw"]["ef_search"]


def test_an_old_build_reads_with_one_default_each():
    record = ShardRecord.from_dict(json.loads(json.dumps(OLD_BUILD)), source="old/SHARD.json")
    assert record.non_finite_skipped == 0 and record.accounted == 42
    assert record.index_types == ["annoy", "lsh"]  # what every build before the choice built
    assert record.hnsw is None and record.calibration is None and record.local_features is None
    assert record.calibrated("annoy") is None
    assert record.files["annoy.ann"] == FileDigest("ab" * 32, 1000)
    again = record.to_dict()
    assert {k: again[k] for k in OLD_BUILD} == OLD_BUILD  # what it had is written back unchanged
    # the walking skeleton's SHARD.json: only the fields every build has written
    skeleton = {k: OLD_BUILD[k] for k in ("shard", "items", "dimension", "files", "seconds")}
    assert ShardRecord.from_dict(skeleton).lsh_bits is None


def test_unknown_keys_survive_a_read_and_a_write():
    future = {**OLD_BUILD, "a_field_of_the_future": {"kept": True},
              "annoy": {**OLD_BUILD["annoy"], "leaf_size": 16}, "hnsw": {"m": 32, "ef_construction": 40, "sq": "fp16"}}
    again = ShardRecord.from_dict(future).to_dict()
    assert again["a_field_of_the_future"] == {"kept": True}
    assert again["annoy"]["leaf_size"] == 16 and again["hnsw"]["sq"] == "fp16"


def test_structure_errors_name_the_field():
    with pytest.raises(ManifestError, match=r"x\.items: expected an integer"):
        ShardRecord.from_dict({**OLD_BUILD, "items": "forty"}, source="x")
    with pytest.raises(ManifestError, match=r"x\.files\.annoy\.ann lacks 'bytes'"):
        ShardRecord.from_dict({**OLD_BUILD, "files": {"annoy.ann": {"sha256": "ab"}}}, source="x")
    with pytest.raises(ManifestError, match="x lacks 'files'"):
        ShardRecord.from_dict({k: v for k, v in OLD_BUILD.items() if k != "files"}, source="x")
    with pytest.raises(ManifestError, match="not a JSON object"):
        ShardRecord.from_dict([OLD_BUILD], source="x")
