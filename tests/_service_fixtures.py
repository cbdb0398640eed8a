"""Index versions shared by the service, browser and compare tests, built once per test process.

Two versions of the flowers17-dev features made by the real index job, in one folder:

* ``full``: the session's ``flowers_index`` (all 720 photos, 2 shards, PCA to 128 dims), copied;
* ``subset``: the same features without label "8" (640 photos), 1 shard, PCA to 24 dims, Annoy
  only: items removed, another transform, another layout — a realistic "tonight's build".

``LATEST`` names ``subset`` (built last). Tests that move ``LATEST`` work on a copy
(:func:`copy_index`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pyarrow.compute as pc
import pyarrow.parquet as pq

from index_builder.types import annoy as annoy_type

DROPPED_LABEL = "8"
_BUILT: dict[str, Any] = {}


def _features_without(label: str, source: Path, out: Path) -> Path:
    """An extract output like ``source`` without the rows of ``label`` (manifest counts kept true)."""
    manifest = json.loads((source / "MANIFEST.json").read_text())
    dropped = 0
    for part in manifest["files"]["features"]:
        table = pq.read_table(source / part["path"])
        keep = table.filter(pc.invert(pc.equal(table.column("label"), label)))
        dropped += table.num_rows - keep.num_rows
        (out / part["path"]).parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(keep, out / part["path"])
        part["rows"] = keep.num_rows
    for part in manifest["files"].get("failures", []):
        (out / part["path"]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source / part["path"], out / part["path"])
    manifest["counts"]["ok"] -= dropped
    manifest["counts"]["read"] -= dropped
    if manifest["counts"].get("inputs") is not None:
        manifest["counts"]["inputs"] -= dropped
    if manifest.get("accounting"):
        manifest["accounting"]["inputs"] -= dropped
    (out / "MANIFEST.json").write_text(json.dumps(manifest))
    return out


def two_versions(tmp_path_factory: Any, flowers_features: Any, flowers_index: Any) -> dict[str, Any]:
    """``{"index": folder, "full": version, "subset": version}``, built on first use."""
    if not _BUILT:
        from pipelines import index

        root = tmp_path_factory.mktemp("service_versions")
        out = root / "index"
        source, full = flowers_index
        out.mkdir()
        shutil.copytree(Path(source) / full.version, out / full.version)
        point_latest(out, full.version)
        subset = _features_without(DROPPED_LABEL, Path(flowers_features[0]), root / "features-subset")
        part = index.run(index.IndexConfig(features=str(subset), output=str(out), shards=1, dims=24,
                                           type_params={"annoy": annoy_type.Params(trees=10)},
                                           index_types=("annoy",), target_recall=0))
        _BUILT.update(index=out, full=full.version, subset=part.version)
    return dict(_BUILT)


def copy_index(built: dict[str, Any], dest: Path) -> Path:
    shutil.copytree(built["index"], dest)
    return dest


def point_latest(index: Path, version: str) -> None:
    """Moves ``LATEST`` the way the index job does (atomic rename)."""
    tmp = index / "LATEST.tmp"
    tmp.write_text(json.dumps({"version": version}))
    tmp.replace(index / "LATEST")
