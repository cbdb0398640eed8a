"""Publishing an index version: the manifest, the commit, the quality gate, ``LATEST``, and cleanup.

In order: pick one complete attempt per shard, check the counts add up, move the shards
and the shared files into ``<output>/<version>``, check every file is there at its size,
write ``MANIFEST.json`` with a digest of every file (the commit point), run the gate when
one is set (its only call), switch ``LATEST``; the job then collects garbage. A version
folder without a manifest is not an index, so a build stopped anywhere before ``LATEST``
moves leaves the previous version and pointer exactly as they were.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from typing import Any

from artefacts import layout, signing
from artefacts.manifests import (
    Accounting,
    Dimension,
    FeaturesManifest,
    FileDigest,
    IndexManifest,
    ShardRecord,
    TransformInfo,
    utc_now,
)
from artefacts.transform import BIAS_FILE, PROJECTION_FILE, VectorTransform
from evaluation import gate
from index_builder.types import registry
from index_builder.types import votes as votes_type
from pipelines.index.config import IndexBuildError, IndexConfig
from plumbing import fsutil
from plumbing import publish as protocol
from transforms.index_build import ATTEMPTS

log = logging.getLogger(__name__)

SHARDING = {"key": "image_id", "hash": "blake2b(digest_size=8), big-endian integer, modulo shards"}
GATE_SUFFIX = ".gate.json"  # <output>/<version>.gate.json: the gate's report beside the version
SHARED_DIRS = (layout.TRANSFORM_DIR, layout.TRANSFORMED_METADATA_DIR, layout.TRANSFORM_DATA_DIR, layout.ENCODER_DIR,
               layout.GRAPH_DIR)  # staged beside the shards; published as they are when present


@dataclasses.dataclass
class Extras:
    """What a build adds beyond the shards, for the manifest: DBA, the graph, local features."""

    dba: dict[str, Any] | None = None
    graph: dict[str, Any] | None = None
    local: dict[str, Any] | None = None
    carried: list[tuple[int, int]] | None = None  # --dba: per shard, (duplicates, non-finite) of the first pass


def choose_attempts(staging: str, shards: int, attempts: str = ATTEMPTS) -> list[tuple[str, ShardRecord]]:
    """For every shard, one complete build attempt: (folder, its SHARD.json record).

    Complete means SHARD.json exists (uploaded last) and every file it lists is
    there at the size it records. Among complete attempts the first by name wins;
    any of them is a valid shard.
    """
    sizes = fsutil.sizes(fsutil.join(staging, attempts, "**"))
    chosen = []
    for s in range(shards):
        prefix = fsutil.join(staging, attempts, f"shard-{s:05d}-")
        infos = sorted(p for p in sizes if p.startswith(prefix) and p.endswith("/" + layout.SHARD_INFO))
        for info_path in infos:
            folder = info_path[: -len(layout.SHARD_INFO) - 1]
            info = ShardRecord.from_dict(fsutil.read_json(info_path), info_path)
            if all(sizes.get(fsutil.join(folder, n)) == m.bytes for n, m in info.files.items()):
                chosen.append((folder, info))
                break
            log.warning("shard %d: attempt %s is incomplete, skipped", s, folder)
        else:
            raise IndexBuildError(f"shard {s} has no complete build under {staging}: nothing was published")
    return chosen


def publish(
    cfg: IndexConfig,
    version: str,
    staging: str,
    features_manifest: FeaturesManifest,
    dim_in: int,
    dim_out: int,
    elapsed: float,
    metrics: dict[str, int] | None = None,
    transform: VectorTransform | None = None,
    signing_key: bytes | None = None,
    extras: Extras | None = None,
) -> IndexManifest:
    """Checks the build's counts, moves it into ``<output>/<version>``, commits its manifest, switches ``LATEST``.

    Raises PublishRefusedError when rows went missing (nothing moved), IndexBuildError when
    a file is not where it should be (nothing committed), GateFailedError when the committed
    version misses the gate (``LATEST`` unmoved).
    """
    extras = extras or Extras()
    attempts = choose_attempts(staging, cfg.shards)
    infos = [info for _, info in attempts]
    accounting = _check_counts(infos, extras, features_manifest, metrics or {})
    files, moves = _version_files(staging, attempts)
    manifest = _manifest(cfg, version, features_manifest, Dimension(dim_in, dim_out), elapsed, metrics, transform,
                         extras, infos, files, accounting)
    _move_in_and_commit(fsutil.join(cfg.output, version), staging, files, moves, manifest, signing_key)
    if cfg.gate:  # the version is whole in its folder; products see it only once LATEST names it
        _gate(cfg, version)
    fsutil.write_json_atomic(fsutil.join(cfg.output, layout.POINTER), {"version": version})
    log.info("published %s: %d items in %d shards, %.1f MB", version, manifest.items, cfg.shards, manifest.bytes / 1e6)
    return manifest


def _check_counts(infos: list[ShardRecord], extras: Extras, features_manifest: FeaturesManifest,
                  metrics: dict[str, int]) -> Accounting:
    """Every feature row is in a shard, or counted out of one (duplicate, non-finite); else PublishRefusedError."""
    if extras.carried:  # --dba: rows the first pass left out are accounted for by its shards
        for info, (dup, non_finite) in zip(infos, extras.carried, strict=True):
            info.duplicates_dropped += dup
            info.non_finite_skipped += non_finite
    rows_in = sum(p.rows for p in features_manifest.parts("features"))
    accounted = sum(i.accounted for i in infos)
    checked = {"feature rows": rows_in, "rows read (counter)": metrics.get("rows_read"),
               "items + duplicates + non-finite in the shards": accounted}
    protocol.check_counts("index", checked)
    return Accounting("upstream manifest", len(features_manifest.parts("features")), rows_in, checked)


def _version_files(staging: str, attempts: list[tuple[str, ShardRecord]]
                   ) -> tuple[dict[str, FileDigest], list[tuple[str, str]]]:
    """The version's files (path in the version → digest) and the moves that put them there (staged, path)."""
    files: dict[str, FileDigest] = {}
    moves: list[tuple[str, str]] = []
    for s, (folder, info) in enumerate(attempts):
        for name, meta in info.files.items():
            files[f"{layout.shard_dir(s)}/{name}"] = meta
            moves.append((fsutil.join(folder, name), f"{layout.shard_dir(s)}/{name}"))
        files[f"{layout.shard_dir(s)}/{layout.SHARD_INFO}"] = _digest(fsutil.join(folder, layout.SHARD_INFO))
        moves.append((fsutil.join(folder, layout.SHARD_INFO), f"{layout.shard_dir(s)}/{layout.SHARD_INFO}"))
    for sub in SHARED_DIRS:
        found = fsutil.match(fsutil.join(staging, sub, "**"))
        if sub == layout.TRANSFORM_DIR and not found:
            raise IndexBuildError(f"{staging} has no {sub}/: the tf.Transform fit did not complete")
        for path in found:
            rel = path[len(staging) + 1:]
            files[rel] = _digest(path)
            moves.append((path, rel))
    for name in (layout.LSH_PLANES, layout.LSH_OFFSETS):
        files[name] = _digest(fsutil.join(staging, name))
        moves.append((fsutil.join(staging, name), name))
    return files, moves


