"""The extract job on the DirectRunner with real photos."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from models.backbone.imaging import decode_and_resize
from models.backbone.network import Backbone
from pipelines import extract


def _read_features(out) -> pa.Table:
    return pa.concat_tables([pq.read_table(p) for p in sorted((out / "features").glob("part-*.parquet"))])


def test_schema_and_manifest_follow_design(flowers_features):
    out, manifest = flowers_features
    table = _read_features(out)
    schema = table.schema
    assert schema.field("image_id").type == pa.string()
    assert schema.field("uri").type == pa.string()
    assert schema.field("sha256").type == pa.string()
    assert schema.field("width").type == pa.int32() and schema.field("height").type == pa.int32()
    assert schema.field("label").type == pa.string() and schema.field("label").nullable
    assert schema.field("feature").type == pa.list_(pa.float32(), 256)
    assert table.num_rows == 720
    on_disk = json.loads((out / "MANIFEST.json").read_text())
    assert on_disk["counts"] == {"inputs": 720, "read": 720, "ok": 720, "failed": 0}
    assert on_disk["dimension"] == 256 and on_disk["input_size"] == 224
    assert on_disk["runtime"] == "graph"  # the library default; the CLI's --runtime auto picks per device
    assert on_disk["model"]["weights_sha256"].startswith("dbdb03ee")
    assert on_disk["model_fingerprint"] == manifest.model_fingerprint
    assert set(table.column("label").to_pylist()) == {str(i) for i in range(9)}
    ids = table.column("image_id").to_pylist()
    assert len(set(ids)) == 720 and "0/image_0001.jpg" in ids
    failures = pq.read_table(next((out / "failures").glob("part-*.parquet")))
    assert failures.schema.names == ["image_id", "uri", "stage", "error", "message", "unit"]


def test_features_equal_backbone_on_same_pixels(flowers_features, flowers, mobilenet_spec):
    out, _ = flowers_features
    table = _read_features(out)
    ids = table.column("image_id").to_pylist()
    picked = [ids.index(i) for i in sorted(ids)[::90]]
    backbone = Backbone(mobilenet_spec)
    pixels = np.stack(
        [decode_and_resize((flowers / ids[i]).read_bytes(), backbone.size).pixels for i in picked]
    )
    direct = backbone.predict(pixels)
    stored = np.stack([np.asarray(table.column("feature")[i].as_py(), np.float32) for i in picked])
    assert np.max(np.abs(direct - stored)) < 1e-4


def test_rerun_replaces_output_without_duplicates(tmp_path, flowers, mobilenet_spec):
    pattern = flowers / "1" / "image_008*.jpg"  # the rerun protocol, not the photo count, is under test
    cfg = extract.ExtractConfig(input=str(pattern), output=str(tmp_path), model=mobilenet_spec)
    first = extract.run(cfg)
    second = extract.run(cfg)
    assert first.run_id != second.run_id
    parts = sorted(p.name for p in (tmp_path / "features").glob("part-*.parquet"))
    assert parts == [f.path.split("/")[-1] for f in second.files["features"]]
    photos = len(list(flowers.glob("1/image_008*.jpg")))
    assert photos >= 5 and first.counts.ok == second.counts.ok == photos
    assert _read_features(tmp_path).num_rows == photos
    assert not list((tmp_path / "_staging").glob("*"))
