"""TFRecord shards of ``tf.train.Example`` (``tfrecord:GLOB``), framing checked record by record.

Ids, labels and uris: ``image/id`` (else ``image/filename``, else ``<shard>#<record index>``);
label ``image/label`` (else ``image/class/text``, else the int ``image/class/label``); uri
``image/uri`` when stored, else ``<shard path>#<record index>``. A record whose checksum
fails or that is not an Example is one failure row and the shard goes on; when the
framing itself is lost (bad length checksum, truncation) the rest of the shard is one
failure row whose message says from where. ``.gz`` / ``.zz`` shards are decompressed by
extension.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import Any, NamedTuple

import apache_beam as beam
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.io.tfrecordio import _TFRecordUtil

from transforms.readers.common import (
    MAX_RECORD_BYTES,
    CorruptRecordError,
    CorruptShardError,
    ListedFile,
    MissingImageError,
    RecordTooLargeError,
    ShardFileReader,
    ShardFn,
    ShardReadError,
    tally,
)
from transforms.records import ImageRecord, failure


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


class _ReadTFRecordShardFn(ShardFn):
    """One TFRecord shard (``.gz``/``.zz`` compressed ones by extension) → records and failure rows."""

    def setup(self):
        import tensorflow as tf

        self._parse = tf.train.Example.FromString

    def process(self, listed: ListedFile):
        path = listed.path
        rel = self._rel(path)
        self._shards.inc()
        index = entries = 0
        try:
            with FileSystems.open(path, compression_type=CompressionTypes.AUTO) as f:
                for frame in iter_tfrecord_frames(f):
                    index = frame.index + 1
                    entries += 1
                    yield self._record(rel, path, frame)
        except Exception as exc:  # truncated, corrupt, unreadable: the rest of the shard is one row
            entries += 1
            yield failure(f"{rel}#{index}", f"{path}#{index}", "read", exc,
                          f"shard unreadable from record {index} on: {exc}")
        yield tally(path, entries)

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


class ReadTFRecordImages(ShardFileReader):
    """Listing of TFRecord shards → ``{"records", "failures", "tallies"}``."""

    FORMAT = "tfrecord"

    def shard_fn(self) -> beam.DoFn:
        return _ReadTFRecordShardFn(self._spec.root)
