"""Building one index shard in a local folder.

Annoy writes and memory-maps local files only, so a shard is always built on the
worker's disk and copied out afterwards by the caller (the Beam job). Everything
in a shard except the Annoy trees is a pure function of its items, and the items
are sorted by ``image_id`` before dense ids are assigned, so rebuilding a shard
from the same features gives the same ids, vectors, codes and tables.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import time
from collections.abc import Iterable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from annoy import AnnoyIndex

from artefacts import layout
from index_builder import calibration, hnsw, local_store, lsh

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

_ID_COLUMNS = ("image_id", "uri", "label", "sha256")
VECTOR_DTYPE = np.float16  # of the rows between the transform and the shard build (row_schema)

DEFAULT_ON_DISK_BYTES = 1 << 30  # Annoy builds in its file above this: RAM for the vectors, not the trees


INDEX_TYPES = ("annoy", "lsh", "hnsw")


@dataclasses.dataclass(frozen=True)
class ShardParams:
    trees: int = 50
    n_jobs: int = -1  # all cores of the worker
    on_disk_bytes: int = DEFAULT_ON_DISK_BYTES  # build Annoy in its file above this estimated index size
    seed: int = 1234
    index_types: tuple[str, ...] = INDEX_TYPES
    hnsw_m: int = hnsw.DEFAULT_M
    hnsw_ef_construction: int = hnsw.DEFAULT_EF_CONSTRUCTION
    target_recall: float = calibration.DEFAULT_TARGET  # 0 turns calibration off
    calibration_k: int = calibration.DEFAULT_K
    calibration_queries: int = calibration.DEFAULT_QUERIES
    local_features: bool = False  # write the shard's local-feature arrays (index_builder.local_store)
    vectors_only: bool = False  # only vectors and id map: the first pass of a --dba build

    def __post_init__(self) -> None:
        if self.trees < 1:
            raise ValueError(f"--trees must be at least 1, not {self.trees}")
        if self.on_disk_bytes < 0:
            raise ValueError("the on-disk threshold cannot be negative")
        unknown = [t for t in self.index_types if t not in INDEX_TYPES]
        if unknown or not (self.index_types or self.vectors_only):
            raise ValueError(f"--index-types takes a non-empty subset of {', '.join(INDEX_TYPES)}, not {unknown}")
        if self.hnsw_m < 2 or self.hnsw_ef_construction < 1:
            raise ValueError("--hnsw-m must be at least 2 and --hnsw-ef-construction at least 1")
        if not 0.0 <= self.target_recall <= 1.0:
            raise ValueError(f"--target-recall must be within 0..1, not {self.target_recall}")


@dataclasses.dataclass
class ShardItems:
    """One shard's items in dense-id order (sorted by image id)."""

    image_ids: list[str]
    uris: list[str]
    labels: list[str | None]
    sha256: list[str]
    vectors: np.ndarray  # (n, dim) float32 holding float16 values (row_schema), L2-normalised before rounding
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
        """:meth:`from_table` for row dicts (``image_id``, ``uri``, ``label``, ``sha256``, ``feature``)."""
        vectors = np.zeros((len(rows), dim), np.float32)
        for i, r in enumerate(rows):
            vectors[i] = r["feature"]
        return cls.from_table(pa.table({
            "image_id": pa.array([r["image_id"] for r in rows], pa.string()),
            "uri": pa.array([r.get("uri") or "" for r in rows], pa.string()),
            "label": pa.array([r.get("label") for r in rows], pa.string()),
            "sha256": pa.array([r.get("sha256") or "" for r in rows], pa.string()),
            "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1).astype(VECTOR_DTYPE)), dim),
        }), dim)

    @classmethod
    def from_table(cls, table: pa.Table, dim: int) -> ShardItems:
        """:meth:`from_batches` for one table (columns as :func:`row_schema`)."""
        return cls.from_batches(table.to_batches(), dim)

    @classmethod
    def from_batches(cls, batches: Iterable[pa.RecordBatch], dim: int) -> ShardItems:
        """Sorts by image id and keeps one row per id, reading ``batches`` once.

        Two rows with one image id would make the id map ambiguous; which one wins
        must not depend on the order a runner delivers them in, so the tie is broken
        by (sha256, uri) and the drop is counted.

        Memory: a runner that streams a grouped shard (Dataflow pages it in) hands the
        batches over one at a time, so the vectors are held as copied chunks while the
        batches go by, then written once into their sorted places, each chunk released as
        it is placed: the peak is one copy of the shard's vectors plus its id columns,
        not the two or three that concatenating, sorting and converting a table made.
        """
        strings: dict[str, list[pa.Array]] = {c: [] for c in _ID_COLUMNS}
        chunks: list[np.ndarray] = []
        for batch in batches:
            if not batch.num_rows:
                continue
            for c in _ID_COLUMNS:
                strings[c].append(batch.column(c))
            flat = batch.column("vector").flatten()  # a slice's own values (``.values`` is the whole parent's)
            chunks.append(np.array(flat.to_numpy(zero_copy_only=False)).reshape(-1, dim))
        ids_table = pa.table({c: pa.concat_arrays(strings[c]) if strings[c] else pa.array([], pa.string())
                              for c in _ID_COLUMNS})
        del strings
        n = ids_table.num_rows
        order = pc.sort_indices(ids_table, sort_keys=[("image_id", "ascending"), ("sha256", "ascending"),
                                                      ("uri", "ascending")]).to_numpy() if n else np.zeros(0, np.int64)
        ids_table = ids_table.take(pa.array(order, pa.int64()))
        sorted_ids = ids_table.column("image_id").to_pylist()
        keep = np.ones(n, bool)
        keep[1:] = [a != b for a, b in zip(sorted_ids[1:], sorted_ids[:-1], strict=True)]
        dropped = int(n - keep.sum())
        if dropped:
            log.warning("%d duplicate image ids dropped (kept the lowest sha256 of each)", dropped)
            ids_table = ids_table.filter(pa.array(keep))
            sorted_ids = [i for i, k in zip(sorted_ids, keep.tolist(), strict=True) if k]
        destination = np.full(n, -1, np.int64)  # input row -> its dense id, -1 for a dropped duplicate
        destination[order[keep]] = np.arange(len(sorted_ids))
        vectors = np.empty((len(sorted_ids), dim), np.float32)
        start = 0
        pending = collections.deque(chunks)
        del chunks
        while pending:
            chunk = pending.popleft()
            dest = destination[start:start + len(chunk)]
            placed = dest >= 0
            vectors[dest[placed]] = chunk[placed]
            start += len(chunk)
            del chunk
        return cls(
            sorted_ids,
            [u or "" for u in ids_table.column("uri").to_pylist()],
            ids_table.column("label").to_pylist(),
            [h or "" for h in ids_table.column("sha256").to_pylist()],
            vectors,
            dropped,
        )


