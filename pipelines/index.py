"""The index job: features in, a published index version out.

1. read the feature files listed in the extract manifest;
2. fit tf.Transform over the whole corpus (L2 → PCA → L2) and transform every row;
3. key rows by a stable hash of ``image_id``, group per shard, build each shard
   (Annoy, LSH codes + MIH tables, float16 vectors, id map) on its worker, which
   uploads it to an attempt folder under ``<index>/_staging/<version>/``;
4. publish: move one complete attempt per shard and the transform into
   ``<index>/<version>/``, check every file is there at its size, write
   ``MANIFEST.json`` with a digest of every file (the commit point), switch
   ``LATEST``, then garbage-collect old versions and dead builds.

A build killed at any point before ``LATEST`` is switched leaves the previous
version and pointer exactly as they were: versions are never written in place,
and a version folder without a manifest is not an index. Concurrent builds into
one output are not supported (the last to publish wins ``LATEST``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import os
import tempfile
import time
from typing import Any

import apache_beam as beam
import numpy as np
from apache_beam.options.pipeline_options import PipelineOptions

from artefacts import layout, signing
from artefacts.manifests import (
    Accounting,
    AnnoyParams,
    Dimension,
    FeaturesManifest,
    FileDigest,
    HnswParams,
    IndexManifest,
    LshParams,
    TransformInfo,
    utc_now,
)
from artefacts.transform import (
    BIAS_FILE,
    CHECK_TOLERANCE,
    PROJECTION_FILE,
    VectorTransform,
    max_difference,
    probe_matrices,
)
from evaluation import gate
from index_builder import augment, calibration, hnsw, local_store, lsh
from index_builder.shard import DEFAULT_ON_DISK_BYTES, INDEX_TYPES, ShardParams
from pipelines.runner import pipeline_options
from plumbing import fsutil, job_metrics
from plumbing import publish as protocol
from plumbing.lease import Lease
from transforms.feature_sets import feature_files, read_features_manifest
from transforms.index_build import (
    ATTEMPTS,
    STRING_COLUMNS,
    BuildShardFn,
    FitBatchesFn,
    KeyLocalFn,
    TransformAndKeyFn,
    make_preprocessing_fn,
    tensor_adapter_config,
)

log = logging.getLogger(__name__)

SHARDING = {"key": "image_id", "hash": "blake2b(digest_size=8), big-endian integer, modulo shards"}


class IndexBuildError(RuntimeError):
    """The build did not produce a complete version; nothing was published."""


@dataclasses.dataclass
class IndexConfig:
    features: str
    output: str
    shards: int = 1
    dims: int = 256  # PCA dimension; 0 keeps the input dimension
    trees: int = 50
    lsh_bits: int = 256  # 128-bit codes needed 8× the candidates for recall 0.95 at 1M (scan cost ~equal)
    seed: int = 1234
    keep_versions: int = 3  # complete versions kept after a publish (LATEST's always is)
    annoy_on_disk_bytes: int = DEFAULT_ON_DISK_BYTES  # build a shard's Annoy in its file above this size
    stale_after_seconds: float = 24 * 3600  # a build unpublished this long is dead: its folders may go
    index_types: tuple[str, ...] = INDEX_TYPES
    hnsw_m: int = hnsw.DEFAULT_M
    hnsw_ef_construction: int = hnsw.DEFAULT_EF_CONSTRUCTION
    target_recall: float = calibration.DEFAULT_TARGET  # 0: no calibration (library defaults)
    lsh_projection: str = "itq"
    lsh_sample: int = 20_000  # vectors the LSH projection is fitted on
    signing_key_file: str | None = None  # sign the manifest (HMAC-SHA256) with this key
    dba: int = 0  # database-side augmentation with each item's top K (0: off)
    dba_alpha: float = augment.DEFAULT_DBA_ALPHA
    graph_k: int = 0  # store the corpus k-NN graph (diffusion re-ranking) with K neighbours per item (0: off)
    local_features: bool = True  # carry the features' local features (when extracted) into the shards
    gate: str = ""  # quality conditions the version must meet before LATEST moves ('map>=0.5,recall@10>=0.95')
    gate_queries: str | None = None  # JSON lines {"image_id", "expected"} for expected@K
    gate_sample: int = 1000  # leave-one-out queries the gate measures on

    def validate(self) -> None:
        if self.lsh_bits not in lsh.SUPPORTED_BITS:
            raise ValueError(f"--lsh-bits must be one of {lsh.SUPPORTED_BITS}")
        if self.shards < 1:
            raise ValueError("--shards must be at least 1")
        if self.dims < 0:
            raise ValueError("--dims must be 0 (keep the dimension) or positive")
        if self.trees < 1:
            raise ValueError("--trees must be at least 1")
        if self.keep_versions < 1:
            raise ValueError("keep_versions must be at least 1: the published version is always kept")
        if self.lsh_projection not in lsh.PROJECTIONS:
            raise ValueError(f"--lsh-projection must be one of {', '.join(lsh.PROJECTIONS)}")
        if self.dba < 0 or self.graph_k < 0:
            raise ValueError("--dba and --graph-k must not be negative")
        if self.dba_alpha < 0:
            raise ValueError("--dba-alpha must not be negative")
        if self.gate:
            gate.parse_conditions(self.gate)
        elif self.gate_queries:
            raise ValueError("--gate-queries needs --gate conditions, e.g. --gate 'expected@10>=0.9'")
        self.shard_params()  # checks the index types, HNSW and calibration settings

    def shard_params(self, local_features: bool = False) -> ShardParams:
        return ShardParams(trees=self.trees, seed=self.seed, on_disk_bytes=self.annoy_on_disk_bytes,
                           index_types=tuple(self.index_types), hnsw_m=self.hnsw_m,
                           hnsw_ef_construction=self.hnsw_ef_construction, target_recall=self.target_recall,
                           local_features=local_features)


def run(cfg: IndexConfig, beam_args: list[str] | None = None) -> IndexManifest:
    """Fits the transform, builds the shards, publishes and cleans up; returns the published manifest."""
    cfg.validate()
    features_manifest = read_features_manifest(cfg.features)
    files = feature_files(cfg.features, features_manifest)
    dim_in = features_manifest.dimension
    if cfg.dims > dim_in:
        log.warning("--dims %d is above the feature dimension %d: keeping %d", cfg.dims, dim_in, dim_in)
    dim_out = dim_in if cfg.dims == 0 else min(cfg.dims, dim_in)
    n_items = sum(p.rows for p in features_manifest.parts("features"))
    if n_items == 0:
        raise ValueError(f"{cfg.features} holds no features: nothing to index")
    if cfg.dims and n_items < dim_out:
        log.warning("only %d items for a %d-d PCA: trailing axes will be noise", n_items, dim_out)
    key = signing.load_key(cfg.signing_key_file) if cfg.signing_key_file else None
    if cfg.gate_queries:  # read before any work: a bad query file fails now, not after the build
        gate.read_gate_queries(fsutil.read_bytes(cfg.gate_queries))
    version = layout.new_version()
    with Lease(cfg.output, version, cfg.stale_after_seconds):  # one build per output at a time
        return _build_and_publish(cfg, features_manifest, files, dim_in, dim_out, n_items, version, key, beam_args)


def _build_and_publish(cfg: IndexConfig, features_manifest: FeaturesManifest, files: list[str], dim_in: int,
                       dim_out: int, n_items: int, version: str, key: bytes | None,
                       beam_args: list[str] | None) -> IndexManifest:
    staging = fsutil.join(cfg.output, layout.STAGING, version)  # GC'd by version name, not by run (collect_garbage)
    started = time.time()
    log.info("index %d items from %s -> %s (%s, %d shards, %s)", n_items, cfg.features, cfg.output, version,
             cfg.shards, "+".join(cfg.index_types))
    _copy_encoder(features_manifest, staging)
    fit_result = _fit(cfg, files, dim_in, dim_out if cfg.dims else 0, staging, beam_args)
    transform, planes, offsets = _transform_as_data(cfg, staging, dim_in, dim_out)
    local_files = feature_files(cfg.features, features_manifest, "local") if cfg.local_features else []
    params = cfg.shard_params(local_features=bool(local_files))
    extra = Extras(local=dict(features_manifest.local_features or {}) if local_files else None)
    if cfg.dba:
        # pass 2: vectors only; the launcher augments them with their neighbours; pass 3 builds the shards
        first = _build_shards(files, transform, staging, dim_out, planes, offsets,
                              dataclasses.replace(params, vectors_only=True, local_features=False), [],
                              FIRST_ATTEMPTS, cfg.shards, beam_args)
        first_attempts = choose_attempts(staging, cfg.shards, FIRST_ATTEMPTS)
        augmented, extra.dba = _augment(cfg, staging, first_attempts)
        extra.carried = [(i.get("duplicates_dropped", 0), i.get("non_finite_skipped", 0)) for _, i in first_attempts]
        result = _build_shards(augmented, VectorTransform(), staging, dim_out, planes, offsets, params, local_files,
                               ATTEMPTS, cfg.shards, beam_args)
        counters = {**job_metrics.collect(fit_result, ("cbir_index",), distributions=False),
                    **job_metrics.collect(first, ("cbir_index",), distributions=False),
                    **{f"dba_pass_{k}": v for k, v in
                       job_metrics.collect(result, ("cbir_index",), distributions=False).items()}}
    else:
        result = _build_shards(files, transform, staging, dim_out, planes, offsets, params, local_files, ATTEMPTS,
                               cfg.shards, beam_args)
        counters = {**job_metrics.collect(fit_result, ("cbir_index",), distributions=False),
                    **job_metrics.collect(result, ("cbir_index",), distributions=False)}
    if cfg.graph_k:
        extra.graph = _graph(cfg, staging)
    elapsed = time.time() - started
    try:
        manifest = publish(cfg, version, staging, features_manifest, dim_in, dim_out, elapsed, counters, transform,
                           key, extra)
    except protocol.PublishRefusedError:
        protocol.discard_staging(staging)  # a refused build is dead: nothing of it is worth keeping
        raise
    except gate.GateFailedError:
        raise  # built and committed in its folder, LATEST untouched; nothing is cleaned up
    try:
        collect_garbage(cfg.output, version, cfg.keep_versions, cfg.stale_after_seconds)
    except Exception as exc:  # the new version is published; a failed cleanup must not undo that
        log.warning("could not clean up old versions under %s: %s", cfg.output, exc)
    return manifest


FIRST_ATTEMPTS = "attempts-first"  # --dba: the first pass's shards (vectors and id maps only)
AUGMENTED_DIR = "_augmented"  # --dba: the augmented vectors the shards are rebuilt from (not published)


@dataclasses.dataclass
class Extras:
    """What a build adds beyond the shards, for the manifest: DBA, the graph, local features."""

    dba: dict[str, Any] | None = None
    graph: dict[str, Any] | None = None
    local: dict[str, Any] | None = None
    carried: list[tuple[int, int]] | None = None  # --dba: per shard, (duplicates, non-finite) of the first pass


def _build_shards(files: list[str], transform: VectorTransform, staging: str, dim: int, planes: np.ndarray,
                  offsets: np.ndarray | None, params: ShardParams, local_files: list[str], attempts: str,
                  shards: int, beam_args: list[str] | None):
    """A Beam pass: feature rows (and local-feature rows) keyed by shard, each shard built on one worker."""
    p = beam.Pipeline(options=pipeline_options(beam_args))
    every_shard = p | "AllShards" >> beam.Create([(s, None) for s in range(shards)])
    keyed = (
        p
        | "Files" >> beam.Create(files)
        | "ReadParquet" >> beam.io.ReadAllFromParquetBatched(columns=[*STRING_COLUMNS, "feature"])
        | "TransformAndKey" >> beam.ParDo(TransformAndKeyFn(transform, shards))
    )
    parts = [keyed, every_shard]
    if local_files:
        parts.append(
            p
            | "LocalFiles" >> beam.Create(local_files)
            | "ReadLocal" >> beam.io.ReadAllFromParquetBatched(columns=list(KeyLocalFn.COLUMNS))
            | "KeyLocal" >> beam.ParDo(KeyLocalFn(shards))
        )
    (
        tuple(parts)
        | "Merge" >> beam.Flatten()
        | "GroupByShard" >> beam.GroupByKey()
        | "BuildShard" >> beam.ParDo(BuildShardFn(staging, dim, planes, offsets, params, attempts))
    )
    result = p.run()
    result.wait_until_finish()
    return result


def _load_attempts(attempts: list[tuple[str, dict[str, Any]]]) -> tuple[np.ndarray, list[Any]]:
    """Every chosen attempt's vectors (float32, global order = shard order) and id-map tables."""
    import pyarrow.parquet as pq

    vectors, idmaps = [], []
    for folder, _ in attempts:
        vectors.append(np.load(io.BytesIO(fsutil.read_bytes(fsutil.join(folder, layout.VECTORS_FILE))))
                       .astype(np.float32))
        idmaps.append(pq.read_table(io.BytesIO(fsutil.read_bytes(fsutil.join(folder, layout.IDMAP_FILE)))))
    dim = vectors[0].shape[1] if vectors else 0
    return (np.concatenate(vectors) if vectors else np.zeros((0, dim), np.float32)), idmaps


