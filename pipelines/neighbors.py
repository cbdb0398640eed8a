"""``cbir neighbors``: the top-k neighbours of every indexed item, as Parquet.

Output layout::

    <out>/neighbors/part-<run>-SSSSS-of-NNNNN.parquet   image_id, neighbor_ids, scores, duplicate,
                                                         duplicate_ids, duplicate_count
    <out>/MANIFEST.json                                  written last; lists exactly this run's parts

The work is a list of (shard, start, end) id ranges, reshuffled so that a
cluster spreads them over its workers; each worker opens the searcher once (in
``setup``: the index memory-mapped, copied to local disk first when it lives on
an object store, since Annoy maps local files only) and searches its chunks in
batches. The version is resolved once on the launcher, so a build published
while the job runs cannot mix two versions in one table. Parts are written under
``<out>/_staging/<run>/``, moved in, and committed by replacing the manifest;
parts of earlier runs are deleted afterwards.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import logging
import os
import time
from typing import Any

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from apache_beam.metrics import Metrics

from artefacts import layout
from artefacts.manifests import (
    Accounting,
    IndexManifest,
    NeighborsCounts,
    NeighborsIndexRef,
    NeighborsManifest,
    ShardRecord,
    new_run_id,
    utc_now,
)
from artefacts.vector_space import space_fingerprint
from pipelines.runner import pipeline_options
from plumbing import fsutil, job_metrics
from plumbing import publish as protocol
from search import index_files
from search.neighbors import SCHEMA, DuplicateGroups, NeighborOptions, chunks, neighbor_table
from search.searcher import Searcher
from transforms import features_io

log = logging.getLogger(__name__)

PARTS = "neighbors"
# Above this share of rows to compute, an incremental table costs more than a full one: measured at 1M items,
# a 10 % churn night selected 67 % of the rows and took 304 s against 251 s for the full table (bench_nightly).
FULL_ABOVE = 0.4


@dataclasses.dataclass
class NeighborsConfig:
    index: str
    output: str
    version: str | None = None
    options: NeighborOptions = dataclasses.field(default_factory=NeighborOptions)
    chunk_size: int = 2048
    num_shards: int = 0  # output files; 0 lets the runner decide
    verify: bool = True
    signing_key: bytes | None = None  # checked on the launcher; workers get the manifest's digest, not the key
    incremental: bool = False  # recompute only the rows the index's last in-place update can have changed


# -- the job ----------------------------------------------------------------------------------------


class NeighborsFn(beam.DoFn):
    """(shard, start, end) → Arrow tables of neighbour rows; the searcher is opened once per worker."""

    def __init__(self, index: str, version: str, opts: NeighborOptions, verify: bool, manifest_sha256: str):
        self._index = index
        self._version = version
        self._opts = opts
        self._verify = verify
        self._manifest_sha256 = manifest_sha256
        self._rows = Metrics.counter("cbir_neighbors", "rows")
        self._with_dups = Metrics.counter("cbir_neighbors", "rows_with_duplicates")
        self._batch_ms = Metrics.distribution("cbir_neighbors", "batch_ms")

    def setup(self) -> None:
        root = index_files.localise(self._index, self._version)
        self._searcher = Searcher(root, version=self._version, verify=self._verify,
                                  manifest_sha256=self._manifest_sha256)
        self._dups = DuplicateGroups(self._searcher.sha256, self._searcher.image_ids)

    def process(self, chunk: tuple[int, int, int] | list[int]):
        """A (shard, start, end) range of a full table, or the global ids of rows an update changed."""
        if isinstance(chunk, list):
            gids = np.asarray(chunk, np.int64)
        else:
            shard, start, end = chunk
            gids = np.arange(start, end, dtype=np.int64) + int(self._searcher.offsets[shard])
        for lo in range(0, len(gids), self._opts.batch_size):
            t0 = time.perf_counter()
            table = neighbor_table(self._searcher, gids[lo:lo + self._opts.batch_size], self._opts, self._dups)
            self._batch_ms.update(int((time.perf_counter() - t0) * 1000))
            self._rows.inc(table.num_rows)
            self._with_dups.inc(sum(1 for c in table.column("duplicate_count").to_pylist() if c))
            yield table

    def teardown(self) -> None:
        searcher = getattr(self, "_searcher", None)
        if searcher is not None:
            searcher.close()


def run(cfg: NeighborsConfig, beam_args: list[str] | None = None) -> NeighborsManifest:
    """Runs the job to completion and publishes it; returns the manifest."""
    if os.path.normpath(cfg.output) == os.path.normpath(cfg.index):
        raise ValueError("--output must not be the index folder")
    version, index_manifest = index_files.resolve(cfg.index, cfg.version, cfg.signing_key)
    manifest_sha256 = hashlib.sha256(fsutil.read_bytes(fsutil.join(cfg.index, version, layout.MANIFEST))).hexdigest()
    if cfg.options.search.rerank.verify and not index_manifest.local_features:
        raise ValueError(f"{cfg.index}/{version} carries no local features, so --verify cannot run: extract with "
                         "--local-features K (e.g. 256), then rebuild the index from those features")
    if cfg.options.search.rerank.diffusion and not index_manifest.graph:
        raise ValueError(f"{cfg.index}/{version} has no k-NN graph, so --diffusion cannot run: rebuild the index "
                         "with --graph-k K (e.g. 20)")
    available = ("exact", *index_manifest.index_types)
    cfg.options = dataclasses.replace(cfg.options, search=cfg.options.search.resolve(available))
    run_id = new_run_id()
    staging = protocol.staging_dir(cfg.output, run_id)
    started = time.time()
    update = incremental_rows(cfg, version, index_manifest) if cfg.incremental else None
    if update is None or update.recompute is None:
        work = chunks(list(index_manifest.items_per_shard or _items_per_shard(cfg.index, version, index_manifest)),
                      cfg.chunk_size)
    else:
        work = [update.recompute[i:i + cfg.chunk_size].tolist()
                for i in range(0, len(update.recompute), cfg.chunk_size)]
    log.info("neighbors of %d items of %s/%s in %d chunks -> %s (run %s)", index_manifest.items, cfg.index,
             version, len(work), cfg.output, run_id)
    p = beam.Pipeline(options=pipeline_options(beam_args))
    (
        p
        | "Chunks" >> beam.Create(work)
        | "Spread" >> beam.Reshuffle()
        | "Neighbors" >> beam.ParDo(NeighborsFn(cfg.index, version, cfg.options, cfg.verify, manifest_sha256))
        | "Write" >> beam.io.WriteToParquetBatched(
            fsutil.join(staging, PARTS, "part"), schema=SCHEMA, file_name_suffix=".parquet",
            num_shards=cfg.num_shards, codec="snappy",
        )
    )
    try:
        result = p.run()
        result.wait_until_finish()
        if update is not None:
            update.stage_copied(staging)
        return publish(cfg, run_id, staging, version, index_manifest, time.time() - started, result, update)
    except BaseException:
        protocol.discard_staging(staging)
        raise


@dataclasses.dataclass
class Update:
    """An incremental run's plan: rows to compute (global ids; None: all of them), rows copied, the record."""

    recompute: np.ndarray | None
    copied: int
    record: dict[str, Any]
    kept: Any = None  # the previous table's rows that are copied (a pyarrow Table)

    def stage_copied(self, staging: str) -> None:
        """The copied rows as one more staged part; after the pipeline ran, whose sink clears its own prefix."""
        if self.kept is None:
            return
        sink = pa.BufferOutputStream()
        pq.write_table(self.kept, sink, compression="snappy")
        fsutil.write_bytes(fsutil.join(staging, PARTS, "part-copied-00000-of-00001.parquet"),
                           sink.getvalue().to_pybytes())


