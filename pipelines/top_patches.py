"""``cbir top-patches``: for chosen channels of a conv layer, the corpus patches that excite them most.

A Beam job over any input ``cbir extract`` reads (folder, glob, ``tfrecord:``, ``wds:``,
``parquet:``), through the same readers and the same decoder, so the pixels scored are
exactly the pixels the features come from. Output layout::

    <out>/channels/channel-CCCC-<run>.png     one grid per channel: the top N crops, best first
    <out>/activations/part-<run>-*.parquet     per image: each channel's peak activation and its cell
    <out>/failures/part-<run>-*.parquet        inputs that could not be read, decoded or scored
    <out>/MANIFEST.json                        written last: the figures (per channel: value, image,
                                               cell, crop box) and the exact files of this run

Every input lands in exactly one activation or failure row, and the job refuses to publish
(exit 4) unless inputs (the launcher's listing, or the shards' tallies) = ``read`` counter =
rows written, and every requested channel has its grid. Crops are the receptive field of
the peak cell on the model's input (``transforms.top_patches.receptive_field``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from typing import Any

import apache_beam as beam

from artefacts.manifests import TopPatchesManifest, new_run_id, utc_now
from models.backbone.imaging import DEFAULT_MAX_PIXELS
from models.backbone.network import Backbone, ModelSpec
from models.inside.layers import LayerModel
from pipelines.runner import pipeline_options
from plumbing import fsutil, job_metrics, publish
from transforms.decode import DecodeFn
from transforms.features_io import WriteFailureParquet
from transforms.readers import InputSpec, ReadImages, write_listing
from transforms.readers.accounting import count_inputs, write_tallies
from transforms.records import FAILURES_TAG
from transforms.top_patches import (
    ACTIVATION_SCHEMA,
    CANDIDATES_TAG,
    ChannelMaximaFn,
    RenderChannelFn,
    TopN,
    activation_table,
    receptive_field,
)

log = logging.getLogger(__name__)

KINDS = ("activations", "failures")
GRIDS = "channels"
SUMMARIES = "_channels"


@dataclasses.dataclass
class TopPatchesConfig:
    input: str
    output: str
    model: ModelSpec
    layer: str
    channels: tuple[int, ...]
    n: int = 16
    batch_size: int = 32
    max_pixels: int = DEFAULT_MAX_PIXELS
    reduced_decode: bool = True
    decode_threads: int = 0
    allow_uri_prefixes: tuple[str, ...] = ()
    tile: int = 96


def build(p: beam.Pipeline, cfg: TopPatchesConfig, spec: InputSpec, listing: str, staging: str,
          field: dict[str, Any]) -> None:
    """The job's graph; separate from :func:`run` so that tests can inspect it."""
    read = p | "Read" >> ReadImages(spec, listing)
    decoded = read["records"] | "Decode" >> beam.ParDo(
        DecodeFn(cfg.model.size(), cfg.max_pixels, cfg.reduced_decode, threads=cfg.decode_threads,
                 window=2 * cfg.batch_size)
    ).with_outputs(FAILURES_TAG, main="images")
    scored = (
        decoded.images
        | "Batch" >> beam.BatchElements(min_batch_size=1, max_batch_size=cfg.batch_size)
        | "Maxima" >> beam.ParDo(ChannelMaximaFn(cfg.model, cfg.layer, list(cfg.channels), cfg.n)).with_outputs(
            CANDIDATES_TAG, FAILURES_TAG, main="rows")
    )
    (
        scored.rows
        | "BatchRows" >> beam.BatchElements(min_batch_size=1, max_batch_size=1024)
        | "ToArrow" >> beam.Map(activation_table)
        | "WriteActivations" >> beam.io.WriteToParquetBatched(
            fsutil.join(staging, "activations", "part"), schema=ACTIVATION_SCHEMA, file_name_suffix=".parquet",
            codec="snappy")
    )
    (
        (read["failures"], decoded[FAILURES_TAG], scored[FAILURES_TAG])
        | "AllFailures" >> beam.Flatten()
        | "WriteFailures" >> WriteFailureParquet(fsutil.join(staging, "failures", "part"))
    )
    (
        scored[CANDIDATES_TAG]
        | "TopPerChannel" >> beam.CombinePerKey(TopN(cfg.n))
        | "Render" >> beam.ParDo(RenderChannelFn(fsutil.join(staging, GRIDS), cfg.layer, field, cfg.tile))
        | "SummaryJson" >> beam.Map(lambda s: json.dumps(s, sort_keys=True))
        | "WriteSummaries" >> beam.io.WriteToText(fsutil.join(staging, SUMMARIES, "part"), file_name_suffix=".jsonl")
    )
    if "tallies" in read:
        write_tallies(read["tallies"], staging)


