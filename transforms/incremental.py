"""Incremental re-indexing: reuse last night's features for unchanged images.

An image is reused when its content digest (sha256 of the bytes) is in the
previous run and that run's model fingerprint, feature dtype and precision equal
this run's. Reused images skip decode and inference entirely.

Only small things cross a shuffle: the set of previous digests is a side input
(64-character strings), and previous feature vectors are joined by digest with
the lightweight metadata of the reused images, never with image bytes.
"""

from __future__ import annotations

import hashlib
from typing import Any

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics

from artefacts.manifests import FeaturesManifest
from transforms import features_io
from transforms.records import FeatureRow, ImageMeta, ImageRecord

REUSED_TAG = "reused"


def previous_rows(table) -> list[tuple[str, tuple[np.ndarray, int, int]]]:
    """Arrow feature table → (sha256, (feature, width, height)) pairs."""
    vectors = features_io.feature_matrix(table)
    shas = table.column("sha256").to_pylist()
    widths = table.column("width").to_pylist()
    heights = table.column("height").to_pylist()
    return [(shas[i], (vectors[i], widths[i], heights[i])) for i in range(table.num_rows)]


class SplitReusableFn(beam.DoFn):
    """Routes records whose digest is known to ``reused`` as ``(sha256, record-without-bytes)``."""

    def __init__(self):
        self._reused = Metrics.counter("cbir", "reused")
        self._new = Metrics.counter("cbir", "to_extract")

    def process(self, record: ImageRecord, known: Any):
        sha = hashlib.sha256(record.data).hexdigest()
        if sha in known:
            self._reused.inc()
            yield beam.pvalue.TaggedOutput(REUSED_TAG, (sha, (record.image_id, record.uri, record.label, record.unit)))
        else:
            self._new.inc()
            yield record


def _join(element: tuple[str, dict[str, list]], dtype: str):
    sha, groups = element
    previous = groups["previous"]
    if not previous:
        return
    feature, width, height = previous[0]
    for image_id, uri, label, unit in groups["current"]:
        meta = ImageMeta(image_id, uri, label, sha, int(width), int(height), unit)
        yield FeatureRow(meta, np.asarray(feature, dtype=np.float32).astype(dtype))


class ReuseFeatures(beam.PTransform):
    """``records`` → (records still to extract, FeatureRows copied from the previous run)."""

    def __init__(self, previous_files: list[str], feature_dtype: str):
        super().__init__()
        self._files = previous_files
        self._dtype = feature_dtype

    def expand(self, records):
        previous = (
            records.pipeline
            | "PreviousFiles" >> beam.Create(self._files)
            | "ReadPrevious" >> beam.io.ReadAllFromParquetBatched(
                columns=["sha256", "width", "height", "feature"]
            )
            | "PreviousRows" >> beam.FlatMap(previous_rows)
        )
        known = (
            previous
            | "Digests" >> beam.Keys()
            | "DistinctDigests" >> beam.Distinct()
            | "AsPairs" >> beam.Map(lambda sha: (sha, True))
        )
        split = records | "Split" >> beam.ParDo(SplitReusableFn(), beam.pvalue.AsDict(known)).with_outputs(
            REUSED_TAG, main="new"
        )
        reused = (
            {"previous": previous, "current": split[REUSED_TAG]}
            | "JoinByDigest" >> beam.CoGroupByKey()
            | "Copy" >> beam.FlatMap(_join, self._dtype)
        )
        return split.new, reused


def reusable(previous: FeaturesManifest, fingerprint: str, feature_dtype: str, precision: str,
             reduced_decode: bool = True) -> str | None:
    """None when the previous run's features can be reused, else the reason they cannot."""
    if previous.reduced_decode != reduced_decode:
        return "the previous run decoded JPEG differently (--full-decode)"
    if previous.model_fingerprint != fingerprint:
        return f"model fingerprint {previous.model_fingerprint} differs from {fingerprint}"
    if previous.feature_dtype != feature_dtype:
        return f"feature dtype {previous.feature_dtype} differs from {feature_dtype}"
    if previous.precision != precision:
        return f"precision {previous.precision} differs from {precision}"
    return None
