"""``cbir dream``, ``cbir explain``, ``cbir map``, ``cbir adversarial``: looking inside the model and the index.

Each command writes a PNG a person can read and, next to it, the figures behind it as
JSON (``OUT.png`` → ``OUT.json``; ``cbir adversarial`` writes ``report.json`` and
``report.md`` into its output folder). None is a Beam job: each runs on one machine where
the model (and the index) is; ``cbir top-patches`` is the Beam job that reads a corpus.
Outputs go through Beam filesystems, so ``gs://`` paths work.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import posixpath
import sys
from typing import Any

import numpy as np

from plumbing import fsutil

log = logging.getLogger(__name__)


def _read_or_none(uri: str) -> bytes | None:
    try:
        return fsutil.read_input(uri)
    except Exception:
        return None


def _png(image: Any) -> bytes:
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def figures_path(output: str) -> str:
    """Where the figures of a picture go: the PNG's path with ``.json`` instead of ``.png``."""
    stem, ext = posixpath.splitext(output)
    return (stem if ext.lower() == ".png" else output) + ".json"


def write_outputs(output: str, image: Any, figures: dict[str, Any]) -> str:
    """Writes the PNG and its JSON figures atomically; returns the JSON path."""
    if not output.lower().endswith(".png"):
        raise ValueError(f"--output {output}: give a .png path")
    fsutil.write_bytes_atomic(output, _png(image))
    path = figures_path(output)
    fsutil.write_json_atomic(path, figures)
    return path


def _index_args(p: argparse.ArgumentParser) -> None:
    from pipelines.options import add_signing_arg

    p.add_argument("--index", required=True)
    p.add_argument("--version", default=None, help="index version (default: LATEST)")
    p.add_argument("--weights-dir", default=None)
    p.add_argument("--model", default=None,
                   help="savedmodel:PATH for an index built with a SavedModel backbone (gradients need a preset)")
    add_signing_arg(p)


def _open(args: argparse.Namespace):
    from pipelines.options import signing_key
    from search.searcher import Searcher

    return Searcher(args.index, version=args.version, signing_key=signing_key(args))


# -- cbir dream -------------------------------------------------------------------------------------------


def _dream(args: argparse.Namespace, _beam_args) -> int:
    from PIL import Image

    from models.backbone.network import Backbone, ModelSpec
    from models.inside.dream import Dreamer, DreamOptions, decode_photo
    from models.inside.layers import LayerModel, parse_layer_names

    opts = DreamOptions(octaves=args.octaves, octave_scale=args.octave_scale, steps=args.steps, step=args.step,
                        tile=args.tile, max_side=args.max_side, seed=args.seed)
    image = decode_photo(fsutil.read_input(args.image))
    layers = parse_layer_names(args.layer)
    model = LayerModel(Backbone(ModelSpec(args.model, weights_dir=args.weights_dir)), layers, flexible=True)
    result = Dreamer(model, opts).dream(image)
    figures = {"command": "dream", "image": args.image, "model": args.model, "layers": layers,
               "size": [int(image.shape[1]), int(image.shape[0])], "options": dataclasses.asdict(opts),
               **result.figures(),
               "mean_abs_change": round(float(np.abs(result.image.astype(np.float32) - image).mean()), 3)}
    path = write_outputs(args.output, Image.fromarray(result.image), figures)
    first, last = result.losses[0][0], result.losses[-1][-1]
    print(f"dream: {args.image} ({image.shape[1]}x{image.shape[0]}) through {', '.join(layers)}: "
          f"{len(result.octave_sizes)} octaves, mean activation {first:.3f} → {last:.3f} → {args.output} ({path})")
    return 0


# -- cbir explain -----------------------------------------------------------------------------------------


