"""What every input reader shares: ids and labels from paths, bounded reads, accounting.

Every reader ends in :class:`Account`, one step that counts what was read (Beam
counters ``read``, ``failed_read``, ``failed_read_<ErrorClass>``), logs progress with
a rate, and splits records from failure rows. Shard readers also emit one *tally*
per shard (:data:`TALLIES_TAG`): how many entries that shard produced. The extract
job checks the tallies against the launcher's listing and the rows it wrote before
it publishes anything (ARCHITECTURE.md, "Accounting").
"""

from __future__ import annotations

import json
import logging
import posixpath
import time
from typing import TYPE_CHECKING, Any, NamedTuple

import apache_beam as beam
from apache_beam.metrics import Metrics

from plumbing.fsutil import MAX_INPUT_BYTES, NotRegularFileError, RecordTooLargeError, read_input  # noqa: F401
from transforms.decode import NAMESPACE, count_failure
from transforms.records import FAILURES_TAG, ImageRecord

if TYPE_CHECKING:
    from transforms.readers.spec import InputSpec

log = logging.getLogger(__name__)
progress_log = logging.getLogger("cbir.progress")

MAX_RECORD_BYTES = MAX_INPUT_BYTES
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff")
TALLIES_TAG = "tallies"


class ListedFile(NamedTuple):
    """One input file as the launcher listed it (path, size and modification time from the listing, no read).

    ``mtime`` is what the filesystem reports as the last update (seconds; local mtime, the object's update
    time on gs:// and s3://); None where it reports nothing, and then a re-run cannot skip the file unread.
    """

    path: str
    size: int
    mtime: float | None = None


def stamp_unit(element: Any, unit: str) -> Any:
    """A reader's output marked with the listed input it came from, so a later run can carry its rows."""
    if isinstance(element, beam.pvalue.TaggedOutput):
        if element.tag == TALLIES_TAG:
            return element
        return beam.pvalue.TaggedOutput(element.tag, stamp_unit(element.value, unit))
    if isinstance(element, dict) and "stage" in element:
        return {**element, "unit": unit}
    if hasattr(element, "_replace") and hasattr(element, "unit"):
        return element._replace(unit=unit)
    return element


class StampUnitFn(beam.DoFn):
    """Runs a shard DoFn and marks everything it yields with the shard (``unit_of`` its input), named as an
    image id is: relative to the input root, so a corpus mounted elsewhere keeps its names."""

    def __init__(self, inner: beam.DoFn, root: str, unit_of: Any = None):
        self._inner = inner
        self._root = root
        self._unit_of = unit_of

    def setup(self):
        self._inner.setup()

    def teardown(self):
        self._inner.teardown()

    def process(self, element: Any):
        unit = relative_id(self._unit_of(element) if self._unit_of is not None else element.path, self._root)
        for out in self._inner.process(element):
            yield stamp_unit(out, unit)


class ShardReadError(ValueError):
    """A record in a shard is unusable; the rest of the shard is still read."""


class CorruptRecordError(ShardReadError):
    """A TFRecord payload failed its CRC, or the bytes are not a ``tf.train.Example``."""


class MissingImageError(ShardReadError):
    """The record or sample holds no image bytes."""


class CorruptShardError(ShardReadError):
    """The shard cannot be read past this point: its remainder is one failure row."""


def read_limited(path: str, limit: int = MAX_RECORD_BYTES, size: int | None = None) -> bytes:
    """An input's bytes, regular files only, size checked before reading (``plumbing.fsutil.read_input``)."""
    return read_input(path, limit, size)


def relative_id(path: str, root: str) -> str:
    """The image id of a file: its path relative to the input root, with '/' separators."""
    root = root.rstrip("/")
    if root and path.startswith(root + "/"):
        return path[len(root) + 1:]
    return path.lstrip("/")


def label_from_id(image_id: str) -> str | None:
    """Folder input: the label is the parent folder name (None for files at the root)."""
    parent = posixpath.dirname(image_id)
    return posixpath.basename(parent) if parent else None


def is_visible(path: str, root: str) -> bool:
    """False for hidden files and anything inside a hidden folder below the root.

    ``.DS_Store``, ``._IMG_1.jpg`` (macOS resource forks), ``.ipynb_checkpoints/``:
    never images, and counting them as failures would only be noise. ``cbir shard``
    uses the same rule, so a folder and its shards hold the same inputs.
    """
    return not any(part.startswith(".") for part in relative_id(path, root).split("/"))