def _augment(cfg: IndexConfig, staging: str, attempts: list[tuple[str, dict[str, Any]]]
             ) -> tuple[list[str], dict[str, Any]]:
    """DBA on the launcher over the first pass's vectors; writes the augmented rows, one Parquet per shard.

    Memory: the corpus's vectors as float32 plus the neighbour search (exact up to
    ``augment.EXACT_UP_TO`` items, an HNSW graph beyond), i.e. about 1 GB per million
    items at 128 dimensions.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    started = time.monotonic()
    vectors, idmaps = _load_attempts(attempts)
    ids, sims = augment.knn(vectors, cfg.dba)
    augmented = augment.dba(vectors, ids, sims, cfg.dba, cfg.dba_alpha)
    del vectors, ids, sims
    out, lo = [], 0
    for s, idmap in enumerate(idmaps):
        n = idmap.num_rows
        block = augmented[lo:lo + n]
        lo += n
        table = pa.table({
            "image_id": idmap.column("image_id"), "uri": idmap.column("uri"), "label": idmap.column("label"),
            "sha256": idmap.column("sha256"),
            "feature": pa.FixedSizeListArray.from_arrays(pa.array(block.reshape(-1), pa.float32()),
                                                         block.shape[1] if block.ndim == 2 else 0),
        })
        path = fsutil.join(staging, AUGMENTED_DIR, f"part-{s:05d}.parquet")
        buf = pa.BufferOutputStream()
        pq.write_table(table, buf)
        fsutil.write_bytes_atomic(path, buf.getvalue().to_pybytes())
        out.append(path)
    info = {"k": cfg.dba, "alpha": cfg.dba_alpha, "neighbours": augment.method_for(len(augmented)),
            "seconds": round(time.monotonic() - started, 3)}
    log.info("DBA (k=%d, alpha=%g) over %d items in %.1fs", cfg.dba, cfg.dba_alpha, len(augmented), info["seconds"])
    return out, info


def _graph(cfg: IndexConfig, staging: str) -> dict[str, Any]:
    """The k-NN graph of the stored vectors (global ids), for diffusion; written under ``staging/graph/``."""
    started = time.monotonic()
    vectors, _ = _load_attempts(choose_attempts(staging, cfg.shards))
    ids, sims = augment.knn(vectors, cfg.graph_k)
    _write_npy(fsutil.join(staging, layout.GRAPH_NEIGHBOURS), ids.astype(np.int32))
    _write_npy(fsutil.join(staging, layout.GRAPH_SIMILARITIES), np.where(ids >= 0, sims, 0).astype(np.float16))
    info = {"k": cfg.graph_k, "neighbours": layout.GRAPH_NEIGHBOURS, "similarities": layout.GRAPH_SIMILARITIES,
            "built_on": "the stored vectors" + (" (after DBA)" if cfg.dba else ""),
            "method": augment.method_for(len(vectors)), "seconds": round(time.monotonic() - started, 3)}
    log.info("k-NN graph (k=%d) of %d items in %.1fs", cfg.graph_k, len(vectors), info["seconds"])
    return info


def _fit(cfg: IndexConfig, files: list[str], dim_in: int, dims: int, staging: str, beam_args: list[str] | None):
    """Pass 1: tf.Transform's analysers over Arrow batches → ``staging/transform_fn``; the LSH sample → .npy."""
    import tensorflow as tf  # noqa: F401  (tf.Transform needs it loaded)
    import tensorflow_transform.beam as tft_beam

    with tempfile.TemporaryDirectory(prefix="cbir-tft-") as tft_tmp:
        p = beam.Pipeline(options=pipeline_options(beam_args))
        with tft_beam.Context(temp_dir=_tft_temp(beam_args, tft_tmp)):
            batches = (
                p
                | "Files" >> beam.Create(files)
                | "ReadParquet" >> beam.io.ReadAllFromParquetBatched(columns=["image_id", "feature"])
                | "ToBatches" >> beam.ParDo(FitBatchesFn(cfg.lsh_sample)).with_outputs(FitBatchesFn.SAMPLE_TAG,
                                                                                         main="batches")
            )
            transform_fn = (batches.batches, tensor_adapter_config(dim_in)) | "Analyze" >> tft_beam.AnalyzeDataset(
                make_preprocessing_fn(dims))
            _ = transform_fn | "WriteTransformFn" >> tft_beam.WriteTransformFn(staging)
            (
                batches[FitBatchesFn.SAMPLE_TAG]
                | "Sample" >> beam.combiners.Top.Smallest(cfg.lsh_sample, key=lambda kv: kv[0])
                | "WriteSample" >> beam.Map(_write_sample, fsutil.join(staging, SAMPLE_FILE))
            )
        result = p.run()
        result.wait_until_finish()
    return result


