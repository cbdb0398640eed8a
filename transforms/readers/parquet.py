"""Parquet of image bytes, or of uris to fetch (``parquet:GLOB``).

Image bytes in a binary column (``image``, ``image_bytes``, ``bytes``, ``jpg``, …, or a
Hugging Face ``struct<bytes, path>`` image column), or fetched from a ``uri`` column
(relative uris resolve against the Parquet file's folder); id ``image_id`` (else ``key``,
else the uri, else ``<file>#<row>``); optional ``label``.

Work is split by row group. Every row of a file is one entry, exactly: the planner
tallies each file with the row count its footer declares, and a row group that cannot
be read past some row yields one failure row for each row it could not read, so the
tally holds whatever goes wrong inside a file.
"""

from __future__ import annotations

import posixpath
from typing import NamedTuple

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from transforms.readers.common import (
    TALLIES_TAG,
    Account,
    ListedFile,
    ListingReader,
    MissingImageError,
    ReadListing,
    ShardFn,
    ShardReadError,
    StampUnitFn,
    read_limited,
    tally,
)
from transforms.records import ImageRecord, failure

PARQUET_BYTES_COLUMNS = ("image", "image_bytes", "bytes", "jpg", "jpeg", "png", "webp", "data", "content")
PARQUET_URI_COLUMNS = ("uri", "url")
PARQUET_ID_COLUMNS = ("image_id", "key")
PARQUET_BATCH_ROWS = 64


class ParquetColumns(NamedTuple):
    image: str | None  # bytes column
    image_struct: bool  # Hugging Face Image feature: struct<bytes: binary, path: string>
    uri: str | None
    image_id: str | None
    label: str | None


def _is_binary(t: pa.DataType) -> bool:
    return pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_binary_view(t)


def parquet_columns(schema: pa.Schema) -> ParquetColumns:
    """Which columns hold the image bytes, its uri, id and label (see the module docstring)."""
    names = {f.name: f.type for f in schema}
    image, is_struct = None, False
    for name in PARQUET_BYTES_COLUMNS:
        t = names.get(name)
        if t is not None and _is_binary(t):
            image = name
            break
        if t is not None and pa.types.is_struct(t) and t.get_field_index("bytes") >= 0:
            image, is_struct = name, True
            break
    if image is None:
        binaries = [n for n, t in names.items() if _is_binary(t)]
        if len(binaries) == 1:
            image = binaries[0]
    uri = next((n for n in PARQUET_URI_COLUMNS if n in names), None)
    image_id = next((n for n in PARQUET_ID_COLUMNS if n in names), None)
    return ParquetColumns(image, is_struct, uri, image_id, "label" if "label" in names else None)


class _FetchUri(NamedTuple):
    image_id: str
    uri: str
    label: str | None
    unit: str = ""


class UriNotAllowedError(ShardReadError):
    """A ``uri`` cell that points outside what the job may read: the row is a failure, the uri is never opened."""


def _split_scheme(path: str) -> tuple[str, str]:
    scheme, sep, rest = path.partition("://")
    return (scheme + sep, rest) if sep else ("", path)


def _normalised(path: str) -> str:
    scheme, rest = _split_scheme(path)
    lead = "/" if rest.startswith("/") else ""
    return scheme + lead + posixpath.normpath(rest).lstrip("/")


def resolve_uri(uri: str, parquet_path: str, allowed_prefixes: tuple[str, ...] = ()) -> str:
    """Where a Parquet ``uri`` cell may be read from, or :class:`UriNotAllowedError`.

    Relative uris resolve against the Parquet file's own folder and may not leave it
    (``../`` past it is refused). Absolute uris (a leading ``/`` or a scheme such as
    ``gs://``) must lie under one of ``allowed_prefixes`` (``--allow-uri-prefix``); with none
    given, only relative uris are read. A Parquet file is data: it must not be able to make a
    worker read ``/etc/passwd`` or another tenant's bucket.
    """
    folder = _normalised(posixpath.dirname(parquet_path))
    if "://" in uri or uri.startswith("/"):
        target = _normalised(uri)
        roots = [_normalised(p).rstrip("/") + "/" for p in allowed_prefixes]
        if not any(target.startswith(root) for root in roots):
            raise UriNotAllowedError(
                f"uri {uri!r} is absolute and not under an allowed prefix "
                f"({', '.join(allowed_prefixes) or 'none given: pass --allow-uri-prefix'})")
        return target
    target = _normalised(FileSystems.join(folder, uri))
    if not target.startswith(folder.rstrip("/") + "/"):
        raise UriNotAllowedError(f"uri {uri!r} leaves the Parquet file's folder {folder}")
    return target


    target = _normalised(FileSystems.join(folder, uri))
    if not target.startswith(folder.rstrip("/") + "/"):
        raise UriNotAllowedError(f"uri {uri!r} leaves the Parquet file's folder {folder}")
    return target


class _RowGroup(NamedTuple):
    path: str
    group: int
    first_row: int  # index of the group's first row in the file
    rows: int


