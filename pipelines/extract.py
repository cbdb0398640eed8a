"""The extract job: image shards in, feature and failure Parquet plus a manifest out.

Output layout (DESIGN.md)::

    <out>/features/part-<run>-SSSSS-of-NNNNN.parquet
    <out>/failures/part-<run>-SSSSS-of-NNNNN.parquet
    <out>/MANIFEST.json      # written last; lists exactly the files of this run

The pipeline writes under ``<out>/_staging/<run>/``; after it succeeds the parts
are moved in, the manifest is replaced atomically (the commit point), and parts
of earlier runs are deleted. A run that dies before the commit leaves the
previous manifest and its files untouched; readers only trust the manifest.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import uuid
from collections import Counter
from typing import Any

import apache_beam as beam

from models.backbone import ModelSpec
from models.imaging import DEFAULT_MAX_PIXELS
from pipelines.runner import pipeline_options
from transforms import features_io, fsutil, job_metrics
from transforms.decode import DecodeFn
from transforms.incremental import ReuseFeatures, reusable
from transforms.inference import BatchingOptions, ExtractFeatures
from transforms.progress import LogProgressFn
from transforms.records import FAILURES_TAG
from transforms.sources import InputSpec, ReadImages

log = logging.getLogger(__name__)

MANIFEST = "MANIFEST.json"
FORMAT_VERSION = 1


class TooManyFailuresError(RuntimeError):
    """More inputs failed than --max-failure-fraction allows (outputs were still written)."""

    def __init__(self, message: str, manifest: dict[str, Any]):
        super().__init__(message)
        self.manifest = manifest


@dataclasses.dataclass
class ExtractConfig:
    input: str
    output: str
    model: ModelSpec = dataclasses.field(default_factory=ModelSpec)
    batching: BatchingOptions = dataclasses.field(default_factory=BatchingOptions)
    feature_dtype: str = "float32"
    max_pixels: int = DEFAULT_MAX_PIXELS
    reduced_decode: bool = True
    max_failure_fraction: float | None = None
    previous: str | None = None  # an earlier extract output whose features may be reused
    decode_threads: int = 0  # 0: one per core (transforms.decode)


def new_run_id() -> str:
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:6]


def build(
    p: beam.Pipeline, cfg: ExtractConfig, spec: InputSpec, staging: str, dim: int,
    previous_files: list[str] | None = None,
) -> None:
    """Composes the extract graph; separate from ``run`` so tests can inspect it."""
    read = p | "Read" >> ReadImages(spec)
    records = read.records
    reused = None
    if previous_files:
        records, reused = records | "Reuse" >> ReuseFeatures(previous_files, cfg.feature_dtype)
    decoded = records | "Decode" >> beam.ParDo(
        DecodeFn(cfg.model.size(), cfg.max_pixels, cfg.reduced_decode, threads=cfg.decode_threads,
                 window=2 * cfg.batching.max_batch_size)
    ).with_outputs(FAILURES_TAG, main="images")
    rows, inference_failures = decoded.images | "Extract" >> ExtractFeatures(
        cfg.model, cfg.batching, cfg.feature_dtype
    )
    if reused is not None:
        rows = (rows, reused) | "WithReused" >> beam.Flatten()
    (
        rows
        | "Progress" >> beam.ParDo(LogProgressFn("features"))
        | "WriteFeatures" >> features_io.WriteFeatureParquet(
            fsutil.join(staging, "features", "part"), features_io.feature_schema(dim, cfg.feature_dtype)
        )
    )
    (
        (read[FAILURES_TAG], decoded[FAILURES_TAG], inference_failures)
        | "AllFailures" >> beam.Flatten()
        | "WriteFailures" >> features_io.WriteFailureParquet(fsutil.join(staging, "failures", "part"))
    )


def _feature_dim(spec: ModelSpec) -> int:
    if not spec.is_savedmodel:
        return spec.preset().dim
    from models.backbone import Backbone

    return Backbone(spec).dim  # a SavedModel declares no dimension: ask it once on the launcher


def run(cfg: ExtractConfig, beam_args: list[str] | None = None) -> dict[str, Any]:
    """Runs the job to completion and publishes it; returns the manifest."""
    spec = InputSpec.parse(cfg.input)
    spec.check_not_empty()
    model_desc = cfg.model.describe()  # resolves weights here: a missing file fails before any work
    model_desc["reduced_decode"] = cfg.reduced_decode  # the query path decodes the same way
    previous_files = _reusable_files(cfg)
    dim = _feature_dim(cfg.model)  # once: for a SavedModel this loads the model on the launcher
    run_id = new_run_id()
    staging = fsutil.join(cfg.output, "_staging", run_id)
    started = time.time()
    options = pipeline_options(beam_args)
    log.info("extract %s -> %s with %s (run %s)", cfg.input, cfg.output, cfg.model.name, run_id)
    p = beam.Pipeline(options=options)
    build(p, cfg, spec, staging, dim, previous_files)
    result = p.run()
    result.wait_until_finish()
    elapsed = time.time() - started
    manifest = publish(cfg, run_id, staging, model_desc, dim, elapsed, result)
    _check_failure_fraction(manifest, cfg.max_failure_fraction)
    return manifest


def _reusable_files(cfg: ExtractConfig) -> list[str]:
    """Feature files of ``--previous`` when its vectors are interchangeable with this run's."""
    if not cfg.previous:
        return []
    previous = read_manifest(cfg.previous)
    why_not = reusable(previous, cfg.model.fingerprint(), cfg.feature_dtype, cfg.model.precision,
                       cfg.reduced_decode)
    if why_not:
        log.warning("not reusing %s: %s; extracting everything", cfg.previous, why_not)
        return []
    files = feature_files(cfg.previous, previous)
    log.info("reusing features of %s (%d rows) for unchanged images", cfg.previous, previous["counts"]["ok"])
    return files