def _copy_encoder(features_manifest: FeaturesManifest, staging: str) -> None:
    """An index of autoencoder codes carries the encoder as data, so a query never loads it from elsewhere."""
    encoder = features_manifest.encoder
    if not encoder:
        return
    from models.autoencoders.feature_autoencoder import ENCODER_DATA_DIR, weights_digest

    source = fsutil.join(encoder["path"], encoder.get("weights", ENCODER_DATA_DIR))
    local = fsutil.localise_tree(source)
    if weights_digest(local) != encoder.get("weights_digest"):
        raise IndexBuildError(f"the encoder data at {source} is not the encoder these codes were made with "
                              "(weights digest differs): re-run cbir autoencode")
    for name in sorted(os.listdir(local)):
        with open(os.path.join(local, name), "rb") as f:
            fsutil.write_bytes_atomic(fsutil.join(staging, layout.ENCODER_DIR, name), f.read())


SAMPLE_FILE = "_lsh_sample.npy"  # raw vectors the LSH projection is fitted on; not part of the version


def _write_sample(pairs: list[tuple[int, np.ndarray]], path: str) -> None:
    _write_npy(path, np.stack([v for _, v in pairs]).astype(np.float32))


def _transform_as_data(cfg: IndexConfig, staging: str, dim_in: int, dim_out: int
                       ) -> tuple[VectorTransform, np.ndarray, np.ndarray]:
    """Reads the fitted transform off our own transform_fn, checks it, fits LSH; writes both as .npy."""
    import tensorflow as tf
    import tensorflow_transform as tft

    local = fsutil.localise_tree(staging) if "://" in staging else staging
    graph = tft.TFTransformOutput(local)  # the SavedModel this very job just wrote: ours to load

    def run_graph(x: np.ndarray, output: str) -> np.ndarray:
        out = graph.transform_raw_features({"feature": tf.constant(np.asarray(x, np.float32))},
                                           drop_unused_features=True)
        return out[output].numpy()

    sample = np.load(io.BytesIO(fsutil.read_bytes(fsutil.join(staging, SAMPLE_FILE))))
    fsutil.delete_quietly([fsutil.join(staging, SAMPLE_FILE)])
    if cfg.dims:
        projection, bias = probe_matrices(lambda x: run_graph(x, "projected"), dim_in)
        transform = VectorTransform(projection, bias)
        _write_npy(fsutil.join(staging, layout.TRANSFORM_DATA_DIR, PROJECTION_FILE), projection)
        _write_npy(fsutil.join(staging, layout.TRANSFORM_DATA_DIR, BIAS_FILE), bias)
    else:
        transform = VectorTransform()
    check = sample[:512]
    diff = max_difference(transform(check), run_graph(check, "feature"))
    if diff > CHECK_TOLERANCE:
        raise IndexBuildError(f"the transform as data differs from transform_fn by {diff:.2e} (more than "
                              f"{CHECK_TOLERANCE:g}) on {len(check)} rows: nothing was published")
    log.info("transform as data matches transform_fn on %d rows (max |diff| %.1e)", len(check), diff)
    planes, offsets = lsh.fit_projection(transform(sample), cfg.lsh_bits, cfg.seed, cfg.lsh_projection)
    _write_npy(fsutil.join(staging, layout.LSH_PLANES), planes)
    _write_npy(fsutil.join(staging, layout.LSH_OFFSETS), offsets)
    return transform, planes, offsets


