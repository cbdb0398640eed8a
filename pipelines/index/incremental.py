"""``cbir index --incremental``: a night's index at the cost of what changed.

The base is the version ``LATEST`` names (or ``--base``). Its fitted transform and LSH
projection are kept; the features are compared with its id maps (``changes.diff``); each shard
with a change is updated in place (``index_builder.update``: new items added, removed ones
dropped, every type re-calibrated on the updated shard) and an unchanged shard is carried
over. The new version is published by the same protocol as a full build (staged attempts,
counts checked, every file digested, the gate, ``LATEST``), so query, serve, compare, signing
and rollback see an ordinary version; its manifest records the base, the counts and the
decision in ``incremental``.

Refused, with the fix in the message: a base built from another model or another feature
dimension. Built in full instead, by itself, and recorded: a base the update cannot carry
(``--dba``, ``--graph-k`` or local features, which follow the whole corpus) and a night whose new
items the fitted projection no longer describes (``changes.projected_energy`` below
:data:`FIT_TOLERANCE` of the unchanged items').
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import tempfile
import time
import uuid
from typing import Any

import numpy as np

from artefacts import layout, signing
from artefacts.manifests import FeaturesManifest, IndexManifest, ShardRecord
from index_builder.update import update_shard
from pipelines.index import changes as night
from pipelines.index.config import IndexConfig
from pipelines.index.publishing import Extras, collect_garbage, publish
from plumbing import fsutil
from plumbing import publish as protocol
from plumbing.lease import Lease
from search import index_files
from transforms.feature_sets import feature_files, read_features_manifest
from transforms.index_build import attempt_dir

log = logging.getLogger(__name__)

FIT_TOLERANCE = 0.9  # new items keeping less than this share of the unchanged items' projected energy: full build
SHARED = (layout.TRANSFORM_DIR, layout.TRANSFORMED_METADATA_DIR, layout.TRANSFORM_DATA_DIR, layout.ENCODER_DIR)


class IncrementalRefusedError(ValueError):
    """The base cannot be updated with these features; the message says what to run instead."""


def plan(cfg: IndexConfig) -> tuple[str, IndexManifest, str | None]:
    """(base version, its manifest, why a full build is needed or None); refuses a base of another space."""
    if not fsutil.exists(fsutil.join(cfg.output, layout.POINTER)) and not cfg.base:
        raise IncrementalRefusedError(f"{cfg.output} has no published version to update: run cbir index without "
                                      "--incremental first")
    key = signing.load_key(cfg.signing_key_file) if cfg.signing_key_file else None
    version, base = index_files.resolve(cfg.output, cfg.base, key)
    features = read_features_manifest(cfg.features)
    if features.model_fingerprint != base.model_fingerprint:
        raise IncrementalRefusedError(
            f"base {version} was built from model {base.model_fingerprint[:12]} ({base.preset}), the features from "
            f"{features.model_fingerprint[:12]} ({features.model.get('preset')}): vectors of two models cannot share "
            "an index; run cbir index --full")
    if features.dimension != base.dimension.input:
        raise IncrementalRefusedError(f"base {version} takes {base.dimension.input}-d features, these are "
                                      f"{features.dimension}-d: run cbir index --full")
    reason = None
    if base.dba or base.graph:
        reason = "the base carries --dba or --graph-k data, which follow the whole corpus"
    elif base.local_features or (cfg.local_features and features.local_features):
        reason = "local features are not carried by an in-place update yet"
    return version, base, reason


def run_incremental(cfg: IndexConfig, full_build: Any, beam_args: list[str] | None = None) -> IndexManifest:
    """Updates the base in place, or builds in full (``full_build(cfg, beam_args)``) when it must; publishes."""
    cfg.validate()
    base_version, base, reason = plan(cfg)
    decision = {"base": base_version}
    if reason is None:
        root = index_files.localise(cfg.output, base_version)
        features = read_features_manifest(cfg.features)
        transform = index_files.load_transform(os.path.join(root, base_version), base)
        found = night.diff(feature_files(cfg.features, features), os.path.join(root, base_version), base.shards,
                           transform, base.dimension.output)
        decision.update(added=found.added, removed=found.removed, changed=found.changed,
                        energy_kept=found.energy)
        reason = _fit_reason(found.energy)
        if reason is None:
            return _update(cfg, features, base_version, base, os.path.join(root, base_version), transform, found,
                           decision, beam_args)
    log.warning("building in full instead of updating %s: %s", base_version, reason)
    return full_build(dataclasses.replace(cfg, shards=base.shards, dims=base.transform.dims,
                                          index_types=tuple(base.index_types),
                                          incremental={**decision, "decision": "full", "reason": reason}), beam_args)


def _fit_reason(energy: dict[str, float]) -> str | None:
    if "new" in energy and "unchanged" in energy and energy["new"] < FIT_TOLERANCE * energy["unchanged"]:
        return (f"the fitted projection keeps {energy['new']:.3f} of the new items' energy against "
                f"{energy['unchanged']:.3f} of the unchanged items' (below {FIT_TOLERANCE:.0%})")
    return None


def _update(cfg: IndexConfig, features: FeaturesManifest, base_version: str, base: IndexManifest, base_dir: str,
            transform: Any, found: night.Changes, decision: dict[str, Any], beam_args: list[str] | None
            ) -> IndexManifest:
    version = layout.new_version()
    key = signing.load_key(cfg.signing_key_file) if cfg.signing_key_file else None
    cfg = dataclasses.replace(cfg, shards=base.shards, dims=base.transform.dims, index_types=tuple(base.index_types),
                              type_params=_base_params(base, cfg), incremental={**decision, "decision": "incremental"})
    with Lease(cfg.output, version, cfg.stale_after_seconds):
        started = time.time()
        staging = fsutil.join(cfg.output, layout.STAGING, version)
        _stage_shared(base_dir, staging)
        planes = np.load(os.path.join(base_dir, layout.LSH_PLANES))
        offsets_path = os.path.join(base_dir, layout.LSH_OFFSETS)
        offsets = np.load(offsets_path) if os.path.exists(offsets_path) else None
        staged, touched = _stage_shards(cfg, base_dir, staging, found, planes, offsets)
        cfg.incremental["touched_shards"] = touched
        try:  # before the commit point: the base's items, less the removed, plus the added, are the version's
            protocol.check_counts("index --incremental", {
                "base items - removed + added": found.base_items - found.removed + found.added,
                "items in the staged shards": staged})
            manifest = publish(cfg, version, staging, features, base.dimension.input, base.dimension.output,
                               time.time() - started, {"rows_read": found.rows}, transform, key, Extras())
        except protocol.PublishRefusedError:
            protocol.discard_staging(staging)
            raise
    try:
        collect_garbage(cfg.output, version, cfg.keep_versions, cfg.stale_after_seconds)
    except Exception as exc:  # the new version is published; a failed cleanup must not undo that
        log.warning("could not clean up old versions under %s: %s", cfg.output, exc)
    return manifest


def _base_params(base: IndexManifest, cfg: IndexConfig) -> dict[str, Any]:
    """The base's own build parameters for each of its types, so an update extends what was built."""
    from index_builder.types import registry

    return {name: registry.get(name).params_from_record(getattr(base, name, None) or base.extra.get(name))
            or cfg.params_of(name) for name in base.index_types}


