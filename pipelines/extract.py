"""The extract job: image shards in, feature and failure Parquet plus a manifest out.

Output layout (ARCHITECTURE.md)::

    <out>/features/part-<run>-SSSSS-of-NNNNN.parquet
    <out>/failures/part-<run>-SSSSS-of-NNNNN.parquet
    <out>/MANIFEST.json      # written last; lists exactly the files of this run

The launcher lists the inputs (files, or shard files) and writes the listing under
``<out>/_staging/<run>/``; the pipeline reads that listing, stages its parts there,
and shard readers report a tally per shard. Before anything is published the
launcher checks that inputs (listed files, or the shards' tallies) = ``read`` (Beam
counter) = rows written in the feature and failure parts; a run that lost elements
is refused (:class:`~plumbing.publish.PublishRefusedError`) and the previous output
stays. Then the parts move in, the manifest is replaced atomically (the commit
point), and parts of earlier runs are deleted (``plumbing.publish``).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

import apache_beam as beam

from artefacts.manifests import Accounting, ExtractCounts, FeaturesManifest, PartFile, new_run_id, utc_now
from models.backbone.imaging import DEFAULT_MAX_PIXELS
from models.backbone.network import ModelSpec
from pipelines import extract_reuse as reuse
from pipelines.runner import pipeline_options
from plumbing import fsutil, job_metrics, publish
from plumbing.lease import Lease
from plumbing.progress import LogProgressFn
from transforms import features_io
from transforms.decode import DecodeFn
from transforms.feature_sets import feature_files, read_features_manifest
from transforms.incremental import ReuseFeatures, reusable
from transforms.inference import BatchingOptions, ExtractFeatures
from transforms.local_features import LocalFeaturesFn, WriteLocalParquet
from transforms.readers import InputSpec, ListedFile, ReadImages, write_listing
from transforms.readers.accounting import unit_rows, write_tallies
from transforms.records import FAILURES_TAG

log = logging.getLogger(__name__)

KINDS = ("features", "failures")
LOCAL_KIND = "local"  # --local-features: <out>/local/part-*.parquet
ALL_KINDS = (*KINDS, LOCAL_KIND, "inputs")


class TooManyFailuresError(RuntimeError):
    """More inputs failed than --max-failure-fraction allows (outputs were still written)."""

    def __init__(self, message: str, manifest: FeaturesManifest):
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
    allow_uri_prefixes: tuple[str, ...] = ()  # parquet: uri cells read only under these (and relative ones)
    local_features: int = 0  # up to this many SIFT keypoints per image for geometric verification (0: none)
    verify_digests: bool = False  # read and hash every input, even those whose listing metadata is unchanged
    commit_every: int = 5_000  # inputs per committed chunk (what a kill can cost); 0: one chunk
    stale_after_seconds: float = 24 * 3600  # a run holding the output's lease this long is dead


def build(
    p: beam.Pipeline, cfg: ExtractConfig, spec: InputSpec, listing: str, staging: str, dim: int,
    previous_files: list[str] | None = None,
) -> None:
    """Composes the extract graph; separate from ``run`` so tests can inspect it."""
    read = p | "Read" >> ReadImages(spec, listing)
    records = read["records"]
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
        (read["failures"], decoded[FAILURES_TAG], inference_failures)
        | "AllFailures" >> beam.Flatten()
        | "WriteFailures" >> features_io.WriteFailureParquet(fsutil.join(staging, "failures", "part"))
    )
    if cfg.local_features:
        (
            read["records"]
            | "LocalFeatures" >> beam.ParDo(LocalFeaturesFn(cfg.local_features, max_pixels=cfg.max_pixels,
                                                            threads=cfg.decode_threads))
            | "WriteLocal" >> WriteLocalParquet(fsutil.join(staging, LOCAL_KIND, "part"))
        )
    if "tallies" in read:
        write_tallies(read["tallies"], staging)


def _preflight_runtime(spec: ModelSpec) -> None:
    """An explicitly named runtime that cannot run fails here, before any work, never on a worker.

    For litert this also converts the model once on the launcher: the flatbuffer cache
    (models/backbone/runtimes.py) then serves every local worker, and remote ones convert once each.
    """
    requested = spec.requested_runtime()
    if requested in ("keras", "litert"):
        from models.backbone.network import Backbone

        Backbone(spec).runner(requested)


def _feature_dim(spec: ModelSpec) -> int:
    if not spec.is_savedmodel:
        return spec.preset().dim
    from models.backbone.network import Backbone

    return Backbone(spec).dim  # a SavedModel declares no dimension: ask it once on the launcher


def run(cfg: ExtractConfig, beam_args: list[str] | None = None) -> FeaturesManifest:
    """Runs the job to completion and publishes it; returns the manifest.

    The inputs no committed run knows unchanged are read in chunks of ``commit_every``, each a pipeline
    whose rows are committed under ``<out>/_resume/`` when it ends: a re-run after a kill continues from
    there. One run per output at a time (a lease that lapses, so a crash never blocks the next night).
    """
    spec = InputSpec.parse(cfg.input, cfg.allow_uri_prefixes)
    listed = spec.list()  # the count everything must add up to; fails at launch when empty
    model_desc = cfg.model.describe()  # resolves weights here: a missing file fails before any work
    model_desc["reduced_decode"] = cfg.reduced_decode  # the query path decodes the same way
    dim = _feature_dim(cfg.model)  # once: for a SavedModel this loads the model on the launcher
    _preflight_runtime(cfg.model)
    run_id = new_run_id()
    with Lease(cfg.output, run_id, cfg.stale_after_seconds, what="extract"):
        manifest = _run_leased(cfg, spec, listed, model_desc, dim, run_id, beam_args)
    _check_failure_fraction(manifest, cfg.max_failure_fraction)
    return manifest


def _run_leased(cfg: ExtractConfig, spec: InputSpec, listed: list[ListedFile], model_desc: dict[str, Any],
                dim: int, run_id: str, beam_args: list[str] | None) -> FeaturesManifest:
    staging = publish.staging_dir(cfg.output, run_id)
    started = time.time()
    key = reuse.settings_key(_settings(cfg))
    previous, digest_from_all = _previous(cfg)
    resumed = None if cfg.local_features else reuse.resume_source(cfg.output, key)
    sources = [s for s in (resumed, previous) if s is not None and not cfg.verify_digests]
    plan = reuse.plan(listed, sources, spec.root)
    log.info("extract %d %s from %s -> %s with %s (run %s): %d carried unread (%s), %d to read", len(listed),
             "shards" if spec.is_shards else "files", cfg.input, cfg.output, cfg.model.name, run_id,
             len(plan.carried), ", ".join(f"{k} {v}" for k, v in plan.by_source.items()) or "nothing to carry from",
             len(plan.to_read))
    try:
        digests = reuse.carry(plan, staging, None if cfg.verify_digests else previous)
        if cfg.verify_digests or previous is None:
            digests = digest_from_all
        metrics, units = _read_in_chunks(cfg, spec, plan.to_read, run_id, staging, dim, digests, key, beam_args)
        units.update({u: (*source.units[u][:2], rows) for u, (source, rows) in plan.carried.items()})
        metrics.update({"reused_by_metadata": len(plan.carried), "reused_by_metadata_rows": plan.carried_rows,
                        **{f"carried_from_{k}": v for k, v in plan.by_source.items()}})
        manifest = publish_run(cfg, spec, listed, run_id, staging, model_desc, dim, time.time() - started, metrics,
                               units, plan.carried_rows)
    except BaseException:
        publish.discard_staging(staging)  # committed chunks stay under _resume/ for the next run
        raise
    fsutil.delete_tree(fsutil.join(cfg.output, reuse.RESUME))
    return manifest


def _settings(cfg: ExtractConfig) -> dict[str, Any]:
    """Everything a row depends on besides the input's bytes."""
    return {"input": cfg.input, "model": cfg.model.fingerprint(), "dtype": cfg.feature_dtype,
            "precision": cfg.model.precision, "reduced_decode": cfg.reduced_decode, "max_pixels": cfg.max_pixels,
            "local_features": cfg.local_features, "uri_prefixes": list(cfg.allow_uri_prefixes)}