def row_schema(dim: int) -> pa.Schema:
    """The rows an index shard is built from: id-map columns and the transformed vector.

    The vector travels as float16, the precision the shard stores it in (``vectors.f16.npy``):
    half the bytes through the shuffle (measured at 1M × 256 on the DirectRunner, which
    holds the grouped rows encoded and decoded at once: ~1.5 GB less peak memory), and the
    Annoy, LSH and HNSW structures are built from exactly the values exact scoring reads, so
    an HNSW cosine equals the re-scored one.
    """
    return pa.schema([("image_id", pa.string()), ("uri", pa.string()), pa.field("label", pa.string(), nullable=True),
                      ("sha256", pa.string()), ("vector", pa.list_(pa.from_numpy_dtype(VECTOR_DTYPE), dim))])


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
    offsets: np.ndarray | None = None, local_rows: pa.Table | None = None,
) -> dict[str, Any]:
    """Writes every file of a shard into ``out_dir``; returns its SHARD.json content (written last).

    Always: the float16 vectors (exact scoring) and the id map; per index type in
    ``params.index_types``: Annoy trees, LSH codes with their MIH tables, an HNSW graph.
    Then each type's search effort is calibrated on the shard's own items. With
    ``params.local_features``, the items' local features (from ``local_rows``) as arrays.
    """
    if params.vectors_only:
        params = dataclasses.replace(params, index_types=(), target_recall=0.0)
    os.makedirs(out_dir, exist_ok=True)
    t0 = time.monotonic()
    n, dim = items.vectors.shape
    if planes.shape[0] != dim:
        raise ValueError(f"LSH hyperplanes are {planes.shape[0]}-d, the vectors {dim}-d")
    seconds: dict[str, float] = {}
    on_disk = False
    if "annoy" in params.index_types:
        log.info("shard %d: Annoy, %d trees over %s items…", shard, params.trees, f"{n:,}")
        on_disk = build_annoy(items.vectors, os.path.join(out_dir, layout.ANNOY_FILE), params)
        seconds["annoy"] = round(time.monotonic() - t0, 3)
    vectors_path = os.path.join(out_dir, layout.VECTORS_FILE)
    np.save(vectors_path, items.vectors.astype(np.float16))
    vectors16 = np.load(vectors_path, mmap_mode="r")  # read back mapped: the page cache holds it, not the heap
    codes = None
    if "lsh" in params.index_types:
        t1 = time.monotonic()
        log.info("shard %d: LSH codes and multi-index tables…", shard)
        codes = lsh.encode(items.vectors, planes, offsets)
        tables = lsh.MIHTables.build(codes)
        np.save(os.path.join(out_dir, layout.CODES_FILE), codes)
        np.save(os.path.join(out_dir, layout.MIH_OFFSETS_FILE), tables.offsets)
        np.save(os.path.join(out_dir, layout.MIH_IDS_FILE), tables.ids)
        seconds["lsh"] = round(time.monotonic() - t1, 3)
    calibrating = params.target_recall > 0 and n > params.calibration_k + 1
    query_ids = calibration.held_out_queries(n, params.calibration_queries, params.seed + shard) if calibrating \
        else None
    hnsw_calibrated = None
    if "hnsw" in params.index_types:
        t1 = time.monotonic()
        log.info("shard %d: HNSW graph (M=%d, efConstruction=%d)…", shard, params.hnsw_m, params.hnsw_ef_construction)
        hnsw_calibrated = hnsw.build(
            items.vectors, os.path.join(out_dir, hnsw.HNSW_FILE), params.hnsw_m, params.hnsw_ef_construction,
            held_out=query_ids,
            while_held_out=(lambda index: calibrate_hnsw(index, items.vectors, query_ids, params)) if calibrating
            else None,
        )
        seconds["hnsw"] = round(time.monotonic() - t1, 3)
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
    local_counts = None
    if params.local_features:
        local_counts = local_store.write_shard(out_dir, items.image_ids, items.sha256, local_rows)
        log.info("shard %d: vote index over %d local descriptors…", shard, local_counts["keypoints"])
        local_counts["vote_index"] = local_store.write_vote_index(out_dir, seed=shard)
    t1 = time.monotonic()
    if query_ids is not None:
        log.info("shard %d: calibrating search effort on %d held-out items…", shard, len(query_ids))
    calibrated = calibrate_shard(out_dir, items.vectors, vectors16, codes, planes, offsets, query_ids, params)
    if calibrated is not None and hnsw_calibrated is not None:
        calibrated["hnsw"] = hnsw_calibrated
    seconds["calibration"] = round(time.monotonic() - t1, 3)
    files = {}
    for name in sorted(os.listdir(out_dir)):
        if name == layout.SHARD_INFO:
            continue
        digest, size = layout.sha256_file(os.path.join(out_dir, name))
        files[name] = {"sha256": digest, "bytes": size}
    seconds["total"] = round(time.monotonic() - t0, 3)
    info = {
        "shard": shard,
        "items": n,
        "dimension": dim,
        "duplicates_dropped": items.duplicates_dropped,
        "non_finite_skipped": non_finite_skipped,
        "index_types": list(params.index_types),
        "annoy": {"trees": params.trees, "on_disk_build": on_disk,
                  "estimated_bytes": annoy_bytes_estimate(n, dim, params.trees)} if "annoy" in params.index_types
        else None,
        "hnsw": {"m": params.hnsw_m, "ef_construction": params.hnsw_ef_construction}
        if "hnsw" in params.index_types else None,
        "lsh_bits": int(planes.shape[1]),
        "calibration": calibrated,
        "local_features": local_counts,
        "files": files,
        "seconds": seconds,
    }
    with open(os.path.join(out_dir, layout.SHARD_INFO), "w") as f:
        json.dump(info, f, indent=2, sort_keys=True)
    log.info("shard %d: %d items, %s", shard, n, ", ".join(f"{k} {v:.1f}s" for k, v in seconds.items()))
    return info


