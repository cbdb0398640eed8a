"""The ``cbir`` console script: one subcommand per job (DESIGN.md).

Beam subcommands pass every argument they do not know to Beam as pipeline
options (``--runner``, ``--project``, ``--temp_location``, ``--direct_num_workers``…).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from models.presets import PRESETS

log = logging.getLogger("cbir")

PLUGIN_COMMANDS = (
    "pipelines.shard",
    "pipelines.neighbors",
    "pipelines.evaluate",
    "pipelines.export_model",
    "pipelines.autoencode",
    "pipelines.inspect",
)


def _add_model_args(p: argparse.ArgumentParser, default: str | None) -> None:
    p.add_argument("--model", default=default,
                   help=f"preset ({', '.join(sorted(PRESETS))}) or savedmodel:PATH")
    p.add_argument("--weights-dir", default=None,
                   help="folder with Keras weights files by their Keras names (default $CBIR_WEIGHTS_DIR)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cbir", description="Content-based image retrieval pipelines")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    ex = sub.add_parser("extract", help="images → features/*.parquet, failures/*.parquet, MANIFEST.json")
    ex.add_argument("--input", required=True, help="folder, glob, tfrecord:GLOB, wds:GLOB or parquet:GLOB")
    ex.add_argument("--output", required=True)
    _add_model_args(ex, "inception_v3")
    ex.add_argument("--weights", default=None, help="'random' (timing only) or an explicit weights file")
    ex.add_argument("--batch-size", type=int, default=64, help="largest inference batch")
    ex.add_argument("--min-batch-size", type=int, default=8)
    ex.add_argument("--precision", choices=("float32", "float16", "bfloat16"), default="float32")
    ex.add_argument("--jit", action="store_true", help="compile the backbone with XLA")
    ex.add_argument("--share-model", action="store_true",
                    help="one model per VM shared by all worker processes (GPU workers)")
    ex.add_argument("--model-copies", type=int, default=None)
    ex.add_argument("--signature", default="serving_default", help="SavedModel signature")
    ex.add_argument("--output-key", default=None, help="SavedModel output to read")
    ex.add_argument("--input-size", type=int, default=None, help="SavedModel input side in pixels")
    ex.add_argument("--feature-dtype", choices=("float32", "float16"), default="float32")
    ex.add_argument("--max-pixels", type=int, default=None, help="refuse images above this many pixels")
    ex.add_argument("--full-decode", action="store_true", help="never decode JPEG at reduced scale")
    ex.add_argument("--decode-threads", type=int, default=0,
                    help="decode threads per worker step (default: one per core, at most 8; 1 = no pool)")
    ex.add_argument("--max-failure-fraction", type=float, default=None,
                    help="exit non-zero (after writing outputs) when more than this fraction failed")
    ex.add_argument("--previous", default=None,
                    help="an earlier extract output: unchanged images (same sha256 and model) are copied")

    ix = sub.add_parser("index", help="features → sharded Annoy + LSH index version")
    ix.add_argument("--features", required=True, help="an extract output folder")
    ix.add_argument("--output", required=True)
    ix.add_argument("--shards", type=int, default=1)
    ix.add_argument("--dims", type=int, default=256, help="PCA dimension (0 keeps the input dimension)")
    ix.add_argument("--trees", type=int, default=50)
    ix.add_argument("--lsh-bits", type=int, default=128, choices=(64, 128, 256))
    ix.add_argument("--seed", type=int, default=1234)
    ix.add_argument("--keep-versions", type=int, default=3, help="complete versions kept (LATEST's always is)")
    ix.add_argument("--annoy-on-disk-mb", type=int, default=None,
                    help="build a shard's Annoy in its file (not RAM) above this estimated size")
    ix.add_argument("--stale-after-hours", type=float, default=24.0,
                    help="unpublished builds older than this are cleaned up")

    q = sub.add_parser("query", help="image files → nearest neighbours")
    q.add_argument("--index", required=True)
    q.add_argument("images", nargs="+")
    q.add_argument("-k", type=int, default=10)
    q.add_argument("--rerank", action="store_true", help="exact re-rank of the candidates")
    q.add_argument("--qe", type=int, default=0, help="query expansion with the top N")
    q.add_argument("--method", choices=("annoy", "lsh", "both", "exact"), default="annoy")
    q.add_argument("--json", action="store_true", help="one JSON object per query")
    q.add_argument("--sheet", default=None, help="write a contact sheet PNG")
    q.add_argument("--version", default=None, help="index version (default: LATEST)")
    q.add_argument("--no-verify", action="store_true", help="check file sizes only, not digests")
    q.add_argument("--weights-dir", default=None)
    q.add_argument("--serving", default=None, metavar="HOST:PORT",
                   help="embed the queries with TensorFlow Serving (cbir export-model) instead of the local model")
    q.add_argument("--serving-protocol", choices=("grpc", "rest"), default="grpc",
                   help="grpc (TF Serving port 8500) or rest (port 8501)")
    q.add_argument("--serving-model", default="cbir", help="the model name TF Serving serves it under")
    q.add_argument("--serving-signature", default="serving_default",
                   help="serving_default (transform applied here) or transformed (exported with --index)")

    # Further subcommands live in their own modules: each exposes
    # register(subparsers) -> parser, and sets `run(args, beam_args) -> int` and `beam`
    # (whether unknown arguments are Beam pipeline options) as parser defaults.
    for module_name in PLUGIN_COMMANDS:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            continue
        module.register(sub)
    return parser


def _extract(args, beam_args: list[str]) -> int:
    from models.backbone import ModelSpec
    from models.imaging import DEFAULT_MAX_PIXELS
    from pipelines import extract
    from transforms.inference import BatchingOptions

    cfg = extract.ExtractConfig(
        input=args.input,
        output=args.output,
        model=ModelSpec(
            name=args.model, weights_dir=args.weights_dir, weights=args.weights, precision=args.precision,
            jit=args.jit, signature=args.signature, output_key=args.output_key, input_size=args.input_size,
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
    )
    try:
        manifest = extract.run(cfg, beam_args)
    except extract.TooManyFailuresError as exc:
        print_extract_summary(exc.manifest)
        print(f"cbir extract: {exc}", file=sys.stderr)
        return 3
    print_extract_summary(manifest)
    return 0


def print_extract_summary(m: dict) -> None:
    c = m["counts"]
    print(f"extract: read {c['read']}, ok {c['ok']}, failed {c['failed']} in {m['elapsed_seconds']:.1f}s "
          f"({m['images_per_second'] or 0:.1f} images/s), model {m['model'].get('preset')} {m['dimension']}-d")
    reused = m.get("metrics", {}).get("reused")
    if reused is not None:
        print(f"  reused {reused} features from the previous run, extracted {m['metrics'].get('to_extract', 0)}")
    for reason, n in list(m.get("failures_by_reason", {}).items())[:10]:
        print(f"  failed {n:>6}  {reason}")


def _index(args, beam_args: list[str]) -> int:
    from pipelines import index

    cfg = index.IndexConfig(
        features=args.features, output=args.output, shards=args.shards, dims=args.dims, trees=args.trees,
        lsh_bits=args.lsh_bits, seed=args.seed, keep_versions=args.keep_versions,
        stale_after_seconds=args.stale_after_hours * 3600,
        **({"annoy_on_disk_bytes": args.annoy_on_disk_mb << 20} if args.annoy_on_disk_mb else {}),
    )
    m = index.run(cfg, beam_args)
    print_index_summary(m)
    return 0


def print_index_summary(m: dict) -> None:
    rate = m["items"] / m["elapsed_seconds"] if m["elapsed_seconds"] else 0
    print(f"index: {m['version']}: {m['items']} items in {m['shards']} shard(s), "
          f"{m['dimension']['input']}→{m['dimension']['output']} dims, {m['bytes'] / 1e6:.1f} MB, "
          f"{m['elapsed_seconds']:.1f}s ({rate:.0f} items/s)")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("apache_beam", "absl", "tensorflow"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    beam_commands = {"extract": _extract, "index": _index}
    if args.command in beam_commands:
        return beam_commands[args.command](args, extra)
    if hasattr(args, "run"):
        if extra and not getattr(args, "beam", False):
            parser.error(f"unrecognised arguments: {' '.join(extra)}")
        return args.run(args, extra)
    if extra:
        parser.error(f"unrecognised arguments: {' '.join(extra)}")
    if args.command == "query":
        from pipelines import query

        return query.main(args)
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