def _previous(cfg: ExtractConfig) -> tuple[reuse.Source | None, list[str]]:
    """``--previous`` as a source of carried rows, and all its feature files (for reuse by digest alone)."""
    if not cfg.previous:
        return None, []
    manifest = read_features_manifest(cfg.previous)
    files = _reusable_files(cfg, manifest)
    if not files:
        return None, []
    if cfg.local_features:
        log.warning("--local-features: inputs are read again (their keypoints are not carried), features are "
                    "reused by content digest")
        return None, files
    return reuse.previous_source(cfg.previous, manifest), files


def _read_in_chunks(cfg: ExtractConfig, spec: InputSpec, to_read: list[ListedFile], run_id: str, staging: str,
                    dim: int, digests: list[str], key: str, beam_args: list[str] | None
                    ) -> tuple[dict[str, Any], dict[str, tuple[int, float | None, int]]]:
    """Runs one pipeline per chunk, commits each, then stages this run's chunks; (summed metrics, unit rows)."""
    metrics: dict[str, Any] = {}
    units: dict[str, tuple[int, float | None, int]] = {}
    if not to_read:
        return {"read": 0}, units
    size = cfg.commit_every or len(to_read)
    chunks = [to_read[i:i + size] for i in range(0, len(to_read), size)]
    for n, chunk in enumerate(chunks):
        log.info("chunk %d of %d: %d inputs", n + 1, len(chunks), len(chunk))
        chunk_metrics, chunk_units = _run_chunk(cfg, spec, chunk, f"{run_id}-{n:05d}", staging, dim, digests, key,
                                                beam_args)
        metrics = job_metrics.add(metrics, chunk_metrics)
        units.update(chunk_units)
    return metrics, units