def _tft_temp(beam_args: list[str] | None, local: str) -> str:
    """tf.Transform's scratch space: the job's temp_location on a cluster, a local folder here."""
    opts = PipelineOptions(beam_args or []).get_all_options()
    return opts.get("temp_location") or local


def _write_npy(path: str, array: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, array)
    with beam.io.filesystems.FileSystems.create(path) as f:
        f.write(buf.getvalue())


def _sizes(pattern: str) -> dict[str, int]:
    """path → size for every file matching ``pattern`` (one listing, no reads)."""
    try:
        found = beam.io.filesystems.FileSystems.match([pattern])[0].metadata_list
    except beam.io.filesystem.BeamIOError:
        return {}
    return {m.path: m.size_in_bytes for m in found}


def choose_attempts(staging: str, shards: int, attempts: str = ATTEMPTS) -> list[tuple[str, dict[str, Any]]]:
    """For every shard, one complete build attempt: (folder, SHARD.json content).

    Complete means SHARD.json exists (uploaded last) and every file it lists is
    there at the size it records. Among complete attempts the first by name wins;
    any of them is a valid shard.
    """
    sizes = _sizes(fsutil.join(staging, attempts, "**"))
    chosen = []
    for s in range(shards):
        prefix = fsutil.join(staging, attempts, f"shard-{s:05d}-")
        infos = sorted(p for p in sizes if p.startswith(prefix) and p.endswith("/" + layout.SHARD_INFO))
        for info_path in infos:
            folder = info_path[: -len(layout.SHARD_INFO) - 1]
            info = fsutil.read_json(info_path)
            if all(sizes.get(fsutil.join(folder, n)) == m["bytes"] for n, m in info["files"].items()):
                chosen.append((folder, info))
                break
            log.warning("shard %d: attempt %s is incomplete, skipped", s, folder)
        else:
            raise IndexBuildError(f"shard {s} has no complete build under {staging}: nothing was published")
    return chosen