def _stage_files(staging: str, kind: str) -> list[str]:
    return fsutil.match(fsutil.join(staging, kind, "part-*.parquet"))


def publish(
    cfg: ExtractConfig, run_id: str, staging: str, model_desc: dict[str, Any], dim: int, elapsed: float,
    result: Any,
) -> dict[str, Any]:
    files, counts, failure_reasons = move_staged_parts(cfg.output, run_id, staging)
    manifest = {
        "kind": "features",
        "format_version": FORMAT_VERSION,
        "run_id": run_id,
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model": model_desc,
        "model_fingerprint": cfg.model.fingerprint(),
        "input_size": cfg.model.size(),
        "preprocessing": model_desc.get("preprocessing", "savedmodel"),
        "dimension": dim,
        "feature_dtype": cfg.feature_dtype,
        "precision": cfg.model.precision,
        "counts": counts,
        "failures_by_reason": failure_reasons,
        "elapsed_seconds": round(elapsed, 3),
        "images_per_second": round(counts["read"] / elapsed, 2) if elapsed > 0 else None,
        "metrics": job_metrics.collect(result, ("cbir", "cbir_inference")),
        "options": _options(cfg),
        "files": files,
    }
    commit(cfg.output, manifest, staging)
    return manifest


def move_staged_parts(
    output: str, run_id: str, staging: str
) -> tuple[dict[str, list[dict[str, Any]]], dict[str, int], dict[str, int]]:
    """Moves a run's staged parts in under run-specific names; returns (files, counts, failure reasons).

    Old parts stay until :func:`commit`, so the previous manifest stays valid meanwhile.
    """
    files: dict[str, list[dict[str, Any]]] = {}
    counts = {"ok": 0, "failed": 0}
    failure_reasons: Counter[str] = Counter()
    moves_from, moves_to = [], []
    for kind, count_key in (("features", "ok"), ("failures", "failed")):
        files[kind] = []
        for src in _stage_files(staging, kind):
            name = src.rsplit("/", 1)[-1].replace("part-", f"part-{run_id}-", 1)
            rows = features_io.count_rows(src)
            counts[count_key] += rows
            files[kind].append({"path": f"{kind}/{name}", "rows": rows})
            moves_from.append(src)
            moves_to.append(fsutil.join(output, kind, name))
            if kind == "failures" and rows:
                table = features_io.read_table(src, ["stage", "error"])
                for stage, error in zip(table.column("stage").to_pylist(), table.column("error").to_pylist(),
                                        strict=True):
                    failure_reasons[f"{stage}:{error}"] += 1
    counts["read"] = counts["ok"] + counts["failed"]
    fsutil.move(moves_from, moves_to)
    return files, counts, dict(failure_reasons.most_common())


def commit(output: str, manifest: dict[str, Any], staging: str) -> None:
    """Replaces the manifest atomically (the commit point), then deletes parts it does not list."""
    old = _previous_files(output)
    fsutil.write_json_atomic(fsutil.join(output, MANIFEST), manifest)
    keep = {f["path"] for kind in manifest["files"].values() for f in kind}
    fsutil.delete_quietly([fsutil.join(output, p) for p in old if p not in keep])
    fsutil.delete_tree(staging)
    staging_root = staging.rsplit("/", 1)[0]
    if not fsutil.match(fsutil.join(staging_root, "*")):
        fsutil.delete_tree(staging_root)


def _previous_files(output: str) -> list[str]:
    """Every part file under the output (earlier runs, or leftovers of crashed ones)."""
    found = []
    for kind in ("features", "failures"):
        for path in fsutil.match(fsutil.join(output, kind, "part-*.parquet")):
            found.append(f"{kind}/{path.rsplit('/', 1)[-1]}")
    return found


def _options(cfg: ExtractConfig) -> dict[str, Any]:
    d = dataclasses.asdict(cfg)
    return d


def _check_failure_fraction(manifest: dict[str, Any], limit: float | None) -> None:
    counts = manifest["counts"]
    if limit is None or counts["read"] == 0:
        return
    fraction = counts["failed"] / counts["read"]
    if fraction > limit:
        raise TooManyFailuresError(
            f"{counts['failed']} of {counts['read']} inputs failed ({fraction:.1%}), "
            f"more than --max-failure-fraction {limit:.1%}; outputs were written, see failures/",
            manifest,
        )


def read_manifest(features_dir: str) -> dict[str, Any]:
    """The committed manifest of an extract output; refuses an output without one."""
    path = fsutil.join(features_dir, MANIFEST)
    if not fsutil.exists(path):
        raise FileNotFoundError(
            f"{path} does not exist: {features_dir} is not a finished extract output (run cbir extract)"
        )
    manifest = fsutil.read_json(path)
    if manifest.get("kind") != "features":
        raise ValueError(f"{path} is not a features manifest")
    return manifest


def feature_files(features_dir: str, manifest: dict[str, Any] | None = None) -> list[str]:
    manifest = manifest or read_manifest(features_dir)
    return [fsutil.join(features_dir, f["path"]) for f in manifest["files"]["features"]]
