"""Building one index shard in a local folder.

Annoy writes and memory-maps local files only, so a shard is always built on the
worker's disk and copied out afterwards by the caller (the Beam job). Everything
in a shard except the Annoy trees is a pure function of its items, and the items
are sorted by ``image_id`` before dense ids are assigned, so rebuilding a shard
from the same features gives the same ids, vectors, codes and tables.
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

DEFAULT_ON_DISK_BYTES = 2 << 30


@dataclasses.dataclass(frozen=True)
class ShardParams:
    trees: int = 50
    n_jobs: int = -1  # all cores of the worker
    on_disk_bytes: int = DEFAULT_ON_DISK_BYTES  # build Annoy in its file above this estimated index size
    seed: int = 1234

    def __post_init__(self) -> None:
        if self.trees < 1:
            raise ValueError(f"--trees must be at least 1, not {self.trees}")
        if self.on_disk_bytes < 0:
            raise ValueError("the on-disk threshold cannot be negative")


@dataclasses.dataclass
class ShardItems:
    """One shard's items in dense-id order (sorted by image id)."""

    image_ids: list[str]
    uris: list[str]
    labels: list[str | None]
    sha256: list[str]
    vectors: np.ndarray  # (n, dim) float32, L2-normalised
    duplicates_dropped: int = 0

    def __post_init__(self) -> None:
        n = len(self.image_ids)
        if self.vectors.ndim != 2 or self.vectors.shape[0] != n:
            raise ValueError(f"{n} items but vectors of shape {self.vectors.shape}")
        if not (len(self.uris) == len(self.labels) == len(self.sha256) == n):
            raise ValueError("id map columns differ in length")
        if any(a >= b for a, b in zip(self.image_ids, self.image_ids[1:], strict=False)):
            raise ValueError("image ids must be unique and sorted: dense ids follow image-id order")
        if not np.isfinite(self.vectors).all():
            bad = [self.image_ids[i] for i in np.flatnonzero(~np.isfinite(self.vectors).all(axis=1))[:5]]
            raise ValueError(f"non-finite vectors for {bad}: the index would return garbage for them")

    @property
    def size(self) -> int:
        return len(self.image_ids)

    @classmethod
    def from_rows(cls, rows: list[dict[str, Any]], dim: int) -> ShardItems:
        """Sorts by image id and keeps one row per id.

        Two rows with one image id would make the id map ambiguous; which one wins
        must not depend on the order a runner delivers them in, so the tie is broken
        by (sha256, uri) and the drop is counted.
        """
        rows = sorted(rows, key=lambda r: (r["image_id"], r.get("sha256") or "", r.get("uri") or ""))
        unique = [r for i, r in enumerate(rows) if i == 0 or r["image_id"] != rows[i - 1]["image_id"]]
        dropped = len(rows) - len(unique)
        if dropped:
            log.warning("%d duplicate image ids dropped (kept the lowest sha256 of each)", dropped)
        vectors = np.zeros((len(unique), dim), dtype=np.float32)
        for i, r in enumerate(unique):
            vectors[i] = r["feature"]
        return cls(
            [r["image_id"] for r in unique],
            [r["uri"] for r in unique],
            [r.get("label") for r in unique],
            [r.get("sha256") or "" for r in unique],
            vectors,
            dropped,
        )


def annoy_bytes_estimate(n: int, dim: int, trees: int) -> int:
    """Size of an angular Annoy index of n items, close enough to choose RAM or disk.

    A node is 12 bytes of header plus the vector; each tree adds split nodes for
    about 3n/(dim + 2) of them, since a leaf holds up to dim + 2 item ids.
    """
    node = 12 + 4 * dim
    return int(node * n * (1 + 3 * trees / (dim + 2)))


def build_annoy(vectors: np.ndarray, path: str, params: ShardParams) -> bool:
    """Builds and writes an angular Annoy index of ``vectors`` (ids 0..n-1); True if built on disk.

    Above ``params.on_disk_bytes`` the nodes are written straight into ``path`` as
    they are built (``on_disk_build``), so a shard larger than the worker's RAM
    still builds; below, building in memory and saving is faster.
    """
    n, dim = vectors.shape
    index = AnnoyIndex(dim, layout.METRIC)
    index.set_seed(params.seed)
    on_disk = annoy_bytes_estimate(n, dim, params.trees) > params.on_disk_bytes
    if on_disk:
        if os.path.exists(path):
            os.remove(path)
        index.on_disk_build(path)  # must precede add_item
    for i in range(n):
        index.add_item(i, vectors[i])
    index.build(params.trees, n_jobs=params.n_jobs)
    if not on_disk:
        index.save(path)
    index.unload()
    return on_disk


def build_shard(
    items: ShardItems, shard: int, out_dir: str, planes: np.ndarray, params: ShardParams, non_finite_skipped: int = 0,
) -> dict[str, Any]:
    """Writes every file of a shard into ``out_dir``; returns its SHARD.json content (written last)."""
    os.makedirs(out_dir, exist_ok=True)
    t0 = time.monotonic()
    n, dim = items.vectors.shape
    if planes.shape[0] != dim:
        raise ValueError(f"LSH hyperplanes are {planes.shape[0]}-d, the vectors {dim}-d")
    on_disk = build_annoy(items.vectors, os.path.join(out_dir, layout.ANNOY_FILE), params)
    t_annoy = time.monotonic() - t0
    np.save(os.path.join(out_dir, layout.VECTORS_FILE), items.vectors.astype(np.float16))
    t1 = time.monotonic()
    codes = lsh.encode(items.vectors, planes)
    tables = lsh.MIHTables.build(codes)
    np.save(os.path.join(out_dir, layout.CODES_FILE), codes)
    np.save(os.path.join(out_dir, layout.MIH_OFFSETS_FILE), tables.offsets)
    np.save(os.path.join(out_dir, layout.MIH_IDS_FILE), tables.ids)
    t_lsh = time.monotonic() - t1
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
        "duplicates_dropped": items.duplicates_dropped,
        "non_finite_skipped": non_finite_skipped,
        "annoy": {"trees": params.trees, "on_disk_build": on_disk,
                  "estimated_bytes": annoy_bytes_estimate(n, dim, params.trees)},
        "lsh_bits": int(planes.shape[1]),
        "files": files,
        "seconds": {"annoy": round(t_annoy, 3), "lsh": round(t_lsh, 3), "total": round(time.monotonic() - t0, 3)},
    }
    with open(os.path.join(out_dir, layout.SHARD_INFO), "w") as f:
        json.dump(info, f, indent=2, sort_keys=True)
    log.info("shard %d: %d items, annoy %.1fs%s", shard, n, t_annoy, " (on disk)" if on_disk else "")
    return info
