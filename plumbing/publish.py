"""Stage → check → move in → commit → clean up: the one way every job publishes.

Object stores have no atomic folder rename, so every output here is committed by one
small JSON file written last (to a temporary name, then renamed): its manifest. Readers
trust only what a manifest lists. The steps, for every job:

1. the pipeline writes under ``<out>/_staging/<run>/`` (nothing a reader looks at);
2. the launcher counts what was staged and checks it against what went in
   (:func:`check_counts`); a mismatch raises :class:`PublishRefusedError` and nothing
   moves, so the previous output stays exactly as it was;
3. the staged files move in under names unique to the run;
4. the manifest is written atomically: the commit point;
5. files of earlier runs that the new manifest does not list are deleted, and the
   staging folder (and the ``_staging`` root, once empty) goes.

A run killed before step 4 leaves the previous manifest and every file it lists in
place; the next run deletes the orphans in step 5.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from typing import Any, TypeVar

import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from artefacts.manifests import Manifest, ManifestError, PartFile
from plumbing import fsutil

log = logging.getLogger(__name__)

STAGING = "_staging"
MANIFEST = "MANIFEST.json"

M = TypeVar("M", bound=Manifest)


class PublishRefusedError(RuntimeError):
    """What a job produced does not add up to what went in; nothing was published.

    ``counts`` holds every figure that had to agree, so the message and a scheduler
    alert can say by how much.
    """

    def __init__(self, what: str, counts: dict[str, Any], detail: str = ""):
        shown = ", ".join(f"{k} {v}" for k, v in counts.items())
        super().__init__(
            f"{what}: counts disagree ({shown}){': ' + detail if detail else ''}. Nothing was published; the "
            "previous output is unchanged. Re-run the job (on the DirectRunner, with the default in_memory mode)."
        )
        self.counts = counts


def staging_dir(output: str, run_id: str) -> str:
    return fsutil.join(output, STAGING, run_id)


def read_manifest(path: str, cls: type[M]) -> M:
    """Reads and checks a manifest through Beam filesystems; names the file in every error."""
    if not fsutil.exists(path):
        raise FileNotFoundError(f"{path} does not exist: the job that writes it has not published there")
    try:
        data = json.loads(fsutil.read_bytes(path))
    except ValueError as exc:
        raise ManifestError(f"{path} is not valid JSON ({exc}): it was damaged; re-run the job") from exc
    return cls.from_dict(data, source=path)


def manifest_bytes(manifest: Manifest) -> bytes:
    """The exact bytes a manifest is written as (what an index signature covers)."""
    return fsutil.json_bytes(manifest.to_dict())


def write_manifest(path: str, manifest: Manifest) -> None:
    fsutil.write_bytes_atomic(path, manifest_bytes(manifest))


def check_counts(what: str, counts: dict[str, int | None], detail: str = "") -> None:
    """Every figure that is known (not None) must be equal, else :class:`PublishRefusedError`."""
    known = {v for v in counts.values() if v is not None}
    if len(known) > 1:
        raise PublishRefusedError(what, counts, detail)


def staged_parts(staging: str, kind: str) -> list[str]:
    return fsutil.match(fsutil.join(staging, kind, "part-*.parquet"))


def run_part_name(path: str, run_id: str) -> str:
    """``part-SSSSS-of-NNNNN.parquet`` → ``part-<run>-SSSSS-of-NNNNN.parquet``: parts of two runs never collide."""
    return path.rsplit("/", 1)[-1].replace("part-", f"part-{run_id}-", 1)


def count_rows(path: str) -> int:
    """Rows in one staged Parquet part, from its footer: the check that staged counts add up reads no data pages."""
    with FileSystems.open(path, compression_type="uncompressed") as f:
        return pq.ParquetFile(f).metadata.num_rows


def count_staged(staging: str, kinds: Iterable[str], run_id: str) -> dict[str, list[tuple[str, PartFile]]]:
    """For each kind, the staged parts as (staged path, the PartFile they will be published as)."""
    out: dict[str, list[tuple[str, PartFile]]] = {}
    for kind in kinds:
        out[kind] = [(src, PartFile(f"{kind}/{run_part_name(src, run_id)}", count_rows(src)))
                     for src in staged_parts(staging, kind)]
    return out


def part_moves(output: str, staged: dict[str, list[tuple[str, PartFile]]]) -> list[tuple[str, str]]:
    return [(src, fsutil.join(output, part.path)) for parts in staged.values() for src, part in parts]


def stale_parts(output: str, kinds: Iterable[str], keep: Iterable[str]) -> list[str]:
    """Part files under ``output`` (relative paths) that the new manifest does not list."""
    keep = set(keep)
    found = []
    for kind in kinds:
        for path in fsutil.match(fsutil.join(output, kind, "part-*.parquet")):
            rel = f"{kind}/{path.rsplit('/', 1)[-1]}"
            if rel not in keep:
                found.append(rel)
    return found


def commit(
    output: str,
    manifest: Manifest,
    moves: list[tuple[str, str]],
    staging: str | None,
    stale: Iterable[str] = (),
    manifest_name: str = MANIFEST,
) -> None:
    """Steps 3–5: move staged files in, write the manifest (the commit point), clean up.

    ``moves`` are (staged path, final path); ``stale`` are paths relative to ``output``
    deleted after the commit (computed before it: the files of earlier runs).
    """
    stale = list(stale)
    fsutil.move([src for src, _ in moves], [dst for _, dst in moves])
    write_manifest(fsutil.join(output, manifest_name), manifest)
    fsutil.delete_quietly([fsutil.join(output, rel) for rel in stale])
    if staging is not None:
        discard_staging(staging)


def discard_staging(staging: str) -> None:
    """Deletes a run's staging folder, and the ``_staging`` root when no other run is staging there."""
    fsutil.delete_tree(staging)
    root = staging.rstrip("/").rsplit("/", 1)[0]
    if root.rsplit("/", 1)[-1] == STAGING and not fsutil.match(fsutil.join(root, "**")):
        fsutil.delete_tree(root)
