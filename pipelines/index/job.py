"""The index job's launcher: checks the inputs, runs the passes and the steps between them, publishes.

One build per output at a time (a lease). With ``--dba`` the shards are built twice: a first
pass keeps vectors and id maps only, the launcher augments the vectors, and a second pass
builds the shards from those.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
import time

import apache_beam as beam
import numpy as np
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.runners.runner import PipelineResult

from artefacts import layout, signing
from artefacts.manifests import FeaturesManifest, IndexManifest
from artefacts.transform import VectorTransform
from evaluation import gate
from index_builder.shard import ShardParams
from pipelines.index import graphs, steps
from pipelines.index.config import IndexConfig
from pipelines.index.publishing import Extras, choose_attempts, collect_garbage, publish
from pipelines.runner import pipeline_options
from plumbing import fsutil, job_metrics
from plumbing import publish as protocol
from plumbing.lease import Lease
from transforms.feature_sets import feature_files, read_features_manifest
from transforms.index_build import ATTEMPTS

log = logging.getLogger(__name__)

FIRST_ATTEMPTS = "attempts-first"  # --dba: the first pass's shards (vectors and id maps only)
COUNTERS = ("cbir_index",)  # the Beam metric namespace the index DoFns count in


def run(cfg: IndexConfig, beam_args: list[str] | None = None) -> IndexManifest:
    """Fits the transform, builds the shards, publishes and cleans up; returns the published manifest."""
    cfg.validate()
    features_manifest = read_features_manifest(cfg.features)
    files = feature_files(cfg.features, features_manifest)
    dim_in = features_manifest.dimension
    if cfg.dims > dim_in:
        log.warning("--dims %d is above the feature dimension %d: keeping %d", cfg.dims, dim_in, dim_in)
    dim_out = dim_in if cfg.dims == 0 else min(cfg.dims, dim_in)
    n_items = sum(p.rows for p in features_manifest.parts("features"))
    if n_items == 0:
        raise ValueError(f"{cfg.features} holds no features: nothing to index")
    if cfg.dims and n_items < dim_out:
        log.warning("only %d items for a %d-d PCA: trailing axes will be noise", n_items, dim_out)
    key = signing.load_key(cfg.signing_key_file) if cfg.signing_key_file else None
    if cfg.gate_queries:  # read before any work: a bad query file fails now, not after the build
        gate.read_gate_queries(fsutil.read_bytes(cfg.gate_queries))
    version = layout.new_version()
    with Lease(cfg.output, version, cfg.stale_after_seconds):  # one build per output at a time
        return _build_and_publish(cfg, features_manifest, files, dim_in, dim_out, n_items, version, key, beam_args)


def _build_and_publish(cfg: IndexConfig, features_manifest: FeaturesManifest, files: list[str], dim_in: int,
                       dim_out: int, n_items: int, version: str, key: bytes | None,
                       beam_args: list[str] | None) -> IndexManifest:
    staging = fsutil.join(cfg.output, layout.STAGING, version)  # GC'd by version name, not by run (collect_garbage)
    started = time.time()
    log.info("index %d items from %s -> %s (%s, %d shards, %s)", n_items, cfg.features, cfg.output, version,
             cfg.shards, "+".join(cfg.index_types))
    steps.copy_encoder(features_manifest, staging)
    fit_result = _fit(cfg, files, dim_in, dim_out if cfg.dims else 0, staging, beam_args)
    transform, planes, offsets = steps.transform_as_data(cfg, staging, dim_in, dim_out)
    local_files = feature_files(cfg.features, features_manifest, "local") if cfg.local_features else []
    extra = Extras(local=dict(features_manifest.local_features or {}) if local_files else None)
    shards = _Shards(files, transform, staging, dim_out, planes, offsets,
                     cfg.shard_params(local_features=bool(local_files)), local_files, cfg.shards, beam_args)
    counters = job_metrics.collect(fit_result, COUNTERS, distributions=False)
    if cfg.dba:
        counters.update(_dba_passes(cfg, shards, extra))
    else:
        counters.update(job_metrics.collect(shards.run(), COUNTERS, distributions=False))
    if cfg.graph_k:
        extra.graph = steps.knn_graph(cfg, staging)
    elapsed = time.time() - started
    try:
        manifest = publish(cfg, version, staging, features_manifest, dim_in, dim_out, elapsed, counters, transform,
                           key, extra)
    except protocol.PublishRefusedError:
        protocol.discard_staging(staging)  # a refused build is dead: nothing of it is worth keeping
        raise
    except gate.GateFailedError:
        raise  # built and committed in its folder, LATEST untouched; nothing is cleaned up
    try:
        collect_garbage(cfg.output, version, cfg.keep_versions, cfg.stale_after_seconds)
    except Exception as exc:  # the new version is published; a failed cleanup must not undo that
        log.warning("could not clean up old versions under %s: %s", cfg.output, exc)
    return manifest


@dataclasses.dataclass
class _Shards:
    """A shard-build pass's inputs; ``run`` builds a pipeline with ``graphs.build_shards`` and runs it."""

    files: list[str]
    transform: VectorTransform
    staging: str
    dim: int
    planes: np.ndarray
    offsets: np.ndarray | None
    params: ShardParams
    local_files: list[str]
    shards: int
    beam_args: list[str] | None

    def run(self, attempts: str = ATTEMPTS) -> PipelineResult:
        p = beam.Pipeline(options=pipeline_options(self.beam_args))
        graphs.build_shards(p, self.files, self.transform, self.staging, self.dim, self.planes, self.offsets,
                            self.params, self.local_files, attempts, self.shards)
        result = p.run()
        result.wait_until_finish()
        return result


