"""What an extract run can skip unread: inputs a committed run already holds rows for, by listing metadata.

Two sources of rows, newest first:

1. *resume*: chunks this output's interrupted run committed (``<out>/_resume/``), made with the same
   settings (``CONFIG.json``); a kill, an OOM or a lost worker costs at most the chunk in flight;
2. *previous*: the ``--previous`` output, when its features are interchangeable with this run's.

An input (an image file, or a shard file: the *unit*) is **carried** when a source lists it with the
same size and modification time and none of its rows is a failure a retry could mend (stages read
and inference); its feature and failure rows are then copied without reading a byte of it. Every
other input is read. Of those, the previous run's rows that were not carried still reuse features
by content digest (a renamed or touched file costs a read and a hash, not a model run).
``--verify-digests`` carries nothing, so every input is read and hashed.

Each source's record is an ``inputs`` table, one row per unit: size, mtime, rows it produced.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from artefacts.manifests import FeaturesManifest
from plumbing import fsutil, publish
from transforms import features_io
from transforms.readers import ListedFile
from transforms.readers.common import relative_id

log = logging.getLogger(__name__)

INPUTS = "inputs"
ROW_KINDS = ("features", "failures")
RESUME = "_resume"
RETRY_STAGES = ("read", "inference")  # a failure at these stages may pass next time: its unit is read again
INPUTS_SCHEMA = pa.schema([("unit", pa.string()), ("size", pa.int64()), ("mtime", pa.float64()),
                           ("rows", pa.int64())])


@dataclasses.dataclass
class Source:
    """Rows a committed run holds, and the listing metadata of the units that made them."""

    name: str
    units: dict[str, tuple[int, float | None, int]]  # unit -> (size, mtime, rows)
    parts: dict[str, list[str]]  # kind -> part paths
    retry: set[str] = dataclasses.field(default_factory=set)  # units with a failure worth retrying

    def carries(self, listed: ListedFile, name: str) -> bool:
        known = self.units.get(name)
        return (known is not None and listed.mtime is not None and known[0] == listed.size
                and known[1] == listed.mtime and name not in self.retry)


@dataclasses.dataclass
class Plan:
    carried: dict[str, tuple[Source, int]]  # unit -> (its source, rows)
    to_read: list[ListedFile]
    by_source: dict[str, int]  # units carried per source

    @property
    def carried_rows(self) -> int:
        return sum(rows for _, rows in self.carried.values())


# -- sources ------------------------------------------------------------------------------------------


def inputs_table(units: dict[str, tuple[int, float | None, int]]) -> pa.Table:
    names = sorted(units)
    return pa.Table.from_arrays([
        pa.array(names, pa.string()), pa.array([units[u][0] for u in names], pa.int64()),
        pa.array([units[u][1] for u in names], pa.float64()), pa.array([units[u][2] for u in names], pa.int64()),
    ], schema=INPUTS_SCHEMA)


def read_units(paths: list[str]) -> dict[str, tuple[int, float | None, int]]:
    out: dict[str, tuple[int, float | None, int]] = {}
    for path in paths:
        t = features_io.read_table(path)
        out.update(zip(t.column("unit").to_pylist(),
                       zip(t.column("size").to_pylist(), t.column("mtime").to_pylist(), t.column("rows").to_pylist(),
                           strict=True), strict=True))
    return out


def retry_units(failure_parts: list[str]) -> set[str]:
    out: set[str] = set()
    for path in failure_parts:
        t = features_io.read_table(path, ["stage", "unit"])
        hit = pc.is_in(t.column("stage"), value_set=pa.array(RETRY_STAGES))
        out.update(u for u in t.column("unit").filter(hit).to_pylist() if u)
    return out


def previous_source(folder: str, manifest: FeaturesManifest) -> Source | None:
    """The ``--previous`` output as a source; None for runs that recorded no listing metadata (older ones)."""
    inputs = manifest.parts(INPUTS)
    if not inputs:
        log.warning("%s records no listing metadata (made before it was kept): its inputs are read again, and "
                    "features are reused by content digest", folder)
        return None
    parts = {kind: [fsutil.join(folder, p.path) for p in manifest.parts(kind)] for kind in ROW_KINDS}
    return Source("previous", read_units([fsutil.join(folder, p.path) for p in inputs]), parts,
                  retry_units(parts["failures"]))


def settings_key(settings: dict[str, Any]) -> str:
    """What rows depend on besides the input's bytes: chunks made under other settings are not resumed."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def resume_source(output: str, key: str) -> Source | None:
    """Chunks an interrupted run into ``output`` committed with the same settings; others are deleted."""
    root = fsutil.join(output, RESUME)
    config = fsutil.join(root, "CONFIG.json")
    if not fsutil.exists(config):
        return None
    if fsutil.read_json(config).get("key") != key:
        log.warning("%s holds chunks of an interrupted run with other settings: deleting them", root)
        fsutil.delete_tree(root)
        return None
    done = sorted(p.rsplit("/", 1)[0] for p in fsutil.match(fsutil.join(root, "chunks", "*", "DONE.json")))
    if not done:
        return None
    units: dict[str, tuple[int, float | None, int]] = {}
    parts: dict[str, list[str]] = {kind: [] for kind in ROW_KINDS}
    for chunk in done:
        if not _complete(chunk):
            continue
        units.update(read_units([fsutil.join(chunk, "inputs.parquet")]))
        for kind in ROW_KINDS:
            parts[kind] += fsutil.match(fsutil.join(chunk, kind, "part-*.parquet"))
    log.info("resuming: %d chunk(s) of an interrupted run hold %d inputs", len(done), len(units))
    return Source("resume", units, parts, retry_units(parts["failures"]))