def publish(
    cfg: IndexConfig,
    version: str,
    staging: str,
    features_manifest: FeaturesManifest,
    dim_in: int,
    dim_out: int,
    elapsed: float,
    metrics: dict[str, int] | None = None,
    transform: VectorTransform | None = None,
    signing_key: bytes | None = None,
    extras: Extras | None = None,
) -> IndexManifest:
    """Checks the build's counts, moves it into ``<output>/<version>``, commits its manifest, switches ``LATEST``."""
    extras = extras or Extras()
    attempts = choose_attempts(staging, cfg.shards)
    infos = [info for _, info in attempts]
    if extras.carried:  # --dba: rows the first pass left out are accounted for by its shards
        for info, (dup, non_finite) in zip(infos, extras.carried, strict=True):
            info["duplicates_dropped"] = info.get("duplicates_dropped", 0) + dup
            info["non_finite_skipped"] = info.get("non_finite_skipped", 0) + non_finite
    rows_in = sum(p.rows for p in features_manifest.parts("features"))
    accounted = sum(i["items"] + i.get("duplicates_dropped", 0) + i.get("non_finite_skipped", 0) for i in infos)
    checked = {"feature rows": rows_in, "rows read (counter)": (metrics or {}).get("rows_read"),
               "items + duplicates + non-finite in the shards": accounted}
    protocol.check_counts("index", checked)
    files: dict[str, FileDigest] = {}
    moves: list[tuple[str, str]] = []
    for s, (folder, info) in enumerate(attempts):
        for name, meta in info["files"].items():
            files[f"{layout.shard_dir(s)}/{name}"] = FileDigest(meta["sha256"], meta["bytes"])
            moves.append((fsutil.join(folder, name), f"{layout.shard_dir(s)}/{name}"))
        files[f"{layout.shard_dir(s)}/{layout.SHARD_INFO}"] = _digest(fsutil.join(folder, layout.SHARD_INFO))
        moves.append((fsutil.join(folder, layout.SHARD_INFO), f"{layout.shard_dir(s)}/{layout.SHARD_INFO}"))
    for sub in (layout.TRANSFORM_DIR, layout.TRANSFORMED_METADATA_DIR, layout.TRANSFORM_DATA_DIR, layout.ENCODER_DIR,
                layout.GRAPH_DIR):
        found = fsutil.match(fsutil.join(staging, sub, "**"))
        if sub == layout.TRANSFORM_DIR and not found:
            raise IndexBuildError(f"{staging} has no {sub}/: the tf.Transform fit did not complete")
        for path in found:
            rel = path[len(staging) + 1:]
            files[rel] = _digest(path)
            moves.append((path, rel))
    for name in (layout.LSH_PLANES, layout.LSH_OFFSETS):
        files[name] = _digest(fsutil.join(staging, name))
        moves.append((fsutil.join(staging, name), name))
    total = sum(i["items"] for i in infos)
    types = list(cfg.index_types)
    has_projection = transform is not None and transform.projection is not None
    manifest = IndexManifest(
        version=version,
        created_utc=utc_now(),
        metric=layout.METRIC,
        dimension=Dimension(dim_in, dim_out),
        transform=TransformInfo(
            ["l2", "pca", "l2"] if cfg.dims else ["l2"], cfg.dims,
            projection_file=f"{layout.TRANSFORM_DATA_DIR}/{PROJECTION_FILE}" if has_projection else None,
            bias_file=f"{layout.TRANSFORM_DATA_DIR}/{BIAS_FILE}" if has_projection else None,
        ),
        index_types=types,
        shards=cfg.shards,
        sharding=SHARDING,
        items=total,
        items_per_shard=[i["items"] for i in infos],
        duplicates_dropped=sum(i.get("duplicates_dropped", 0) for i in infos),
        model=features_manifest.model,
        model_fingerprint=features_manifest.model_fingerprint,
        features_run_id=features_manifest.run_id,
        annoy=AnnoyParams(
            trees=cfg.trees, metric=layout.METRIC, seed=cfg.seed,
            search_k=_calibrated_max(infos, "annoy", "search_k", -1),
            on_disk_build_shards=[s for s, i in enumerate(infos) if (i.get("annoy") or {}).get("on_disk_build")],
            calibration=_calibration_summary(infos, "annoy", cfg),
        ) if "annoy" in types else None,
        lsh=LshParams(bits=cfg.lsh_bits, seed=cfg.seed, substring_bits=lsh.SUBSTRING_BITS, method=cfg.lsh_projection,
                      candidates=_calibrated_max(infos, "lsh", "candidates", None),
                      calibration=_calibration_summary(infos, "lsh", cfg)) if "lsh" in types else None,
        hnsw=HnswParams(m=cfg.hnsw_m, ef_construction=cfg.hnsw_ef_construction,
                        ef_search=_calibrated_max(infos, "hnsw", "ef_search", hnsw.DEFAULT_EF_SEARCH),
                        calibration=_calibration_summary(infos, "hnsw", cfg)) if "hnsw" in types else None,
        metrics=metrics or {},
        elapsed_seconds=round(elapsed, 3),
        bytes=sum(f.bytes for f in files.values()),
        files=dict(sorted(files.items())),
        accounting=Accounting("upstream manifest", len(features_manifest.parts("features")), rows_in, checked),
        dba=extras.dba,
        graph=extras.graph,
        local_features=({**extras.local, "items_with_local_features": sum(
            (i.get("local_features") or {}).get("items_with_local_features", 0) for i in infos),
            "vote_index": {"file": local_store.VOTES_FILE, "nprobe": local_store.VOTE_NPROBE,
                           "ratio": local_store.VOTE_RATIO,
                           "kinds": sorted({i["local_features"]["vote_index"]["kind"] for i in infos})}}
            if extras.local is not None else None),
    )
    final = fsutil.join(cfg.output, version)
    moves = [(src, fsutil.join(final, rel)) for src, rel in moves]
    fsutil.move([src for src, _ in moves], [dst for _, dst in moves])
    _check_in_place(final, files)
    if signing_key is not None:  # before the commit point, so a committed signed version is never unsigned
        fsutil.write_bytes_atomic(fsutil.join(final, signing.SIGNATURE_FILE),
                                  signing.sign(protocol.manifest_bytes(manifest), signing_key).encode())
    protocol.commit(final, manifest, [], staging)  # the commit point: the version's MANIFEST.json
    if cfg.gate:  # the version is whole in its folder; products see it only once LATEST names it
        _gate(cfg, version)
    fsutil.write_json_atomic(fsutil.join(cfg.output, layout.POINTER), {"version": version})
    log.info("published %s: %d items in %d shards, %.1f MB", version, total, cfg.shards, manifest.bytes / 1e6)
    return manifest


