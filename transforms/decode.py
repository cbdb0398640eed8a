"""Decode + resize as a DoFn that never lets one bad image stop the job."""

from __future__ import annotations

import hashlib

import apache_beam as beam
from apache_beam.metrics import Metrics

from models.imaging import DEFAULT_MAX_PIXELS, decode_and_resize
from transforms.records import FAILURES_TAG, ImageMeta, ImageRecord, failure

NAMESPACE = "cbir"


def count_failure(stage: str, error: str, n: int = 1) -> None:
    """Counters ``failed_<stage>`` and ``failed_<stage>_<ErrorClass>``.

    One naming scheme for every stage, so a monitoring page can sum failures by stage
    or break them down by cause without knowing which DoFn produced them.
    """
    Metrics.counter(NAMESPACE, f"failed_{stage}").inc(n)
    Metrics.counter(NAMESPACE, f"failed_{stage}_{error}").inc(n)


class DecodeFn(beam.DoFn):
    """``ImageRecord`` → ``(ImageMeta, uint8 pixels)``; failures to the tagged output.

    The metadata rides along as the RunInference key, so features and provenance
    never need a shuffle to be joined again.
    """

    def __init__(self, size: int, max_pixels: int = DEFAULT_MAX_PIXELS, reduced_decode: bool = True):
        self._size = size
        self._max_pixels = max_pixels
        self._reduced = reduced_decode
        self._ok = Metrics.counter(NAMESPACE, "decoded")
        self._reduced_count = Metrics.counter(NAMESPACE, "decoded_reduced_scale")
        self._pixels = Metrics.distribution(NAMESPACE, "source_megapixels_x1000")

    def process(self, record: ImageRecord):
        sha = hashlib.sha256(record.data).hexdigest()
        try:
            img = decode_and_resize(record.data, self._size, self._max_pixels, self._reduced)
        except Exception as exc:  # every decoder error is data, not a crash
            count_failure("decode", type(exc).__name__)
            yield beam.pvalue.TaggedOutput(FAILURES_TAG, failure(record.image_id, record.uri, "decode", exc))
            return
        self._ok.inc()
        Metrics.counter(NAMESPACE, f"decoded_{img.format.lower()}").inc()
        if img.reduced_scale > 1:
            self._reduced_count.inc()
        self._pixels.update(img.width * img.height // 1000)
        meta = ImageMeta(record.image_id, record.uri, record.label, sha, img.width, img.height)
        yield meta, img.pixels