def incremental_rows(cfg: NeighborsConfig, version: str, index_manifest: IndexManifest) -> Update:
    """The previous table's rows that cannot have changed, and which rows to compute.

    Possible when the table in ``cfg.output`` was made with the same options from the version this
    one was updated from in place; otherwise every row is computed, and the record says why.
    """
    from search.neighbor_changes import patch_rows, rows_to_recompute

    reason = _why_full(cfg, version, index_manifest)
    if reason is not None:
        log.warning("computing every neighbour row: %s", reason)
        return Update(None, 0, {"decision": "full", "reason": reason})
    base = index_manifest.extra["incremental"]["base"]
    root = index_files.localise(cfg.index, version)
    base_ids = _base_ids(index_files.localise(cfg.index, base), base)
    previous = read_neighbors(cfg.output)
    with Searcher(root, version=version, verify=False) as searcher:
        changes = rows_to_recompute(searcher, previous, base_ids, cfg.options.search.k, cfg.options.search)
    if len(changes.recompute) > FULL_ABOVE * index_manifest.items:
        reason = (f"{len(changes.recompute):,} of {index_manifest.items:,} rows would be computed again: above "
                  f"{FULL_ABOVE:.0%}, a full table costs less")
        log.warning("computing every neighbour row: %s", reason)
        return Update(None, 0, {"decision": "full", "reason": reason, "selected": changes.reasons})
    kept = previous.filter(pc.is_in(previous.column("image_id"), value_set=pa.array(sorted(changes.keep))))
    kept = patch_rows(kept, changes.patched, cfg.options.search.k)
    record = {"decision": "incremental", "base_version": base, "rows_copied": kept.num_rows,
              "rows_computed": len(changes.recompute), "selected": changes.reasons}
    log.info("neighbors --incremental: %d rows copied, %d to compute (%s)", kept.num_rows, len(changes.recompute),
             ", ".join(f"{k} {v}" for k, v in changes.reasons.items()))
    return Update(changes.recompute, kept.num_rows, record, kept)


