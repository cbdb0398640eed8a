"""Readers for image shards: TFRecord of ``tf.train.Example``, WebDataset tars, Parquet.

Each reader is a PTransform over an :class:`~transforms.sources.InputSpec` with the
same outputs as the folder reader: ``records`` (:class:`ImageRecord`) and failure
rows under :data:`FAILURES_TAG`, stage ``read``. A shard is the unit of work (one
worker streams one shard; Parquet is split further by row group), so memory stays
bounded by one record, not one shard.

Nothing is dropped. A record whose checksum fails, an Example without image bytes, a
tar sample without an image member, a Parquet row without bytes: one failure row
each, and the shard goes on. When a shard cannot be read past some point (truncated
file, corrupt length field, broken tar header) the rest of it is one failure row
whose message says from where, since the records behind it cannot be counted.

Names read from shards (Example ids, tar member names, Parquet cells) are data: they
become ``image_id``/``uri`` strings and are never used as paths to write to.

Ids, labels and uris:

* TFRecord: ``image/id`` (else ``image/filename``, else ``<shard>#<record index>``);
  label ``image/label`` (else ``image/class/text``, else the int ``image/class/label``);
  uri ``image/uri`` when stored, else ``<shard path>#<record index>``.
* WebDataset: samples are consecutive members sharing a key (the member name up to the
  first dot of its base name, as ``webdataset`` splits them); the image is the first
  ``jpg``/``jpeg``/``png``/``webp`` (or ``gif``/``bmp``/``tif``/``tiff``) member. Id
  ``image_id`` from the ``json`` member, else ``<shard>#<key>``; label ``cls``, else
  ``label`` in the ``json``, else ``txt``; uri ``uri``/``url`` in the ``json``, else
  ``<shard path>#<key>``.
* Parquet: image bytes in a binary column (``image``, ``image_bytes``, ``bytes``,
  ``jpg``, …, or a Hugging Face ``struct<bytes, path>`` image column), or fetched from a
  ``uri`` column (relative uris resolve against the Parquet file's folder); id
  ``image_id`` (else ``key``, else the uri, else ``<file>#<row>``); optional ``label``.
"""

from __future__ import annotations

import json
import logging
import posixpath
import struct
import tarfile
from collections.abc import Iterator
from typing import Any, NamedTuple

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.io.tfrecordio import _TFRecordUtil
from apache_beam.metrics import Metrics

from transforms.decode import NAMESPACE
from transforms.records import ImageRecord, failure
from transforms.sources import (
    MAX_RECORD_BYTES,
    Account,
    InputSpec,
    MatchVisible,
    RecordTooLargeError,
    read_limited,
    relative_id,
)

log = logging.getLogger(__name__)

WDS_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff")
WDS_LABEL_EXTENSIONS = ("cls", "json", "txt")
PARQUET_BYTES_COLUMNS = ("image", "image_bytes", "bytes", "jpg", "jpeg", "png", "webp", "data", "content")
PARQUET_URI_COLUMNS = ("uri", "url")
PARQUET_ID_COLUMNS = ("image_id", "key")
PARQUET_BATCH_ROWS = 64


class ShardReadError(ValueError):
    """A record in a shard is unusable; the rest of the shard is still read."""


class CorruptRecordError(ShardReadError):
    """A TFRecord payload failed its CRC, or the bytes are not a ``tf.train.Example``."""


class MissingImageError(ShardReadError):
    """The record or sample holds no image bytes."""


class CorruptShardError(ShardReadError):
    """The shard cannot be read past this point: its remainder is one failure row."""


# ---------------------------------------------------------------- TFRecord framing


def masked_crc32c(data: bytes) -> int:
    """TFRecord's masked CRC32C (Beam's implementation, which picks the fastest library)."""
    return _TFRecordUtil._masked_crc32c(data)


def write_tfrecord(f: Any, payload: bytes) -> None:
    """Appends one TFRecord frame (length, CRC of length, payload, CRC of payload)."""
    _TFRecordUtil.write_record(f, payload)


class _Frame(NamedTuple):
    index: int
    offset: int
    payload: bytes | None  # None when the record is unusable but the shard goes on
    error: ShardReadError | None


def _read_exact(f: Any, n: int) -> bytes:
    chunks, left = [], n
    while left > 0:
        chunk = f.read(min(left, 8 * 1024 * 1024))
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _skip(f: Any, n: int) -> int:
    skipped = 0
    while skipped < n:
        chunk = f.read(min(n - skipped, 8 * 1024 * 1024))
        if not chunk:
            break
        skipped += len(chunk)
    return skipped