def _stage_shared(base_dir: str, staging: str) -> None:
    """The base's fitted transform, its graph-free extras and its LSH projection, into staging as they are."""
    names = [layout.LSH_PLANES, layout.LSH_OFFSETS]
    for sub in SHARED:
        folder = os.path.join(base_dir, sub)
        for parent, _, files in os.walk(folder):
            names += [os.path.relpath(os.path.join(parent, f), base_dir) for f in files]
    for rel in names:
        src = os.path.join(base_dir, rel)
        if os.path.exists(src):
            fsutil.upload(src, fsutil.join(staging, *rel.split(os.sep)))


def _stage_shards(cfg: IndexConfig, base_dir: str, staging: str, found: night.Changes, planes: np.ndarray,
                  offsets: np.ndarray | None) -> tuple[int, list[int]]:
    """Every shard into its attempt folder under staging: updated when touched, else carried; (items, touched)."""
    params = cfg.shard_params()
    items, touched = 0, []
    for number, change in enumerate(found.shards):
        shard_dir = os.path.join(base_dir, layout.shard_dir(number))
        workdir = tempfile.mkdtemp(prefix=f"cbir-update-{number:05d}-")
        try:
            if change.touched:
                touched.append(number)
                info = update_shard(shard_dir, workdir, change.added, change.removed, number, planes, params,
                                    offsets, duplicates=change.duplicates, non_finite=change.non_finite)
            else:
                info = _carry(shard_dir, workdir, change)
            items += info["items"]
            dest = attempt_dir(staging, number, uuid.uuid4().hex[:12])
            names = sorted(n for n in os.listdir(workdir) if n != layout.SHARD_INFO) + [layout.SHARD_INFO]
            for name in names:  # SHARD.json last: its presence means the attempt is whole
                fsutil.upload(os.path.join(workdir, name), fsutil.join(dest, name))
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    log.info("updated %d of %d shards (%d added, %d removed)", len(touched), len(found.shards), found.added,
             found.removed)
    return items, touched


def _carry(shard_dir: str, workdir: str, change: night.ShardChanges) -> dict[str, Any]:
    """An unchanged shard as it was, its record counting tonight's duplicates and non-finite rows."""
    for name in os.listdir(shard_dir):
        if name != layout.SHARD_INFO:
            try:
                os.link(os.path.join(shard_dir, name), os.path.join(workdir, name))
            except OSError:
                shutil.copyfile(os.path.join(shard_dir, name), os.path.join(workdir, name))
    record = ShardRecord.from_dict(fsutil.read_json(os.path.join(shard_dir, layout.SHARD_INFO)))
    record.duplicates_dropped, record.non_finite_skipped = change.duplicates, change.non_finite
    with open(os.path.join(workdir, layout.SHARD_INFO), "w") as f:
        f.write(record.to_json_text())
    return record.to_dict()