def _why_full(cfg: NeighborsConfig, version: str, index_manifest: IndexManifest) -> str | None:
    """Why the previous table cannot be updated (None: it can)."""
    path = fsutil.join(cfg.output, protocol.MANIFEST)
    if not fsutil.exists(path):
        return f"{cfg.output} holds no previous table"
    previous = protocol.read_manifest(path, NeighborsManifest)
    night = (index_manifest.extra or {}).get("incremental") or {}
    if night.get("decision") != "incremental" or night.get("base") != previous.index.version:
        return (f"{version} was not updated in place from {previous.index.version}, the version the previous table "
                "was made from")
    options = {**cfg.options.search.to_dict(), "max_duplicates": cfg.options.max_duplicates}
    if any(previous.options.get(key) != value for key, value in options.items()):
        return "the previous table was made with other search options"
    return None


def _base_ids(root: str, version: str) -> dict[str, str]:
    """image_id → sha256 of a version's items, from its id maps."""
    out: dict[str, str] = {}
    folder = os.path.join(root, version)
    for name in sorted(os.listdir(os.path.join(folder, "shards"))):
        idmap = pq.read_table(os.path.join(folder, "shards", name, layout.IDMAP_FILE), columns=["image_id", "sha256"])
        out.update(zip(idmap.column("image_id").to_pylist(), idmap.column("sha256").to_pylist(), strict=True))
    return out


def _items_per_shard(index: str, version: str, manifest: IndexManifest) -> list[int]:
    """Shard sizes from the SHARD.json files, for manifests that do not list them."""
    paths = [fsutil.join(index, version, layout.shard_dir(s), layout.SHARD_INFO) for s in range(manifest.shards)]
    return [ShardRecord.from_dict(fsutil.read_json(path), path).items for path in paths]


