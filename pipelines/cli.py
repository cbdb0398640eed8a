"""The ``cbir`` console script: one subcommand per job, every one registered the same way.

Each module in :data:`COMMAND_MODULES` exposes ``register(subparsers)``, which adds its
subcommand and sets two parser defaults: ``handler`` (``handler(args, beam_args) -> int``)
and ``beam`` (whether arguments the command does not know are Beam pipeline options,
``--runner``, ``--project``, ``--temp_location``, …). An argument neither the command nor
Beam knows is an error that names it, before any work.

Errors end in one line on stderr and an exit code a scheduler can act on (tracebacks
only with ``-v``):

====  ======================================================================
0     done
1     an unexpected error (a bug, or a failure outside the product: re-run with -v)
2     bad input or usage: the message names the file or option and the fix
3     ``cbir extract --max-failure-fraction``: too many inputs failed (outputs were written)
4     the job's counts did not add up: nothing was published, the previous output stands
5     ``cbir index --gate``: the new version failed its quality gate (built, not published)
====  ======================================================================
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from pipelines.quiet import quiet_known_noise, quiet_tensorflow

log = logging.getLogger("cbir")

COMMAND_MODULES = (
    "pipelines.extract",
    "pipelines.index",
    "pipelines.query",
    "pipelines.neighbors",
    "pipelines.evaluate",
    "pipelines.shard_inputs",
    "pipelines.export_model",
    "pipelines.autoencode",
    "pipelines.train_autoencoder",
    "pipelines.denoise",
    "pipelines.inspect",
    "pipelines.visualise",
    "pipelines.top_patches",
    "pipelines.serve",
    "pipelines.compare",
    "pipelines.reindex",
)

# Every subcommand, the module that registers it, and its one-line help: what ``cbir --help`` and a mistyped
# command are answered from without importing a single command module (they import TensorFlow and Beam,
# seconds before argparse could say a word). tests/pipelines/test_cli.py checks it against the modules.
COMMANDS: dict[str, tuple[str, str]] = {
    "extract": ("pipelines.extract", "images → features/*.parquet, failures/*.parquet, MANIFEST.json"),
    "index": ("pipelines.index", "features → sharded Annoy + LSH index version"),
    "query": ("pipelines.query", "image files → nearest neighbours"),
    "neighbors": ("pipelines.neighbors", "top-k neighbours of every indexed item → Parquet (Beam job)"),
    "evaluate": ("pipelines.evaluate", "leave-one-out mAP, precision@k, recall@k of an index"),
    "shard": ("pipelines.shard_inputs", "folder of images → TFRecord or WebDataset shards"),
    "export-model": ("pipelines.export_model", "a preset backbone → SavedModel for TensorFlow Serving"),
    "autoencode": ("pipelines.autoencode", "learn compact (optionally denoising) codes and rewrite features"),
    "train-autoencoder": ("pipelines.train_autoencoder",
                          "images → a convolutional (denoising) autoencoder: codes, denoiser, SavedModels"),
    "denoise": ("pipelines.denoise", "clean images with a cbir train-autoencoder --noise model (PNG out)"),
    "projector": ("pipelines.inspect", "export an index for TensorBoard's Embedding Projector"),
    "filters": ("pipelines.inspect",
                "filters as a PNG grid: the first convolution's kernels, or any layer's by gradient ascent"),
    "dream": ("pipelines.visualise", "DeepDream: amplify what a layer sees in an image"),
    "explain": ("pipelines.visualise", "why a result matched a query: saliency maps of the similarity, side by side"),
    "map": ("pipelines.visualise", "a 2-D map of an index (PCA or t-SNE) with thumbnails coloured by label"),
    "adversarial": ("pipelines.visualise", "FGSM / PGD against retrieval: self-hit, target rank, P@10 against eps, "
                                           "before and after the query path's JPEG"),
    "top-patches": ("pipelines.top_patches",
                    "the corpus patches that excite chosen channels of a layer most (Beam job)"),
    "serve": ("pipelines.serve", "HTTP search API and browser front end over an index (follows LATEST)"),
    "compare": ("pipelines.compare", "two index versions: neighbour churn, recall, label metrics, changes"),
    "reindex": ("pipelines.reindex",
                "one command for the night: extract → index → gate → neighbours, resumable, with a report"),
}

EXIT_UNEXPECTED, EXIT_USAGE, EXIT_TOO_MANY_FAILURES, EXIT_REFUSED, EXIT_GATE = 1, 2, 3, 4, 5


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The full parser; with ``only``, just the module that registers that subcommand is imported."""
    parser, sub = _top_parser()
    modules = COMMAND_MODULES if only is None else (COMMANDS[only][0],)
    for name in modules:
        importlib.import_module(name).register(sub)
    parser.set_defaults(subcommands=sub.choices)
    return parser


