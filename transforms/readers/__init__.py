"""Input readers: an :class:`InputSpec` and the launcher's listing in, image records out.

One module per input format (``files``, ``tfrecord``, ``webdataset``, ``parquet``), the
registry here. Every reader goes through Beam filesystems, so the same spec works on
local disk, ``gs://`` and ``s3://``, and returns the same three outputs:

* ``records``: :class:`~transforms.records.ImageRecord` (bytes plus id, uri, label);
* ``failures``: failure rows, stage ``read`` (nothing is dropped silently);
* ``tallies``: one ``{"unit": shard path, "entries": n}`` per shard (shard formats only;
  a folder's count is its listing).
"""

from __future__ import annotations

import apache_beam as beam

from transforms.readers.common import (
    MAX_RECORD_BYTES,
    TALLIES_TAG,
    ListedFile,
    ListingReader,
    RecordTooLargeError,
    read_limited,
)
from transforms.readers.files import ReadImageFiles
from transforms.readers.parquet import ReadParquetImages
from transforms.readers.spec import FORMATS, InputSpec, write_listing
from transforms.readers.tfrecord import ReadTFRecordImages
from transforms.readers.webdataset import ReadWebDatasetImages

READERS: dict[str, type[beam.PTransform]] = {
    "files": ReadImageFiles,
    "tfrecord": ReadTFRecordImages,
    "wds": ReadWebDatasetImages,
    "parquet": ReadParquetImages,
}

__all__ = [
    "FORMATS", "MAX_RECORD_BYTES", "READERS", "TALLIES_TAG", "InputSpec", "ListedFile", "ReadImages",
    "RecordTooLargeError", "read_limited", "write_listing",
]


class ReadImages(ListingReader):
    """``InputSpec`` + listing glob → ``{"records", "failures", "tallies"}`` (no tallies for folders)."""

    def expand(self, pbegin):
        reader = READERS[self._spec.format]
        return pbegin | f"Read{self._spec.format.title()}" >> reader(self._spec, self._listing)