def _jsonl(pattern: str) -> list[dict[str, Any]]:
    out = []
    for path in fsutil.match(pattern):
        out += [json.loads(line) for line in fsutil.read_bytes(path).decode("utf-8").splitlines() if line.strip()]
    return out


def check_layer(cfg: TopPatchesConfig) -> dict[str, Any]:
    """Loads the model on the launcher: an unknown layer or channel fails before any work; returns the field."""
    model = LayerModel(Backbone(cfg.model), cfg.layer)
    total = model.channels[0]
    bad = [c for c in cfg.channels if not 0 <= c < total]
    if bad or not cfg.channels:
        raise ValueError(f"--channels: {cfg.layer} has channels 0..{total - 1}, not {bad or 'none'}")
    if len(set(cfg.channels)) != len(cfg.channels):
        raise ValueError("--channels lists a channel twice")
    return receptive_field(model.keras_model, cfg.layer).describe()


def run(cfg: TopPatchesConfig, beam_args: list[str] | None = None) -> TopPatchesManifest:
    """Runs the job and publishes it; returns the manifest."""
    if cfg.n < 1:
        raise ValueError("-n must be at least 1")
    spec = InputSpec.parse(cfg.input, cfg.allow_uri_prefixes)
    listed = spec.list()
    field = check_layer(cfg)
    run_id = new_run_id()
    staging = publish.staging_dir(cfg.output, run_id)
    started = time.time()
    listing = write_listing(staging, listed)
    log.info("top-patches: %d %s, %s channels %s, top %d -> %s (run %s)", len(listed),
             "shards" if spec.is_shards else "files", cfg.layer, list(cfg.channels), cfg.n, cfg.output, run_id)
    p = beam.Pipeline(options=pipeline_options(beam_args))
    build(p, cfg, spec, listing, staging, field)
    try:
        result = p.run()
        result.wait_until_finish()
        return publish_run(cfg, spec, listed, run_id, staging, field, time.time() - started, result)
    except BaseException:
        publish.discard_staging(staging)
        raise


def publish_run(cfg: TopPatchesConfig, spec: InputSpec, listed: list, run_id: str, staging: str,
                field: dict[str, Any], elapsed: float, result: Any) -> TopPatchesManifest:
    """Checks the counts and the grids, then moves everything in and commits the manifest."""
    staged = publish.count_staged(staging, KINDS, run_id)
    scored = sum(p.rows for _, p in staged["activations"])
    failed = sum(p.rows for _, p in staged["failures"])
    metrics = job_metrics.collect(result, ("cbir", "cbir_top_patches"), distributions=False)
    inputs, accounting = count_inputs(spec, listed, staging, job="top-patches")
    accounting.checked = {"inputs": inputs, "read (counter)": metrics.get("read"), "rows written": scored + failed}
    publish.check_counts("top-patches", accounting.checked)
    summaries = {int(s["channel"]): s for s in _jsonl(fsutil.join(staging, SUMMARIES, "part-*"))}
    wanted = sorted(cfg.channels) if scored else []
    if sorted(summaries) != wanted:
        raise publish.PublishRefusedError("top-patches", {"channels asked": len(wanted), "grids": len(summaries)},
                                          "a channel's grid is missing or repeated")
    grids = {str(c): f"{GRIDS}/{summaries[c]['grid'].replace('.png', f'-{run_id}.png')}" for c in wanted}
    moves = publish.part_moves(cfg.output, staged) + [
        (fsutil.join(staging, GRIDS, summaries[c]["grid"]), fsutil.join(cfg.output, grids[str(c)])) for c in wanted]
    keep = {p.path for _, p in staged["activations"]} | {p.path for _, p in staged["failures"]}
    stale = publish.stale_parts(cfg.output, KINDS, keep)
    stale += [f"{GRIDS}/{path.rsplit('/', 1)[-1]}" for path in fsutil.match(fsutil.join(cfg.output, GRIDS, "*.png"))
              if f"{GRIDS}/{path.rsplit('/', 1)[-1]}" not in set(grids.values())]
    manifest = TopPatchesManifest(
        run_id=run_id, created_utc=utc_now(), model=cfg.model.describe(), model_fingerprint=cfg.model.fingerprint(),
        layer=cfg.layer, channels=list(cfg.channels), n=cfg.n, receptive_field=field,
        counts={"inputs": inputs, "scored": scored, "failed": failed},
        accounting=accounting, files={k: [p for _, p in staged[k]] for k in KINDS}, grids=grids,
        patches={str(c): summaries[c]["patches"] for c in wanted}, elapsed_seconds=round(elapsed, 3),
    )
    publish.commit(cfg.output, manifest, moves, staging, stale=stale)
    log.info("published %d grids, %d activation rows, %d failures to %s", len(grids), scored, failed, cfg.output)
    return manifest