def iter_tfrecord_frames(f: Any, max_record_bytes: int = MAX_RECORD_BYTES) -> Iterator[_Frame]:
    """Yields every frame of a TFRecord stream, checking both CRCs.

    A bad payload CRC or an oversized record is yielded as an error and reading goes
    on (the length field was intact, so the next frame is found). A bad length CRC or
    a short read raises :class:`CorruptShardError`: the frame boundaries are lost.
    """
    index, offset = 0, 0
    while True:
        header = _read_exact(f, 12)
        if not header:
            return
        if len(header) < 12:
            raise CorruptShardError(f"truncated record header at byte {offset} (record {index})")
        length, length_crc = struct.unpack("<QI", header)
        if masked_crc32c(header[:8]) != length_crc:
            raise CorruptShardError(f"length checksum mismatch at byte {offset} (record {index}): not a TFRecord "
                                    "file, or corrupt")
        if length > max_record_bytes:
            if _skip(f, length + 4) < length + 4:
                raise CorruptShardError(f"truncated record at byte {offset} (record {index})")
            yield _Frame(index, offset, None, RecordTooLargeError(
                f"record {index} holds {length} bytes, more than the limit of {max_record_bytes}"))
        else:
            body = _read_exact(f, length + 4)
            if len(body) < length + 4:
                raise CorruptShardError(f"truncated record at byte {offset} (record {index}): "
                                        f"{len(body)} of {length + 4} bytes")
            payload, (data_crc,) = body[:length], struct.unpack("<I", body[length:])
            if masked_crc32c(payload) != data_crc:
                yield _Frame(index, offset, None, CorruptRecordError(f"record {index} at byte {offset} "
                                                                     "failed its checksum"))
            else:
                yield _Frame(index, offset, payload, None)
        index += 1
        offset += 16 + length


# ---------------------------------------------------------------- tf.train.Example


def _first_bytes(feature_map: Any, key: str) -> bytes | None:
    if key in feature_map and feature_map[key].bytes_list.value:
        return feature_map[key].bytes_list.value[0]
    return None


def _first_text(feature_map: Any, key: str) -> str | None:
    if key not in feature_map:
        return None
    feat = feature_map[key]
    if feat.bytes_list.value:
        return feat.bytes_list.value[0].decode("utf-8", errors="replace")
    if feat.int64_list.value:
        return str(feat.int64_list.value[0])
    return None


def example_fields(example: Any) -> tuple[bytes | None, str | None, str | None, str | None]:
    """``(image bytes, id, label, uri)`` of a ``tf.train.Example``; missing fields are None.

    Falls back to the keys of TensorFlow's classic ``build_image_data.py`` shards
    (``image/filename``, ``image/class/text``, ``image/class/label``).
    """
    fm = example.features.feature
    data = _first_bytes(fm, "image/encoded")
    image_id = _first_text(fm, "image/id") or _first_text(fm, "image/filename")
    label = _first_text(fm, "image/label")
    if label is None:
        label = _first_text(fm, "image/class/text") or _first_text(fm, "image/class/label")
    return data, image_id, label, _first_text(fm, "image/uri")


def encode_example(data: bytes, image_id: str, label: str | None = None, uri: str | None = None,
                   image_format: str | None = None) -> bytes:
    """A serialized ``tf.train.Example`` in the layout the reader expects (deterministic bytes)."""
    import tensorflow as tf

    def b(value: str | bytes) -> tf.train.Feature:
        raw = value.encode() if isinstance(value, str) else value
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[raw]))

    feature = {"image/encoded": b(data), "image/id": b(image_id)}
    if label is not None:
        feature["image/label"] = b(label)
    if uri is not None:
        feature["image/uri"] = b(uri)
    if image_format is not None:
        feature["image/format"] = b(image_format)
    example = tf.train.Example(features=tf.train.Features(feature=feature))
    return example.SerializeToString(deterministic=True)


class _ShardFn(beam.DoFn):
    """Shared by the shard DoFns: the root for relative shard names, and a shard counter."""

    def __init__(self, root: str):
        self._root = root
        self._shards = Metrics.counter(NAMESPACE, "shards_read")

    def _rel(self, path: str) -> str:
        return relative_id(path, self._root)