def _chunk_parts(output: str, run_id: str, kinds: tuple[str, ...]) -> dict[str, list[tuple[str, PartFile]]]:
    """This run's committed chunk parts, as staged parts that publish moves straight from ``_resume/`` into
    place: a run that fails to publish leaves them where the next run resumes from."""
    out: dict[str, list[tuple[str, PartFile]]] = {kind: [] for kind in kinds}
    for folder in fsutil.match(fsutil.join(output, reuse.RESUME, "chunks", f"{run_id}-*", "DONE.json")):
        chunk = folder.rsplit("/", 2)[-2]
        for kind in kinds:
            for src in fsutil.match(fsutil.join(folder.rsplit("/", 1)[0], kind, "part-*.parquet")):
                name = f"part-{chunk}-{src.rsplit('/', 1)[-1][5:]}"
                out[kind].append((src, PartFile(f"{kind}/{name}", publish.count_rows(src))))
    return out


def _run_chunk(cfg: ExtractConfig, spec: InputSpec, chunk: list[ListedFile], name: str, staging: str, dim: int,
               digests: list[str], key: str, beam_args: list[str] | None
               ) -> tuple[dict[str, Any], dict[str, tuple[int, float | None, int]]]:
    """One chunk's pipeline; its rows are counted, then committed under ``_resume/chunks/<name>/``."""
    work = fsutil.join(staging, "chunks", name)
    p = beam.Pipeline(options=pipeline_options(beam_args))
    build(p, cfg, spec, write_listing(work, chunk), work, dim, digests)
    result = p.run()
    result.wait_until_finish()
    metrics = job_metrics.collect(result, ("cbir", "cbir_inference"))
    rows = unit_rows(spec, chunk, work)
    kinds = (*KINDS, LOCAL_KIND) if cfg.local_features else KINDS
    staged = publish.count_staged(work, kinds, name)
    written = sum(part.rows for kind in KINDS for _, part in staged[kind])
    publish.check_counts("extract", {"inputs": sum(rows.values()), "read (counter)": metrics.get("read"),
                                     "rows written": written}, f"chunk {name}")
    reuse.start_resume(cfg.output, key)
    folder = fsutil.join(cfg.output, reuse.RESUME, "chunks", name)
    moves = [(src, fsutil.join(folder, kind, src.rsplit("/", 1)[-1])) for kind in kinds for src, _ in staged[kind]]
    fsutil.move([a for a, _ in moves], [b for _, b in moves])
    units = {reuse.unit_name(f.path, spec.root): (f.size, f.mtime, rows[f.path]) for f in chunk}
    reuse.write_table(reuse.inputs_table(units), fsutil.join(folder, "inputs.parquet"))
    fsutil.write_json_atomic(fsutil.join(folder, "DONE.json"), {"inputs": len(chunk), "rows": written})
    fsutil.delete_tree(work)
    return metrics, units


