"""The on-disk contract of an index (ARCHITECTURE.md), independent of any runner.

::

    <index>/LATEST                         JSON pointer to the newest complete version
    <index>/_staging/<version>/...         a build in progress (never read)
    <index>/<version>/MANIFEST.json        written last; digests of every file below
    <index>/<version>/transform_fn/...     tf.Transform graph, applied to queries too
    <index>/<version>/lsh_planes.npy       (dim, bits) hyperplanes
    <index>/<version>/shards/shard-NNNNN/  annoy.ann, vectors.f16.npy, lsh_codes.npy,
                                           mih_offsets.npy, mih_ids.npy, idmap.parquet, SHARD.json

Nothing here imports Beam: the pipeline moves files, this module names and checks them.
"""

from __future__ import annotations

import calendar
import dataclasses
import hashlib
import re
import time

from artefacts.manifests import new_run_id

FORMAT_VERSION = 2  # 2: transform as data, learned LSH, HNSW, calibrated efforts
MANIFEST = "MANIFEST.json"
POINTER = "LATEST"
STAGING = "_staging"
SHARD_INFO = "SHARD.json"
LSH_PLANES = "lsh_planes.npy"
LSH_OFFSETS = "lsh_offsets.npy"
TRANSFORM_DIR = "transform_fn"
TRANSFORMED_METADATA_DIR = "transformed_metadata"
TRANSFORM_DATA_DIR = "transform"  # the transform as data (projection.npy, bias.npy): what queries apply
ENCODER_DIR = "encoder"  # an index of autoencoder codes: the encoder as data (layers.json + .npy)
ANNOY_FILE = "annoy.ann"
VECTORS_FILE = "vectors.f16.npy"
CODES_FILE = "lsh_codes.npy"
MIH_OFFSETS_FILE = "mih_offsets.npy"
MIH_IDS_FILE = "mih_ids.npy"
IDMAP_FILE = "idmap.parquet"
GRAPH_DIR = "graph"  # --graph-k: the corpus k-NN graph (diffusion), global ids in shard order
GRAPH_NEIGHBOURS = f"{GRAPH_DIR}/neighbours.npy"  # (n, k) int32 global ids, best first, -1 pads
GRAPH_SIMILARITIES = f"{GRAPH_DIR}/similarities.npy"  # (n, k) float16 cosines
METRIC = "angular"


class IndexIntegrityError(RuntimeError):
    """A version whose files do not match its manifest, or is not complete."""


_VERSION = re.compile(r"^v(\d{8}T\d{6})-[0-9a-f]{6}$")


def new_version(now: float | None = None) -> str:
    """A version name that sorts by build start time (UTC) and never collides: ``v`` + a run id."""
    return "v" + new_run_id(now)


def is_version(name: str) -> bool:
    return bool(_VERSION.match(name))


def version_time(name: str) -> float:
    """Build start (epoch seconds) encoded in a version name."""
    m = _VERSION.match(name)
    if not m:
        raise ValueError(f"{name!r} is not an index version name")
    return float(calendar.timegm(time.strptime(m.group(1), "%Y%m%dT%H%M%S")))


@dataclasses.dataclass(frozen=True)
class Cleanup:
    """What a publish may delete: relative folder names under the index root."""

    versions: list[str]  # complete versions beyond the newest ``keep``
    incomplete: list[str]  # version folders without a manifest (a crash between move and commit)
    staging: list[str]  # _staging/<version> folders of builds that never published

    @property
    def all(self) -> list[str]:
        return self.versions + self.incomplete + [f"{STAGING}/{v}" for v in self.staging]


def plan_cleanup(
    complete: list[str],
    incomplete: list[str],
    staging: list[str],
    latest: str,
    keep: int,
    now: float,
    stale_after: float,
) -> Cleanup:
    """Which folders to garbage-collect after ``latest`` was published.

    Complete versions: keep the newest ``keep`` by name (build start) and always the
    one ``LATEST`` points to. Incomplete and staging folders may belong to a build
    still running elsewhere, so they go only once they are older than
    ``stale_after`` seconds and than ``latest``. Names that are not version names
    are never touched: they are not ours.
    """
    if keep < 1:
        raise ValueError(f"keep_versions must be at least 1, not {keep}")
    newest = sorted((v for v in complete if is_version(v)), reverse=True)
    kept = set(newest[:keep]) | {latest}
    old = [v for v in newest if v not in kept]

    def stale(v: str) -> bool:
        return is_version(v) and v != latest and v < latest and version_time(v) <= now - stale_after

    return Cleanup(
        versions=sorted(old),
        incomplete=sorted(v for v in incomplete if stale(v)),
        staging=sorted(v for v in staging if stale(v)),
    )


def shard_dir(shard: int) -> str:
    return f"shards/shard-{shard:05d}"


def stable_shard(image_id: str, num_shards: int) -> int:
    """Shard of an image id: the same on every worker, Python version and run."""
    digest = hashlib.blake2b(image_id.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % num_shards


def sha256_stream(chunks) -> tuple[str, int]:
    h = hashlib.sha256()
    size = 0
    for chunk in chunks:
        h.update(chunk)
        size += len(chunk)
    return h.hexdigest(), size


def sha256_file(path: str) -> tuple[str, int]:
    with open(path, "rb") as f:
        return sha256_stream(iter(lambda: f.read(1 << 20), b""))
