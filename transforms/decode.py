"""Decode + resize as a DoFn that never lets one bad image stop the job.

Decoding runs in a small thread pool inside the DoFn (Pillow releases the GIL), with a
bounded window of images in flight. On a runner that executes a stage in one thread
(the DirectRunner's safe ``in_memory`` mode, one Dataflow/Flink SDK thread), this is
what keeps the cores busy: while the model runs a batch downstream, the pool decodes
the next images. The window bounds memory (``window`` decoded images plus their bytes),
and results leave in input order.

Counters are incremented on the bundle's own thread only: Beam metrics are recorded per
bundle in thread-local state, so an increment from a pool thread would be lost.
"""

from __future__ import annotations

import collections
import hashlib
import os
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.timestamp import MIN_TIMESTAMP
from apache_beam.utils.windowed_value import WindowedValue

from models.backbone.imaging import DEFAULT_MAX_PIXELS, DecodedImage, decode_and_resize
from transforms.records import FAILURES_TAG, ImageMeta, ImageRecord, failure

NAMESPACE = "cbir"
MAX_DECODE_THREADS = 8


def count_failure(stage: str, error: str, n: int = 1) -> None:
    """Counters ``failed_<stage>`` and ``failed_<stage>_<ErrorClass>``.

    One naming scheme for every stage, so a monitoring page can sum failures by stage
    or break them down by cause without knowing which DoFn produced them.
    """
    Metrics.counter(NAMESPACE, f"failed_{stage}").inc(n)
    Metrics.counter(NAMESPACE, f"failed_{stage}_{error}").inc(n)


def default_decode_threads() -> int:
    return max(1, min(MAX_DECODE_THREADS, os.cpu_count() or 1))


def _decode(record: ImageRecord, size: int, max_pixels: int, reduced: bool) -> tuple[str, Any]:
    """Runs on a pool thread: pure, never raises, touches no Beam state."""
    sha = hashlib.sha256(record.data).hexdigest()
    try:
        return sha, decode_and_resize(record.data, size, max_pixels, reduced)
    except Exception as exc:  # every decoder error is data, not a crash
        return sha, exc


class PooledFn(beam.DoFn):
    """A DoFn whose per-element work runs in a bounded thread pool, results leaving in input order.

    Subclasses define :meth:`work` (pure: runs on a pool thread, never raises, touches no
    Beam state) and :meth:`emit` (runs on the bundle's thread: counters and outputs).
    ``threads`` 0 means one per core (at most :data:`MAX_DECODE_THREADS`); 1 works on the
    bundle's thread. ``window`` is how many elements may be in flight (default four per
    thread, at least 64).
    """

    def __init__(self, threads: int = 0, window: int = 0):
        self._threads = threads
        self._window = window

    def work(self, record: ImageRecord) -> Any:
        raise NotImplementedError

    def emit(self, record: ImageRecord, result: Any):
        raise NotImplementedError

    def setup(self) -> None:
        threads = self._threads or default_decode_threads()
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="cbir-pool") if threads > 1 else None
        self._limit = self._window or max(64, 4 * threads)

    def start_bundle(self) -> None:
        self._pending: collections.deque[tuple[ImageRecord, Future]] = collections.deque()

    def process(self, record: ImageRecord):
        if self._pool is None:
            yield from self.emit(record, self.work(record))
            return
        self._pending.append((record, self._pool.submit(self.work, record)))
        while len(self._pending) > self._limit:
            rec, fut = self._pending.popleft()
            yield from self.emit(rec, fut.result())

    def finish_bundle(self):
        # Batch pipelines only: everything here is in the global window.
        while self._pending:
            rec, fut = self._pending.popleft()
            for out in self.emit(rec, fut.result()):
                if isinstance(out, beam.pvalue.TaggedOutput):
                    yield beam.pvalue.TaggedOutput(out.tag, WindowedValue(out.value, MIN_TIMESTAMP, [GlobalWindow()]))
                else:
                    yield WindowedValue(out, MIN_TIMESTAMP, [GlobalWindow()])

    def teardown(self) -> None:
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)


class DecodeFn(PooledFn):
    """``ImageRecord`` → ``(ImageMeta, uint8 pixels)``; failures to the tagged output.

    The metadata rides along as the RunInference key, so features and provenance
    never need a shuffle to be joined again. The window (see :class:`PooledFn`) lets a
    model batch downstream overlap with decoding the next images.
    """

    def __init__(
        self, size: int, max_pixels: int = DEFAULT_MAX_PIXELS, reduced_decode: bool = True, threads: int = 0,
        window: int = 0,
    ):
        super().__init__(threads, window)
        self._size = size
        self._max_pixels = max_pixels
        self._reduced = reduced_decode
        self._ok = Metrics.counter(NAMESPACE, "decoded")
        self._reduced_count = Metrics.counter(NAMESPACE, "decoded_reduced_scale")
        self._pixels = Metrics.distribution(NAMESPACE, "source_megapixels_x1000")

    def work(self, record: ImageRecord) -> tuple[str, Any]:
        return _decode(record, self._size, self._max_pixels, self._reduced)

    def emit(self, record: ImageRecord, result: tuple[str, Any]):
        sha, img = result
        if isinstance(img, BaseException):
            count_failure("decode", type(img).__name__)
            yield beam.pvalue.TaggedOutput(FAILURES_TAG, failure(record.image_id, record.uri, "decode", img,
                                                                 unit=record.unit))
            return
        assert isinstance(img, DecodedImage)
        self._ok.inc()
        Metrics.counter(NAMESPACE, f"decoded_{img.format.lower()}").inc()
        if img.reduced_scale > 1:
            self._reduced_count.inc()
        self._pixels.update(img.width * img.height // 1000)
        meta = ImageMeta(record.image_id, record.uri, record.label, sha, img.width, img.height, record.unit)
        yield meta, img.pixels