def read_manifest(output: str) -> TopPatchesManifest:
    return publish.read_manifest(fsutil.join(output, publish.MANIFEST), TopPatchesManifest)


# -- command line -----------------------------------------------------------------------------------------


def _channels(text: str) -> tuple[int, ...]:
    import argparse

    try:
        out = tuple(int(c) for c in text.split(",") if c.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected channel numbers such as 3,17,42, not {text!r}") from None
    if not out:
        raise argparse.ArgumentTypeError("names no channel")
    return out


def register(subparsers: Any) -> None:
    from pipelines.options import add_model_args, positive_int

    p = subparsers.add_parser(
        "top-patches", help="the corpus patches that excite chosen channels of a layer most (Beam job)",
        description="For each channel, the N images whose peak activation is highest, cropped to the peak cell's "
                    "receptive field, as one PNG grid per channel; figures in MANIFEST.json. Cost: one forward pass "
                    "per image (MobileNet v1 0.25: about 150 images/s on two CPU cores).")
    p.add_argument("--input", required=True, help="folder, glob, tfrecord:GLOB, wds:GLOB or parquet:GLOB")
    p.add_argument("--output", required=True)
    add_model_args(p, "mobilenet_v1_025")
    p.add_argument("--layer", required=True, help="a Keras layer name of the backbone, e.g. conv_pw_6_relu")
    p.add_argument("--channels", type=_channels, required=True, help="channel numbers, e.g. 3,17,42")
    p.add_argument("-n", type=positive_int, default=16, help="patches per channel (default 16)")
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--tile", type=positive_int, default=96, help="pixels per patch in the grids")
    p.add_argument("--max-pixels", type=positive_int, default=None, help="refuse images above this many pixels")
    p.add_argument("--full-decode", action="store_true", help="never decode JPEG at reduced scale")
    p.add_argument("--decode-threads", type=int, default=0)
    p.add_argument("--allow-uri-prefix", action="append", default=[], metavar="PREFIX",
                   help="parquet: also read absolute uri cells under PREFIX")
    p.set_defaults(handler=main, beam=True)


def main(args: Any, beam_args: list[str]) -> int:
    cfg = TopPatchesConfig(
        input=args.input, output=args.output, model=ModelSpec(args.model, weights_dir=args.weights_dir),
        layer=args.layer, channels=args.channels, n=args.n, batch_size=args.batch_size,
        max_pixels=args.max_pixels or DEFAULT_MAX_PIXELS, reduced_decode=not args.full_decode,
        decode_threads=args.decode_threads, allow_uri_prefixes=tuple(args.allow_uri_prefix), tile=args.tile,
    )
    m = run(cfg, beam_args)
    print(f"top-patches: {m.counts['scored']} images scored, {m.counts['failed']} failed; {len(m.grids)} grids of "
          f"{m.layer} (receptive field {m.receptive_field['size']} px) in {m.elapsed_seconds:.1f}s → {cfg.output}")
    for c, path in m.grids.items():
        best = m.patches[c][0] if m.patches[c] else None
        if best:
            print(f"  channel {c}: {path}  best {best['value']:.3f} in {best['image_id']}")
    return 0