GATE_SUFFIX = ".gate.json"  # <output>/<version>.gate.json: the gate's report beside the version


def _gate(cfg: IndexConfig, version: str) -> dict[str, Any]:
    """Measures the committed version; raises GateFailedError (LATEST untouched) when a condition fails."""
    from search import index_files
    from search.searcher import Searcher

    conditions = gate.parse_conditions(cfg.gate)
    queries = gate.read_gate_queries(fsutil.read_bytes(cfg.gate_queries)) if cfg.gate_queries else None
    started = time.time()
    root = index_files.localise(cfg.output, version)
    with Searcher(root, version=version, verify=False) as searcher:  # just written by this job
        measured = gate.measure(searcher, conditions, cfg.gate_sample, cfg.seed, queries)
    passed, rows = gate.check(conditions, measured)
    report = {"version": version, "passed": passed, "conditions": rows, "measured": measured,
              "sample": cfg.gate_sample, "queries_file": cfg.gate_queries, "seconds": round(time.time() - started, 3),
              "created_utc": utc_now()}
    path = fsutil.join(cfg.output, version + GATE_SUFFIX)
    fsutil.write_json_atomic(path, report)
    if not passed:
        failed = ", ".join(f"{r['condition']} (measured {_show(r['measured'])})" for r in rows if not r["passed"])
        raise gate.GateFailedError(f"the quality gate failed for {version}: {failed}. LATEST still names the previous "
                                   f"version; {version} stays built but unpublished, report at {path}", report)
    log.info("gate passed for %s: %s", version, ", ".join(f"{r['condition']} ({_show(r['measured'])})" for r in rows))
    return report


