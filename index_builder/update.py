"""Updating one built shard in place: items removed and added without rebuilding what did not change.

A night of re-indexing typically changes about 1 % of a corpus, and items are sharded by a hash
of their id, so every shard sees a few changes: rebuilding them all costs what the first build
cost. Here a shard is brought from its base folder to the new item set in a new folder (the base
is never written to, so the published version it belongs to stays intact): the survivors keep
their order and are renumbered without gaps, the new items are appended after them, and each
index type applies the change its own way (``IndexType.update``: HNSW adds to its graph and
keeps removed nodes as tombstones, Annoy keeps its trees and searches the new items exactly
beside them, LSH codes are re-encoded). Every file a reader sees (id map, vectors, codes) stays
dense, so the searcher and every job reading a shard need no notion of deletion. Each type is
then calibrated again on the updated shard. A changed item (same id, new content) is a removal
plus an addition.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Collection
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from artefacts import layout
from artefacts.manifests import ShardRecord
from index_builder.shard import IDMAP_SCHEMA, ShardItems, ShardParams, calibrate_built, file_digests, run_types
from index_builder.types.base import ShardBuild, ShardChange

log = logging.getLogger(__name__)


def update_shard(base_dir: str, out_dir: str, added: ShardItems, removed: Collection[str], number: int,
                 planes: np.ndarray, params: ShardParams, offsets: np.ndarray | None = None, duplicates: int = 0,
                 non_finite: int = 0) -> dict[str, Any]:
    """Writes the updated shard into ``out_dir``; returns its SHARD.json content (written last).

    ``removed`` are image ids to drop; an id in ``added`` that the base holds replaces it. The
    index types are the base's own; ``params`` gives their parameters and the calibration settings.
    ``duplicates`` and ``non_finite`` are the night's feature rows of this shard left out, for the
    accounting (every feature row is an item, a dropped duplicate or a non-finite row).
    """
    if params.local_features:
        raise ValueError("an in-place shard update does not carry local features yet: build the index in full")
    t0 = time.monotonic()
    os.makedirs(out_dir, exist_ok=True)
    base = _read_record(base_dir)
    idmap = pq.read_table(os.path.join(base_dir, layout.IDMAP_FILE))
    gone = set(removed) | set(added.image_ids)
    keep = np.asarray([i not in gone for i in idmap.column("image_id").to_pylist()], bool)
    remap = np.full(len(keep), -1, np.int64)
    remap[keep] = np.arange(int(keep.sum()))
    base_vectors = np.load(os.path.join(base_dir, layout.VECTORS_FILE), mmap_mode="r")
    vectors = np.concatenate([np.asarray(base_vectors[keep], np.float32), added.vectors]).reshape(-1, planes.shape[0])
    np.save(os.path.join(out_dir, layout.VECTORS_FILE), vectors.astype(np.float16))
    _write_idmap(idmap.filter(pa.array(keep)), added, out_dir)
    build = _shard_build(vectors, number, out_dir, planes, offsets, params,
                         ShardChange(base_dir, remap, added.size))
    build.earlier = base.calibration
    entries, seconds = run_types(build, base.index_types, "update")
    t1 = time.monotonic()
    calibrated = calibrate_built(build, params, base.index_types, earlier=base.calibration)
    seconds["calibration"] = round(time.monotonic() - t1, 3)
    seconds["total"] = round(time.monotonic() - t0, 3)
    info = {
        "shard": number, "items": len(vectors), "dimension": vectors.shape[1],
        "duplicates_dropped": duplicates, "non_finite_skipped": non_finite,
        "index_types": list(base.index_types),
        **{name: entry for name, entry in entries.items() if entry is not None},
        "lsh_bits": int(planes.shape[1]), "calibration": calibrated, "local_features": None,
        "files": file_digests(out_dir), "seconds": seconds,
        "update": {"base_items": len(keep), "removed": int((~keep).sum()), "added": added.size},
    }
    record = ShardRecord.from_dict(info, f"{out_dir}/{layout.SHARD_INFO}")
    with open(os.path.join(out_dir, layout.SHARD_INFO), "w") as f:
        f.write(record.to_json_text())
    log.info("shard %d updated: %d kept, %d removed, %d added (%s)", number, int(keep.sum()), int((~keep).sum()),
             added.size, ", ".join(f"{k} {v:.1f}s" for k, v in seconds.items()))
    return record.to_dict()


def _read_record(base_dir: str) -> ShardRecord:
    path = os.path.join(base_dir, layout.SHARD_INFO)
    with open(path) as f:
        return ShardRecord.from_dict(json.load(f), path)


def _write_idmap(kept: pa.Table, added: ShardItems, out_dir: str) -> None:
    """The survivors' rows in their order, then the new items', with dense ids 0..n-1."""
    new = pa.table({"image_id": pa.array(added.image_ids, pa.string()), "uri": pa.array(added.uris, pa.string()),
                    "label": pa.array(added.labels, pa.string()), "sha256": pa.array(added.sha256, pa.string())})
    rows = pa.concat_tables([kept.select(["image_id", "uri", "label", "sha256"]), new])
    ids = pa.array(np.arange(rows.num_rows, dtype=np.int32))
    table = pa.Table.from_arrays([ids, *rows.columns], schema=IDMAP_SCHEMA)
    if pc.count_distinct(table.column("image_id")).as_py() != table.num_rows:
        raise ValueError("an image id would appear twice in the updated shard")
    pq.write_table(table, os.path.join(out_dir, layout.IDMAP_FILE))


def _shard_build(vectors: np.ndarray, number: int, out_dir: str, planes: np.ndarray, offsets: np.ndarray | None,
                 params: ShardParams, change: ShardChange) -> ShardBuild:
    from index_builder import calibration

    settings = params.settings
    n = len(vectors)
    calibrating = settings.target_recall > 0 and n > settings.calibration_k + 1
    query_ids = calibration.held_out_queries(n, settings.calibration_queries, settings.seed + number) \
        if calibrating else None
    return ShardBuild(number=number, out_dir=out_dir, vectors=vectors, planes=planes, offsets=offsets,
                      settings=settings, type_params=dict(params.type_params), query_ids=query_ids, change=change)