def _explain(args: argparse.Namespace, _beam_args) -> int:
    from inspection.explain import explain, render

    searcher = _open(args)
    embedder = searcher.open_embedder(weights_dir=args.weights_dir, model=args.model)
    query = fsutil.read_input(args.query)
    if args.result is not None:
        try:
            gid = searcher.image_ids.index(args.result)
        except ValueError:
            raise ValueError(f"--result: the index has no item with image_id {args.result!r}") from None
        rank = None
    else:
        vectors, ok, failures = embedder.embed_bytes([query])
        if not ok:
            raise ValueError(f"{args.query} cannot be decoded: {failures[0].error}: {failures[0].message}")
        hits = searcher.search(vectors[0], k=args.rank)
        if len(hits) < args.rank:
            raise ValueError(f"--rank {args.rank}: the query has only {len(hits)} results")
        hit = hits[args.rank - 1]
        gid, rank = searcher.global_id(hit.shard, hit.id), args.rank
    e = explain(searcher, embedder, query, gid, args.method, patch=args.patch, stride=args.stride)
    figures = {"command": "explain", "query": args.query, "index": searcher.version_dir, "rank": rank,
               **e.figures()}
    path = write_outputs(args.output, render(e), figures)
    peak = figures["query"]["peak"]
    print(f"explain ({args.method}): {args.query} ↔ {e.result['image_id']} similarity {e.score:.4f}; query map "
          f"peaks at x={peak['x']:.2f}, y={peak['y']:.2f} of the frame → {args.output} ({path})")
    return 0


# -- cbir map ---------------------------------------------------------------------------------------------


def _map(args: argparse.Namespace, _beam_args) -> int:
    from inspection.collection_map import collection_map

    searcher = _open(args)
    result = collection_map(searcher, args.method, args.sample, args.seed, None if args.no_thumbnails else
                            _read_or_none, thumb=args.thumb, canvas=args.canvas)
    figures = {"command": "map", "index": searcher.version_dir, **result.figures(searcher.image_ids)}
    path = write_outputs(args.output, result.image, figures)
    sampled = f"a sample of {len(result.gids)}" if len(result.gids) < result.items else f"all {result.items}"
    print(f"map ({args.method}): {sampled} items of {searcher.version_dir}, {len(result.colours)} labels coloured"
          f"{f', {result.unreadable} thumbnails unreadable' if result.unreadable else ''} → {args.output} ({path})")
    return 0


# -- cbir adversarial -------------------------------------------------------------------------------------


def _adversarial(args: argparse.Namespace, _beam_args) -> int:
    from inspection.adversarial_report import AdversarialConfig, markdown, run_report
    from models.inside.adversarial import AttackOptions

    target = None if args.target == "none" else args.target
    cfg = AdversarialConfig(attacks=tuple(a.strip() for a in args.attack.split(",") if a.strip()), eps=args.eps,
                            target=target, sample=args.sample, seed=args.seed,
                            attack=AttackOptions(steps=args.steps, seed=args.seed), jpeg_qualities=args.jpeg,
                            pictures=args.pictures)
    searcher = _open(args)
    embedder = searcher.open_embedder(weights_dir=args.weights_dir, model=args.model)
    out = run_report(searcher, embedder, cfg, _read_or_none)
    out_dir = args.output.rstrip("/")
    for name, image in out.pictures.items():
        fsutil.write_bytes_atomic(fsutil.join(out_dir, f"{name}.png"), _png(image))
    out.report["pictures"] = [f"{name}.png" for name in out.pictures]
    fsutil.write_json_atomic(fsutil.join(out_dir, "report.json"), out.report)
    table = markdown(out.report)
    fsutil.write_bytes_atomic(fsutil.join(out_dir, "report.md"), table.encode("utf-8"))
    if args.json:
        print(json.dumps(out.report))
    else:
        print(table)
        print(f"adversarial: {out.report['sample']} photos, {len(out.report['results'])} rows, "
              f"{len(out.pictures)} pictures → {out_dir}", file=sys.stderr)
    return 0


# -- registration -----------------------------------------------------------------------------------------


def register(sub) -> None:
    """``cbir dream``, ``explain``, ``map`` and ``adversarial``: one parser each."""
    for add in (_register_dream, _register_explain, _register_map, _register_adversarial):
        add(sub)


def _register_dream(sub) -> None:
    from pipelines.options import add_model_args, float_above, non_negative_int, positive_int

    d = sub.add_parser(
        "dream", help="DeepDream: amplify what a layer sees in an image",
        description="Gradient ascent on a layer's mean activation from the image itself, over octaves, with random "
                    "shifts and tiled gradients; saved at the input's size. Defaults take about a minute for a "
                    "512 px image with MobileNet v1 0.25 on two CPU cores (InceptionV3: several minutes).")
    add_model_args(d, "mobilenet_v1_025")
    d.add_argument("--layer", required=True, help="Keras layer name(s) of the backbone, comma-separated")
    d.add_argument("--octaves", type=positive_int, default=4)
    d.add_argument("--octave-scale", type=float_above(1.0), default=1.4)
    d.add_argument("--steps", type=positive_int, default=10, help="steps per octave")
    d.add_argument("--step", type=float, default=1.5, help="grey levels per step (normalised gradient)")
    d.add_argument("--tile", type=positive_int, default=256, help="gradient tile side in pixels")
    d.add_argument("--max-side", type=non_negative_int, default=512,
                   help="dream at most this large (the detail is upscaled onto the original); 0: full size")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("image")
    d.add_argument("--output", required=True, help="PNG path (figures go next to it as .json)")
    d.set_defaults(handler=_dream, beam=False)