def _show(value: float | None) -> str:
    return "not computable" if value is None else f"{value:.4f}"


def _calibrated_max(infos: list[dict[str, Any]], kind: str, key: str, default: Any) -> Any:
    """The largest calibrated effort over the shards (what a caller without per-shard values should use)."""
    values = [(i.get("calibration") or {}).get(kind, {}).get(key) for i in infos]
    values = [v for v in values if v is not None]
    return max(values) if values else default


def _calibration_summary(infos: list[dict[str, Any]], kind: str, cfg: IndexConfig) -> dict[str, Any] | None:
    """What calibration chose and measured, per shard, for one index type (None when it did not run)."""
    per_shard = [(i.get("calibration") or {}).get(kind) for i in infos]
    if not any(per_shard):
        return None
    measured = [p for p in per_shard if p]
    return {
        "target_recall": cfg.target_recall, "k": calibration.DEFAULT_K,
        "per_shard": per_shard,
        "min_recall": min(p["recall"] for p in measured),
        "reached_target": all(p["reached_target"] for p in measured),
    }


def _check_in_place(final: str, files: dict[str, FileDigest]) -> None:
    """Every file the manifest will list is in the version folder at its size, before the commit."""
    sizes = _sizes(fsutil.join(final, "**"))
    bad = [rel for rel, meta in files.items() if sizes.get(fsutil.join(final, rel)) != meta.bytes]
    if bad:
        raise IndexBuildError(f"{final}: {len(bad)} file(s) missing or of the wrong size after the move: {bad[:5]}")


def _digest(path: str) -> FileDigest:
    with beam.io.filesystems.FileSystems.open(path, compression_type="uncompressed") as f:
        digest, size = layout.sha256_stream(iter(lambda: f.read(1 << 20), b""))
    return FileDigest(digest, size)


def collect_garbage(
    output: str, latest: str, keep: int, stale_after: float, now: float | None = None
) -> list[str]:
    """Deletes complete versions beyond the newest ``keep`` and folders of builds that died.

    Runs only after ``LATEST`` points at ``latest``; see layout.plan_cleanup for
    what is kept. Returns the folders deleted (relative to ``output``).
    """
    complete, incomplete, staging = set(), set(), set()
    root = output.rstrip("/") + "/"
    for path in fsutil.match(fsutil.join(output, "**")):
        parts = path[len(root):].split("/")
        if parts[0] == layout.STAGING and len(parts) > 2:
            staging.add(parts[1])
        elif len(parts) > 1 and layout.is_version(parts[0]):
            (complete if parts[1:] == [layout.MANIFEST] else incomplete).add(parts[0])
    if "://" not in output:  # local disk also keeps folders that hold no file (a build that died early)
        with contextlib.suppress(OSError):
            staging.update(os.listdir(os.path.join(output, layout.STAGING)))
        with contextlib.suppress(OSError):
            incomplete.update(n for n in os.listdir(output) if layout.is_version(n))
    incomplete -= complete
    plan = layout.plan_cleanup(sorted(complete), sorted(incomplete), sorted(staging), latest, keep,
                               time.time() if now is None else now, stale_after)
    for rel in plan.all:
        log.info("deleting %s/%s", output, rel)
        fsutil.delete_tree(fsutil.join(output, rel))
        if layout.is_version(rel):
            fsutil.delete_quietly([fsutil.join(output, rel + GATE_SUFFIX)])
    if "://" not in output:  # local disk keeps empty folders; object stores have none
        with contextlib.suppress(OSError):
            os.rmdir(os.path.join(output, layout.STAGING))
    return plan.all


# -- command line -------------------------------------------------------------------------------------


