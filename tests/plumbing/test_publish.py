"""The one publish protocol: refuse before moving, commit by manifest, delete only stale parts."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from artefacts.manifests import ExtractCounts, FeaturesManifest, utc_now
from plumbing import publish


def _part(path, rows: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"x": list(range(rows))}), path)


def _manifest(run_id: str, files) -> FeaturesManifest:
    return FeaturesManifest(run_id=run_id, created_utc=utc_now(), model={}, model_fingerprint="f", dimension=1,
                            counts=ExtractCounts(read=0, ok=0, failed=0), files=files)


def _publish(out, run_id: str, rows: list[int]) -> FeaturesManifest:
    staging = publish.staging_dir(str(out), run_id)
    for i, n in enumerate(rows):
        _part(out / publish.STAGING / run_id / "features" / f"part-{i:05d}-of-{len(rows):05d}.parquet", n)
    staged = publish.count_staged(staging, ["features"], run_id)
    manifest = _manifest(run_id, {"features": [p for _, p in staged["features"]]})
    keep = [p.path for p in manifest.files["features"]]
    publish.commit(str(out), manifest, publish.part_moves(str(out), staged), staging,
                   stale=publish.stale_parts(str(out), ["features"], keep))
    return manifest


def test_a_second_run_replaces_the_first_and_cleans_up(tmp_path):
    out = tmp_path / "out"
    first = _publish(out, "r1", [3, 4])
    assert sorted(p.name for p in (out / "features").iterdir()) == ["part-r1-00000-of-00002.parquet",
                                                                     "part-r1-00001-of-00002.parquet"]
    second = _publish(out, "r2", [5])
    assert [p.rows for p in second.files["features"]] == [5] and first.run_id == "r1"
    assert sorted(p.name for p in (out / "features").iterdir()) == ["part-r2-00000-of-00001.parquet"]
    assert publish.read_manifest(str(out / publish.MANIFEST), FeaturesManifest) == second
    assert not (out / publish.STAGING).exists()  # the staging root goes once empty


def test_staging_of_another_run_is_left_alone(tmp_path):
    out = tmp_path / "out"
    _part(out / publish.STAGING / "other" / "features" / "part-00000-of-00001.parquet", 1)
    _publish(out, "r1", [2])
    assert (out / publish.STAGING / "other" / "features" / "part-00000-of-00001.parquet").exists()


def test_check_counts_names_every_figure(tmp_path):
    publish.check_counts("job", {"inputs": 5, "counter": None, "rows": 5})
    with pytest.raises(publish.PublishRefusedError, match=r"job: counts disagree \(inputs 5, rows 4\)") as info:
        publish.check_counts("job", {"inputs": 5, "rows": 4})
    assert info.value.counts == {"inputs": 5, "rows": 4}


def test_damaged_manifest_is_named(tmp_path):
    path = tmp_path / publish.MANIFEST
    path.write_text("{not json")
    with pytest.raises(ValueError, match=str(path)):
        publish.read_manifest(str(path), FeaturesManifest)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        publish.read_manifest(str(tmp_path / "missing.json"), FeaturesManifest)