def _manifest(cfg: IndexConfig, version: str, features_manifest: FeaturesManifest, dimension: Dimension,
              elapsed: float, metrics: dict[str, int] | None, transform: VectorTransform | None, extras: Extras,
              infos: list[ShardRecord], files: dict[str, FileDigest], accounting: Accounting) -> IndexManifest:
    has_projection = transform is not None and transform.projection is not None
    types = _type_params(cfg, infos)
    extra = {**types.pop("extra", {}), **({"incremental": cfg.incremental} if cfg.incremental else {})}
    return IndexManifest(
        version=version,
        created_utc=utc_now(),
        metric=layout.METRIC,
        dimension=dimension,
        transform=TransformInfo(
            ["l2", "pca", "l2"] if cfg.dims else ["l2"], cfg.dims,
            projection_file=f"{layout.TRANSFORM_DATA_DIR}/{PROJECTION_FILE}" if has_projection else None,
            bias_file=f"{layout.TRANSFORM_DATA_DIR}/{BIAS_FILE}" if has_projection else None,
        ),
        index_types=list(cfg.index_types),
        shards=cfg.shards,
        sharding=SHARDING,
        items=sum(i.items for i in infos),
        items_per_shard=[i.items for i in infos],
        duplicates_dropped=sum(i.duplicates_dropped for i in infos),
        model=features_manifest.model,
        model_fingerprint=features_manifest.model_fingerprint,
        features_run_id=features_manifest.run_id,
        **types,
        metrics=metrics or {},
        elapsed_seconds=round(elapsed, 3),
        bytes=sum(f.bytes for f in files.values()),
        files=dict(sorted(files.items())),
        accounting=accounting,
        dba=extras.dba,
        graph=extras.graph,
        local_features=_local_features(extras.local, infos),
        extra=extra,
    )


def _type_params(cfg: IndexConfig, infos: list[ShardRecord]) -> dict[str, Any]:
    """Each built type's manifest record (its parameters and calibration), from the registry.

    A type with a field of its name in the manifest (``annoy``, ``lsh``, ``hnsw``) fills it; a
    newer one's record is kept under its name among the manifest's other keys (``extra``).
    """
    records = registry.manifest_records(tuple(cfg.index_types), cfg.type_params, cfg.seed, infos,
                                        cfg.target_recall)
    fields = {f.name for f in dataclasses.fields(IndexManifest)}
    known = {name: record for name, record in records.items() if name in fields}
    other = {name: record for name, record in records.items() if name not in fields}
    return {**known, "extra": other} if other else known


def _local_features(local: dict[str, Any] | None, infos: list[ShardRecord]) -> dict[str, Any] | None:
    """The features' local-feature record, with what the shards stored of it (None when none were carried)."""
    if local is None:
        return None
    return {**local, "items_with_local_features": sum(
        (i.local_features or {}).get("items_with_local_features", 0) for i in infos),
        "vote_index": votes_type.manifest_record([i.local_features["vote_index"]["kind"] for i in infos])}


