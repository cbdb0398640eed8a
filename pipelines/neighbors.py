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
import shutil
import tempfile
import time
import uuid
from typing import Any

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics

from index_builder import layout
from pipelines.runner import pipeline_options
from serving.neighbors import SCHEMA, DuplicateGroups, NeighborOptions, chunks, neighbor_table
from serving.searcher import LSH_RADIUS, METHODS, Searcher, space_fingerprint
from transforms import features_io, fsutil, job_metrics

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
PARTS = "neighbors"


@dataclasses.dataclass
class NeighborsConfig:
    index: str
    output: str
    version: str | None = None
    options: NeighborOptions = dataclasses.field(default_factory=NeighborOptions)
    chunk_size: int = 2048
    num_shards: int = 0  # output files; 0 lets the runner decide
    verify: bool = True


# -- the index, wherever it lives -------------------------------------------------------------------


def resolve_remote_version(index: str, version: str | None) -> tuple[str, dict[str, Any]]:
    """(version, manifest) read through Beam filesystems, so gs:// and s3:// indexes work too."""
    if version is None:
        pointer = fsutil.join(index, layout.POINTER)
        if not fsutil.exists(pointer):
            raise FileNotFoundError(f"{index} has no {layout.POINTER}: no index was published there")
        version = fsutil.read_json(pointer)["version"]
    if not version or "/" in version or version.startswith((".", "_")):
        raise layout.IndexIntegrityError(f"{version!r} is not an index version name")
    path = fsutil.join(index, version, layout.MANIFEST)
    if not fsutil.exists(path):
        raise FileNotFoundError(f"{fsutil.join(index, version)} is not a complete index version (no manifest)")
    manifest = fsutil.read_json(path)
    layout.check_manifest(manifest)
    return version, manifest


def local_index(index: str, version: str) -> str:
    """A local folder holding ``version`` of ``index``: the index itself when it is local, else a
    copy in the machine's temp folder (made once per machine, then reused)."""
    if "://" not in index:
        return index
    cache = os.path.join(tempfile.gettempdir(), "cbir-index-cache", hashlib.sha1(index.encode()).hexdigest()[:12])
    if os.path.isfile(os.path.join(cache, version, layout.MANIFEST)):
        return cache
    manifest = fsutil.read_json(fsutil.join(index, version, layout.MANIFEST))
    tmp = os.path.join(cache, f"_tmp-{uuid.uuid4().hex[:8]}")
    try:
        for rel in list(manifest["files"]) + [layout.MANIFEST]:
            dest = os.path.join(tmp, rel)
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            with beam.io.filesystems.FileSystems.open(
                fsutil.join(index, version, rel), compression_type="uncompressed"
            ) as src, open(dest, "wb") as dst:
                shutil.copyfileobj(src, dst, length=8 << 20)
        try:
            os.rename(tmp, os.path.join(cache, version))  # the manifest arrives with the rest, atomically
        except OSError:  # another worker on this machine finished first
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("copied index %s/%s to %s", index, version, cache)
    return cache


# -- the job ----------------------------------------------------------------------------------------


class NeighborsFn(beam.DoFn):
    """(shard, start, end) → Arrow tables of neighbour rows; the searcher is opened once per worker."""

    def __init__(self, index: str, version: str, opts: NeighborOptions, verify: bool):
        self._index = index
        self._version = version
        self._opts = opts
        self._verify = verify
        self._rows = Metrics.counter("cbir_neighbors", "rows")
        self._with_dups = Metrics.counter("cbir_neighbors", "rows_with_duplicates")
        self._batch_ms = Metrics.distribution("cbir_neighbors", "batch_ms")

    def setup(self) -> None:
        root = local_index(self._index, self._version)
        self._searcher = Searcher(root, version=self._version, verify=self._verify)
        self._dups = DuplicateGroups(self._searcher.sha256, self._searcher.image_ids)

    def process(self, chunk: tuple[int, int, int]):
        shard, start, end = chunk
        base = int(self._searcher.offsets[shard])
        for lo in range(start, end, self._opts.batch_size):
            hi = min(lo + self._opts.batch_size, end)
            t0 = time.perf_counter()
            table = neighbor_table(self._searcher, np.arange(base + lo, base + hi), self._opts, self._dups)
            self._batch_ms.update(int((time.perf_counter() - t0) * 1000))
            self._rows.inc(table.num_rows)
            self._with_dups.inc(sum(1 for c in table.column("duplicate_count").to_pylist() if c))
            yield table

    def teardown(self) -> None:
        searcher = getattr(self, "_searcher", None)
        if searcher is not None:
            searcher.close()


