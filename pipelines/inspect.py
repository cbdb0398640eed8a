"""``cbir projector`` and ``cbir filters``: the usual ways to look inside."""

from __future__ import annotations

import argparse

import numpy as np


def register(sub) -> None:
    from pipelines.options import int_at_least, positive_int

    p = sub.add_parser("projector", help="export an index for TensorBoard's Embedding Projector")
    p.add_argument("--index", required=True)
    p.add_argument("--output", required=True, help="local folder")
    p.add_argument("--limit", type=int, default=5000, help="items to export (evenly spaced)")
    p.add_argument("--no-sprite", action="store_true")
    p.set_defaults(handler=_projector, beam=False)

    f = sub.add_parser(
        "filters", help="filters as a PNG grid: the first convolution's kernels, or any layer's by gradient ascent",
        description="--mode kernels draws the first convolution's weights. --mode ascent draws, for --filters N "
                    "channels of --layer, the input pattern that excites each most (gradient ascent from noisy grey "
                    "with jitter and blur, one graph per batch of filters; dead filters skipped). 20 filters of "
                    "MobileNet v1 0.25's conv_pw_13_relu at the defaults take about 35 s on two CPU cores.")
    f.add_argument("--model", default="inception_v3")
    f.add_argument("--weights-dir", default=None)
    f.add_argument("--weights", default=None, help="'random' to compare with untrained filters")
    f.add_argument("--mode", choices=("kernels", "ascent"), default="kernels")
    f.add_argument("--layer", default=None, help="ascent: a Keras layer name of the backbone, e.g. conv_pw_6_relu")
    f.add_argument("--filters", type=positive_int, default=16, help="ascent: the first N live channels")
    f.add_argument("--channels", default=None, help="ascent: these channels instead, e.g. 3,17,42")
    f.add_argument("--size", type=int_at_least(32), default=128, help="ascent: image side in pixels")
    f.add_argument("--steps", type=positive_int, default=60, help="ascent: gradient steps")
    f.add_argument("--step", type=float, default=3.0, help="ascent: RMS grey levels per step")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--output", required=True, help="PNG path (ascent figures go next to it as .json)")
    f.set_defaults(handler=_filters, beam=False)


def _projector(args: argparse.Namespace, _beam_args) -> int:
    from inspection.projector import write_projector
    from plumbing import fsutil
    from search.searcher import Hit, Searcher

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
    from models.backbone.network import Backbone, ModelSpec
    from models.inside.filters import filter_grid, first_conv_kernels
    from models.inside.layers import keras_model_of

    if args.mode == "kernels" and (args.layer or args.channels):
        raise ValueError("--layer and --channels are for --mode ascent")
    if args.mode == "ascent" and not args.layer:
        raise ValueError("--mode ascent needs --layer (a Keras layer name of the backbone, e.g. conv_pw_6_relu)")
    backbone = Backbone(ModelSpec(args.model, weights_dir=args.weights_dir, weights=args.weights))
    if args.mode == "ascent":
        return _ascent(args, backbone)
    name, kernels = first_conv_kernels(keras_model_of(backbone))
    _write_png(args.output, filter_grid(kernels))
    print(f"filters: {kernels.shape[-1]} filters of {name} ({kernels.shape[0]}x{kernels.shape[1]}) → {args.output}")
    return 0


def _write_png(path: str, image) -> None:
    import io

    from plumbing import fsutil

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    fsutil.write_bytes_atomic(path, buf.getvalue())


def _ascent(args: argparse.Namespace, backbone) -> int:
    import dataclasses
    import posixpath

    from models.inside.ascent import AscentOptions, ascend_filters, ascent_grid
    from models.inside.layers import LayerModel
    from plumbing import fsutil

    if not args.output.lower().endswith(".png"):
        raise ValueError(f"--output {args.output}: give a .png path")
    try:
        channels = [int(c) for c in args.channels.split(",") if c.strip()] if args.channels else None
    except ValueError:
        raise ValueError(f"--channels: expected numbers such as 3,17,42, not {args.channels!r}") from None
    opts = AscentOptions(size=args.size, steps=args.steps, step=args.step, seed=args.seed)
    model = LayerModel(backbone, args.layer, flexible=True, pre_activation=True)
    result = ascend_filters(model, channels, args.filters, opts)
    _write_png(args.output, ascent_grid(result, args.layer))
    figures = {"command": "filters", "mode": "ascent", "model": args.model, "layer": args.layer,
               "options": dataclasses.asdict(opts), **result.figures()}
    path = posixpath.splitext(args.output)[0] + ".json"
    fsutil.write_json_atomic(path, figures)
    rise = [float(h[-1] - h[0]) for h in result.history]
    print(f"filters: {len(result.channels)} filters of {args.layer} by gradient ascent ({len(result.skipped)} dead "
          f"skipped), mean activation rose by {np.mean(rise) if rise else 0:.3f} → {args.output} ({path})")
    return 0