def _move_in_and_commit(final: str, staging: str, files: dict[str, FileDigest], moves: list[tuple[str, str]],
                        manifest: IndexManifest, signing_key: bytes | None) -> None:
    """Moves the staged files into the version folder, checks them, signs, and writes the manifest last."""
    moves = [(src, fsutil.join(final, rel)) for src, rel in moves]
    fsutil.move([src for src, _ in moves], [dst for _, dst in moves])
    _check_in_place(final, files)
    if signing_key is not None:  # before the commit point, so a committed signed version is never unsigned
        fsutil.write_bytes_atomic(fsutil.join(final, signing.SIGNATURE_FILE),
                                  signing.sign(protocol.manifest_bytes(manifest), signing_key).encode())
    protocol.commit(final, manifest, [], staging)  # the commit point: the version's MANIFEST.json


def _check_in_place(final: str, files: dict[str, FileDigest]) -> None:
    """Every file the manifest will list is in the version folder at its size, before the commit."""
    sizes = fsutil.sizes(fsutil.join(final, "**"))
    bad = [rel for rel, meta in files.items() if sizes.get(fsutil.join(final, rel)) != meta.bytes]
    if bad:
        raise IndexBuildError(f"{final}: {len(bad)} file(s) missing or of the wrong size after the move: {bad[:5]}")


def _digest(path: str) -> FileDigest:
    return FileDigest(*layout.sha256_stream(fsutil.read_chunks(path)))


def _gate(cfg: IndexConfig, version: str) -> dict[str, Any]:
    """Measures the committed version; raises GateFailedError (LATEST untouched) when a condition fails."""
    from search import index_files
    from search.searcher import Searcher

    conditions = gate.parse_conditions(cfg.gate)
    queries = gate.read_gate_queries(fsutil.read_bytes(cfg.gate_queries)) if cfg.gate_queries else None
    started = time.time()
    root = index_files.localise(cfg.output, version)
    with Searcher(root, version=version, verify=False) as searcher:  # just written by this job
        measured = gate.measure(searcher, conditions, cfg.gate_sample, cfg.seed, queries)
    passed, rows = gate.check(conditions, measured)
    report = {"version": version, "passed": passed, "conditions": rows, "measured": measured,
              "sample": cfg.gate_sample, "queries_file": cfg.gate_queries, "seconds": round(time.time() - started, 3),
              "created_utc": utc_now()}
    path = fsutil.join(cfg.output, version + GATE_SUFFIX)
    fsutil.write_json_atomic(path, report)
    if not passed:
        failed = ", ".join(f"{r['condition']} (measured {show_measured(r['measured'])})" for r in rows
                           if not r["passed"])
        raise gate.GateFailedError(f"the quality gate failed for {version}: {failed}. LATEST still names the previous "
                                   f"version; {version} stays built but unpublished, report at {path}", report)
    log.info("gate passed for %s: %s", version,
             ", ".join(f"{r['condition']} ({show_measured(r['measured'])})" for r in rows))
    return report


def show_measured(value: float | None) -> str:
    """A gate measurement as the CLI and the log print it (None: the metric could not be computed)."""
    return "not computable" if value is None else f"{value:.4f}"


def collect_garbage(
    output: str, latest: str, keep: int, stale_after: float, now: float | None = None
) -> list[str]:
    """Deletes complete versions beyond the newest ``keep`` and folders of builds that died.

    Runs only after ``LATEST`` points at ``latest``; see layout.plan_cleanup for
    what is kept. Returns the folders deleted (relative to ``output``).
    """
    complete, incomplete, staging = set(), set(), set()
    root = output.rstrip("/") + "/"
    for path in fsutil.match(fsutil.join(output, "**")):
        parts = path[len(root):].split("/")
        if parts[0] == layout.STAGING and len(parts) > 2:
            staging.add(parts[1])
        elif len(parts) > 1 and layout.is_version(parts[0]):
            (complete if parts[1:] == [layout.MANIFEST] else incomplete).add(parts[0])
    if "://" not in output:  # local disk also keeps folders that hold no file (a build that died early)
        with contextlib.suppress(OSError):
            staging.update(os.listdir(os.path.join(output, layout.STAGING)))
        with contextlib.suppress(OSError):
            incomplete.update(n for n in os.listdir(output) if layout.is_version(n))
    incomplete -= complete
    plan = layout.plan_cleanup(sorted(complete), sorted(incomplete), sorted(staging), latest, keep,
                               time.time() if now is None else now, stale_after)
    for rel in plan.all:
        log.info("deleting %s/%s", output, rel)
        fsutil.delete_tree(fsutil.join(output, rel))
        if layout.is_version(rel):
            fsutil.delete_quietly([fsutil.join(output, rel + GATE_SUFFIX)])
    if "://" not in output:  # local disk keeps empty folders; object stores have none
        with contextlib.suppress(OSError):
            os.rmdir(os.path.join(output, layout.STAGING))
    return plan.all
