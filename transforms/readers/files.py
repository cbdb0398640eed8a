"""Folder (or glob) input: one listed image file → one record or one failure row."""

from __future__ import annotations

import apache_beam as beam

from transforms.readers.common import (
    Account,
    ListedFile,
    ListingReader,
    ReadListing,
    label_from_id,
    read_limited,
    relative_id,
)
from transforms.records import ImageRecord, failure


class _ReadFileFn(beam.DoFn):
    """Reads one listed file; a read error becomes a failure row (stage ``read``)."""

    def __init__(self, root: str):
        self._root = root

    def process(self, listed: ListedFile):
        image_id = relative_id(listed.path, self._root)
        try:
            data = read_limited(listed.path, size=listed.size)
        except Exception as exc:  # permissions, vanished files, remote errors, oversized files
            yield failure(image_id, listed.path, "read", exc, unit=image_id)
            return
        yield ImageRecord(image_id, listed.path, label_from_id(image_id), data, image_id)


class ReadImageFiles(ListingReader):
    """Listing of image files → ``{"records", "failures"}`` (no tallies: the listing is the count)."""

    FORMAT = "files"

    def expand(self, pbegin):
        accounted = (
            pbegin
            | "Listing" >> ReadListing(self._listing)
            | "ReadFiles" >> beam.ParDo(_ReadFileFn(self._spec.root))
            | "Account" >> Account(self.FORMAT)
        )
        return {"records": accounted.records, "failures": accounted.failures}