def run(cfg: NeighborsConfig, beam_args: list[str] | None = None) -> dict[str, Any]:
    """Runs the job to completion and publishes it; returns the manifest."""
    if cfg.options.k < 1:
        raise ValueError("-k must be at least 1")
    if cfg.options.method not in METHODS:
        raise ValueError(f"--method must be one of {METHODS}")
    if os.path.normpath(cfg.output) == os.path.normpath(cfg.index):
        raise ValueError("--output must not be the index folder")
    version, index_manifest = resolve_remote_version(cfg.index, cfg.version)
    work = chunks(list(index_manifest.get("items_per_shard") or _items_per_shard(cfg.index, version, index_manifest)),
                  cfg.chunk_size)
    run_id = time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:6]
    staging = fsutil.join(cfg.output, layout.STAGING, run_id)
    started = time.time()
    log.info("neighbors of %d items of %s/%s in %d chunks -> %s (run %s)", index_manifest["items"], cfg.index,
             version, len(work), cfg.output, run_id)
    p = beam.Pipeline(options=pipeline_options(beam_args))
    (
        p
        | "Chunks" >> beam.Create(work)
        | "Spread" >> beam.Reshuffle()
        | "Neighbors" >> beam.ParDo(NeighborsFn(cfg.index, version, cfg.options, cfg.verify))
        | "Write" >> beam.io.WriteToParquetBatched(
            fsutil.join(staging, PARTS, "part"), schema=SCHEMA, file_name_suffix=".parquet",
            num_shards=cfg.num_shards, codec="snappy",
        )
    )
    result = p.run()
    result.wait_until_finish()
    return publish(cfg, run_id, staging, version, index_manifest, time.time() - started, result)


def _items_per_shard(index: str, version: str, manifest: dict[str, Any]) -> list[int]:
    """Shard sizes from the SHARD.json files, for manifests that do not list them."""
    return [int(fsutil.read_json(fsutil.join(index, version, layout.shard_dir(s), layout.SHARD_INFO))["items"])
            for s in range(int(manifest["shards"]))]


def publish(cfg: NeighborsConfig, run_id: str, staging: str, version: str, index_manifest: dict[str, Any],
            elapsed: float, result: Any) -> dict[str, Any]:
    parts = fsutil.match(fsutil.join(staging, PARTS, "part-*.parquet"))
    files, moves_to, total = [], [], 0
    for src in parts:
        name = src.rsplit("/", 1)[-1].replace("part-", f"part-{run_id}-", 1)
        rows = features_io.count_rows(src)
        total += rows
        files.append({"path": f"{PARTS}/{name}", "rows": rows})
        moves_to.append(fsutil.join(cfg.output, PARTS, name))
    if total != int(index_manifest["items"]):
        fsutil.delete_tree(staging)
        raise RuntimeError(f"the job wrote {total} neighbour rows for {index_manifest['items']} indexed items; "
                           "nothing was published")
    fsutil.move(parts, moves_to)
    counters = job_metrics.collect(result, ("cbir_neighbors",), distributions=False)
    manifest = {
        "kind": "neighbors",
        "format_version": FORMAT_VERSION,
        "run_id": run_id,
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "index": {
            "path": cfg.index,
            "version": version,
            "items": index_manifest["items"],
            "shards": index_manifest["shards"],
            "model_fingerprint": index_manifest["model_fingerprint"],
            "space_fingerprint": space_fingerprint(index_manifest),
        },
        "options": {**dataclasses.asdict(cfg.options), "chunk_size": cfg.chunk_size},
        "columns": [f.name for f in SCHEMA],
        "counts": {"rows": total, "rows_with_duplicates": counters.get("rows_with_duplicates", None)},
        "elapsed_seconds": round(elapsed, 3),
        "items_per_second": round(total / elapsed, 2) if elapsed > 0 else None,
        "files": files,
    }
    old = [f"{PARTS}/{p.rsplit('/', 1)[-1]}" for p in fsutil.match(fsutil.join(cfg.output, PARTS, "part-*.parquet"))]
    fsutil.write_json_atomic(fsutil.join(cfg.output, layout.MANIFEST), manifest)  # the commit point
    keep = {f["path"] for f in files}
    fsutil.delete_quietly([fsutil.join(cfg.output, p) for p in old if p not in keep])
    fsutil.delete_tree(staging)
    log.info("published %d neighbour rows in %d file(s) to %s", total, len(files), cfg.output)
    return manifest


