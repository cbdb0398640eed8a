"""The index job's Beam graphs: the fit pass and the shard-build pass.

Each ``build_*`` composes its graph on the pipeline it is given and runs nothing (as
``pipelines.extract.build`` does): the launcher (``job.py``) decides when a pass runs and
reads its counters, and a test can look at a graph without running it.
"""

from __future__ import annotations

import apache_beam as beam
import numpy as np

from artefacts.transform import VectorTransform
from index_builder.shard import ShardParams
from plumbing import fsutil
from transforms.index_build import (
    STRING_COLUMNS,
    BuildShardFn,
    FitBatchesFn,
    KeyLocalFn,
    TransformAndKeyFn,
    make_preprocessing_fn,
    tensor_adapter_config,
)

SAMPLE_FILE = "_lsh_sample.npy"  # raw vectors the LSH projection is fitted on; not part of the version


def build_fit(p: beam.Pipeline, files: list[str], dim_in: int, dims: int, lsh_sample: int, staging: str,
              temp_dir: str) -> None:
    """Pass 1: tf.Transform's analysers over Arrow batches → ``staging/transform_fn``; the LSH sample → .npy.

    ``dims`` 0 keeps the input dimension (no PCA). tf.Transform takes its scratch folder
    (``temp_dir``) while the graph is composed, not when it runs, so it is given here.
    """
    import tensorflow as tf  # noqa: F401  (tf.Transform needs it loaded)
    import tensorflow_transform.beam as tft_beam

    with tft_beam.Context(temp_dir=temp_dir):
        batches = (
            p
            | "Files" >> beam.Create(files)
            | "ReadParquet" >> beam.io.ReadAllFromParquetBatched(columns=["image_id", "feature"])
            | "ToBatches" >> beam.ParDo(FitBatchesFn(lsh_sample)).with_outputs(FitBatchesFn.SAMPLE_TAG,
                                                                                main="batches")
        )
        transform_fn = (batches.batches, tensor_adapter_config(dim_in)) | "Analyze" >> tft_beam.AnalyzeDataset(
            make_preprocessing_fn(dims))
        _ = transform_fn | "WriteTransformFn" >> tft_beam.WriteTransformFn(staging)
        (
            batches[FitBatchesFn.SAMPLE_TAG]
            | "Sample" >> beam.combiners.Top.Smallest(lsh_sample, key=lambda kv: kv[0])
            | "WriteSample" >> beam.Map(_write_sample, fsutil.join(staging, SAMPLE_FILE))
        )


def _write_sample(pairs: list[tuple[int, np.ndarray]], path: str) -> None:
    fsutil.write_npy(path, np.stack([v for _, v in pairs]).astype(np.float32))


def build_shards(p: beam.Pipeline, files: list[str], transform: VectorTransform, staging: str, dim: int,
                 planes: np.ndarray, offsets: np.ndarray | None, params: ShardParams, local_files: list[str],
                 attempts: str, shards: int) -> None:
    """A build pass: feature rows (and local-feature rows) keyed by shard, each shard built on one worker.

    Every shard number is fed in even when no row hashes to it, so each shard is built
    (possibly empty) and publishing finds one attempt per shard under ``staging/attempts``.
    """
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