def _reusable_files(cfg: ExtractConfig, previous: FeaturesManifest) -> list[str]:
    """Feature files of ``--previous`` when its vectors are interchangeable with this run's."""
    why_not = reusable(previous, cfg.model.fingerprint(), cfg.feature_dtype, cfg.model.precision,
                       cfg.reduced_decode)
    if why_not:
        log.warning("not reusing %s: %s; extracting everything", cfg.previous, why_not)
        return []
    log.info("reusing features of %s (%d rows) for unchanged images", cfg.previous, previous.counts.ok)
    return feature_files(cfg.previous, previous)


def publish_run(
    cfg: ExtractConfig, spec: InputSpec, listed: list[ListedFile], run_id: str, staging: str,
    model_desc: dict[str, Any], dim: int, elapsed: float, metrics: dict[str, Any],
    units: dict[str, tuple[int, float | None, int]], carried_rows: int = 0,
) -> FeaturesManifest:
    """Checks the run's counts (inputs = rows read or carried = rows staged), then moves its parts in and
    commits the manifest, which lists the inputs' listing metadata for the next run."""
    names = [reuse.unit_name(f.path, spec.root) for f in listed]
    reuse.write_table(reuse.inputs_table({name: units[name] for name in names}),
                      fsutil.join(staging, reuse.INPUTS, "part-00000-of-00001.parquet"))
    kinds = (*KINDS, LOCAL_KIND) if cfg.local_features else KINDS
    staged = publish.count_staged(staging, (*kinds, reuse.INPUTS), run_id)
    for kind, parts in _chunk_parts(cfg.output, run_id, kinds).items():
        staged[kind] += parts
    ok = sum(p.rows for _, p in staged["features"])
    failed = sum(p.rows for _, p in staged["failures"])
    inputs = sum(units[name][2] for name in names)
    read = metrics.get("read")
    source = "listing" if not spec.is_shards else "parquet footers" if spec.format == "parquet" else "tallies"
    accounting = Accounting(source, len(listed), inputs, {
        "inputs": inputs, "read (counter) + carried": None if read is None else read + carried_rows,
        "rows written": ok + failed})
    publish.check_counts("extract", accounting.checked)
    reasons = features_io.failure_reasons([src for src, _ in staged["failures"]])
    local = None
    if cfg.local_features:
        read_failures = sum(n for reason, n in reasons.items() if reason.startswith("read:"))
        local = _check_local(staged[LOCAL_KIND], ok + failed - read_failures, cfg)
    manifest = FeaturesManifest(
        run_id=run_id,
        created_utc=utc_now(),
        model=model_desc,
        model_fingerprint=cfg.model.fingerprint(),
        input_size=cfg.model.size(),
        preprocessing=model_desc.get("preprocessing", "savedmodel"),
        dimension=dim,
        feature_dtype=cfg.feature_dtype,
        precision=cfg.model.precision,
        counts=ExtractCounts(read=ok + failed, ok=ok, failed=failed, inputs=inputs),
        failures_by_reason=reasons,
        elapsed_seconds=round(elapsed, 3),
        images_per_second=round((ok + failed) / elapsed, 2) if elapsed > 0 else None,
        metrics=metrics,
        options=dataclasses.asdict(cfg),
        accounting=accounting,
        files={kind: [p for _, p in staged[kind]] for kind in (*kinds, reuse.INPUTS)},
        local_features=local,
        runtime=_runtime_used(metrics),
    )
    keep = [p.path for parts in manifest.files.values() for p in parts]
    publish.commit(cfg.output, manifest, publish.part_moves(cfg.output, staged), staging,
                   stale=publish.stale_parts(cfg.output, ALL_KINDS, keep))
    return manifest


