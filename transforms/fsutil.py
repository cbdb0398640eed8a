"""Small helpers over Beam filesystems for staged, atomic publishing.

Object stores have no atomic directory rename, so every job here commits by
writing one small JSON file last (write to a temporary name, then rename):
readers trust only what that file lists.
"""

from __future__ import annotations

import json
import logging
import uuid
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


def write_json_atomic(path: str, obj: Any) -> None:
    write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


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


def match(pattern: str) -> list[str]:
    try:
        return sorted(m.path for m in FileSystems.match([pattern])[0].metadata_list)
    except BeamIOError:
        return []


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
