"""WebDataset tars (``wds:GLOB``) as img2dataset writes them: members grouped by key.

A sample is the consecutive members sharing a key (the member name up to the first dot
of its base name, as ``webdataset`` splits them); the image is the first
``jpg``/``jpeg``/``png``/``webp`` (or ``gif``/``bmp``/``tif``/``tiff``) member. Id
``image_id`` from the ``json`` member, else ``<shard>#<key>``; label ``cls``, else
``label`` in the ``json``, else ``txt``; uri ``uri``/``url`` in the ``json``, else
``<shard path>#<key>``. Member names are data: they become ids, never paths to write to.
"""

from __future__ import annotations

import json
import posixpath
import tarfile
from typing import Any

import apache_beam as beam
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from transforms.decode import NAMESPACE
from transforms.readers.common import (
    MAX_RECORD_BYTES,
    CorruptRecordError,
    ListedFile,
    MissingImageError,
    RecordTooLargeError,
    ShardFn,
    tally,
)
from transforms.readers.spec import read_shard_files
from transforms.records import ImageRecord, failure

WDS_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff")
WDS_LABEL_EXTENSIONS = ("cls", "json", "txt")


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


class _ReadTarShardFn(ShardFn):
    """One WebDataset tar (plain or gzip/bzip2/xz compressed), streamed → one element per sample."""

    def __init__(self, root: str, max_member_bytes: int = MAX_RECORD_BYTES):
        super().__init__(root)
        self._max = max_member_bytes

    def process(self, listed: ListedFile):
        path = listed.path
        rel = self._rel(path)
        self._shards.inc()
        key, members, position, entries = None, {}, 0, 0
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
                                entries += 1
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
            yield tally(path, entries + 1)
            yield failure(rel + where, path + where, "read", exc,
                          f"tar unreadable from member {position} on (sample {key!r}): {type(exc).__name__}: {exc}")
            return
        if key is not None:
            entries += 1
            yield wds_sample(rel, path, key, members)
        yield tally(path, entries)


class ReadWebDatasetImages(beam.PTransform):
    """Listing of WebDataset tars → ``{"records", "failures", "tallies"}``."""

    FORMAT = "wds"

    def __init__(self, spec: Any, listing: str):
        super().__init__()
        self._spec = spec
        self._listing = listing

    def expand(self, pbegin):
        return read_shard_files(pbegin, self._spec, self._listing, _ReadTarShardFn(self._spec.root), self.FORMAT)