class _ReadTFRecordShardFn(_ShardFn):
    """One TFRecord shard (``.gz``/``.zz`` compressed ones by extension) → records and failure rows."""

    def setup(self):
        import tensorflow as tf

        self._parse = tf.train.Example.FromString

    def process(self, metadata):
        path = metadata.path
        rel = self._rel(path)
        self._shards.inc()
        index = 0
        try:
            with FileSystems.open(path, compression_type=CompressionTypes.AUTO) as f:
                for frame in iter_tfrecord_frames(f):
                    index = frame.index + 1
                    yield self._record(rel, path, frame)
        except Exception as exc:  # truncated, corrupt, unreadable: the rest of the shard is one row
            yield failure(f"{rel}#{index}", f"{path}#{index}", "read", exc,
                          f"shard unreadable from record {index} on: {exc}")

    def _record(self, rel: str, path: str, frame: _Frame) -> ImageRecord | dict:
        fallback_id, fallback_uri = f"{rel}#{frame.index}", f"{path}#{frame.index}"
        if frame.error is not None:
            return failure(fallback_id, fallback_uri, "read", frame.error)
        try:
            example = self._parse(frame.payload)
        except Exception as exc:  # protobuf DecodeError: the payload is not an Example
            return failure(fallback_id, fallback_uri, "read", CorruptRecordError(
                f"record {frame.index} is not a tf.train.Example: {type(exc).__name__}: {exc}"))
        data, image_id, label, uri = example_fields(example)
        image_id, uri = image_id or fallback_id, uri or fallback_uri
        if data is None:
            return failure(image_id, uri, "read", MissingImageError(f"record {frame.index} has no image/encoded"))
        return ImageRecord(image_id, uri, label, data)


# ---------------------------------------------------------------- WebDataset


def split_wds_name(name: str) -> tuple[str, str] | None:
    """``dir/abc.seg.png`` → ``("dir/abc", "seg.png")``: the key ends at the first dot of the base name."""
    folder, base = posixpath.split(name)
    if "." not in base.lstrip("."):
        return None
    stem, ext = base.split(".", 1)
    if not stem:
        return None
    return posixpath.join(folder, stem) if folder else stem, ext.lower()


def _text(data: bytes) -> str:
    return data.decode("utf-8", errors="replace").strip()


def wds_sample(rel: str, path: str, key: str, members: dict[str, bytes | Exception]) -> ImageRecord | dict:
    """One WebDataset sample (extension → member bytes) → a record or a failure row."""
    meta: dict[str, Any] = {}
    meta_error = None
    if isinstance(members.get("json"), bytes):
        try:
            loaded = json.loads(members["json"])
            meta = loaded if isinstance(loaded, dict) else {}
        except ValueError as exc:
            meta_error = exc
    image_id = meta.get("image_id")
    image_id = str(image_id) if image_id is not None else f"{rel}#{key}"
    uri = meta.get("uri") or meta.get("url")
    uri = str(uri) if uri else f"{path}#{key}"
    image = next((members[e] for e in members if e in WDS_IMAGE_EXTENSIONS), None)
    if isinstance(image, Exception):  # refused unread (too large)
        return failure(image_id, uri, "read", image)
    if image is None:
        return failure(image_id, uri, "read", MissingImageError(
            f"sample {key!r} has no {'/'.join(WDS_IMAGE_EXTENSIONS)} member (members: {', '.join(members)})"))
    if meta_error is not None:
        return failure(image_id, uri, "read", CorruptRecordError(f"sample {key!r}: bad json member: {meta_error}"))
    label = None
    if isinstance(members.get("cls"), bytes):
        label = _text(members["cls"])
    elif meta.get("label") is not None:
        label = str(meta["label"])
    elif isinstance(members.get("txt"), bytes):
        label = _text(members["txt"])
    return ImageRecord(image_id, uri, label or None, image)


class _ReadTarShardFn(_ShardFn):
    """One WebDataset tar (plain or gzip/bzip2/xz compressed), streamed → one element per sample."""

    def __init__(self, root: str, max_member_bytes: int = MAX_RECORD_BYTES):
        super().__init__(root)
        self._max = max_member_bytes

    def process(self, metadata):
        path = metadata.path
        rel = self._rel(path)
        self._shards.inc()
        key, members, position = None, {}, 0
        try:
            with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
                # Stream mode: members are read in order, nothing is extracted to disk.
                with tarfile.open(fileobj=f, mode="r|*") as tar:
                    for member in tar:
                        position += 1
                        if not member.isfile():
                            continue
                        split = split_wds_name(member.name)
                        if split is None:
                            Metrics.counter(NAMESPACE, "wds_members_ignored").inc()
                            continue
                        member_key, ext = split
                        if member_key != key:
                            if key is not None:
                                yield wds_sample(rel, path, key, members)
                            key, members = member_key, {}
                        if ext not in WDS_IMAGE_EXTENSIONS and ext not in WDS_LABEL_EXTENSIONS:
                            continue  # other modalities (npy, seg.png, …): not ours to read
                        if member.size > self._max:
                            members[ext] = RecordTooLargeError(
                                f"member {member.name!r} holds {member.size} bytes, more than {self._max}")
                            continue
                        members[ext] = tar.extractfile(member).read()
        except Exception as exc:  # truncated or corrupt tar: the rest of the shard is one row
            where = f"#{key}" if key is not None else ""
            yield failure(rel + where, path + where, "read", exc,
                          f"tar unreadable from member {position} on (sample {key!r}): {type(exc).__name__}: {exc}")
            return
        if key is not None:
            yield wds_sample(rel, path, key, members)