def _complete(chunk: str) -> bool:
    """A chunk whose parts still hold the rows it committed (a run that failed to publish may have moved them)."""
    rows = sum(publish.count_rows(p) for kind in ROW_KINDS for p in fsutil.match(fsutil.join(chunk, kind, "part-*")))
    if rows != fsutil.read_json(fsutil.join(chunk, "DONE.json")).get("rows"):
        log.warning("%s lost rows it committed: its inputs are read again", chunk)
        return False
    return True


def start_resume(output: str, key: str) -> None:
    fsutil.write_bytes_atomic(fsutil.join(output, RESUME, "CONFIG.json"), fsutil.json_bytes({"key": key}))


# -- the plan and the copy ----------------------------------------------------------------------------


def unit_name(path: str, root: str) -> str:
    """A unit's name in rows and records: relative to the input root, as image ids are."""
    return relative_id(path, root)


def plan(listed: list[ListedFile], sources: list[Source], root: str) -> Plan:
    """Each listed unit: carried from the first source that knows it unchanged, else read."""
    carried: dict[str, tuple[Source, int]] = {}
    to_read: list[ListedFile] = []
    by_source = {s.name: 0 for s in sources}
    for item in listed:
        name = unit_name(item.path, root)
        source = next((s for s in sources if s.carries(item, name)), None)
        if source is None:
            to_read.append(item)
        else:
            carried[name] = (source, source.units[name][2])
            by_source[source.name] += 1
    return Plan(carried, to_read, by_source)


def carry(p: Plan, staging: str, digests_from: Source | None = None) -> list[str]:
    """The carried units' rows, filtered from their sources' parts into ``staging``, each part read once.

    From ``digests_from`` (the previous run), the feature rows *not* carried (changed, removed or moved
    inputs) also go to ``staging/_digests/``: what is read tonight may reuse them by content digest.
    Returns those digest files.
    """
    sources = {id(s): s for s, _ in p.carried.values()}
    if digests_from is not None and p.to_read:
        sources.setdefault(id(digests_from), digests_from)
    digest_files: list[str] = []
    for source in sources.values():
        units = pa.array(sorted(u for u, (s, _) in p.carried.items() if s is source), pa.string())
        for kind in ROW_KINDS:
            for n, path in enumerate(source.parts[kind]):
                table = features_io.read_table(path)
                mask = pc.is_in(table.column("unit"), value_set=units)
                kept = table.filter(mask)
                if kept.num_rows:
                    write_table(kept, fsutil.join(staging, kind, f"part-carried-{source.name}-{n:05d}.parquet"))
                if source is digests_from and kind == "features" and p.to_read and kept.num_rows < table.num_rows:
                    digest_files.append(fsutil.join(staging, "_digests", f"part-{n:05d}.parquet"))
                    write_table(table.filter(pc.invert(mask)), digest_files[-1])
    return digest_files


def write_table(table: pa.Table, path: str) -> None:
    """One Parquet file through Beam filesystems, streamed (no second copy of it in memory)."""
    with FileSystems.create(path) as f:
        pq.write_table(table, f, compression="snappy")