def _dba_passes(cfg: IndexConfig, shards: _Shards, extra: Extras) -> dict[str, int]:
    """Pass 2 keeps vectors only; the launcher augments them with their neighbours; pass 3 builds the shards.

    Returns the counters of both passes (the second's prefixed ``dba_pass_``) and records the
    augmentation and what the first pass left out in ``extra``.
    """
    first_only = dataclasses.replace(shards, params=dataclasses.replace(shards.params, vectors_only=True,
                                                                        local_features=False), local_files=[])
    first = first_only.run(FIRST_ATTEMPTS)
    first_attempts = choose_attempts(shards.staging, shards.shards, FIRST_ATTEMPTS)
    augmented, extra.dba = steps.augment_vectors(cfg, shards.staging, first_attempts)
    extra.carried = [(i.duplicates_dropped, i.non_finite_skipped) for _, i in first_attempts]
    result = dataclasses.replace(shards, files=augmented, transform=VectorTransform()).run()
    return {**job_metrics.collect(first, COUNTERS, distributions=False),
            **{f"dba_pass_{k}": v for k, v in job_metrics.collect(result, COUNTERS, distributions=False).items()}}


def _fit(cfg: IndexConfig, files: list[str], dim_in: int, dims: int, staging: str,
         beam_args: list[str] | None) -> PipelineResult:
    """Pass 1 (``graphs.build_fit``), run to completion with tf.Transform's scratch space around it."""
    with tempfile.TemporaryDirectory(prefix="cbir-tft-") as tft_tmp:
        p = beam.Pipeline(options=pipeline_options(beam_args))
        graphs.build_fit(p, files, dim_in, dims, cfg.lsh_sample, staging, _tft_temp(beam_args, tft_tmp))
        result = p.run()
        result.wait_until_finish()
    return result


def _tft_temp(beam_args: list[str] | None, local: str) -> str:
    """tf.Transform's scratch space: the job's temp_location on a cluster, a local folder here."""
    opts = PipelineOptions(beam_args or []).get_all_options()
    return opts.get("temp_location") or local