def register(subparsers: Any) -> None:
    from pipelines.options import fraction, non_negative_int, positive_int

    ix = subparsers.add_parser("index", help="features → sharded Annoy + LSH index version")
    ix.add_argument("--features", required=True, help="an extract output folder")
    ix.add_argument("--output", required=True)
    ix.add_argument("--shards", type=positive_int, default=1)
    ix.add_argument("--dims", type=non_negative_int, default=256, help="PCA dimension (0 keeps the input dimension)")
    ix.add_argument("--trees", type=positive_int, default=50)
    ix.add_argument("--lsh-bits", type=int, default=256, choices=lsh.SUPPORTED_BITS)
    ix.add_argument("--seed", type=int, default=1234)
    ix.add_argument("--keep-versions", type=positive_int, default=3,
                    help="complete versions kept (LATEST's always is)")
    ix.add_argument("--annoy-on-disk-mb", type=positive_int, default=None,
                    help="build a shard's Annoy in its file (not RAM) above this estimated size")
    ix.add_argument("--stale-after-hours", type=float, default=24.0,
                    help="unpublished builds older than this are cleaned up")
    ix.add_argument("--index-types", default=",".join(INDEX_TYPES),
                    help=f"comma-separated subset of {','.join(INDEX_TYPES)} (default all)")
    ix.add_argument("--hnsw-m", type=positive_int, default=hnsw.DEFAULT_M, help="HNSW links per node")
    ix.add_argument("--hnsw-ef-construction", type=positive_int, default=hnsw.DEFAULT_EF_CONSTRUCTION,
                    help="HNSW candidate list while building")
    ix.add_argument("--target-recall", type=fraction, default=calibration.DEFAULT_TARGET,
                    help="recall@10 each index type is calibrated to per shard (0: no calibration)")
    ix.add_argument("--lsh-projection", choices=lsh.PROJECTIONS, default="itq",
                    help="how LSH hyperplanes are made (itq: learned PCA-ITQ rotation)")
    ix.add_argument("--dba", type=non_negative_int, default=0, metavar="K",
                    help="database-side augmentation: store each vector as the similarity-weighted mean of itself "
                         "and its top K (a second build pass; queries stay as they are)")
    ix.add_argument("--dba-alpha", type=float, default=augment.DEFAULT_DBA_ALPHA,
                    help="DBA weights are similarity**alpha")
    ix.add_argument("--graph-k", type=non_negative_int, default=0, metavar="K",
                    help="store the corpus k-NN graph with K neighbours per item, for --diffusion re-ranking")
    ix.add_argument("--no-local-features", action="store_true",
                    help="leave out the local features the extract stored (no --verify with this index)")
    ix.add_argument("--gate", default="", metavar="CONDITIONS",
                    help="only switch LATEST when the new version meets these, e.g. 'map>=0.50,recall@10>=0.95' "
                         "(metrics: map, p@1, p@5, p@10, recall@K, expected@K, queries_found); else exit 5")
    ix.add_argument("--gate-queries", default=None, metavar="FILE",
                    help="JSON lines {\"image_id\": ..., \"expected\": [...]} for expected@K")
    ix.add_argument("--gate-sample", type=positive_int, default=1000,
                    help="leave-one-out queries the gate measures on (seeded)")
    ix.add_argument("--signing-key", default=None, metavar="FILE",
                    help="sign the version's manifest with HMAC-SHA256 under this key (readers given it refuse others)")
    ix.set_defaults(handler=main, beam=True)


def main(args: Any, beam_args: list[str]) -> int:
    cfg = IndexConfig(
        features=args.features, output=args.output, shards=args.shards, dims=args.dims, trees=args.trees,
        lsh_bits=args.lsh_bits, seed=args.seed, keep_versions=args.keep_versions,
        stale_after_seconds=args.stale_after_hours * 3600,
        index_types=tuple(t.strip() for t in args.index_types.split(",") if t.strip()),
        hnsw_m=args.hnsw_m, hnsw_ef_construction=args.hnsw_ef_construction, target_recall=args.target_recall,
        lsh_projection=args.lsh_projection, signing_key_file=args.signing_key, dba=args.dba,
        dba_alpha=args.dba_alpha, graph_k=args.graph_k, local_features=not args.no_local_features,
        gate=args.gate, gate_queries=args.gate_queries, gate_sample=args.gate_sample,
        **({"annoy_on_disk_bytes": args.annoy_on_disk_mb << 20} if args.annoy_on_disk_mb else {}),
    )
    manifest = run(cfg, beam_args)
    print_summary(manifest)
    if cfg.gate:
        report = fsutil.read_json(fsutil.join(cfg.output, manifest.version + GATE_SUFFIX))
        print("  gate passed: " + ", ".join(f"{r['condition']} ({_show(r['measured'])})" for r in report["conditions"]))
    return 0


def print_summary(m: IndexManifest) -> None:
    rate = m.items / m.elapsed_seconds if m.elapsed_seconds else 0
    print(f"index: {m.version}: {m.items} items in {m.shards} shard(s) ({'+'.join(m.index_types)}), "
          f"{m.dimension.input}→{m.dimension.output} dims, {m.bytes / 1e6:.1f} MB, "
          f"{m.elapsed_seconds:.1f}s ({rate:.0f} items/s)")
    for kind, key in (("hnsw", "ef_search"), ("annoy", "search_k"), ("lsh", "candidates")):
        params = getattr(m, kind)
        cal = params.calibration if params else None
        if cal:
            values = [p[key] for p in cal["per_shard"] if p]
            print(f"  {kind}: {key} {min(values)}–{max(values)} per shard for recall@{cal['k']} ≥ "
                  f"{cal['target_recall']} (lowest measured {cal['min_recall']:.3f})")
