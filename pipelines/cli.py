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
)

EXIT_UNEXPECTED, EXIT_USAGE, EXIT_TOO_MANY_FAILURES, EXIT_REFUSED, EXIT_GATE = 1, 2, 3, 4, 5


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cbir", description="Content-based image retrieval pipelines")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging, TensorFlow's own logs, tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    parser.set_defaults(subcommands=sub.choices)
    return parser


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
    quiet_tensorflow("-v" in argv or "--verbose" in argv)
    parser = build_parser()
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
