"""The index job: features in, a published index version out.

1. read the feature files listed in the extract manifest;
2. fit tf.Transform over the whole corpus (L2 → PCA → L2) and transform every row;
3. key rows by a stable hash of ``image_id``, group per shard, build each shard
   (Annoy, LSH codes + MIH tables, float16 vectors, id map) on its worker;
4. move the staged version into place, write ``MANIFEST.json`` with a digest of
   every file, then switch ``LATEST``. A build killed at any point before that last
   step leaves the previous version and pointer as they were.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import tempfile
import time
from typing import Any

import apache_beam as beam
import numpy as np
from apache_beam.options.pipeline_options import PipelineOptions

from index_builder import layout, lsh
from index_builder.shard import ShardParams
from pipelines.extract import feature_files, read_manifest
from transforms import fsutil
from transforms.index_build import (
    BuildShardFn,
    KeyByShardFn,
    make_preprocessing_fn,
    raw_feature_spec,
    table_to_instances,
)

log = logging.getLogger(__name__)


@dataclasses.dataclass
class IndexConfig:
    features: str
    output: str
    shards: int = 1
    dims: int = 256
    trees: int = 50
    lsh_bits: int = 128
    seed: int = 1234
    keep_versions: int = 3


def run(cfg: IndexConfig, beam_args: list[str] | None = None) -> dict[str, Any]:
    import tensorflow as tf  # noqa: F401  (tf.Transform needs it loaded)
    import tensorflow_transform.beam as tft_beam
    from tensorflow_transform.tf_metadata import dataset_metadata, schema_utils

    if cfg.lsh_bits not in lsh.SUPPORTED_BITS:
        raise ValueError(f"--lsh-bits must be one of {lsh.SUPPORTED_BITS}")
    if cfg.shards < 1:
        raise ValueError("--shards must be at least 1")
    features_manifest = read_manifest(cfg.features)
    files = feature_files(cfg.features, features_manifest)
    dim_in = int(features_manifest["dimension"])
    dim_out = dim_in if cfg.dims == 0 else min(cfg.dims, dim_in)
    n_items = int(features_manifest["counts"]["ok"])
    if n_items == 0:
        raise ValueError(f"{cfg.features} holds no features: nothing to index")
    if cfg.dims and n_items < dim_out:
        log.warning("only %d items for a %d-d PCA: trailing axes will be noise", n_items, dim_out)
    version = layout.new_version()
    staging = fsutil.join(cfg.output, layout.STAGING, version)
    planes = lsh.hyperplanes(dim_out, cfg.lsh_bits, cfg.seed)
    params = ShardParams(trees=cfg.trees, seed=cfg.seed)
    started = time.time()
    metadata = dataset_metadata.DatasetMetadata(schema_utils.schema_from_feature_spec(raw_feature_spec(dim_in)))
    log.info("index %d items from %s -> %s (%s, %d shards)", n_items, cfg.features, cfg.output, version,
             cfg.shards)
    with tempfile.TemporaryDirectory(prefix="cbir-tft-") as tft_tmp:
        p = beam.Pipeline(options=PipelineOptions(beam_args or []))
        with tft_beam.Context(temp_dir=_tft_temp(beam_args, tft_tmp)):
            rows = (
                p
                | "Files" >> beam.Create(files)
                | "ReadParquet" >> beam.io.ReadAllFromParquetBatched()
                | "ToInstances" >> beam.FlatMap(table_to_instances)
            )
            (transformed, _), transform_fn = (rows, metadata) | "FitTransform" >> tft_beam.AnalyzeAndTransformDataset(
                make_preprocessing_fn(dim_out if cfg.dims else 0)
            )
            _ = transform_fn | "WriteTransformFn" >> tft_beam.WriteTransformFn(staging)
            keyed = transformed | "KeyByShard" >> beam.ParDo(KeyByShardFn(cfg.shards))
            every_shard = p | "AllShards" >> beam.Create([(s, None) for s in range(cfg.shards)])
            (
                (keyed, every_shard)
                | "Merge" >> beam.Flatten()
                | "GroupByShard" >> beam.GroupByKey()
                | "BuildShard" >> beam.ParDo(BuildShardFn(staging, dim_out, planes, params))
            )
        p.run().wait_until_finish()
    _write_npy(fsutil.join(staging, layout.LSH_PLANES), planes)
    elapsed = time.time() - started
    manifest = publish(cfg, version, staging, features_manifest, dim_in, dim_out, elapsed)
    return manifest


def _tft_temp(beam_args: list[str] | None, local: str) -> str:
    """tf.Transform's scratch space: the job's temp_location on a cluster, a local folder here."""
    opts = PipelineOptions(beam_args or []).get_all_options()
    return opts.get("temp_location") or local


def _write_npy(path: str, array: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, array)
    with beam.io.filesystems.FileSystems.create(path) as f:
        f.write(buf.getvalue())


def publish(
    cfg: IndexConfig,
    version: str,
    staging: str,
    features_manifest: dict[str, Any],
    dim_in: int,
    dim_out: int,
    elapsed: float,
) -> dict[str, Any]:
    shard_infos = []
    files: dict[str, dict[str, Any]] = {}
    for s in range(cfg.shards):
        info = fsutil.read_json(fsutil.join(staging, layout.shard_dir(s), layout.SHARD_INFO))
        shard_infos.append(info)
        for name, meta in info["files"].items():
            files[f"{layout.shard_dir(s)}/{name}"] = meta
        files[f"{layout.shard_dir(s)}/{layout.SHARD_INFO}"] = _digest(
            fsutil.join(staging, layout.shard_dir(s), layout.SHARD_INFO)
        )
    for sub in (layout.TRANSFORM_DIR, layout.TRANSFORMED_METADATA_DIR):
        for path in fsutil.match(fsutil.join(staging, sub, "**")):
            files[path[len(staging) + 1:]] = _digest(path)
    files[layout.LSH_PLANES] = _digest(fsutil.join(staging, layout.LSH_PLANES))
    total = sum(i["items"] for i in shard_infos)
    manifest = {
        "kind": "index",
        "format_version": layout.FORMAT_VERSION,
        "version": version,
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "metric": layout.METRIC,
        "dimension": {"input": dim_in, "output": dim_out},
        "transform": {"steps": ["l2", "pca" if cfg.dims else "none", "l2"], "dims": cfg.dims},
        "shards": cfg.shards,
        "items": total,
        "items_per_shard": [i["items"] for i in shard_infos],
        "model": features_manifest["model"],
        "model_fingerprint": features_manifest["model_fingerprint"],
        "features_run_id": features_manifest.get("run_id"),
        "annoy": {"trees": cfg.trees, "metric": layout.METRIC, "seed": cfg.seed},
        "lsh": {"bits": cfg.lsh_bits, "seed": cfg.seed, "substring_bits": lsh.SUBSTRING_BITS},
        "vectors_dtype": "float16",
        "elapsed_seconds": round(elapsed, 3),
        "bytes": sum(f["bytes"] for f in files.values()),
        "files": dict(sorted(files.items())),
    }
    # Move the complete version into place, commit it with its manifest, then switch the pointer.
    sources = fsutil.match(fsutil.join(staging, "**"))
    final = fsutil.join(cfg.output, version)
    fsutil.move(sources, [fsutil.join(final, s[len(staging) + 1:]) for s in sources])
    fsutil.write_json_atomic(fsutil.join(final, layout.MANIFEST), manifest)
    fsutil.write_json_atomic(fsutil.join(cfg.output, layout.POINTER), {"version": version})
    fsutil.delete_tree(staging)
    log.info("published %s: %d items in %d shards, %.1f MB", version, total, cfg.shards, manifest["bytes"] / 1e6)
    return manifest


def _digest(path: str) -> dict[str, Any]:
    with beam.io.filesystems.FileSystems.open(path, compression_type="uncompressed") as f:
        digest, size = layout.sha256_stream(iter(lambda: f.read(1 << 20), b""))
    return {"sha256": digest, "bytes": size}
