"""Building one index shard in a local folder.

Annoy writes and memory-maps local files only, so a shard is always built on the
worker's disk and copied out afterwards by the caller (the Beam job).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from annoy import AnnoyIndex

from index_builder import layout, lsh

log = logging.getLogger(__name__)

IDMAP_SCHEMA = pa.schema(
    [
        ("id", pa.int32()),
        ("image_id", pa.string()),
        ("uri", pa.string()),
        pa.field("label", pa.string(), nullable=True),
        ("sha256", pa.string()),
    ]
)


@dataclasses.dataclass(frozen=True)
class ShardParams:
    trees: int = 50
    n_jobs: int = -1  # all cores of the worker
    on_disk_bytes: int = 2 << 30  # build Annoy on disk above this estimated size
    seed: int = 1234


@dataclasses.dataclass
class ShardItems:
    """One shard's items, sorted by image id so that dense ids are deterministic."""

    image_ids: list[str]
    uris: list[str]
    labels: list[str | None]
    sha256: list[str]
    vectors: np.ndarray  # (n, dim) float32, L2-normalised

    @classmethod
    def from_rows(cls, rows: list[dict[str, Any]], dim: int) -> ShardItems:
        rows = sorted(rows, key=lambda r: r["image_id"])
        vectors = np.zeros((len(rows), dim), dtype=np.float32)
        for i, r in enumerate(rows):
            vectors[i] = r["feature"]
        return cls(
            [r["image_id"] for r in rows],
            [r["uri"] for r in rows],
            [r.get("label") for r in rows],
            [r.get("sha256", "") for r in rows],
            vectors,
        )


def build_annoy(vectors: np.ndarray, path: str, params: ShardParams) -> None:
    n, dim = vectors.shape
    index = AnnoyIndex(dim, layout.METRIC)
    index.set_seed(params.seed)
    if n * dim * 4 * 2 > params.on_disk_bytes:
        index.on_disk_build(path)  # nodes live in the file, not in RAM
    for i in range(n):
        index.add_item(i, vectors[i])
    index.build(params.trees, n_jobs=params.n_jobs)
    if not _built_on_disk(path):
        index.save(path)
    index.unload()


def _built_on_disk(path: str) -> bool:
    return os.path.exists(path) and os.path.getsize(path) > 0


def build_shard(
    items: ShardItems, shard: int, out_dir: str, planes: np.ndarray, params: ShardParams
) -> dict[str, Any]:
    """Writes every file of a shard into ``out_dir``; returns its SHARD.json content."""
    os.makedirs(out_dir, exist_ok=True)
    t0 = time.monotonic()
    n, dim = items.vectors.shape
    build_annoy(items.vectors, os.path.join(out_dir, layout.ANNOY_FILE), params)
    t_annoy = time.monotonic() - t0
    np.save(os.path.join(out_dir, layout.VECTORS_FILE), items.vectors.astype(np.float16))
    codes = lsh.encode(items.vectors, planes)
    tables = lsh.MIHTables.build(codes)
    np.save(os.path.join(out_dir, layout.CODES_FILE), codes)
    np.save(os.path.join(out_dir, layout.MIH_OFFSETS_FILE), tables.offsets)
    np.save(os.path.join(out_dir, layout.MIH_IDS_FILE), tables.ids)
    idmap = pa.Table.from_arrays(
        [
            pa.array(np.arange(n, dtype=np.int32)),
            pa.array(items.image_ids, pa.string()),
            pa.array(items.uris, pa.string()),
            pa.array(items.labels, pa.string()),
            pa.array(items.sha256, pa.string()),
        ],
        schema=IDMAP_SCHEMA,
    )
    pq.write_table(idmap, os.path.join(out_dir, layout.IDMAP_FILE))
    files = {}
    for name in sorted(os.listdir(out_dir)):
        if name == layout.SHARD_INFO:
            continue
        digest, size = layout.sha256_file(os.path.join(out_dir, name))
        files[name] = {"sha256": digest, "bytes": size}
    info = {
        "shard": shard,
        "items": n,
        "dimension": dim,
        "files": files,
        "seconds": {"annoy": round(t_annoy, 3), "total": round(time.monotonic() - t0, 3)},
    }
    with open(os.path.join(out_dir, layout.SHARD_INFO), "w") as f:
        json.dump(info, f, indent=2, sort_keys=True)
    log.info("shard %d: %d items, annoy %.1fs", shard, n, t_annoy)
    return info
