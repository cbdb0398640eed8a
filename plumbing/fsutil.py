"""Small helpers over Beam filesystems for staged, atomic publishing.

Object stores have no atomic directory rename, so every job here commits by
writing one small JSON file last (write to a temporary name, then rename):
readers trust only what that file lists.
"""

from __future__ import annotations

import json
import logging
import shutil
import uuid
from collections.abc import Iterator
from typing import Any

from apache_beam.io.filesystem import BeamIOError
from apache_beam.io.filesystems import FileSystems

log = logging.getLogger(__name__)


def join(*parts: str) -> str:
    return FileSystems.join(*parts)


def exists(path: str) -> bool:
    return FileSystems.exists(path)


def write_bytes_atomic(path: str, data: bytes) -> None:
    """Writes ``path`` so that readers see the old content or the new, never a part."""
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with FileSystems.create(tmp) as f:
        f.write(data)
    FileSystems.rename([tmp], [path])  # os.rename locally; copy + delete on object stores


def write_bytes(path: str, data: bytes) -> None:
    """Writes ``path`` in one go, not atomically: for staging files nothing reads before the job commits."""
    with FileSystems.create(path) as f:
        f.write(data)


def upload(local_path: str, dest: str) -> None:
    """A local file to ``dest`` (any Beam filesystem), streamed: a shard's multi-GB files never sit in memory."""
    with open(local_path, "rb") as src, FileSystems.create(dest) as dst:
        shutil.copyfileobj(src, dst, length=8 << 20)


def write_npy(path: str, array: Any) -> None:
    """Writes a numpy array in ``.npy`` format (no pickle): the index's arrays are data, like every artefact."""
    import io

    import numpy as np

    buf = io.BytesIO()
    np.save(buf, array)
    write_bytes(path, buf.getvalue())


def read_npy(path: str) -> Any:
    """Reads a ``.npy`` array whole, wherever it is stored; object arrays are refused (no pickle)."""
    import io

    import numpy as np

    return np.load(io.BytesIO(read_bytes(path)))


def json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


def write_json_atomic(path: str, obj: Any) -> None:
    write_bytes_atomic(path, json_bytes(obj))


def move(sources: list[str], destinations: list[str]) -> None:
    """Renames files, creating local destination folders first (object stores have none)."""
    for dest in destinations:
        parent = dest.rsplit("/", 1)[0]
        if "://" not in dest and parent and not FileSystems.exists(parent):
            FileSystems.mkdirs(parent)
    if sources:
        FileSystems.rename(sources, destinations)


def read_bytes(path: str) -> bytes:
    with FileSystems.open(path, compression_type="uncompressed") as f:
        return f.read()


def read_json(path: str) -> Any:
    return json.loads(read_bytes(path))


def read_chunks(path: str, size: int = 1 << 20) -> Iterator[bytes]:
    """The bytes of ``path`` in pieces of ``size``, so a digest of a large file never holds it whole."""
    with FileSystems.open(path, compression_type="uncompressed") as f:
        yield from iter(lambda: f.read(size), b"")


def match(pattern: str) -> list[str]:
    try:
        return sorted(m.path for m in FileSystems.match([pattern])[0].metadata_list)
    except BeamIOError:
        return []


def sizes(pattern: str) -> dict[str, int]:
    """path → size in bytes for every file matching ``pattern``: one listing, no reads."""
    try:
        found = FileSystems.match([pattern])[0].metadata_list
    except BeamIOError:
        return {}
    return {m.path: m.size_in_bytes for m in found}


def delete_quietly(paths: list[str]) -> None:
    """Deletes what exists; a file already gone is not an error (re-runs, races)."""
    for path in paths:
        try:
            if FileSystems.exists(path):
                FileSystems.delete([path])
        except BeamIOError as exc:
            log.warning("could not delete %s: %s", path, exc)


def delete_tree(root: str) -> None:
    delete_quietly(match(join(root, "**")))
    try:
        if FileSystems.exists(root):
            FileSystems.delete([root])
    except BeamIOError:
        pass


def copy_to_local(src: str, dest: str) -> None:
    """Copies one file from any Beam filesystem to a local path (parents created)."""
    import os
    import shutil

    os.makedirs(os.path.dirname(dest) or ".", exist_ok=True)
    with FileSystems.open(src, compression_type="uncompressed") as f, open(dest, "wb") as out:
        shutil.copyfileobj(f, out, length=8 << 20)


def localise_tree(path: str) -> str:
    """A local folder with the files under ``path``: ``path`` itself when local, else a temporary copy.

    TensorFlow loads SavedModels from local disk here; object-store folders are copied first.
    """
    if "://" not in path:
        return path
    import os
    import tempfile

    local = tempfile.mkdtemp(prefix="cbir-local-")
    root = path.rstrip("/")
    for src in match(join(root, "**")):
        copy_to_local(src, os.path.join(local, src[len(root) + 1:]))
    return local


MAX_INPUT_BYTES = 256 * 1024 * 1024  # one image larger than this is a failure, not an allocation


class RecordTooLargeError(ValueError):
    """An input holds more bytes than the limit; it is refused unread."""


class NotRegularFileError(ValueError):
    """A path that is not a regular file (FIFO, device, directory, symbolic link): never opened."""


def _describe_mode(mode: int) -> str:
    import stat

    for test, name in ((stat.S_ISLNK, "a symbolic link (not followed)"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def read_input(path: str, limit: int = MAX_INPUT_BYTES, size: int | None = None) -> bytes:
    """Reads a whole input file, refusing what is not a regular file or is above ``limit`` bytes, unread.

    Local paths are checked with ``lstat`` and opened with ``O_NOFOLLOW | O_NONBLOCK``, so a FIFO
    named ``x.jpg`` cannot block a worker and a link cannot lead outside the input. The size
    comes from the filesystem (or the listing, ``size``) before a byte is read, and the read
    asks for at most ``min(size, limit) + 1`` bytes (one more tells a file that grew). Remote
    paths (``gs://``, ``s3://``) are objects: their size comes from the listing or a match.
    """
    if "://" not in path:
        import os
        import stat

        st = os.lstat(path)
        if not stat.S_ISREG(st.st_mode):
            raise NotRegularFileError(f"{path} is {_describe_mode(st.st_mode)}: only regular files are read")
        if st.st_size > limit:
            raise RecordTooLargeError(f"{path} holds {st.st_size} bytes, more than the limit of {limit}")
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):  # replaced between the two looks
                raise NotRegularFileError(f"{path} is {_describe_mode(st.st_mode)}: only regular files are read")
            with os.fdopen(fd, "rb", closefd=True) as f:
                fd = -1
                data = f.read(min(st.st_size, limit) + 1)
        finally:
            if fd >= 0:
                os.close(fd)
    else:
        if size is None:
            found = FileSystems.match([path])[0].metadata_list
            size = found[0].size_in_bytes if found else None
        if size is not None and size > limit:
            raise RecordTooLargeError(f"{path} holds {size} bytes, more than the limit of {limit}")
        want = limit + 1 if size is None else min(size, limit) + 1
        with FileSystems.open(path, compression_type="uncompressed") as f:
            data = f.read(want)
    if len(data) > limit:
        raise RecordTooLargeError(f"{path} holds more than {limit} bytes")
    return data
