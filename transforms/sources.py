"""Readers that turn an input spec into :class:`ImageRecord` elements.

A spec is a folder or glob of image files, or ``tfrecord:GLOB``, ``wds:GLOB``,
``parquet:GLOB`` (DESIGN.md). Every reader goes through Beam filesystems, so the
same spec works on local disk, ``gs://`` and ``s3://``. A file that cannot be read
becomes a failure row with stage ``read``; nothing is dropped silently.

Every reader ends in :class:`Account`, one step that counts what was read (Beam
counters ``read``, ``failed_read``, ``failed_read_<ErrorClass>``), logs progress
with a rate, and splits records from failure rows. The shard formats live in
:mod:`transforms.shard_readers`.
"""

from __future__ import annotations

import dataclasses
import logging
import posixpath
import re
import time

import apache_beam as beam
from apache_beam.io import fileio
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from transforms.decode import NAMESPACE, count_failure
from transforms.records import FAILURES_TAG, ImageRecord, failure

log = logging.getLogger(__name__)
progress_log = logging.getLogger("cbir.progress")

FORMATS = ("files", "tfrecord", "wds", "parquet")
MAX_RECORD_BYTES = 256 * 1024 * 1024  # one image larger than this is a failure, not an allocation
_GLOB_CHARS = re.compile(r"[*?\[]")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff")


@dataclasses.dataclass(frozen=True)
class InputSpec:
    format: str
    pattern: str  # a glob for FileSystems.match
    root: str  # prefix stripped from paths to make image ids (files) or shard names (shards)

    @classmethod
    def parse(cls, spec: str) -> InputSpec:
        fmt, sep, rest = spec.partition(":")
        if sep and fmt in FORMATS[1:]:
            if not rest:
                raise ValueError(f"{fmt}: needs a glob, e.g. {fmt}:/data/shards/*")
            rest = _shard_pattern(rest)
            return cls(fmt, rest, _glob_root(rest))
        if _GLOB_CHARS.search(spec):
            return cls("files", spec, _glob_root(spec))
        if spec.lower().endswith(IMAGE_EXTENSIONS):
            return cls("files", spec, posixpath.dirname(spec.rstrip("/")))
        root = spec.rstrip("/")
        return cls("files", FileSystems.join(root, "**"), root)

    def check_not_empty(self) -> None:
        """Fails at launch, not after an empty job, when nothing matches."""
        result = FileSystems.match([self.pattern], limits=[1])[0]
        if not result.metadata_list:
            raise FileNotFoundError(f"input {self.pattern!r} matches no file")


def _shard_pattern(rest: str) -> str:
    """A glob as given; a plain path that is not a file means the shards in that folder.

    So ``tfrecord:OUT`` reads what ``cbir shard --output OUT`` wrote (its ``_SHARDS.json``
    is skipped like every ``_``/``.`` name, as Hadoop and Spark skip ``_SUCCESS``).
    """
    if _GLOB_CHARS.search(rest):
        return rest
    inside = FileSystems.join(rest.rstrip("/"), "*")
    try:
        if FileSystems.match([inside], limits=[1])[0].metadata_list:
            return inside
    except Exception:  # BeamIOError: nothing below it, so it names a file
        pass
    return rest


class RecordTooLargeError(ValueError):
    """An input holds more bytes than :data:`MAX_RECORD_BYTES`; it is refused unread."""


def read_limited(path: str, limit: int = MAX_RECORD_BYTES) -> bytes:
    """Reads a whole file through Beam filesystems, refusing one above ``limit`` bytes.

    Reads at most ``limit + 1`` bytes, so a 50 GB file named ``.jpg`` costs nothing.
    """
    with FileSystems.open(path, compression_type="uncompressed") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise RecordTooLargeError(f"{path} holds more than {limit} bytes")
    return data


def _glob_root(pattern: str) -> str:
    parts = pattern.split("/")
    fixed = []
    for part in parts:
        if _GLOB_CHARS.search(part):
            break
        fixed.append(part)
    else:
        fixed = parts[:-1]
    return "/".join(fixed)


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

    def process(self, element):
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


class MatchVisible(beam.PTransform):
    """The visible files of a glob, spread over workers (one element per file)."""

    def __init__(self, pattern: str, root: str, shards: bool = False):
        super().__init__()
        self._pattern = pattern
        self._root = root
        self._shards = shards

    def expand(self, pbegin):
        root, shards = self._root, self._shards
        return (
            pbegin
            | "Match" >> fileio.MatchFiles(self._pattern)
            | "SkipHidden" >> beam.Filter(
                lambda m: is_visible(m.path, root) and (not shards or is_shard_name(m.path))
            )
            | "Spread" >> beam.Reshuffle()
        )


class _ReadFileFn(beam.DoFn):
    """Reads one matched file; a read error becomes a failure row."""

    def __init__(self, root: str):
        self._root = root

    def process(self, metadata):
        path = metadata.path
        image_id = relative_id(path, self._root)
        try:
            data = read_limited(path)
        except Exception as exc:  # permissions, vanished files, remote errors, oversized files
            yield failure(image_id, path, "read", exc)
            return
        yield ImageRecord(image_id, path, label_from_id(image_id), data)


class ReadImages(beam.PTransform):
    """``InputSpec`` → main output of :class:`ImageRecord`, tagged output of failure rows."""

    def __init__(self, spec: InputSpec):
        super().__init__()
        self._spec = spec

    def expand(self, pbegin):
        spec = self._spec
        if spec.format == "files":
            return (
                pbegin
                | "MatchFiles" >> MatchVisible(spec.pattern, spec.root)
                | "ReadFiles" >> beam.ParDo(_ReadFileFn(spec.root))
                | "Account" >> Account("files")
            )
        from transforms import shard_readers

        return pbegin | f"Read{spec.format.title()}" >> shard_readers.READERS[spec.format](spec)
