"""Finding, checking and localising an index version: the one place that reads ``LATEST`` and manifests.

Used by the searcher, the neighbour and evaluation jobs and the TF Serving export, on
local disk and object stores alike (through Beam filesystems). Annoy and faiss map
local files only, so a remote index is copied once per machine into a cache before a
searcher opens it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import uuid

from index_builder import layout
from index_builder.manifests import IndexManifest, ManifestError
from transforms import fsutil

log = logging.getLogger(__name__)


def check_version_name(version: str) -> str:
    """A version name is read from LATEST or the command line: never let it walk out of the index."""
    if not isinstance(version, str) or not version or "/" in version or "\\" in version \
            or version.startswith((".", "_")):
        raise layout.IndexIntegrityError(f"{version!r} is not an index version name")
    return version


def available_versions(index_dir: str) -> list[str]:
    """Complete (manifest-bearing) version folders, oldest first."""
    found = fsutil.match(fsutil.join(index_dir, "*", layout.MANIFEST))
    return sorted(p.rstrip("/").split("/")[-2] for p in found if not p.split("/")[-2].startswith((".", "_")))


def read_pointer(index_dir: str) -> str:
    """The version ``LATEST`` names; a missing or damaged pointer is an error that names the file."""
    pointer = fsutil.join(index_dir, layout.POINTER)
    if not fsutil.exists(pointer):
        raise FileNotFoundError(f"{index_dir} has no {layout.POINTER}: no index was published there")
    try:
        version = json.loads(fsutil.read_bytes(pointer))["version"]
    except (ValueError, KeyError, TypeError) as exc:
        raise layout.IndexIntegrityError(
            f"{pointer} is damaged ({type(exc).__name__}): rewrite it with the name of a version in {index_dir} "
            f"(versions there: {', '.join(available_versions(index_dir)) or 'none'})"
        ) from None
    return check_version_name(version)


def resolve(index_dir: str, version: str | None = None) -> tuple[str, IndexManifest]:
    """(version, checked manifest) of ``version`` or of the one ``LATEST`` points to."""
    version = check_version_name(version) if version is not None else read_pointer(index_dir)
    path = fsutil.join(index_dir, version, layout.MANIFEST)
    if not fsutil.exists(path):
        known = available_versions(index_dir)
        if fsutil.match(fsutil.join(index_dir, version, "**")):
            raise layout.IndexIntegrityError(f"{fsutil.join(index_dir, version)} has no {layout.MANIFEST}: "
                                             "not a complete index version")
        raise FileNotFoundError(
            f"index version {version} does not exist in {index_dir} "
            f"(versions there: {', '.join(known) if known else 'none'})"
        )
    manifest = read_manifest(path)
    if manifest.version != version:
        raise layout.IndexIntegrityError(
            f"{fsutil.join(index_dir, version)} holds the manifest of version {manifest.version}: "
            "a version folder must keep the name it was published under"
        )
    return version, manifest


def read_manifest(path: str) -> IndexManifest:
    try:
        data = json.loads(fsutil.read_bytes(path))
    except ValueError as exc:
        raise layout.IndexIntegrityError(f"{path} is not valid JSON ({exc}): the index is damaged") from None
    try:
        return IndexManifest.from_dict(data, source=path)
    except ManifestError as exc:
        raise layout.IndexIntegrityError(str(exc)) from None


def verify_files(version_dir: str, manifest: IndexManifest, full: bool = True, prefix: str = "") -> None:
    """Refuses a local version whose files differ from its manifest (size always, sha256 if ``full``).

    ``prefix`` limits the check to the files under one folder (the export checks only the transform).
    """
    bad = []
    for rel, meta in manifest.files.items():
        if not rel.startswith(prefix):
            continue
        path = os.path.join(version_dir, rel)
        if not os.path.isfile(path) or os.path.getsize(path) != meta.bytes:
            bad.append(rel)
        elif full and layout.sha256_file(path)[0] != meta.sha256:
            bad.append(rel)
    if bad:
        raise layout.IndexIntegrityError(
            f"{version_dir}: {len(bad)} file(s) do not match the manifest ({', '.join(bad[:5])}); "
            "the index is damaged or was modified: rebuild or republish it"
        )


def localise(index_dir: str, version: str) -> str:
    """A local folder holding ``version`` of ``index_dir``: the index itself when it is local, else a
    copy in the machine's temp folder (made once per machine, then reused)."""
    if "://" not in index_dir:
        return index_dir
    cache = os.path.join(tempfile.gettempdir(), "cbir-index-cache", hashlib.sha1(index_dir.encode()).hexdigest()[:12])
    if os.path.isfile(os.path.join(cache, version, layout.MANIFEST)):
        return cache
    manifest = read_manifest(fsutil.join(index_dir, version, layout.MANIFEST))
    tmp = os.path.join(cache, f"_tmp-{uuid.uuid4().hex[:8]}")
    try:
        for rel in [*manifest.files, layout.MANIFEST]:
            fsutil.copy_to_local(fsutil.join(index_dir, version, rel), os.path.join(tmp, rel))
        try:
            os.rename(tmp, os.path.join(cache, version))  # the manifest arrives with the rest, atomically
        except OSError:  # another worker on this machine finished first
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("copied index %s/%s to %s", index_dir, version, cache)
    return cache
