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
import logging
import os
import time
from collections.abc import Iterable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from artefacts import layout
from artefacts.manifests import ShardRecord
from index_builder import calibration, local_store
from index_builder.types import registry
from index_builder.types.base import BuildSettings, ShardBuild

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



@dataclasses.dataclass(frozen=True)
class ShardParams:
    """How a shard is built: which index types with which parameters, and what they share."""

    index_types: tuple[str, ...] = registry.DEFAULT_TYPES
    type_params: dict[str, Any] = dataclasses.field(default_factory=dict)  # type name -> its Params (else defaults)
    settings: BuildSettings = BuildSettings()
    local_features: bool = False  # write the shard's local-feature arrays (index_builder.local_store)
    vectors_only: bool = False  # only vectors and id map: the first pass of a --dba build

    def __post_init__(self) -> None:
        registry.check_selection(tuple(self.index_types), allow_empty=self.vectors_only)
        if not 0.0 <= self.settings.target_recall <= 1.0:
            raise ValueError(f"--target-recall must be within 0..1, not {self.settings.target_recall}")
        for name in self.type_params:
            registry.get(name)

    def params_of(self, name: str) -> Any:
        """A type's build parameters: the ones given, else its defaults."""
        return self.type_params.get(name) or registry.get(name).Params()


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


def build_shard(
    items: ShardItems, shard: int, out_dir: str, planes: np.ndarray, params: ShardParams, non_finite_skipped: int = 0,
    offsets: np.ndarray | None = None, local_rows: pa.Table | None = None,
) -> dict[str, Any]:
    """Writes every file of a shard into ``out_dir``; returns its SHARD.json content (written last).

    Always the float16 vectors (exact scoring) and the id map; then each index type of
    ``params.index_types`` builds its files and calibrates its search effort on held-out items of
    the shard (``index_builder.types``); with ``params.local_features``, the items' local features
    (from ``local_rows``) as arrays and their vote index.
    """
    if params.vectors_only:
        params = dataclasses.replace(params, index_types=(), settings=dataclasses.replace(params.settings,
                                                                                           target_recall=0.0))
    os.makedirs(out_dir, exist_ok=True)
    t0 = time.monotonic()
    n, dim = items.vectors.shape
    if planes.shape[0] != dim:
        raise ValueError(f"LSH hyperplanes are {planes.shape[0]}-d, the vectors {dim}-d")
    np.save(os.path.join(out_dir, layout.VECTORS_FILE), items.vectors.astype(np.float16))
    build = _shard_build(items, shard, out_dir, planes, offsets, params, local_rows)
    entries, seconds = run_types(build, params.index_types, "build")
    _write_idmap(items, out_dir)
    local_counts = _write_local(build, params) if params.local_features else None
    t1 = time.monotonic()
    calibrated = calibrate_built(build, params, params.index_types)
    seconds["calibration"] = round(time.monotonic() - t1, 3)
    seconds["total"] = round(time.monotonic() - t0, 3)
    info = {
        "shard": shard, "items": n, "dimension": dim,
        "duplicates_dropped": items.duplicates_dropped, "non_finite_skipped": non_finite_skipped,
        "index_types": list(params.index_types),
        **{name: entry for name, entry in entries.items() if entry is not None},
        "lsh_bits": int(planes.shape[1]),
        "calibration": calibrated,
        "local_features": local_counts,
        "files": file_digests(out_dir),
        "seconds": seconds,
    }
    record = ShardRecord.from_dict(info, f"{out_dir}/{layout.SHARD_INFO}")  # typed: what every reader expects
    with open(os.path.join(out_dir, layout.SHARD_INFO), "w") as f:
        f.write(record.to_json_text())
    log.info("shard %d: %d items, %s", shard, n, ", ".join(f"{k} {v:.1f}s" for k, v in seconds.items()))
    return record.to_dict()


def _shard_build(items: ShardItems, shard: int, out_dir: str, planes: np.ndarray, offsets: np.ndarray | None,
                 params: ShardParams, local_rows: pa.Table | None) -> ShardBuild:
    """What the index types share while building one shard, the calibration queries drawn once."""
    settings = params.settings
    n = items.size
    calibrating = settings.target_recall > 0 and n > settings.calibration_k + 1
    query_ids = calibration.held_out_queries(n, settings.calibration_queries, settings.seed + shard) if calibrating \
        else None
    return ShardBuild(number=shard, out_dir=out_dir, vectors=items.vectors, planes=planes, offsets=offsets,
                      settings=settings, type_params=dict(params.type_params), query_ids=query_ids,
                      image_ids=items.image_ids, sha256=items.sha256, local_rows=local_rows)


def run_types(build: ShardBuild, names: Any, step: str) -> tuple[dict[str, Any], dict[str, float]]:
    """Each named type's ``build`` or ``update`` on the shard: (SHARD.json entries, seconds per type)."""
    entries: dict[str, Any] = {}
    seconds: dict[str, float] = {}
    for name in names:
        t1 = time.monotonic()
        entries[name] = getattr(registry.get(name), step)(build)
        seconds[name] = round(time.monotonic() - t1, 3)
    return entries, seconds


def calibrate_built(build: ShardBuild, params: ShardParams, names: Any,
                    earlier: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """Each type's calibrated effort on the shard's held-out items (None when calibration does not run).

    ``earlier``: the shard's calibration before an in-place update; a type that could not measure
    again (too few new items to hold out of a graph) keeps what it had.
    """
    if build.query_ids is None:
        return None
    log.info("shard %d: calibrating search effort on %d held-out items…", build.number, len(build.query_ids))
    settings = params.settings
    out: dict[str, Any] = {"k": settings.calibration_k, "target_recall": settings.target_recall,
                           "queries": int(len(build.query_ids))}
    for name in names:
        found = registry.get(name).calibrate(build)
        if found is None and earlier:
            found = earlier.get(name)
        if found is not None:
            out[name] = found
    return out


def _write_idmap(items: ShardItems, out_dir: str) -> None:
    idmap = pa.Table.from_arrays(
        [
            pa.array(np.arange(items.size, dtype=np.int32)),
            pa.array(items.image_ids, pa.string()),
            pa.array(items.uris, pa.string()),
            pa.array(items.labels, pa.string()),
            pa.array(items.sha256, pa.string()),
        ],
        schema=IDMAP_SCHEMA,
    )
    pq.write_table(idmap, os.path.join(out_dir, layout.IDMAP_FILE))


def _write_local(build: ShardBuild, params: ShardParams) -> dict[str, Any]:
    counts: dict[str, Any] = local_store.write_shard(build.out_dir, build.image_ids, build.sha256, build.local_rows)
    for name in registry.LOCAL:
        t = registry.get(name)
        log.info("shard %d: %s over %d local descriptors…", build.number, name, counts["keypoints"])
        counts[t.local_record] = t.build(build)
    return counts


def file_digests(out_dir: str) -> dict[str, dict[str, Any]]:
    files = {}
    for name in sorted(os.listdir(out_dir)):
        if name == layout.SHARD_INFO:
            continue
        digest, size = layout.sha256_file(os.path.join(out_dir, name))
        files[name] = {"sha256": digest, "bytes": size}
    return files
