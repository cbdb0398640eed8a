"""``cbir extract --local-features K``: keypoints and descriptors per image, as Parquet rows.

One row per record the readers delivered (``index_builder.local_store.LOCAL_SCHEMA``): the
keypoints of an image that decodes, or an ``error`` for one that does not, so the rows can
be counted against the job's read counter like every other output. The work runs in the
same bounded pool as decoding (OpenCV and Pillow release the GIL).
"""

from __future__ import annotations

import hashlib
from typing import Any

import apache_beam as beam
from apache_beam.metrics import Metrics

from index_builder.local_store import LOCAL_SCHEMA
from models.backbone.imaging import DEFAULT_MAX_PIXELS
from models.backbone.local_features import DEFAULT_MAX_SIDE, from_image_bytes
from transforms.decode import NAMESPACE, PooledFn
from transforms.records import ImageRecord


def _local(record: ImageRecord, max_keypoints: int, max_side: int, max_pixels: int) -> dict[str, Any]:
    sha = hashlib.sha256(record.data).hexdigest()
    try:
        feats = from_image_bytes(record.data, max_keypoints, max_side, max_pixels)
    except Exception as exc:  # the image fails in the feature path too; here it is a row with a reason
        return {"image_id": record.image_id, "sha256": sha, "keypoints": 0, "width": 0, "height": 0,
                "points": b"", "descriptors": b"", "error": f"{type(exc).__name__}: {exc}"[:500]}
    points, descriptors = feats.to_bytes()
    return {"image_id": record.image_id, "sha256": sha, "keypoints": feats.size, "width": feats.width,
            "height": feats.height, "points": points, "descriptors": descriptors, "error": None}


class LocalFeaturesFn(PooledFn):
    """``ImageRecord`` → a local-feature row (dict of :data:`LOCAL_SCHEMA`)."""

    def __init__(self, max_keypoints: int, max_side: int = DEFAULT_MAX_SIDE, max_pixels: int = DEFAULT_MAX_PIXELS,
                 threads: int = 0):
        super().__init__(threads)
        if max_keypoints < 1:
            raise ValueError(f"--local-features must be at least 1, not {max_keypoints}")
        self._k = max_keypoints
        self._side = max_side
        self._max_pixels = max_pixels
        self._rows = Metrics.counter(NAMESPACE, "local_rows")
        self._failed = Metrics.counter(NAMESPACE, "local_failed")
        self._keypoints = Metrics.distribution(NAMESPACE, "local_keypoints")

    def work(self, record: ImageRecord) -> dict[str, Any]:
        return _local(record, self._k, self._side, self._max_pixels)

    def emit(self, record: ImageRecord, row: dict[str, Any]):
        self._rows.inc()
        if row["error"] is not None:
            self._failed.inc()
        self._keypoints.update(row["keypoints"])
        yield row


class WriteLocalParquet(beam.PTransform):
    def __init__(self, prefix: str):
        super().__init__()
        self._prefix = prefix

    def expand(self, rows):
        return rows | "Write" >> beam.io.WriteToParquet(
            self._prefix, LOCAL_SCHEMA, file_name_suffix=".parquet", codec="snappy",
            row_group_buffer_size=16 << 20,
        )

