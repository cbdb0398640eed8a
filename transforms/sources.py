"""Readers that turn an input spec into :class:`ImageRecord` elements.

A spec is a folder or glob of image files, or ``tfrecord:GLOB``, ``wds:GLOB``,
``parquet:GLOB`` (DESIGN.md). Every reader goes through Beam filesystems, so the
same spec works on local disk, ``gs://`` and ``s3://``. A file that cannot be read
becomes a failure row with stage ``read``; nothing is dropped silently.
"""

from __future__ import annotations

import dataclasses
import logging
import posixpath
import re

import apache_beam as beam
from apache_beam.io import fileio
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from transforms.records import FAILURES_TAG, ImageRecord, failure

log = logging.getLogger(__name__)

FORMATS = ("files", "tfrecord", "wds", "parquet")
_GLOB_CHARS = re.compile(r"[*?\[]")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff")


@dataclasses.dataclass(frozen=True)
class InputSpec:
    format: str
    pattern: str  # a glob for FileSystems.match
    root: str  # prefix stripped from paths to make image ids (files only)

    @classmethod
    def parse(cls, spec: str) -> InputSpec:
        fmt, sep, rest = spec.partition(":")
        if sep and fmt in FORMATS[1:]:
            if not rest:
                raise ValueError(f"{fmt}: needs a glob, e.g. {fmt}:/data/shards/*")
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


class _ReadFileFn(beam.DoFn):
    """Reads one matched file; a read error becomes a failure row."""

    def __init__(self, root: str):
        self._root = root
        self._read = Metrics.counter("cbir", "read")
        self._failed = Metrics.counter("cbir", "failed_read")
        self._bytes = Metrics.distribution("cbir", "file_bytes")

    def process(self, metadata):
        path = metadata.path
        image_id = relative_id(path, self._root)
        self._read.inc()
        try:
            with FileSystems.open(path, compression_type="uncompressed") as f:
                data = f.read()
        except Exception as exc:  # permissions, vanished files, remote errors
            self._failed.inc()
            yield beam.pvalue.TaggedOutput(FAILURES_TAG, failure(image_id, path, "read", exc))
            return
        self._bytes.update(len(data))
        yield ImageRecord(image_id, path, label_from_id(image_id), data)


def _visible(metadata) -> bool:
    name = posixpath.basename(metadata.path)
    return not name.startswith(".") and metadata.size_in_bytes >= 0


class ReadImages(beam.PTransform):
    """``InputSpec`` → main output of :class:`ImageRecord`, tagged output of failure rows."""

    def __init__(self, spec: InputSpec):
        super().__init__()
        self._spec = spec

    def expand(self, pbegin):
        spec = self._spec
        if spec.format == "files":
            matched = (
                pbegin
                | "Match" >> fileio.MatchFiles(spec.pattern)
                | "SkipHidden" >> beam.Filter(_visible)
                | "Spread" >> beam.Reshuffle()
            )
            return matched | "ReadFiles" >> beam.ParDo(_ReadFileFn(spec.root)).with_outputs(
                FAILURES_TAG, main="records"
            )
        from transforms import shard_readers

        return pbegin | f"Read{spec.format.title()}" >> shard_readers.READERS[spec.format](spec)
