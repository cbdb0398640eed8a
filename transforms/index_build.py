"""PTransforms of the index job: feature rows, the tf.Transform fit, shard builds."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
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


def raw_feature_spec(dim: int) -> dict[str, Any]:
    import tensorflow as tf

    spec = {c: tf.io.FixedLenFeature([], tf.string) for c in STRING_COLUMNS}
    spec["feature"] = tf.io.FixedLenFeature([dim], tf.float32)
    return spec


def make_preprocessing_fn(dims: int):
    """L2-normalise → centre and project on the top ``dims`` principal axes → L2-normalise.

    The mean and the PCA matrix are tf.Transform analysers: one full pass over the
    corpus computes them, and the saved graph applies the same constants to every
    query. ``dims == 0`` keeps the dimension and only normalises.
    """
    import tensorflow as tf
    import tensorflow_transform as tft

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


def table_to_instances(table) -> list[dict[str, Any]]:
    """Arrow feature rows → tf.Transform instance dicts (float32 features, bytes strings)."""
    vectors = features_io.feature_matrix(table)
    cols = {c: table.column(c).to_pylist() for c in STRING_COLUMNS}
    out = []
    for i in range(table.num_rows):
        row = {c: (cols[c][i] or "").encode("utf-8") for c in STRING_COLUMNS}
        row["feature"] = vectors[i]
        out.append(row)
    return out


def _decode(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


class KeyByShardFn(beam.DoFn):
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


class BuildShardFn(beam.DoFn):
    """Builds a shard on local disk, then copies its files to the staging version folder."""

    def __init__(self, staging: str, dim: int, planes: np.ndarray, params: ShardParams):
        self._staging = staging
        self._dim = dim
        self._planes = planes
        self._params = params
        self._items = Metrics.counter("cbir_index", "items")
        self._shards = Metrics.counter("cbir_index", "shards")
        self._seconds = Metrics.distribution("cbir_index", "shard_build_ms")

    def process(self, keyed: tuple[int, Any]):
        shard, rows = keyed
        rows = [r for r in rows if r is not None]  # None marks a shard that must exist even if empty
        items = ShardItems.from_rows(rows, self._dim)
        local = tempfile.mkdtemp(prefix=f"cbir-shard-{shard:05d}-")
        try:
            info = build_shard(items, shard, local, self._planes, self._params)
            dest = FileSystems.join(self._staging, layout.shard_dir(shard))
            for name in sorted(os.listdir(local)):
                _upload(os.path.join(local, name), FileSystems.join(dest, name))
        finally:
            shutil.rmtree(local, ignore_errors=True)
        self._items.inc(info["items"])
        self._shards.inc()
        self._seconds.update(int(info["seconds"]["total"] * 1000))
        yield info


def _upload(local_path: str, dest: str) -> None:
    with open(local_path, "rb") as src, FileSystems.create(dest) as dst:
        shutil.copyfileobj(src, dst, length=8 << 20)