def _threads(params: ShardParams) -> int:
    """Threads calibration measures recall with: the worker's cores, as the builds use."""
    return params.n_jobs if params.n_jobs > 0 else (os.cpu_count() or 1)


def calibrate_hnsw(index: Any, vectors: np.ndarray, query_ids: np.ndarray, params: ShardParams) -> dict[str, Any]:
    """The smallest efSearch reaching the target for items the graph does not hold yet (see hnsw.build)."""
    k = params.calibration_k
    truth = calibration.exact_neighbours(vectors, query_ids, k, leave_out_all=True)
    grid = [e for e in (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048) if e >= k + 1]
    found = calibration.calibrate(lambda q, m, ef: hnsw.search(index, q, m, ef)[0], grid, vectors, query_ids, truth,
                                  params.target_recall, threads=_threads(params))
    return {**found.to_dict("ef_search"), "queries": "held out of the graph"}


def calibrate_shard(out_dir: str, vectors: np.ndarray, vectors16: np.ndarray, codes: np.ndarray | None,
                    planes: np.ndarray, offsets: np.ndarray | None, query_ids: np.ndarray | None,
                    params: ShardParams) -> dict[str, Any] | None:
    """Annoy and LSH: the smallest effort reaching ``params.target_recall`` on held-out items of this shard."""
    k = params.calibration_k
    n = len(vectors)
    if query_ids is None:
        return None
    truth = calibration.exact_neighbours(vectors, query_ids, k)
    out: dict[str, Any] = {"k": k, "target_recall": params.target_recall, "queries": int(len(query_ids))}
    if "annoy" in params.index_types:
        index = AnnoyIndex(vectors.shape[1], layout.METRIC)
        index.load(os.path.join(out_dir, layout.ANNOY_FILE))
        grid = calibration.geometric_grid(params.trees * (k + 1), params.trees * n * 2, 1.6)

        def annoy_search(q, m, search_k):
            ids = np.full((len(q), m), -1, np.int64)
            for row, vec in enumerate(q.tolist()):
                r = index.get_nns_by_vector(vec, m, search_k=search_k)
                ids[row, : len(r)] = r
            return ids

        out["annoy"] = calibration.calibrate(annoy_search, grid, vectors, query_ids, truth,
                                             params.target_recall, threads=_threads(params)).to_dict("search_k")
        index.unload()
    if codes is not None:
        scan = lsh.HammingScan(codes)  # the searcher's own scan, so the chosen count means the same there
        grid = calibration.geometric_grid(2 * k, n, 1.5)

        def lsh_search(q, m, candidates):
            found = scan.top(lsh.encode(q, planes, offsets), candidates)
            ids = np.full((len(q), m), -1, np.int64)
            for row in range(len(q)):
                cand = found[row][found[row] >= 0]
                scores = np.asarray(vectors16[cand], np.float32) @ q[row]
                top = cand[np.argsort(-scores, kind="stable")[:m]]
                ids[row, : len(top)] = top
            return ids

        out["lsh"] = calibration.calibrate(lsh_search, grid, vectors, query_ids, truth,
                                           params.target_recall, threads=_threads(params)).to_dict("candidates")
    return out
