"""Typed manifests: one reader and one writer per kind, old manifests still read, wrong ones refused."""

from __future__ import annotations

import json

import pytest

from artefacts.manifests import (
    ExtractCounts,
    FeaturesManifest,
    IndexManifest,
    ManifestError,
    NeighborsManifest,
    PartFile,
    new_run_id,
)

# A features manifest as the first release wrote it: no accounting, no counts.inputs, no precision.
OLD_FEATURES = {
    "kind": "features", "format_version": 1, "run_id": "20261126T000000-abcdef", "created_utc": "2026-11-26T00:00:00Z",
    "model": {"preset": "mobilenet_v1_025", "weights": "pretrained"}, "model_fingerprint": "0123456789abcdef",
    "input_size": 224, "preprocessing": "tf", "dimension": 256, "feature_dtype": "float32",
    "counts": {"read": 3, "ok": 2, "failed": 1}, "failures_by_reason": {"decode:ImageDecodeError": 1},
    "elapsed_seconds": 1.5, "images_per_second": 2.0, "metrics": {}, "options": {},
    "files": {"features": [{"path": "features/part-x-00000-of-00001.parquet", "rows": 2}],
              "failures": [{"path": "failures/part-x-00000-of-00001.parquet", "rows": 1}]},
    "a_field_of_the_future": {"kept": True},
}


def test_old_features_manifest_reads_with_one_default_each():
    m = FeaturesManifest.from_dict(json.loads(json.dumps(OLD_FEATURES)), source="old/MANIFEST.json")
    assert m.counts == ExtractCounts(read=3, ok=2, failed=1, inputs=None)
    assert m.precision == "float32" and m.accounting is None and m.reduced_decode is True
    assert m.parts() == [PartFile("features/part-x-00000-of-00001.parquet", 2)]
    again = m.to_dict()
    assert again["a_field_of_the_future"] == {"kept": True}  # unknown keys survive a read and a write
    assert FeaturesManifest.from_dict(again) == m


def test_kind_and_format_version_are_checked_first():
    with pytest.raises(ManifestError, match="is a 'features' manifest, not 'index'"):
        IndexManifest.from_dict(OLD_FEATURES, source="x")
    with pytest.raises(ManifestError, match="format 7.*run cbir extract again"):
        FeaturesManifest.from_dict({**OLD_FEATURES, "format_version": 7}, source="x")
    with pytest.raises(ManifestError, match="not a JSON object"):
        NeighborsManifest.from_dict([1, 2], source="x")


def test_structure_errors_name_the_field():
    broken = json.loads(json.dumps(OLD_FEATURES))
    broken["counts"]["ok"] = "two"
    with pytest.raises(ManifestError, match=r"x\.counts\.ok: expected an integer"):
        FeaturesManifest.from_dict(broken, source="x")
    del broken["counts"]
    with pytest.raises(ManifestError, match="lacks 'counts'"):
        FeaturesManifest.from_dict(broken, source="x")


def test_run_ids_sort_by_time_and_do_not_collide():
    a, b = new_run_id(1_000_000_000), new_run_id(1_000_000_001)
    assert a < b and a.startswith("20010909T014640-")
    assert len({new_run_id(0) for _ in range(200)}) == 200