# ---------------------------------------------------------------- Parquet


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


def _resolve_uri(uri: str, parquet_path: str) -> str:
    if "://" in uri or uri.startswith("/"):
        return uri
    return FileSystems.join(posixpath.dirname(parquet_path), uri)


class _PlanParquetFn(_ShardFn):
    """One Parquet file → ``(path, row group)`` work items, so big files spread over workers."""

    def process(self, metadata):
        path = metadata.path
        self._shards.inc()
        try:
            with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
                groups = pq.ParquetFile(f).metadata.num_row_groups
        except Exception as exc:  # not Parquet, truncated footer, unreadable
            rel = self._rel(path)
            yield beam.pvalue.TaggedOutput("failed", failure(rel, path, "read", exc, f"parquet file unreadable: {exc}"))
            return
        for group in range(groups):
            yield path, group


class _ReadParquetRowGroupFn(_ShardFn):
    """``(path, row group)`` → records, failure rows, and uris to fetch (tagged ``fetch``)."""

    def process(self, item):
        path, group = item
        rel = self._rel(path)
        row = 0
        try:
            with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
                pf = pq.ParquetFile(f)
                cols = parquet_columns(pf.schema_arrow)
                first_row = sum(pf.metadata.row_group(g).num_rows for g in range(group))
                wanted = [c for c in (cols.image, cols.uri, cols.image_id, cols.label) if c]
                for batch in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, row_groups=[group], columns=wanted):
                    for values in batch.to_pylist():
                        yield self._row(rel, path, first_row + row, values, cols)
                        row += 1
        except Exception as exc:
            yield failure(f"{rel}#rowgroup{group}", path, "read", exc,
                          f"row group {group} unreadable from row {row} of it on: {type(exc).__name__}: {exc}")

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
            return beam.pvalue.TaggedOutput("fetch", _FetchUri(image_id, _resolve_uri(str(uri), path), label))
        what = "no image-bytes column and no uri column" if not (cols.image or cols.uri) else "neither bytes nor uri"
        return failure(image_id, f"{path}#{index}", "read", MissingImageError(f"row {index}: {what}"))


class _FetchUriFn(beam.DoFn):
    def process(self, item: _FetchUri):
        try:
            data = read_limited(item.uri)
        except Exception as exc:
            yield failure(item.image_id, item.uri, "read", exc)
            return
        yield ImageRecord(item.image_id, item.uri, item.label, data)


# ---------------------------------------------------------------- the PTransforms


class _ReadShardFiles(beam.PTransform):
    """Match shard files, read each with one DoFn, account: the shape of every per-file reader."""

    FORMAT = ""
    READ_FN: type[beam.DoFn]

    def __init__(self, spec: InputSpec):
        super().__init__()
        self._spec = spec

    def expand(self, pbegin):
        return (
            pbegin
            | "MatchShards" >> MatchVisible(self._spec.pattern, self._spec.root, shards=True)
            | "ReadShards" >> beam.ParDo(self.READ_FN(self._spec.root))
            | "Account" >> Account(self.FORMAT)
        )


class ReadTFRecordImages(_ReadShardFiles):
    """``tfrecord:GLOB`` → ``records`` and failure rows."""

    FORMAT = "tfrecord"
    READ_FN = _ReadTFRecordShardFn


class ReadWebDatasetImages(_ReadShardFiles):
    """``wds:GLOB`` → ``records`` and failure rows."""

    FORMAT = "wds"
    READ_FN = _ReadTarShardFn


class ReadParquetImages(beam.PTransform):
    """``parquet:GLOB`` → ``records`` and failure rows (uri rows are fetched after a reshuffle)."""

    def __init__(self, spec: InputSpec):
        super().__init__()
        self._spec = spec

    def expand(self, pbegin):
        root = self._spec.root
        planned = (
            pbegin
            | "MatchFiles" >> MatchVisible(self._spec.pattern, root, shards=True)
            | "Plan" >> beam.ParDo(_PlanParquetFn(root)).with_outputs("failed", main="groups")
        )
        rows = (
            planned.groups
            | "SpreadGroups" >> beam.Reshuffle()
            | "ReadRowGroups" >> beam.ParDo(_ReadParquetRowGroupFn(root)).with_outputs("fetch", main="rows")
        )
        fetched = rows.fetch | "SpreadFetches" >> beam.Reshuffle() | "FetchUris" >> beam.ParDo(_FetchUriFn())
        return (
            (planned.failed, rows.rows, fetched)
            | "Merge" >> beam.Flatten()
            | "Account" >> Account("parquet")
        )


READERS: dict[str, type[beam.PTransform]] = {
    "tfrecord": ReadTFRecordImages,
    "wds": ReadWebDatasetImages,
    "parquet": ReadParquetImages,
}
