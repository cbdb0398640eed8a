"""PTransforms of the index job: feature rows, the tf.Transform fit, shard builds."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import uuid
from typing import Any

import apache_beam as beam
import numpy as np
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from index_builder import layout
from index_builder.shard import ShardItems, ShardParams, build_shard
from transforms import features_io

log = logging.getLogger(__name__)

STRING_COLUMNS = ("image_id", "uri", "label", "sha256")
ATTEMPTS = "attempts"  # under the staging version: one folder per shard build attempt


def raw_feature_spec(dim: int) -> dict[str, Any]:
    import tensorflow as tf

    spec = {c: tf.io.FixedLenFeature([], tf.string) for c in STRING_COLUMNS}
    spec["feature"] = tf.io.FixedLenFeature([dim], tf.float32)
    return spec


def make_preprocessing_fn(dims: int):
    """L2-normalise → centre and project on the top ``dims`` principal axes → L2-normalise.

    The mean and the PCA matrix are tf.Transform analysers: one full pass over the
    corpus computes them, and the saved graph applies the same constants to every
    query, so a query and the corpus can never be transformed differently.
    ``dims == 0`` keeps the dimension and only normalises (the two L2 steps
    collapse into one). The first L2 makes PCA fit directions, not magnitudes,
    which is what cosine search compares.
    """
    import tensorflow as tf
    import tensorflow_transform as tft

    if dims < 0:
        raise ValueError(f"dims must be 0 (keep) or positive, not {dims}")

    def preprocessing_fn(inputs):
        x = tf.math.l2_normalize(inputs["feature"], axis=1)
        if dims:
            mean = tft.mean(x, reduce_instance_dims=False)
            pca = tft.pca(x, output_dim=dims, dtype=tf.float32)
            x = tf.matmul(x - mean, pca)
        outputs = {"feature": tf.math.l2_normalize(x, axis=1)}
        for c in STRING_COLUMNS:
            outputs[c] = tf.identity(inputs[c])
        return outputs

    return preprocessing_fn


def table_to_instances(table) -> tuple[list[dict[str, Any]], list[str]]:
    """Arrow feature rows → tf.Transform instance dicts, and the ids of rows with non-finite features.

    A NaN or infinite vector would poison the corpus-wide mean and covariance, so
    such rows are left out of the index instead of silently breaking every query.
    """
    vectors = features_io.feature_matrix(table)
    finite = np.isfinite(vectors).all(axis=1)
    cols = {c: table.column(c).to_pylist() for c in STRING_COLUMNS}
    out, bad = [], []
    for i in range(table.num_rows):
        if not finite[i]:
            bad.append(cols["image_id"][i])
            continue
        row = {c: (cols[c][i] or "").encode("utf-8") for c in STRING_COLUMNS}
        row["feature"] = vectors[i]
        out.append(row)
    return out, bad


NON_FINITE_TAG = "non_finite"


class ToInstancesFn(beam.DoFn):
    """Feature tables → instance dicts; ids of rows left out go to :data:`NON_FINITE_TAG`.

    The left-out ids travel to their shard (:class:`KeyByShardFn`) so that each shard's
    SHARD.json accounts for them: items in = items indexed + duplicates + non-finite,
    checked per build without trusting a counter.
    """

    def __init__(self):
        self._rows = Metrics.counter("cbir_index", "rows_read")
        self._skipped = Metrics.counter("cbir_index", "non_finite_skipped")

    def process(self, table):
        rows, bad = table_to_instances(table)
        if bad:
            log.warning("%d feature rows with non-finite values left out of the index, e.g. %s", len(bad), bad[:3])
            self._skipped.inc(len(bad))
            for image_id in bad:
                yield beam.pvalue.TaggedOutput(NON_FINITE_TAG, image_id)
        self._rows.inc(len(rows) + len(bad))
        yield from rows


def key_skipped(image_id: str, num_shards: int) -> tuple[int, dict[str, Any]]:
    """A left-out row as a marker for its shard's build (same hash as the rows it would have joined)."""
    return layout.stable_shard(image_id, num_shards), {"skipped": "non_finite", "image_id": image_id}


def _decode(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


class KeyByShardFn(beam.DoFn):
    """(shard, row) with the shard a stable hash of image_id (layout.stable_shard)."""

    def __init__(self, num_shards: int):
        self._shards = num_shards

    def process(self, row: dict[str, Any]):
        image_id = _decode(row["image_id"])
        label = _decode(row["label"])
        yield layout.stable_shard(image_id, self._shards), {
            "image_id": image_id,
            "uri": _decode(row["uri"]),
            "label": label or None,
            "sha256": _decode(row["sha256"]),
            "feature": np.asarray(row["feature"], dtype=np.float32),
        }


def attempt_dir(staging: str, shard: int, attempt: str) -> str:
    return FileSystems.join(staging, ATTEMPTS, f"shard-{shard:05d}-{attempt}")


class BuildShardFn(beam.DoFn):
    """Builds a shard on local disk, then uploads it to its own attempt folder under staging.

    A runner may run a bundle twice (a retry after a lost worker, a zombie that
    still writes). Each attempt uploads to a folder of its own and writes
    SHARD.json last, so the publisher can pick one complete attempt and never
    mixes files of two (the Annoy file of a multithreaded build differs between
    attempts, so a mix would not match its digests).
    """

    def __init__(self, staging: str, dim: int, planes: np.ndarray, params: ShardParams):
        self._staging = staging
        self._dim = dim
        self._planes = planes
        self._params = params
        self._items = Metrics.counter("cbir_index", "items")
        self._shards = Metrics.counter("cbir_index", "shards")
        self._duplicates = Metrics.counter("cbir_index", "duplicates_dropped")
        self._seconds = Metrics.distribution("cbir_index", "shard_build_ms")

    def process(self, keyed: tuple[int, Any]):
        shard, elements = keyed
        rows, non_finite = [], 0
        for r in elements:
            if r is None:  # marks a shard that must exist even if empty
                continue
            if "skipped" in r:  # a row left out before the transform, accounted for here
                non_finite += 1
                continue
            rows.append(r)
        items = ShardItems.from_rows(rows, self._dim)
        local = tempfile.mkdtemp(prefix=f"cbir-shard-{shard:05d}-")
        try:
            info = build_shard(items, shard, local, self._planes, self._params, non_finite_skipped=non_finite)
            dest = attempt_dir(self._staging, shard, uuid.uuid4().hex[:12])
            names = sorted(n for n in os.listdir(local) if n != layout.SHARD_INFO) + [layout.SHARD_INFO]
            for name in names:  # SHARD.json last: its presence means the attempt is whole
                _upload(os.path.join(local, name), FileSystems.join(dest, name))
        finally:
            shutil.rmtree(local, ignore_errors=True)
        self._items.inc(info["items"])
        self._shards.inc()
        self._duplicates.inc(info["duplicates_dropped"])
        self._seconds.update(int(info["seconds"]["total"] * 1000))
        yield info


def _upload(local_path: str, dest: str) -> None:
    with open(local_path, "rb") as src, FileSystems.create(dest) as dst:
        shutil.copyfileobj(src, dst, length=8 << 20)
