"""``cbir export-model``: a preset backbone as a SavedModel TensorFlow Serving can serve.

    cbir export-model --model mobilenet_v1_025 --output models/cbir [--version N] [--index IDX]
    tensorflow_model_server --model_name=cbir --model_base_path=$PWD/models/cbir --port=8500 --rest_api_port=8501

Not a Beam job: it builds one graph on this machine. ``--index`` adds the
``transformed`` signature (decode → backbone → the index's transform_fn), checked
against the index's model fingerprint so it cannot pair a transform with the
wrong network.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

from artefacts import layout
from artefacts.vector_space import transform_fingerprint
from models.backbone.export import ExportError, IndexTransform, existing_versions, export_savedmodel
from models.backbone.imaging import DEFAULT_MAX_PIXELS
from models.backbone.network import ModelSpec
from models.backbone.presets import PRESETS
from search import index_files

log = logging.getLogger(__name__)


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("export-model", help="a preset backbone → SavedModel for TensorFlow Serving")
    p.add_argument("--model", default="inception_v3", help=f"preset ({', '.join(sorted(PRESETS))})")
    p.add_argument("--output", required=True, help="model base path: the export goes to OUTPUT/VERSION/")
    p.add_argument("--version", default="1",
                   help="positive integer version folder (default 1), or 'next' for one above the highest present")
    p.add_argument("--index", default=None, help="an index folder: adds the 'transformed' signature")
    p.add_argument("--index-version", default=None, help="index version for --index (default: LATEST)")
    p.add_argument("--weights-dir", default=None,
                   help="folder with Keras weights files by their Keras names (default $CBIR_WEIGHTS_DIR)")
    p.add_argument("--force", action="store_true", help="replace an existing version folder")
    p.add_argument("--full-decode", action="store_true",
                   help="never decode JPEG at reduced scale (match an extract run with --full-decode)")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, help="refuse images above this many pixels")
    p.add_argument("--no-warmup", action="store_true", help="do not write assets.extra/tf_serving_warmup_requests")
    p.set_defaults(handler=main, beam=False)


def parse_version(value: str, output: str) -> int:
    if value == "next":
        return max(existing_versions(output), default=0) + 1
    try:
        version = int(value)
    except ValueError:
        raise ExportError(f"--version must be a positive integer or 'next', not {value!r}") from None
    if version < 1:
        raise ExportError(f"--version must be a positive integer, not {version}")
    return version


def index_transform(index_dir: str, version: str | None = None) -> IndexTransform:
    """The index version whose transform (as data) the ``transformed`` signature embeds.

    Checks the manifest and the digests of the transform data only: the shards (possibly
    gigabytes) play no part in the export, and no SavedModel of the index is loaded.
    """
    version, m = index_files.resolve(index_dir, version)
    version_dir = os.path.join(index_dir, version)
    index_files.verify_files(version_dir, m, full=True, prefix=layout.TRANSFORM_DATA_DIR + "/")
    transform = index_files.load_transform(version_dir, m)
    return IndexTransform(
        version_dir=version_dir,
        version=version,
        model_fingerprint=m.model_fingerprint,
        transform_fingerprint=transform_fingerprint(m),
        dimension=m.dimension.output,
        projection=transform.projection,
        bias=transform.bias,
    )


def main(args: argparse.Namespace, beam_args: list[str]) -> int:
    try:
        version = parse_version(args.version, args.output)
        spec = ModelSpec(args.model, weights_dir=args.weights_dir)
        index = index_transform(args.index, args.index_version) if args.index else None
        result = export_savedmodel(
            spec, args.output, version=version, index=index, force=args.force, max_pixels=args.max_pixels,
            reduced_decode=not args.full_decode, warmup=not args.no_warmup,
        )
    except ExportError as exc:
        print(f"cbir export-model: {exc}", file=sys.stderr)
        return 2
    info = result.info
    print(f"exported {info.model['preset']} ({info.dimension}-d, {info.input_size} px, "
          f"fingerprint {info.model_fingerprint}) to {result.path}")
    for name, sig in info.signatures.items():
        ins = ", ".join(f"{k} {v['dtype']}{v['shape']}" for k, v in sig["inputs"].items())
        outs = ", ".join(f"{k} {v['dtype']}{v['shape']}" for k, v in sig["outputs"].items())
        print(f"  signature {name}: {ins} -> {outs}")
    if index is not None:
        print(f"  'transformed' applies the transform_fn of index version {index.version} ({index.dimension}-d)")
    base = args.output if "://" in args.output else os.path.abspath(args.output)
    print(f"serve: tensorflow_model_server --model_name=cbir --model_base_path={base} --port=8500 --rest_api_port=8501")
    print(f"extract through it: cbir extract --model savedmodel:{result.path} --signature pixels "
          f"--input-size {info.input_size} --input ... --output ...")
    return 0
