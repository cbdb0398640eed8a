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
import os
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
    if isinstance(image, Exception):  # refused unread (too large, a link, a repeated name)
        return failure(image_id, uri, "read", image)
    unusable = next((v for e, v in members.items() if isinstance(v, Exception)), None)
    if unusable is not None:  # a label or metadata member that cannot be trusted
        return failure(image_id, uri, "read", unusable)
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


class LinkMemberError(ShardReadError):
    """A tar member that is a symbolic or hard link: never followed, never read."""


class DuplicateMemberError(ShardReadError):
    """A member name that appeared earlier in the same shard: the later copy is not trusted."""


class SpecialMemberError(ShardReadError):
    """A device, FIFO or other special member where an image or label should be."""


_COMPRESSED = {b"\x1f\x8b": "gzip", b"BZh": "bz2", b"\xfd7zXZ\x00": "xz"}
MAX_DECOMPRESSED_BYTES = 16 << 30  # a compressed shard is spooled to local disk up to this size


def _compression(head: bytes) -> str | None:
    return next((kind for magic, kind in _COMPRESSED.items() if head.startswith(magic)), None)


def _spool(f: Any, kind: str, limit: int = MAX_DECOMPRESSED_BYTES) -> Any:
    """A compressed tar decompressed into a local temporary file (seekable, size known), capped."""
    import bz2
    import gzip
    import lzma
    import tempfile

    opener = {"gzip": gzip.GzipFile, "bz2": bz2.BZ2File, "xz": lzma.LZMAFile}[kind]
    out = tempfile.TemporaryFile(prefix="cbir-wds-")
    with opener(fileobj=f) if kind == "gzip" else opener(f) as src:
        copied = 0
        while True:
            chunk = src.read(8 << 20)
            if not chunk:
                break
            copied += len(chunk)
            if copied > limit:
                out.close()
                raise RecordTooLargeError(f"the {kind} shard decompresses to more than {limit} bytes")
            out.write(chunk)
    out.seek(0)
    return out


class _ReadTarShardFn(ShardFn):
    """One WebDataset tar (plain, or gzip/bzip2/xz compressed) → one element per sample, plus a tally.

    Random access, never stream mode: each header is checked against the shard's size before the
    next is looked for, so a header that claims 2^40 bytes ends the shard in one step (stream mode
    skips such a member block by block, for minutes). Link members, special members and repeated
    names become failure rows of their sample; a header that claims more bytes than the shard
    holds makes the rest of the shard one failure row.
    """

    def __init__(self, root: str, max_member_bytes: int = MAX_RECORD_BYTES):
        super().__init__(root)
        self._max = max_member_bytes

    def process(self, listed: ListedFile):
        path = listed.path
        rel = self._rel(path)
        self._shards.inc()
        key, members, position, entries = None, {}, 0, 0
        spooled = None
        try:
            with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
                kind = _compression(f.read(6))
                f.seek(0)
                if kind is not None:
                    spooled = _spool(f, kind)
                    source, size = spooled, os.fstat(spooled.fileno()).st_size
                else:
                    source, size = f, listed.size
                seen: set[str] = set()
                with tarfile.open(fileobj=source, mode="r:") as tar:
                    while True:
                        member = tar.next()
                        if member is None:
                            break
                        position += 1
                        split = None if member.isdir() else split_wds_name(member.name)
                        if split is not None and split[0] != key:  # the previous sample is complete
                            if key is not None:
                                entries += 1
                                yield wds_sample(rel, path, key, members)
                            key, members = split[0], {}
                        if member.offset_data + member.size > size:
                            raise CorruptShardError(
                                f"member {member.name!r} claims {member.size} bytes at byte {member.offset_data}, "
                                f"but the shard holds {size}")
                        if member.isdir():
                            continue
                        if split is None:
                            Metrics.counter(NAMESPACE, "wds_members_ignored").inc()
                            continue
                        ext = split[1]
                        if ext not in WDS_IMAGE_EXTENSIONS and ext not in WDS_LABEL_EXTENSIONS:
                            continue  # other modalities (npy, seg.png, …): not ours to read
                        members[ext] = self._member(tar, member, seen)
        except Exception as exc:  # truncated or corrupt tar, a lying header: the rest of the shard is one row
            where = f"#{key}" if key is not None else ""
            yield tally(path, entries + 1)
            yield failure(rel + where, path + where, "read", exc,
                          f"tar unreadable from member {position} on (sample {key!r}): {type(exc).__name__}: {exc}")
            return
        finally:
            if spooled is not None:
                spooled.close()
        if key is not None:
            entries += 1
            yield wds_sample(rel, path, key, members)
        yield tally(path, entries)

    def _member(self, tar: tarfile.TarFile, member: tarfile.TarInfo, seen: set[str]) -> bytes | Exception:
        """A wanted member's bytes, or the reason it cannot be used (its sample becomes a failure row)."""
        name = member.name
        if name in seen:
            return DuplicateMemberError(f"member {name!r} appears more than once in the shard")
        seen.add(name)
        if member.issym() or member.islnk():
            return LinkMemberError(f"member {name!r} is a link to {member.linkname!r}: links are not followed")
        if not member.isfile():
            return SpecialMemberError(f"member {name!r} is not a regular file (type {member.type!r})")
        if member.size > self._max:
            return RecordTooLargeError(f"member {name!r} holds {member.size} bytes, more than {self._max}")
        data = tar.extractfile(member).read(member.size)
        if len(data) != member.size:
            raise CorruptShardError(f"member {name!r} claims {member.size} bytes, {len(data)} are there")
        return data


class ReadWebDatasetImages(ShardFileReader):
    """Listing of WebDataset tars → ``{"records", "failures", "tallies"}``."""

    FORMAT = "wds"

    def shard_fn(self) -> beam.DoFn:
        return _ReadTarShardFn(self._spec.root)
