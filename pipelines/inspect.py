"""``cbir projector`` and ``cbir filters``: the usual ways to look inside."""

from __future__ import annotations

import argparse

import numpy as np


def register(sub) -> None:
    p = sub.add_parser("projector", help="export an index for TensorBoard's Embedding Projector")
    p.add_argument("--index", required=True)
    p.add_argument("--output", required=True, help="local folder")
    p.add_argument("--limit", type=int, default=5000, help="items to export (evenly spaced)")
    p.add_argument("--no-sprite", action="store_true")
    p.set_defaults(handler=_projector, beam=False)

    f = sub.add_parser("filters", help="write the first convolution's filters as a PNG grid")
    f.add_argument("--model", default="inception_v3")
    f.add_argument("--weights-dir", default=None)
    f.add_argument("--weights", default=None, help="'random' to compare with untrained filters")
    f.add_argument("--output", required=True, help="PNG path")
    f.set_defaults(handler=_filters, beam=False)


def _projector(args: argparse.Namespace, _beam_args) -> int:
    from serving.projector import write_projector
    from serving.searcher import Hit, Searcher
    from transforms import fsutil

    searcher = Searcher(args.index)
    items = list(searcher.items())
    picked = [items[i] for i in np.linspace(0, len(items) - 1, min(args.limit, len(items))).astype(int)]
    vectors = np.stack([searcher.vector(s, i) for s, i in picked])
    meta = [{k: searcher.describe(Hit(0.0, s, i), 0)[k] for k in ("image_id", "label", "uri")} for s, i in picked]

    def read(uri: str) -> bytes | None:
        try:
            return fsutil.read_input(uri)
        except Exception:
            return None

    write_projector(args.output, vectors, meta, None if args.no_sprite else read)
    print(f"projector: {len(picked)} of {len(items)} items → {args.output} (tensorboard --logdir {args.output})")
    return 0


def _filters(args: argparse.Namespace, _beam_args) -> int:
    from models.backbone import Backbone, ModelSpec
    from models.filters import filter_grid, first_conv_kernels

    backbone = Backbone(ModelSpec(args.model, weights_dir=args.weights_dir, weights=args.weights))
    name, kernels = first_conv_kernels(backbone.keras_model)
    filter_grid(kernels).save(args.output)
    print(f"filters: {kernels.shape[-1]} filters of {name} ({kernels.shape[0]}x{kernels.shape[1]}) → {args.output}")
    return 0
