"""The index job's Beam steps: the tf.Transform fit over Arrow batches, the transform as data, shard builds.

Two passes over the features, both on Arrow record batches (no per-row Python objects):

1. **fit**: feature batches (``feature`` as ``list<float32>``, rows with NaN or infinity
   left out) go to ``tft_beam.AnalyzeDataset`` through a TFXIO tensor adapter; a seeded,
   deterministic sample of raw vectors (smallest blake2b of ``image_id``) feeds the LSH fit.
2. **build**: each batch is transformed with the fitted transform *as data*
   (``artefacts.transform``), split by shard into small record batches, grouped per
   shard, and built on one worker. A shard's memory is its own rows, never the corpus.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import uuid
from typing import Any

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from artefacts import layout
from artefacts.transform import VectorTransform
from index_builder.shard import VECTOR_DTYPE, ShardItems, ShardParams, build_shard, row_schema
from transforms import features_io

log = logging.getLogger(__name__)

STRING_COLUMNS = ("image_id", "uri", "label", "sha256")
ATTEMPTS = "attempts"  # under the staging version: one folder per shard build attempt
NAMESPACE = "cbir_index"


# -- pass 1: the fit ----------------------------------------------------------------------------------


def tensor_adapter_config(dim: int) -> Any:
    """TFXIO adapter for batches holding one column ``feature`` (``list<float32>`` of length ``dim``)."""
    from tensorflow_metadata.proto.v0 import schema_pb2
    from tfx_bsl.tfxio import tensor_adapter

    rep = schema_pb2.TensorRepresentation()
    rep.dense_tensor.column_name = "feature"
    rep.dense_tensor.shape.dim.add().size = dim
    return tensor_adapter.TensorAdapterConfig(pa.schema([("feature", pa.list_(pa.float32()))]), {"feature": rep})


def make_preprocessing_fn(dims: int):
    """L2-normalise → centre and project on the top ``dims`` principal axes → L2-normalise.

    The mean and the PCA matrix are tf.Transform analysers: one full pass over the corpus
    computes them. Besides the result (``feature``) the graph outputs ``projected``, the
    affine step before the last normalisation, from which the index reads the transform
    as data (``artefacts.transform.probe_matrices``). ``dims == 0`` keeps the
    dimension and only normalises. The first L2 makes PCA fit directions, not magnitudes,
    which is what cosine search compares.
    """
    import tensorflow as tf
    import tensorflow_transform as tft

    if dims < 0:
        raise ValueError(f"dims must be 0 (keep) or positive, not {dims}")

    def preprocessing_fn(inputs):
        x = tf.math.l2_normalize(inputs["feature"], axis=1)
        if not dims:
            return {"feature": x}
        mean = tft.mean(x, reduce_instance_dims=False)
        pca = tft.pca(x, output_dim=dims, dtype=tf.float32)
        projected = tf.matmul(x - mean, pca)
        return {"feature": tf.math.l2_normalize(projected, axis=1), "projected": projected}

    return preprocessing_fn


def finite_rows(table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """(float32 (n, D) vectors, boolean mask of rows whose vector is finite)."""
    vectors = features_io.feature_matrix(table)
    return vectors, np.isfinite(vectors).all(axis=1)


def sample_key(image_id: str) -> int:
    """A row's place in the LSH-fit sample: small keys are kept (deterministic, spread like random)."""
    return int.from_bytes(hashlib.blake2b(image_id.encode("utf-8"), digest_size=8).digest(), "big")


class FitBatchesFn(beam.DoFn):
    """Feature tables → ``list<float32>`` batches for the fit; ``sample`` gets each batch's sample candidates."""

    SAMPLE_TAG = "sample"

    def __init__(self, sample_size: int):
        self._sample = sample_size

    def process(self, table: pa.Table):
        vectors, finite = finite_rows(table)
        if not finite.all():
            table, vectors = table.filter(pa.array(finite)), vectors[finite]
        if not len(vectors):
            return
        dim = vectors.shape[1]
        offsets = pa.array(np.arange(0, (len(vectors) + 1) * dim, dim, dtype=np.int32))
        values = pa.array(np.ascontiguousarray(vectors).reshape(-1), pa.float32())
        yield pa.RecordBatch.from_arrays([pa.ListArray.from_arrays(offsets, values)], names=["feature"])
        if self._sample:
            keys = np.asarray([sample_key(i) for i in table.column("image_id").to_pylist()], dtype=np.uint64)
            keep = np.argsort(keys, kind="stable")[: self._sample]
            for i in keep.tolist():
                yield beam.pvalue.TaggedOutput(self.SAMPLE_TAG, (int(keys[i]), vectors[i]))


# -- pass 2: transform and build ----------------------------------------------------------------------


def _strings(table: pa.Table, name: str) -> list[str | None]:
    return table.column(name).to_pylist()


def _string_column(table: pa.Table, name: str) -> pa.Array:
    """A string column of the id map: nulls become "" except in ``label`` (no label is a value)."""
    col = table.column(name).combine_chunks().cast(pa.string())
    return col if name == "label" else pc.fill_null(col, "")