def _runtime_used(metrics: dict[str, Any]) -> str | None:
    """The runtimes batches ran on, from the per-batch counters (workers may choose differently under auto)."""
    prefix = "batches_runtime_"
    used = sorted(k[len(prefix):] for k, v in metrics.items() if k.startswith(prefix) and v)
    return "+".join(used) or None


def _check_local(parts: list[tuple[str, Any]], records: int, cfg: ExtractConfig) -> dict[str, Any]:
    """One local-feature row per record the readers delivered, or nothing is published."""
    rows = sum(p.rows for _, p in parts)
    publish.check_counts("extract", {"records read (inputs that did not fail to read)": records,
                                     "local-feature rows": rows})
    with_keypoints = keypoints = 0
    for src, _ in parts:
        counts = features_io.read_table(src, ["keypoints"]).column("keypoints").to_numpy()
        with_keypoints += int((counts > 0).sum())
        keypoints += int(counts.sum())
    from models.backbone.local_features import DEFAULT_MAX_SIDE, DETECTOR

    return {"detector": DETECTOR, "max_keypoints": cfg.local_features, "max_side": DEFAULT_MAX_SIDE,
            "rows": rows, "with_keypoints": with_keypoints, "keypoints": keypoints}


def _check_failure_fraction(manifest: FeaturesManifest, limit: float | None) -> None:
    counts = manifest.counts
    if limit is None or counts.read == 0:
        return
    fraction = counts.failed / counts.read
    if fraction > limit:
        raise TooManyFailuresError(
            f"{counts.failed} of {counts.read} inputs failed ({fraction:.1%}), "
            f"more than --max-failure-fraction {limit:.1%}; outputs were written, see failures/",
            manifest,
        )


# -- command line -------------------------------------------------------------------------------------