def read_neighbors(output: str):
    """The published neighbour table (only the parts the manifest lists) as one Arrow table."""
    import pyarrow as pa

    manifest = fsutil.read_json(fsutil.join(output, layout.MANIFEST))
    if manifest.get("kind") != "neighbors":
        raise ValueError(f"{output} holds no neighbour table")
    tables = [features_io.read_table(fsutil.join(output, f["path"])) for f in manifest["files"]]
    return pa.concat_tables(tables) if tables else SCHEMA.empty_table()


# -- command line -----------------------------------------------------------------------------------


def register(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("neighbors", help="top-k neighbours of every indexed item → Parquet (Beam job)")
    p.add_argument("--index", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--version", default=None, help="index version (default: LATEST)")
    p.add_argument("--method", choices=METHODS, default="annoy")
    p.add_argument("--no-rerank", action="store_true", help="keep Annoy's scores instead of re-ranking 4k exactly")
    p.add_argument("--qe", type=int, default=0, help="query expansion with the top N")
    p.add_argument("--search-k", type=int, default=-1,
                   help="Annoy search_k (default: the manifest's annoy.search_k, else trees × candidates)")
    p.add_argument("--lsh-radius", type=int, default=LSH_RADIUS, help="largest MIH substring radius")
    p.add_argument("--chunk-size", type=int, default=2048, help="items per unit of work")
    p.add_argument("--batch-size", type=int, default=256, help="queries searched as one batch")
    p.add_argument("--max-duplicates", type=int, default=100, help="duplicate_ids listed per row")
    p.add_argument("--num-files", type=int, default=0, help="output files (default: the runner decides)")
    p.add_argument("--no-verify", action="store_true", help="workers check file sizes only, not digests")
    p.set_defaults(run=main, beam=True)
    return p


def main(args: argparse.Namespace, beam_args: list[str]) -> int:
    opts = NeighborOptions(
        k=args.k, method=args.method, rerank=not args.no_rerank, qe=args.qe, search_k=args.search_k,
        lsh_radius=args.lsh_radius, batch_size=args.batch_size, max_duplicates=args.max_duplicates,
    )
    cfg = NeighborsConfig(index=args.index, output=args.output, version=args.version, options=opts,
                          chunk_size=args.chunk_size, num_shards=args.num_files, verify=not args.no_verify)
    m = run(cfg, beam_args)
    dups = m["counts"]["rows_with_duplicates"]
    print(f"neighbors: {m['counts']['rows']} rows (k={opts.k}, {opts.method}{'+rerank' if opts.rerank else ''}"
          f"{f'+qe{opts.qe}' if opts.qe else ''}) from {m['index']['version']} in {m['elapsed_seconds']:.1f}s "
          f"({m['items_per_second'] or 0:.0f} items/s) → {cfg.output}"
          + (f"; {dups} items have exact duplicates" if dups is not None else ""))
    return 0