def _register_explain(sub) -> None:
    from pipelines.options import positive_int

    e = sub.add_parser(
        "explain", help="why a result matched a query: saliency maps of the similarity, side by side",
        description="Occlusion (default; ~170 forward passes per image at 224 px, seconds on a CPU), gradient or "
                    "guided-backpropagation maps of the product's similarity between the query and one result.")
    _index_args(e)
    e.add_argument("query")
    e.add_argument("--result", default=None, metavar="IMAGE_ID", help="the result to explain (default: by --rank)")
    e.add_argument("--rank", type=positive_int, default=1, help="explain the query's result at this rank")
    e.add_argument("--method", choices=("occlusion", "gradient", "guided"), default="occlusion")
    e.add_argument("--patch", type=positive_int, default=32, help="occlusion patch side in model pixels")
    e.add_argument("--stride", type=positive_int, default=16, help="occlusion stride in model pixels")
    e.add_argument("--output", required=True, help="PNG path (figures go next to it as .json)")
    e.set_defaults(handler=_explain, beam=False)


def _register_map(sub) -> None:
    from pipelines.options import non_negative_int, positive_int

    m = sub.add_parser(
        "map", help="a 2-D map of an index (PCA or t-SNE) with thumbnails coloured by label",
        description="Indexes above --sample items (default 2000) are sampled uniformly (seeded) to that size. "
                    "t-SNE of 2000 items takes about half a minute on two CPU cores, PCA a second.")
    _index_args(m)
    m.add_argument("--method", choices=("tsne", "pca"), default="tsne")
    m.add_argument("--sample", type=positive_int, default=2000, help="draw at most this many items (default 2000)")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--thumb", type=positive_int, default=40, help="thumbnail side in pixels")
    m.add_argument("--canvas", type=non_negative_int, default=0,
                   help="map side in pixels (default: from the number of items, 600 to 1400)")
    m.add_argument("--no-thumbnails", action="store_true", help="coloured squares only (no image reads)")
    m.add_argument("--output", required=True, help="PNG path (figures go next to it as .json)")
    m.set_defaults(handler=_map, beam=False)


def _register_adversarial(sub) -> None:
    from pipelines.options import non_negative_int, non_negative_int_list, positive_int

    a = sub.add_parser(
        "adversarial", help="FGSM / PGD against retrieval: self-hit, target rank, P@10 against eps, before and "
                            "after the query path's JPEG",
        description="Over a sample of indexed photos. Defaults (20 photos, eps 0,1,2,4,8, both attacks, 10 PGD "
                    "steps) take about a minute with MobileNet v1 0.25 on two CPU cores; InceptionV3 about ten.")
    _index_args(a)
    a.add_argument("--attack", default="fgsm,pgd", help="fgsm, pgd, or both comma-separated (default both)")
    a.add_argument("--eps", type=non_negative_int_list, default=(0, 1, 2, 4, 8),
                   help="L∞ budgets in grey levels of 0-255")
    a.add_argument("--target", default="random",
                   help="targeted attacks towards a random item of another label (random), one IMAGE_ID, or none")
    a.add_argument("--sample", type=positive_int, default=20, help="indexed photos attacked (default 20)")
    a.add_argument("--steps", type=positive_int, default=10, help="PGD steps")
    a.add_argument("--jpeg", type=non_negative_int_list, default=(95, 75), help="JPEG qualities a client sends")
    a.add_argument("--pictures", type=non_negative_int, default=1, help="pictures per attack and goal")
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--json", action="store_true", help="print the report as JSON")
    a.add_argument("--output", required=True, help="folder: report.json, report.md and one PNG per attack")
    a.set_defaults(handler=_adversarial, beam=False)