def register(subparsers: Any) -> None:
    from pipelines.options import add_model_args, add_runtime_arg, fraction, non_negative_int, positive_int

    ex = subparsers.add_parser("extract", help="images → features/*.parquet, failures/*.parquet, MANIFEST.json")
    ex.add_argument("--input", required=True, help="folder, glob, tfrecord:GLOB, wds:GLOB or parquet:GLOB")
    ex.add_argument("--output", required=True)
    add_model_args(ex, "inception_v3")
    ex.add_argument("--weights", default=None, help="'random' (timing only) or an explicit weights file")
    ex.add_argument("--batch-size", type=positive_int, default=64, help="largest inference batch")
    ex.add_argument("--min-batch-size", type=positive_int, default=8)
    ex.add_argument("--precision", choices=("float32", "float16", "bfloat16"), default="float32")
    ex.add_argument("--jit", action="store_true", help="compile the backbone with XLA (the same as --runtime xla)")
    add_runtime_arg(ex)
    ex.add_argument("--share-model", action="store_true",
                    help="one model per VM shared by all worker processes (GPU workers)")
    ex.add_argument("--model-copies", type=positive_int, default=None)
    ex.add_argument("--signature", default="serving_default", help="SavedModel signature")
    ex.add_argument("--output-key", default=None, help="SavedModel output to read")
    ex.add_argument("--input-size", type=positive_int, default=None, help="SavedModel input side in pixels")
    ex.add_argument("--feature-dtype", choices=("float32", "float16"), default="float32")
    ex.add_argument("--max-pixels", type=positive_int, default=None, help="refuse images above this many pixels")
    ex.add_argument("--full-decode", action="store_true", help="never decode JPEG at reduced scale")
    ex.add_argument("--decode-threads", type=int, default=0,
                    help="decode threads per worker step (default: one per core, at most 8; 1 = no pool)")
    ex.add_argument("--max-failure-fraction", type=fraction, default=None,
                    help="exit 3 (after writing outputs) when more than this fraction of the inputs failed")
    ex.add_argument("--allow-uri-prefix", action="append", default=[], metavar="PREFIX",
                    help="parquet: also read absolute uri cells under PREFIX (repeatable); relative uris always "
                         "resolve inside the Parquet file's folder")
    ex.add_argument("--local-features", type=non_negative_int, default=0, metavar="K",
                    help="also store up to K SIFT keypoints per image (local/*.parquet) so that the index can "
                         "verify matches geometrically (cbir query --verify N); 0 (default): none")
    ex.add_argument("--previous", default=None,
                    help="an earlier extract output (may be --output itself): inputs whose size and modification "
                         "time it recorded unchanged are carried unread, and read images with a known sha256 are "
                         "not run through the model again")
    ex.add_argument("--verify-digests", action="store_true",
                    help="read and hash every input, even those whose listing metadata is unchanged (catches a "
                         "file rewritten with the same size and time)")
    ex.add_argument("--commit-every", type=non_negative_int, default=5_000, metavar="N",
                    help="commit the rows of every N inputs read (default 5000); a re-run after a kill continues "
                         "from the committed ones. 0: one chunk. On Dataflow each chunk is a job: raise it")
    ex.set_defaults(handler=main, beam=True)


def main(args: Any, beam_args: list[str]) -> int:
    cfg = ExtractConfig(
        input=args.input,
        output=args.output,
        model=ModelSpec(
            name=args.model, weights_dir=args.weights_dir, weights=args.weights, precision=args.precision,
            jit=args.jit, runtime=args.runtime, signature=args.signature, output_key=args.output_key,
            input_size=args.input_size,
        ),
        batching=BatchingOptions(
            min_batch_size=min(args.min_batch_size, args.batch_size), max_batch_size=args.batch_size,
            share_across_processes=args.share_model, model_copies=args.model_copies,
        ),
        feature_dtype=args.feature_dtype,
        max_pixels=args.max_pixels or DEFAULT_MAX_PIXELS,
        reduced_decode=not args.full_decode,
        max_failure_fraction=args.max_failure_fraction,
        previous=args.previous,
        decode_threads=args.decode_threads,
        allow_uri_prefixes=tuple(args.allow_uri_prefix),
        local_features=args.local_features,
        verify_digests=args.verify_digests,
        commit_every=args.commit_every,
    )
    try:
        manifest = run(cfg, beam_args)
    except TooManyFailuresError as exc:
        print_summary(exc.manifest)
        raise
    print_summary(manifest)
    return 0


def print_summary(m: FeaturesManifest) -> None:
    c = m.counts
    print(f"extract: read {c.read}, ok {c.ok}, failed {c.failed} in {m.elapsed_seconds:.1f}s "
          f"({m.images_per_second or 0:.1f} images/s), model {m.model.get('preset')} {m.dimension}-d"
          + (f" on {m.runtime}" if m.runtime else ""))
    if m.accounting is not None:
        print(f"  inputs {m.accounting.inputs} ({m.accounting.source}, {m.accounting.units} units): every one is a "
              "feature or a failure row")
    carried, reused = m.metrics.get("reused_by_metadata"), m.metrics.get("reused")
    if carried:
        print(f"  carried unread {carried} inputs ({m.metrics.get('reused_by_metadata_rows', 0)} rows) whose size "
              f"and time were unchanged")
    if reused is not None:
        print(f"  of those read: {reused} reused by content digest, extracted {m.metrics.get('to_extract', 0)}")
    for reason, n in list(m.failures_by_reason.items())[:10]:
        print(f"  failed {n:>6}  {reason}")