class TransformAndKeyFn(beam.DoFn):
    """Feature tables → ``(shard, ("rows", RecordBatch))`` with transformed vectors, and
    ``(shard, ("non_finite", 1))`` for each row left out, so each shard accounts for its own rows.

    The transform is the fitted one as data, so the stored vectors are computed by exactly the
    code that transforms queries.
    """

    def __init__(self, transform: VectorTransform, num_shards: int):
        self._transform = transform
        self._shards = num_shards
        self._rows = Metrics.counter(NAMESPACE, "rows_read")
        self._skipped = Metrics.counter(NAMESPACE, "non_finite_skipped")

    def process(self, table: pa.Table):
        vectors, finite = finite_rows(table)
        ids = _strings(table, "image_id")
        self._rows.inc(len(ids))
        shard_of = np.asarray([layout.stable_shard(i, self._shards) for i in ids], dtype=np.int64)
        if not finite.all():
            bad = np.flatnonzero(~finite)
            log.warning("%d feature rows with non-finite values left out of the index, e.g. %s", len(bad),
                        [ids[i] for i in bad[:3]])
            self._skipped.inc(len(bad))
            for i in bad.tolist():
                yield int(shard_of[i]), ("non_finite", 1)
        keep = np.flatnonzero(finite)
        if not len(keep):
            return
        out = self._transform(vectors[keep])
        dim = out.shape[1]
        taken = table.take(pa.array(keep))
        batch = pa.RecordBatch.from_arrays(
            [_string_column(taken, c) for c in STRING_COLUMNS]
            + [pa.FixedSizeListArray.from_arrays(pa.array(out.reshape(-1).astype(VECTOR_DTYPE)), dim)],
            schema=row_schema(dim),
        )
        shards = shard_of[keep]
        order = np.argsort(shards, kind="stable")
        bounds = np.flatnonzero(np.diff(shards[order])) + 1
        for part in np.split(order, bounds):
            if len(part):
                yield int(shards[part[0]]), ("rows", batch.take(pa.array(part)))


class KeyLocalFn(beam.DoFn):
    """Local-feature tables (``extract --local-features``) → ``(shard, ("local", RecordBatch))``.

    Keyed by the same hash of ``image_id`` as the feature rows, so each shard's build sees the
    local features of exactly its own items and writes them in its dense-id order.
    """

    COLUMNS = ("image_id", "sha256", "points", "descriptors")

    def __init__(self, num_shards: int):
        self._shards = num_shards

    def process(self, table: pa.Table):
        ids = _strings(table, "image_id")
        shards = np.asarray([layout.stable_shard(i, self._shards) for i in ids], dtype=np.int64)
        batch = table.select(list(self.COLUMNS)).combine_chunks().to_batches()
        if not batch:
            return
        whole = pa.Table.from_batches(batch)
        order = np.argsort(shards, kind="stable")
        bounds = np.flatnonzero(np.diff(shards[order])) + 1
        for part in np.split(order, bounds):
            if len(part):
                yield int(shards[part[0]]), ("local", whole.take(pa.array(part)))


def attempt_dir(staging: str, shard: int, attempt: str, attempts: str = ATTEMPTS) -> str:
    return FileSystems.join(staging, attempts, f"shard-{shard:05d}-{attempt}")


class BuildShardFn(beam.DoFn):
    """Builds a shard on local disk, then uploads it to its own attempt folder under staging.

    A runner may run a bundle twice (a retry after a lost worker, a zombie that
    still writes). Each attempt uploads to a folder of its own and writes
    SHARD.json last, so the publisher can pick one complete attempt and never
    mixes files of two (the Annoy file of a multithreaded build differs between
    attempts, so a mix would not match its digests).
    """

    def __init__(self, staging: str, dim: int, planes: np.ndarray, offsets: np.ndarray | None, params: ShardParams,
                 attempts: str = ATTEMPTS):
        self._staging = staging
        self._attempts = attempts
        self._dim = dim
        self._planes = planes
        self._offsets = offsets
        self._params = params
        self._items = Metrics.counter(NAMESPACE, "items")
        self._shards = Metrics.counter(NAMESPACE, "shards")
        self._duplicates = Metrics.counter(NAMESPACE, "duplicates_dropped")
        self._seconds = Metrics.distribution(NAMESPACE, "shard_build_ms")

    def process(self, keyed: tuple[int, Any]):
        shard, elements = keyed
        local: list[pa.Table] = []
        non_finite = 0

        def row_batches():
            # One pass over the grouped values: a streaming runner pages them in, so the rows are
            # never all held twice (ShardItems.from_batches copies each batch's vectors once).
            nonlocal non_finite
            for element in elements:
                if element is None:  # marks a shard that must exist even if empty
                    continue
                kind, value = element
                if kind == "rows":
                    yield value
                elif kind == "local":
                    local.append(value)
                else:  # a row left out before the transform, accounted for here
                    non_finite += value

        items = ShardItems.from_batches(row_batches(), self._dim)
        workdir = tempfile.mkdtemp(prefix=f"cbir-shard-{shard:05d}-")
        try:
            local_rows = pa.concat_tables(local) if local else None
            local.clear()
            info = build_shard(items, shard, workdir, self._planes, self._params, non_finite_skipped=non_finite,
                               offsets=self._offsets, local_rows=local_rows)
            del local_rows
            dest = attempt_dir(self._staging, shard, uuid.uuid4().hex[:12], self._attempts)
            names = sorted(n for n in os.listdir(workdir) if n != layout.SHARD_INFO) + [layout.SHARD_INFO]
            for name in names:  # SHARD.json last: its presence means the attempt is whole
                _upload(os.path.join(workdir, name), FileSystems.join(dest, name))
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        self._items.inc(info["items"])
        self._shards.inc()
        self._duplicates.inc(info["duplicates_dropped"])
        self._seconds.update(int(info["seconds"]["total"] * 1000))
        yield info


def _upload(local_path: str, dest: str) -> None:
    with open(local_path, "rb") as src, FileSystems.create(dest) as dst:
        shutil.copyfileobj(src, dst, length=8 << 20)