class _PlanParquetFn(ShardFn):
    """One Parquet file → its row groups as work items, and a tally of the rows its footer declares."""

    def process(self, listed: ListedFile):
        path = listed.path
        self._shards.inc()
        try:
            with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
                meta = pq.ParquetFile(f).metadata
                sizes = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
        except Exception as exc:  # not Parquet, truncated footer, unreadable
            yield tally(path, 1)
            yield beam.pvalue.TaggedOutput("failed", failure(self._rel(path), path, "read", exc,
                                                             f"parquet file unreadable: {exc}"))
            return
        yield tally(path, sum(sizes))
        first = 0
        for group, rows in enumerate(sizes):
            yield _RowGroup(path, group, first, rows)
            first += rows


class _ReadParquetRowGroupFn(ShardFn):
    """A row group → exactly one entry per row: records, failure rows, or uris to fetch (``fetch``)."""

    def __init__(self, root: str, allowed_prefixes: tuple[str, ...] = ()):
        super().__init__(root)
        self._allowed = tuple(allowed_prefixes)

    def process(self, item: _RowGroup):
        path = item.path
        rel = self._rel(path)
        done = 0
        try:
            with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
                pf = pq.ParquetFile(f)
                cols = parquet_columns(pf.schema_arrow)
                wanted = [c for c in (cols.image, cols.uri, cols.image_id, cols.label) if c]
                for batch in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, row_groups=[item.group], columns=wanted):
                    for values in batch.to_pylist():
                        if done >= item.rows:
                            raise ValueError(f"row group {item.group} holds more rows than its footer declares")
                        yield self._row(rel, path, item.first_row + done, values, cols)
                        done += 1
        except Exception as exc:
            reason = f"row group {item.group} unreadable from row {done} of it on: {type(exc).__name__}: {exc}"
            for row in range(item.first_row + done, item.first_row + item.rows):
                yield failure(f"{rel}#{row}", f"{path}#{row}", "read", exc, reason)
            return
        for row in range(item.first_row + done, item.first_row + item.rows):  # the footer promised more
            yield failure(f"{rel}#{row}", f"{path}#{row}", "read", MissingImageError(
                f"row {row}: declared by the footer, not found in row group {item.group}"))

    def _row(self, rel: str, path: str, index: int, values: dict, cols: ParquetColumns):
        uri = values.get(cols.uri) if cols.uri else None
        raw_id = values.get(cols.image_id) if cols.image_id else None
        image_id = str(raw_id) if raw_id is not None else (str(uri) if uri else f"{rel}#{index}")
        label = values.get(cols.label) if cols.label else None
        label = str(label) if label is not None else None
        data = values.get(cols.image) if cols.image else None
        if cols.image_struct and isinstance(data, dict):
            data = data.get("bytes")
        if data is not None:
            return ImageRecord(image_id, str(uri) if uri else f"{path}#{index}", label, bytes(data))
        if uri:
            try:
                target = resolve_uri(str(uri), path, self._allowed)
            except UriNotAllowedError as exc:
                return failure(image_id, str(uri), "read", exc)
            return beam.pvalue.TaggedOutput("fetch", _FetchUri(image_id, target, label))
        what = "no image-bytes column and no uri column" if not (cols.image or cols.uri) else "neither bytes nor uri"
        return failure(image_id, f"{path}#{index}", "read", MissingImageError(f"row {index}: {what}"))


class _FetchUriFn(beam.DoFn):
    def process(self, item: _FetchUri):
        try:
            data = read_limited(item.uri)
        except Exception as exc:
            yield failure(item.image_id, item.uri, "read", exc, unit=item.unit)
            return
        yield ImageRecord(item.image_id, item.uri, item.label, data, item.unit)


def _group_unit(item: _RowGroup) -> str:
    return item.path


class ReadParquetImages(ListingReader):
    """Listing of Parquet files → ``{"records", "failures", "tallies"}`` (uri rows fetched after a reshuffle)."""

    FORMAT = "parquet"

    def expand(self, pbegin):
        root = self._spec.root
        planned = (
            pbegin
            | "Listing" >> ReadListing(self._listing)
            | "Plan" >> beam.ParDo(StampUnitFn(_PlanParquetFn(root), root)).with_outputs(
                "failed", TALLIES_TAG, main="groups")
        )
        rows = (
            planned.groups
            | "SpreadGroups" >> beam.Reshuffle()
            | "ReadRowGroups" >> beam.ParDo(StampUnitFn(_ReadParquetRowGroupFn(root, self._spec.allow_uri_prefixes),
                                                        root, _group_unit)).with_outputs("fetch", main="rows")
        )
        fetched = rows.fetch | "SpreadFetches" >> beam.Reshuffle() | "FetchUris" >> beam.ParDo(_FetchUriFn())
        accounted = (planned.failed, rows.rows, fetched) | "Merge" >> beam.Flatten() | "Account" >> Account(self.FORMAT)
        return {"records": accounted.records, "failures": accounted.failures, "tallies": planned[TALLIES_TAG]}