def is_shard_name(path: str) -> bool:
    """Shard globs skip ``_*`` and ``.*`` files: manifests, ``_SUCCESS`` markers, temp files."""
    return not posixpath.basename(path).startswith(("_", "."))


def tally(unit: str, entries: int) -> beam.pvalue.TaggedOutput:
    """A shard reader's report: ``unit`` (the shard path) produced ``entries`` records or failure rows."""
    return beam.pvalue.TaggedOutput(TALLIES_TAG, {"unit": unit, "entries": int(entries)})


class ShardFn(beam.DoFn):
    """Base of the shard DoFns: the root for relative shard names, and a shard counter."""

    def __init__(self, root: str):
        self._root = root
        self._shards = Metrics.counter(NAMESPACE, "shards_read")

    def _rel(self, path: str) -> str:
        return relative_id(path, self._root)


class _AccountFn(beam.DoFn):
    """Counts, logs progress and splits a reader's output into records and failure rows.

    Input elements are :class:`ImageRecord` or failure dicts (stage ``read``), so every
    reader shares one definition of "read": each element is one input accounted for.
    """

    def __init__(self, what: str, every_seconds: float = 10.0):
        self._what = what
        self._every = every_seconds
        self._read = Metrics.counter(NAMESPACE, "read")
        self._bytes = Metrics.distribution(NAMESPACE, "record_bytes")

    def setup(self):
        self._count = 0
        self._start = time.monotonic()
        self._last = self._start

    def process(self, element: Any):
        self._read.inc()
        self._tick()
        if isinstance(element, ImageRecord):
            self._bytes.update(len(element.data))
            yield element
        else:
            count_failure(element["stage"], element["error"])
            yield beam.pvalue.TaggedOutput(FAILURES_TAG, element)

    def _tick(self) -> None:
        self._count += 1
        now = time.monotonic()
        if now - self._last >= self._every:
            self._last = now
            rate = self._count / max(now - self._start, 1e-9)
            progress_log.info("read %s: %d inputs in this worker, %.1f/s", self._what, self._count, rate)


class Account(beam.PTransform):
    """Records-or-failures → tagged outputs ``records`` (main) and :data:`FAILURES_TAG`."""

    def __init__(self, what: str):
        super().__init__()
        self._what = what

    def expand(self, pcoll):
        return pcoll | beam.ParDo(_AccountFn(self._what)).with_outputs(FAILURES_TAG, main="records")


def _parse_line(line: str) -> ListedFile:
    path, size, *rest = json.loads(line)
    return ListedFile(path, int(size), rest[0] if rest else None)


class ReadListing(beam.PTransform):
    """The launcher's listing → one :class:`ListedFile` per input, spread over workers."""

    def __init__(self, pattern: str):
        super().__init__()
        self._pattern = pattern

    def expand(self, pbegin):
        return (
            pbegin
            | "ReadListing" >> beam.io.ReadFromText(self._pattern)
            | "Parse" >> beam.Map(_parse_line)
            | "Spread" >> beam.Reshuffle()
        )


class ListingReader(beam.PTransform):
    """The shape of every format reader: an input spec and the launcher's listing in; out
    ``{"records", "failures"}`` and, from shard formats, ``"tallies"``. A subclass names its
    ``FORMAT`` (also the progress and counter label of its :class:`Account`) and writes ``expand``."""

    FORMAT = ""

    def __init__(self, spec: InputSpec, listing: str):
        super().__init__()
        self._spec = spec
        self._listing = listing


class ShardFileReader(ListingReader):
    """A reader that reads each listed shard file in one DoFn (TFRecord, WebDataset), which reports a tally
    per shard; a subclass gives that DoFn (:meth:`shard_fn`)."""

    def shard_fn(self) -> beam.DoFn:
        raise NotImplementedError

    def expand(self, pbegin):
        read = (
            pbegin
            | "Listing" >> ReadListing(self._listing)
            | "ReadShards" >> beam.ParDo(StampUnitFn(self.shard_fn(), self._spec.root)).with_outputs(
                TALLIES_TAG, main="entries")
        )
        accounted = read.entries | "Account" >> Account(self.FORMAT)
        return {"records": accounted.records, "failures": accounted.failures, "tallies": read[TALLIES_TAG]}