def _top_parser() -> tuple[argparse.ArgumentParser, argparse._SubParsersAction]:
    parser = argparse.ArgumentParser(prog="cbir", description="Content-based image retrieval pipelines")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging, TensorFlow's own logs, tracebacks")
    return parser, parser.add_subparsers(dest="command", required=True)


def _answer_without_commands(argv: list[str]) -> None:
    """``cbir``, ``cbir --help`` and an unknown command, answered from :data:`COMMANDS` (exits)."""
    parser, sub = _top_parser()
    for name, (_, text) in COMMANDS.items():
        sub.add_parser(name, help=text, add_help=False)
    parser.parse_args(argv)  # prints the help or the usage error and exits
    raise SystemExit(2)


def _command_of(argv: list[str]) -> str | None:
    """The subcommand named in ``argv``: its first word that is not an option (None before a -h)."""
    for word in argv:
        if word in ("-h", "--help"):
            return None
        if not word.startswith("-"):
            return word
    return None


def _usage_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean bad input or usage: the message says what and how to fix it."""
    from artefacts.layout import IndexIntegrityError
    from artefacts.manifests import ManifestError
    from artefacts.signing import SignatureError
    from models.backbone.weights import WeightsNotFoundError
    from plumbing.lease import LeaseHeldError
    from search.compatibility import ModelMismatchError, TransformMismatchError

    return (ValueError, FileNotFoundError, NotADirectoryError, PermissionError, ManifestError, IndexIntegrityError,
            WeightsNotFoundError, ModelMismatchError, TransformMismatchError, SignatureError, LeaseHeldError)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = _command_of(argv)
    if command not in COMMANDS:
        _answer_without_commands(argv)
    quiet_tensorflow("-v" in argv or "--verbose" in argv)
    parser = build_parser(only=command)
    args, extra = parser.parse_known_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    quiet_known_noise()
    for noisy in ("apache_beam", "absl", "tensorflow", "h5py", "faiss"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    from pipelines.runner import check_beam_args

    sub_parser = args.subcommands[args.command]
    if extra:
        problem = check_beam_args(extra, sub_parser) if args.beam else (
            f"unrecognised arguments: {' '.join(extra)}")
        if problem:
            sub_parser.error(problem)
    from evaluation.gate import GateFailedError
    from pipelines.extract import TooManyFailuresError
    from plumbing.publish import PublishRefusedError

    try:
        return int(args.handler(args, extra) or 0)
    except TooManyFailuresError as exc:
        print(f"cbir {args.command}: {exc}", file=sys.stderr)
        return EXIT_TOO_MANY_FAILURES
    except GateFailedError as exc:
        print(f"cbir {args.command}: {exc}", file=sys.stderr)
        return EXIT_GATE
    except PublishRefusedError as exc:
        if args.verbose:
            raise
        print(f"cbir {args.command}: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    except KeyboardInterrupt:
        print(f"cbir {args.command}: interrupted; nothing was published by this run", file=sys.stderr)
        return 130
    except _usage_errors() as exc:
        if args.verbose:
            raise
        print(f"cbir {args.command}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as exc:
        if args.verbose:
            raise
        print(f"cbir {args.command}: unexpected {type(exc).__name__}: {exc} (run with -v for the traceback)",
              file=sys.stderr)
        return EXIT_UNEXPECTED


if __name__ == "__main__":
    sys.exit(main())
