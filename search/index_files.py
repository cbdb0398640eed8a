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

import numpy as np

from artefacts import layout, signing
from artefacts.manifests import IndexManifest, ManifestError
from artefacts.transform import VectorTransform
from index_builder import local_store
from index_builder.types import registry
from index_builder.types import votes as votes_type
from plumbing import fsutil

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


def resolve(index_dir: str, version: str | None = None, signing_key: bytes | None = None,
            manifest_sha256: str | None = None) -> tuple[str, IndexManifest]:
    """(version, checked manifest) of ``version`` or of the one ``LATEST`` points to.

    With ``signing_key`` the manifest must carry a valid signature (``artefacts.signing``);
    with ``manifest_sha256`` (what a launcher verified) it must be exactly those bytes, so
    workers of a job read the very version the launcher checked, without holding the key.
    """
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
    raw = fsutil.read_bytes(path)
    if signing_key is not None:
        sig_path = fsutil.join(index_dir, version, signing.SIGNATURE_FILE)
        signature = fsutil.read_bytes(sig_path).decode("ascii", "replace") if fsutil.exists(sig_path) else None
        signing.check(raw, signature, signing_key, fsutil.join(index_dir, version))
    if manifest_sha256 is not None and hashlib.sha256(raw).hexdigest() != manifest_sha256:
        raise layout.IndexIntegrityError(f"{path} changed since the job started: refusing to mix two manifests")
    manifest = parse_manifest(raw, path)
    if manifest.version != version:
        raise layout.IndexIntegrityError(
            f"{fsutil.join(index_dir, version)} holds the manifest of version {manifest.version}: "
            "a version folder must keep the name it was published under"
        )
    return version, manifest


def read_manifest(path: str) -> IndexManifest:
    return parse_manifest(fsutil.read_bytes(path), path)


def parse_manifest(raw: bytes, path: str) -> IndexManifest:
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise layout.IndexIntegrityError(f"{path} is not valid JSON ({exc}): the index is damaged") from None
    try:
        return IndexManifest.from_dict(data, source=path)
    except ManifestError as exc:
        raise layout.IndexIntegrityError(str(exc)) from None


def required_files(manifest: IndexManifest) -> list[str]:
    """Every file a version of this manifest must hold, from its index types, shards and transform.

    A manifest that leaves one of them out is refused even when the digests of what it
    does list match: deleting entries (and corrupting the files behind them) must not
    slip past the check.
    """
    need = []
    if manifest.transform.projection_file:
        need += [manifest.transform.projection_file, manifest.transform.bias_file]
    elif "pca" in manifest.transform.steps:
        need.append(f"{layout.TRANSFORM_DATA_DIR}/projection.npy")
    if manifest.model.get("encoder"):
        need.append(f"{layout.ENCODER_DIR}/layers.json")
    per_shard = [layout.VECTORS_FILE, layout.IDMAP_FILE, layout.SHARD_INFO]
    built = [registry.get(name) for name in manifest.index_types if name in registry.SELECTABLE]
    per_shard += [f for t in built for f in t.files]
    need += [f for t in built for f in t.version_files]
    if manifest.local_features:
        per_shard += list(local_store.FILES)
        if manifest.local_features.get("vote_index"):  # indexes built before the vote index have none
            per_shard.append(votes_type.VOTES_FILE)
    if manifest.graph:
        need += [layout.GRAPH_NEIGHBOURS, layout.GRAPH_SIMILARITIES]
    for s in range(manifest.shards):
        need += [f"{layout.shard_dir(s)}/{name}" for name in per_shard]
    return need


def verify_files(version_dir: str, manifest: IndexManifest, full: bool = True, prefix: str = "") -> None:
    """Refuses a local version whose files differ from its manifest in any way.

    Every listed file must be there at its size (and sha256 when ``full``); every file the
    index types need must be listed; and no file may lie unlisted under the shards or the
    transform, where a reader would pick it up. ``prefix`` limits the check to one folder
    (the export checks only the transform).
    """
    bad, unlisted = [], []
    missing = [rel for rel in required_files(manifest) if rel.startswith(prefix) and rel not in manifest.files]
    for rel, meta in manifest.files.items():
        if not rel.startswith(prefix):
            continue
        path = os.path.join(version_dir, rel)
        if not os.path.isfile(path) or os.path.islink(path) or os.path.getsize(path) != meta.bytes:
            bad.append(rel)
        elif full and layout.sha256_file(path)[0] != meta.sha256:
            bad.append(rel)
    for sub in ("shards", layout.TRANSFORM_DATA_DIR, layout.TRANSFORM_DIR, layout.ENCODER_DIR):
        root = os.path.join(version_dir, sub)
        for folder, _, names in os.walk(root):
            for name in names:
                rel = os.path.relpath(os.path.join(folder, name), version_dir).replace(os.sep, "/")
                if rel.startswith(prefix) and rel not in manifest.files:
                    unlisted.append(rel)
    problems = []
    if bad:
        problems.append(f"{len(bad)} file(s) do not match the manifest ({', '.join(bad[:5])})")
    if missing:
        problems.append(f"the manifest does not list {len(missing)} required file(s) ({', '.join(missing[:5])})")
    if unlisted:
        problems.append(f"{len(unlisted)} file(s) are not in the manifest ({', '.join(unlisted[:5])})")
    if problems:
        raise layout.IndexIntegrityError(
            f"{version_dir}: {'; '.join(problems)}; the index is damaged or was modified: rebuild or republish it"
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


def load_transform(version_dir: str, manifest: IndexManifest) -> VectorTransform:
    """The index's vector transform, from the data files its manifest lists (never a SavedModel)."""
    info = manifest.transform
    if info.projection_file is None:
        if "pca" in info.steps:
            raise layout.IndexIntegrityError(f"{version_dir}: the manifest lists no transform data for its PCA step; "
                                             "rebuild the index")
        return VectorTransform()
    projection = np.load(os.path.join(version_dir, info.projection_file), allow_pickle=False)
    bias = np.load(os.path.join(version_dir, info.bias_file), allow_pickle=False)
    expected = (manifest.dimension.input, manifest.dimension.output)
    if projection.shape != expected or bias.shape != (projection.shape[1],):
        raise layout.IndexIntegrityError(f"{version_dir}: transform data of shapes {projection.shape}, {bias.shape} do "
                                         f"not fit {manifest.dimension.input}→{manifest.dimension.output}")
    return VectorTransform(projection.astype(np.float32), bias.astype(np.float32))
