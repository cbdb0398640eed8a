"""``cbir train-autoencoder``: images in, a trained convolutional (denoising) autoencoder out.

1. The launcher lists the inputs (any spec ``cbir extract`` reads: folders, ``tfrecord:``,
   ``wds:``, ``parquet:``) and stages the listing.
2. A Beam pass reads every input, decodes and resizes it with the product's own decoding
   (``transforms.decode.DecodeFn``, ``--size`` square) and writes the pixels to TFRecord shards
   under staging (``transforms.pixel_shards``); what cannot be read or decoded becomes a failure
   row, as in extract.
3. The launcher checks the accounting before anything else: inputs (listing or shard tallies)
   = ``read`` counter = records in the pixel shards + failure rows; a mismatch publishes nothing
   (exit 4).
4. Keras trains on ``tf.data`` streaming those shards (shuffled in a window, never all in
   memory), holding out the last shards for validation; with ``--noise`` each training input is
   corrupted and the target is the clean image. TensorBoard gets loss scalars and image summaries.
5. The loss curve, a reconstruction sheet, the weights as data and the SavedModels are written
   under staging, then published: folders swapped in, the manifest written last.

Output::

    <out>/MANIFEST.json          # kind "pixel-autoencoder", the commit point
    <out>/encoder/               # SavedModel: signatures pixels, serving_default (pixels → code)
    <out>/autoencoder/           # SavedModel: pixels → reconstruction (the denoiser with --noise)
    <out>/weights/               # layers.json + one .npy per variable, decoder included (what cbir denoise loads)
    <out>/loss.png, <out>/reconstructions.png
    <out>/tensorboard/<run>/     # train/, validation/ (loss), images/ (input, noisy, reconstruction)
    <out>/failures/part-<run>-*.parquet

Then ``cbir extract --model savedmodel:<out>/encoder --signature pixels`` encodes a corpus, and
``cbir denoise --model <out>`` / ``cbir query --denoise <out>`` clean images.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import time
from typing import Any

import apache_beam as beam

from artefacts.manifests import (
    KIND_AUTOENCODER,
    KIND_DENOISING,
    PixelAutoencoderManifest,
    PixelCounts,
    PixelShards,
    SavedModelInfo,
    WeightsInfo,
    new_run_id,
    utc_now,
)
from models.autoencoders import pixel_autoencoder as pa
from models.backbone.imaging import DEFAULT_MAX_PIXELS, RESIZE_METHOD
from pipelines.runner import pipeline_options
from plumbing import folders, fsutil, job_metrics, publish
from transforms import features_io
from transforms.decode import DecodeFn
from transforms.pixel_shards import (
    WritePixelShards,
    count_records,
    default_shards,
    shard_number,
    validation_shards,
)
from transforms.readers import InputSpec, ListedFile, ReadImages, write_listing
from transforms.readers.accounting import count_inputs, write_tallies
from transforms.records import FAILURES_TAG

log = logging.getLogger(__name__)

PIXELS_DIR = "pixels"
MODEL_FOLDERS = ("encoder", "autoencoder", pa.WEIGHTS_DIR)
LOSS_PNG, SHEET_PNG = pa.LOSS_PNG, pa.SHEET_PNG
TENSORBOARD_DIR = "tensorboard"


@dataclasses.dataclass
class TrainAutoencoderConfig:
    input: str
    output: str
    model: pa.PixelAutoencoderConfig = dataclasses.field(default_factory=pa.PixelAutoencoderConfig)
    max_pixels: int = DEFAULT_MAX_PIXELS
    reduced_decode: bool = True
    decode_threads: int = 0  # 0: one per core (transforms.decode)
    allow_uri_prefixes: tuple[str, ...] = ()
    pixel_shards: int = 0  # 0: from the number of inputs (transforms.pixel_shards.default_shards)


@dataclasses.dataclass
class _Decoded:
    """What the Beam pass left in staging, as the launcher counted it."""

    counts: PixelCounts
    accounting: Any
    failures: list  # (staged path, PartFile) of the failure parts
    train_files: list[str]
    val_files: list[str]
    metrics: dict[str, Any]
    shards: int
    held_out: list[int]
    seconds: float


def build(p: beam.Pipeline, cfg: TrainAutoencoderConfig, spec: InputSpec, listing: str, staging: str,
          shards: int) -> None:
    """Read → decode → pixel shards; failures and shard tallies alongside (separate from ``run`` for tests)."""
    read = p | "Read" >> ReadImages(spec, listing)
    decoded = read["records"] | "Decode" >> beam.ParDo(
        DecodeFn(cfg.model.size, cfg.max_pixels, cfg.reduced_decode, threads=cfg.decode_threads)
    ).with_outputs(FAILURES_TAG, main="images")
    _ = decoded.images | "PixelShards" >> WritePixelShards(fsutil.join(staging, PIXELS_DIR), shards)
    (
        (read["failures"], decoded[FAILURES_TAG])
        | "AllFailures" >> beam.Flatten()
        | "WriteFailures" >> features_io.WriteFailureParquet(fsutil.join(staging, "failures", "part"))
    )
    if "tallies" in read:
        write_tallies(read["tallies"], staging)


def run(cfg: TrainAutoencoderConfig, beam_args: list[str] | None = None) -> PixelAutoencoderManifest:
    """Decodes, checks, trains, exports and publishes; returns the committed manifest."""
    m = cfg.model
    spec = InputSpec.parse(cfg.input, cfg.allow_uri_prefixes)
    listed = spec.list()
    run_id = new_run_id()
    staging = publish.staging_dir(cfg.output, run_id)
    started = time.time()
    local, remote = folders.local_workdir(staging, "cbir-train-autoencoder-")
    try:
        decoded = _decode(cfg, spec, listed, run_id, staging, beam_args)
        t = time.time()
        trained, scores, preview = pa.train_on_shards(m, decoded.train_files, decoded.val_files,
                                                      decoded.counts.train, decoded.counts.validation,
                                                      os.path.join(local, TENSORBOARD_DIR, run_id))
        train_seconds = time.time() - t
        outputs = pa.write_outputs(trained, scores, preview, local)
        if remote:
            folders.upload(local, staging, [*MODEL_FOLDERS, LOSS_PNG, SHEET_PNG, TENSORBOARD_DIR])
        timings = {
            "decode_seconds": round(decoded.seconds, 3),
            "train_seconds": round(train_seconds, 3),
            "seconds_per_epoch": [round(s, 3) for s in trained.epoch_seconds],
            "elapsed_seconds": round(time.time() - started, 3),
        }
        manifest = _manifest(cfg, run_id, decoded, trained, scores, outputs, timings)
        _publish(cfg.output, staging, run_id, manifest, decoded.failures)
    except BaseException:
        publish.discard_staging(staging)
        raise
    finally:
        if remote:
            shutil.rmtree(local, ignore_errors=True)
    return manifest


def _decode(cfg: TrainAutoencoderConfig, spec: InputSpec, listed: list[ListedFile], run_id: str, staging: str,
            beam_args: list[str] | None) -> _Decoded:
    """Runs the Beam pass over the listed inputs into staging and checks what it wrote (``_check``)."""
    m = cfg.model
    started = time.time()
    shards = cfg.pixel_shards or default_shards(len(listed) * (100 if spec.is_shards else 1))
    held_out = validation_shards(shards, m.validation_fraction)
    log.info("train-autoencoder: %d %s from %s -> %s, %d px, %s, %d epochs (run %s)", len(listed),
             "shards" if spec.is_shards else "files", cfg.input, cfg.output, m.size,
             f"code {m.code_dim}" if m.dense else "convolutional bottleneck", m.epochs, run_id)
    listing = write_listing(staging, listed)
    p = beam.Pipeline(options=pipeline_options(beam_args))
    build(p, cfg, spec, listing, staging, shards)
    result = p.run()
    result.wait_until_finish()
    seconds = time.time() - started
    counts, accounting, failures, train_files, val_files, metrics = _check(
        spec, listed, staging, run_id, result, held_out)
    return _Decoded(counts, accounting, failures, train_files, val_files, metrics, shards, held_out, seconds)


def _manifest(cfg: TrainAutoencoderConfig, run_id: str, decoded: _Decoded, trained: pa.Trained,
              scores: dict[str, float], outputs: dict[str, Any], timings: dict[str, Any]) -> PixelAutoencoderManifest:
    m = cfg.model
    return PixelAutoencoderManifest(
        run_id=run_id,
        created_utc=utc_now(),
        input=cfg.input,
        model_kind=KIND_DENOISING if m.denoising else KIND_AUTOENCODER,
        config=m.to_dict(),
        fingerprint=pa.model_fingerprint(m, outputs["digest"]),
        decode={"size": m.size, "resize": RESIZE_METHOD, "reduced_decode": cfg.reduced_decode,
                "max_pixels": cfg.max_pixels, "decoder": "models.backbone.imaging (Pillow)"},
        counts=decoded.counts,
        accounting=decoded.accounting,
        weights=WeightsInfo(pa.WEIGHTS_DIR, outputs["digest"], outputs["weights"]),
        savedmodels={k: SavedModelInfo(**v) for k, v in outputs["savedmodels"].items()},
        history=trained.history,
        validation=scores,
        files={"failures": [part for _, part in decoded.failures]},
        failures_by_reason=features_io.failure_reasons([src for src, _ in decoded.failures]),
        pixel_shards=PixelShards(decoded.shards, decoded.held_out,
                                 len(decoded.train_files) + len(decoded.val_files)),
        pictures={"loss_curve": LOSS_PNG, "reconstructions": SHEET_PNG},
        tensorboard=f"{TENSORBOARD_DIR}/{run_id}",
        metrics=decoded.metrics,
        options=_options(cfg),
        timings=timings,
    )


def _options(cfg: TrainAutoencoderConfig) -> dict[str, Any]:
    d = dataclasses.asdict(cfg)
    d["model"] = cfg.model.to_dict()
    d["allow_uri_prefixes"] = list(cfg.allow_uri_prefixes)
    return d


def _check(spec: InputSpec, listed: list[ListedFile], staging: str, run_id: str, result: Any, held_out: list[int]):
    """The accounting, from files the launcher reads itself; refuses (nothing published) when it does not add up."""
    staged = publish.count_staged(staging, ["failures"], run_id)["failures"]
    failed = sum(part.rows for _, part in staged)
    shard_files = fsutil.match(fsutil.join(staging, PIXELS_DIR, "pixels-*.tfrecord"))
    per_file = {path: count_records(path) for path in shard_files}
    examples = sum(per_file.values())
    metrics = job_metrics.collect(result, ("cbir",), distributions=False)
    inputs, accounting = count_inputs(spec, listed, staging, "train-autoencoder")
    accounting.checked = {"inputs": inputs, "read (counter)": metrics.get("read"),
                          "records in pixel shards + failure rows": examples + failed}
    publish.check_counts("train-autoencoder", accounting.checked)
    publish.check_counts("train-autoencoder", {"pixel records in files": examples,
                                               "pixel_examples (counter)": metrics.get("pixel_examples")})
    held = set(held_out)
    val_files = [f for f in shard_files if shard_number(f) in held and per_file[f]]
    train_files = [f for f in shard_files if shard_number(f) not in held and per_file[f]]
    n_val = sum(per_file[f] for f in val_files)
    n_train = examples - n_val
    if examples == 0:
        raise ValueError(f"train-autoencoder: none of the {inputs} inputs could be decoded ({failed} failures); "
                         "nothing to train on")
    if n_val == 0 or n_train == 0:
        raise ValueError(f"train-autoencoder: {examples} decoded images split into {n_train} for training and "
                         f"{n_val} held out; both need images: give more images or another --validation-fraction")
    counts = PixelCounts(inputs=inputs, read=examples + failed, decoded=examples, failed=failed, train=n_train,
                         validation=n_val)
    log.info("decoded %d of %d inputs (%d failed): %d for training, %d held out", examples, inputs, failed, n_train,
             n_val)
    return counts, accounting, staged, train_files, val_files, metrics


def _publish(output: str, staging: str, run_id: str, manifest: PixelAutoencoderManifest, failures: list) -> None:
    """Model folders swapped in, pictures and TensorBoard logs moved in, the manifest written last, then the
    files of earlier runs deleted (failure parts, TensorBoard runs)."""
    keep = [part.path for _, part in failures]
    stale = publish.stale_parts(output, ["failures"], keep)
    stale += [p[len(output.rstrip("/")) + 1:] for p in fsutil.match(fsutil.join(output, TENSORBOARD_DIR, "*", "**"))
              if not p[len(output.rstrip("/")) + 1:].startswith(f"{TENSORBOARD_DIR}/{run_id}/")]
    for name in MODEL_FOLDERS:
        folders.swap_folder(output, staging, name)
    board = fsutil.match(fsutil.join(staging, TENSORBOARD_DIR, run_id, "**"))
    moves = [(src, fsutil.join(output, src[len(staging.rstrip("/")) + 1:])) for src in board]
    moves += [(fsutil.join(staging, name), fsutil.join(output, name)) for name in (LOSS_PNG, SHEET_PNG)]
    moves += publish.part_moves(output, {"failures": failures})
    publish.commit(output, manifest, moves, staging, stale=stale)
    _remove_empty_tensorboard_runs(output, run_id)


def _remove_empty_tensorboard_runs(output: str, run_id: str) -> None:
    root = os.path.join(output, TENSORBOARD_DIR)
    if "://" in output or not os.path.isdir(root):
        return
    for name in os.listdir(root):
        if name != run_id:
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


# -- command line -------------------------------------------------------------------------------------


def register(subparsers: Any) -> None:
    from pipelines.options import fraction, non_negative_int, positive_int

    p = subparsers.add_parser("train-autoencoder",
                              help="images → a convolutional (denoising) autoencoder: codes, denoiser, SavedModels")
    p.add_argument("--input", required=True, help="folder, glob, tfrecord:GLOB, wds:GLOB or parquet:GLOB")
    p.add_argument("--output", required=True)
    p.add_argument("--size", type=positive_int, default=128, help="images are squashed to SIZE x SIZE (default 128)")
    p.add_argument("--code-dim", type=non_negative_int, default=None,
                   help="dense code size (default 128); 0 = convolutional bottleneck, fully convolutional (the "
                        "default with --noise: a denoiser cleans any size)")
    p.add_argument("--epochs", type=positive_int, default=5)
    p.add_argument("--noise", default=None, metavar="KIND:AMOUNT[,…]",
                   help="denoising autoencoder: gaussian:σ (σ in [0, 1] units), saltpepper:p, jpeg:q; each training "
                        "image gets one of them")
    p.add_argument("--filters", default=None,
                   help="channels of the stride-2 convolutions, comma-separated (default 32,64,128 with a dense "
                        "code, 32,64 with --code-dim 0)")
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--learning-rate", type=float, default=2e-3, help="Adam's learning rate (default 2e-3)")
    p.add_argument("--validation-fraction", type=fraction, default=0.1,
                   help="share of the images held out (whole pixel shards, chosen by image id)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--max-pixels", type=positive_int, default=None, help="refuse images above this many pixels")
    p.add_argument("--full-decode", action="store_true", help="never decode JPEG at reduced scale")
    p.add_argument("--decode-threads", type=int, default=0, help="decode threads per worker step (0: one per core)")
    p.add_argument("--pixel-shards", type=non_negative_int, default=0,
                   help="TFRecord shards of decoded pixels (default: about one per 1000 images, at least 10)")
    p.add_argument("--allow-uri-prefix", action="append", default=[], metavar="PREFIX",
                   help="parquet: also read absolute uri cells under PREFIX (repeatable)")
    p.set_defaults(handler=main, beam=True)


def config_from_args(args: Any) -> TrainAutoencoderConfig:
    from models.autoencoders.pixel_noise import parse_noise

    noise = parse_noise(args.noise)
    code_dim = args.code_dim if args.code_dim is not None else (0 if noise else 128)
    try:
        filters = tuple(int(f) for f in args.filters.split(",") if f.strip()) if args.filters else \
            pa.default_filters(code_dim)
    except ValueError:
        raise ValueError(f"--filters: {args.filters!r} is not a comma-separated list of integers") from None
    model = pa.PixelAutoencoderConfig(
        size=args.size, code_dim=code_dim, filters=filters, noise=noise, epochs=args.epochs,
        batch_size=args.batch_size, learning_rate=args.learning_rate, validation_fraction=args.validation_fraction,
        seed=args.seed,
    )
    return TrainAutoencoderConfig(
        input=args.input, output=args.output, model=model, max_pixels=args.max_pixels or DEFAULT_MAX_PIXELS,
        reduced_decode=not args.full_decode, decode_threads=args.decode_threads,
        allow_uri_prefixes=tuple(args.allow_uri_prefix), pixel_shards=args.pixel_shards,
    )


def main(args: Any, beam_args: list[str]) -> int:
    manifest = run(config_from_args(args), beam_args)
    print_summary(manifest, args.output)
    return 0


def print_summary(m: PixelAutoencoderManifest, output: str) -> None:
    c, v = m.counts, m.validation
    per_epoch = m.timings.get("seconds_per_epoch") or [0.0]
    cfg = m.config
    print(f"train-autoencoder: read {c.read}, decoded {c.decoded} ({c.train} training, {c.validation} held out), "
          f"failed {c.failed}; {len(per_epoch)} epochs at {cfg['size']} px, {sum(per_epoch) / len(per_epoch):.1f}s "
          "per epoch")
    scores = f"held-out MSE {v['mse']:.5f}, PSNR {v['psnr']:.2f} dB, SSIM {v['ssim']:.3f}"
    if m.denoising:
        scores += f" (noisy input: PSNR {v['psnr_input']:.2f} dB, SSIM {v['ssim_input']:.3f})"
    print(f"  {m.model_kind}: {scores}")
    enc = m.savedmodels["encoder"]
    print(f"  encoder: cbir extract --model savedmodel:{fsutil.join(output, enc.path)} --signature pixels "
          f"({enc.dimension}-d codes)")
    if m.denoising:
        print(f"  denoise: cbir denoise --model {output} IMAGE… --output DIR, or cbir query --denoise {output}")
    print(f"  pictures: {fsutil.join(output, LOSS_PNG)}, {fsutil.join(output, SHEET_PNG)}; "
          f"tensorboard --logdir {fsutil.join(output, m.tensorboard or TENSORBOARD_DIR)}")
