"""The night's steps, each a call of the job's own Python entry point (never a subprocess).

Each returns what it published, which the night's state records: ``{"output": run id or version}``.
A step's exception is the job's own (TooManyFailuresError, GateFailedError, PublishRefusedError, …),
so the command exits with the code ``cbir`` gives that job's failure.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from artefacts import layout
from models.backbone.network import ModelSpec
from pipelines.reindex.night import Paths
from plumbing import fsutil

log = logging.getLogger(__name__)


@dataclasses.dataclass
class ReindexConfig:
    """The options of a night; everything else is each job's default."""

    input: str  # the images, as cbir extract takes them (folder, tfrecord:, wds:, parquet:)
    root: str  # features/, index/, neighbors/, reports/ and _reindex/ live here
    model: ModelSpec
    max_failure_fraction: float | None = None  # extract: exit 3 above this share of failed inputs
    shards: int = 1  # index, full builds only: an in-place update keeps the base's shards
    dims: int = 256  # index, full builds only: PCA dimension
    full: bool = False  # build the index from scratch tonight instead of updating LATEST in place
    gate: str = ""  # quality conditions before LATEST moves (exit 5 when one fails)
    gate_queries: str | None = None
    gate_sample: int = 1000
    k: int = 10  # neighbours per row, and the k of the comparison with the previous version
    method: str = "auto"
    compare_sample: int = 1000  # items the comparison with the previous version queries (0: all)
    resume_within_hours: float = 12.0  # a failed night older than this is not resumed: a new one starts
    lease_hours: float = 12.0  # a lease not renewed this long (its holder died elsewhere) no longer holds

    def validate(self) -> None:
        """Fails at launch on settings no night could honour, before the lease or any step."""
        if self.resume_within_hours < 0 or self.lease_hours <= 0:
            raise ValueError("--resume-within-hours must not be negative and --lease-hours must be positive")
        self.index_config(Paths(self.root)).validate()  # gate conditions, shards, dims

    def index_config(self, paths: Paths) -> Any:
        """The index job's settings for this root (an IndexConfig; the index package loads TensorFlow)."""
        from pipelines.index.config import IndexConfig

        return IndexConfig(features=paths.features, output=paths.index, shards=self.shards, dims=self.dims,
                           gate=self.gate, gate_queries=self.gate_queries, gate_sample=self.gate_sample)


def extract(cfg: ReindexConfig, paths: Paths, beam_args: list[str] | None) -> dict[str, Any]:
    """Extracts into ``features/`` in place, reusing the previous night's rows for unchanged images."""
    from pipelines import extract as job

    previous = paths.features if fsutil.exists(fsutil.join(paths.features, layout.MANIFEST)) else None
    manifest = job.run(job.ExtractConfig(input=cfg.input, output=paths.features, model=cfg.model,
                                         max_failure_fraction=cfg.max_failure_fraction, previous=previous), beam_args)
    return {"output": manifest.run_id}


def index(cfg: ReindexConfig, paths: Paths, beam_args: list[str] | None) -> dict[str, Any]:
    """Updates the version LATEST names in place, or builds in full (first night, ``--full``); gates; publishes.

    The decision and its reason end up in the version's manifest (``extra["incremental"]``) either
    way: the index job records its own fall-backs, and this records the two decided here.
    """
    from pipelines import index as job
    from pipelines.index.incremental import run_incremental

    icfg = cfg.index_config(paths)
    if cfg.full:
        why_full = "--full was given"
    elif not fsutil.exists(fsutil.join(paths.index, layout.POINTER)):
        why_full = "no version was published yet"
    else:
        return {"output": run_incremental(icfg, job.run, beam_args).version}
    log.info("building the index in full: %s", why_full)
    manifest = job.run(dataclasses.replace(icfg, incremental={"decision": "full", "reason": why_full}), beam_args)
    return {"output": manifest.version}


def neighbors(cfg: ReindexConfig, paths: Paths, version: str, beam_args: list[str] | None) -> dict[str, Any]:
    """The neighbour table of ``version`` (tonight's), only the rows the update can have changed computed."""
    from pipelines import neighbors as job

    manifest = job.run(job.NeighborsConfig(index=paths.index, output=paths.neighbors, version=version,
                                           options=neighbor_options(cfg), incremental=True), beam_args)
    return {"output": manifest.run_id, "version": manifest.index.version}


def compare(cfg: ReindexConfig, paths: Paths, old: str, new: str) -> dict[str, Any]:
    """``cbir compare`` of tonight's version against the previous one, searched as the table is."""
    from evaluation.compare import CompareConfig
    from pipelines import compare as job

    # Both versions were written by the index job into this root, which digested every file, and the
    # searcher still checks every size; verifying digests again would read every file of two versions.
    return job.run(old, new, paths.index, CompareConfig(search=neighbor_options(cfg).search,
                                                        sample=cfg.compare_sample), verify=False)


def neighbor_options(cfg: ReindexConfig) -> Any:
    """The neighbour table's search: the job's defaults (exact re-scoring) with the night's k and method."""
    from search.neighbors import NeighborOptions

    default = NeighborOptions()
    return dataclasses.replace(default, search=default.search.replace(k=cfg.k, method=cfg.method))