def publish(cfg: NeighborsConfig, run_id: str, staging: str, version: str, index_manifest: IndexManifest,
            elapsed: float, result: Any, update: Any = None) -> NeighborsManifest:
    """Refuses a table whose rows are not one per indexed item; else moves the parts in and commits."""
    staged = protocol.count_staged(staging, [PARTS], run_id)
    total = sum(part.rows for _, part in staged[PARTS])
    counters = job_metrics.collect(result, ("cbir_neighbors",), distributions=False)
    computed = counters.get("rows")
    copied = update.copied if update is not None else 0
    checked = {"indexed items": index_manifest.items,
               "rows (counter)" if not copied else "rows computed (counter) + copied":
                   None if computed is None else computed + copied,
               "rows written": total}
    protocol.check_counts("neighbors", checked)
    manifest = NeighborsManifest(
        run_id=run_id,
        created_utc=utc_now(),
        index=NeighborsIndexRef(
            path=cfg.index, version=version, items=index_manifest.items, shards=index_manifest.shards,
            model_fingerprint=index_manifest.model_fingerprint, space_fingerprint=space_fingerprint(index_manifest),
        ),
        options={**cfg.options.search.to_dict(), "max_duplicates": cfg.options.max_duplicates,
                 "chunk_size": cfg.chunk_size},
        columns=[f.name for f in SCHEMA],
        counts=NeighborsCounts(rows=total, rows_with_duplicates=counters.get("rows_with_duplicates")),
        elapsed_seconds=round(elapsed, 3),
        items_per_second=round(total / elapsed, 2) if elapsed > 0 else None,
        files=[part for _, part in staged[PARTS]],
        accounting=Accounting("upstream manifest", index_manifest.shards, index_manifest.items, checked),
        extra={"incremental": update.record} if update is not None else {},
    )
    protocol.commit(cfg.output, manifest, protocol.part_moves(cfg.output, staged), staging,
                    stale=protocol.stale_parts(cfg.output, [PARTS], [f.path for f in manifest.files]))
    log.info("published %d neighbour rows in %d file(s) to %s", total, len(manifest.files), cfg.output)
    return manifest


def read_neighbors(output: str):
    """The published neighbour table (only the parts the manifest lists) as one Arrow table."""
    import pyarrow as pa

    manifest = protocol.read_manifest(fsutil.join(output, protocol.MANIFEST), NeighborsManifest)
    tables = [features_io.read_table(fsutil.join(output, f.path)) for f in manifest.files]
    return pa.concat_tables(tables) if tables else SCHEMA.empty_table()


# -- command line -----------------------------------------------------------------------------------


def register(subparsers: Any) -> None:
    from pipelines.options import add_search_args, add_signing_arg, non_negative_int, positive_int

    p = subparsers.add_parser("neighbors", help="top-k neighbours of every indexed item → Parquet (Beam job)")
    p.add_argument("--index", required=True)
    p.add_argument("--output", required=True)
    add_search_args(p, rerank_flag="--no-rerank")
    p.add_argument("--version", default=None, help="index version (default: LATEST)")
    p.add_argument("--chunk-size", type=positive_int, default=2048, help="items per unit of work")
    p.add_argument("--batch-size", type=positive_int, default=256, help="queries searched as one batch")
    p.add_argument("--max-duplicates", type=non_negative_int, default=100, help="duplicate_ids listed per row")
    p.add_argument("--num-files", type=non_negative_int, default=0, help="output files (default: the runner decides)")
    p.add_argument("--no-verify", action="store_true", help="workers check file sizes only, not digests")
    p.add_argument("--incremental", action="store_true",
                   help="recompute only the rows the index's last in-place update (cbir index --incremental) can "
                        "have changed and copy the rest from the table in --output; in full when that is not possible")
    add_signing_arg(p)
    p.set_defaults(handler=main, beam=True)


def main(args: argparse.Namespace, beam_args: list[str]) -> int:
    from pipelines.options import search_options, signing_key

    opts = NeighborOptions(search=search_options(args, batch_size=args.batch_size),
                           max_duplicates=args.max_duplicates)
    cfg = NeighborsConfig(index=args.index, output=args.output, version=args.version, options=opts,
                          chunk_size=args.chunk_size, num_shards=args.num_files, verify=not args.no_verify,
                          signing_key=signing_key(args), incremental=args.incremental)
    m = run(cfg, beam_args)
    dups = m.counts.rows_with_duplicates
    so = opts.search
    print(f"neighbors: {m.counts.rows} rows (k={so.k}, {so.method}{'+rerank' if so.rerank.exact else ''}"
          f"{f'+qe{so.rerank.qe}' if so.rerank.qe else ''}) from {m.index.version} in {m.elapsed_seconds:.1f}s "
          f"({m.items_per_second or 0:.0f} items/s) → {cfg.output}"
          + (f"; {dups} items have exact duplicates" if dups is not None else ""))
    return 0
