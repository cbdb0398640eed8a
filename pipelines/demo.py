"""The end-to-end demo behind ``./run_local.sh``: extract → index → query on one machine.

With no ``--input`` it builds a small labelled corpus from the photographs that
scikit-image ships inside its wheel (astronaut, cat, coffee, rocket, …): each
photo in several variants (mirror, crops, rotation, exposure, JPEG quality)
under a folder named after it, plus two broken files to show failure
accounting. Queries are further variants that are not in the corpus.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import sys
import time

from PIL import Image, ImageEnhance, ImageOps

from pipelines.quiet import quiet_known_noise, quiet_tensorflow

log = logging.getLogger("cbir.demo")

SAMPLE_PHOTOS = (
    "astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png", "hubble_deep_field.jpg",
    "retina.jpg", "ihc.png", "horse.png", "camera.png", "coins.png", "moon.png", "brick.png", "grass.png",
    "gravel.png", "page.png", "text.png", "logo.png", "color.png", "cell.png",
)


def _variants(im: Image.Image) -> dict[str, Image.Image]:
    w, h = im.size
    return {
        "original": im,
        "mirror": ImageOps.mirror(im),
        "crop_center": im.crop((w // 8, h // 8, w - w // 8, h - h // 8)),
        "crop_corner": im.crop((0, 0, int(w * 0.8), int(h * 0.8))),
        "rotate": im.rotate(12, resample=Image.Resampling.BILINEAR, expand=False),
        "dark": ImageEnhance.Brightness(im).enhance(0.6),
    }


def _query_variant(im: Image.Image) -> Image.Image:
    w, h = im.size
    return ImageEnhance.Contrast(ImageOps.mirror(im.crop((w // 10, h // 6, w - w // 12, h)))).enhance(1.3)


def build_sample_corpus(root: str) -> tuple[str, list[str]]:
    """Writes the sample corpus under ``root``; returns (corpus folder, query files)."""
    import skimage

    source = os.path.join(os.path.dirname(skimage.__file__), "data")
    corpus, queries = os.path.join(root, "sample_corpus"), os.path.join(root, "sample_queries")
    os.makedirs(queries, exist_ok=True)
    query_files = []
    for name in SAMPLE_PHOTOS:
        path = os.path.join(source, name)
        if not os.path.exists(path):
            continue
        base = os.path.splitext(name)[0]
        im = Image.open(path)
        im = im.convert("RGB")
        folder = os.path.join(corpus, base)
        os.makedirs(folder, exist_ok=True)
        for variant, img in _variants(im).items():
            quality = 35 if variant == "dark" else 90
            img.save(os.path.join(folder, f"{variant}.jpg"), quality=quality)
        qpath = os.path.join(queries, f"{base}.jpg")
        _query_variant(im).save(qpath, quality=85)
        query_files.append(qpath)
    broken = os.path.join(corpus, "broken")
    os.makedirs(broken, exist_ok=True)
    buf = io.BytesIO()
    Image.open(os.path.join(source, "chelsea.png")).convert("RGB").save(buf, format="JPEG")
    with open(os.path.join(broken, "truncated.jpg"), "wb") as f:
        f.write(buf.getvalue()[: len(buf.getvalue()) // 3])
    with open(os.path.join(broken, "not_an_image.jpg"), "wb") as f:
        f.write(b"this is a text file with a .jpg name\n")
    return corpus, query_files


def _sample_queries(corpus: str, n: int) -> list[str]:
    """A few images from different folders of a user corpus, for the demo queries."""
    picked, seen = [], set()
    for dirpath, _, files in sorted(os.walk(corpus)):
        for f in sorted(files):
            if f.lower().endswith((".jpg", ".jpeg", ".png")) and dirpath not in seen:
                picked.append(os.path.join(dirpath, f))
                seen.add(dirpath)
                break
        if len(picked) >= n:
            break
    return picked


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="cbir end-to-end demo on the DirectRunner")
    parser.add_argument("--input", default=None, help="image folder (default: a built-in sample corpus)")
    parser.add_argument("--output", default="out/demo")
    parser.add_argument("--model", default="mobilenet_v1_025")
    parser.add_argument("--weights-dir", default=None)
    parser.add_argument("--runtime", choices=("auto", "keras", "graph", "xla", "litert"), default="auto",
                        help="how the backbone runs, as cbir extract --runtime (default auto)")
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--dims", type=int, default=64)
    parser.add_argument("--queries", type=int, default=4)
    args, beam_args = parser.parse_known_args(argv)
    quiet_tensorflow()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    quiet_known_noise()
    for noisy in ("apache_beam", "absl", "tensorflow", "root", "faiss"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    from models.backbone.network import ModelSpec
    from pipelines import extract, index
    from pipelines.query import format_table, run_query
    from search.options import Rerank, SearchOptions
    from transforms.inference import BatchingOptions

    out = os.path.abspath(args.output)
    if args.input:
        corpus, queries = args.input, _sample_queries(args.input, args.queries)
        print(f"corpus: {corpus}")
    else:
        corpus, queries = build_sample_corpus(out)
        queries = queries[: args.queries]
        print(f"corpus: built-in sample ({corpus}): scikit-image's bundled photos in 6 variants each, "
              "plus 2 broken files")

    stages = {}
    t = time.time()
    fm = extract.run(
        extract.ExtractConfig(
            input=corpus, output=os.path.join(out, "features"),
            model=ModelSpec(args.model, weights_dir=args.weights_dir, runtime=args.runtime),
            batching=BatchingOptions(),
        ),
        beam_args,
    )
    stages["extract"] = time.time() - t
    extract.print_summary(fm)

    t = time.time()
    dims = min(args.dims, max(1, fm.counts.ok - 1))
    im = index.run(index.IndexConfig(features=os.path.join(out, "features"), output=os.path.join(out, "index"),
                                     shards=args.shards, dims=dims), beam_args)
    stages["index"] = time.time() - t
    index.print_summary(im)

    t = time.time()
    sheet = os.path.join(out, "contact_sheet.png")
    rows, failures, timings = run_query(os.path.join(out, "index"), queries,
                                        SearchOptions(k=5, rerank=Rerank(exact=True)),
                                        weights_dir=args.weights_dir, sheet=sheet, runtime=args.runtime)
    stages["query"] = time.time() - t
    print(format_table(rows))
    print()
    print("stage      seconds   items   items/s")
    counts = {"extract": fm.counts.read, "index": im.items, "query": timings["queries"]}
    for stage, secs in stages.items():
        print(f"{stage:<9} {secs:>8.1f} {counts[stage]:>7} {counts[stage] / secs:>9.1f}")
    print(f"\nfeatures: {os.path.join(out, 'features')}\nindex:    {os.path.join(out, 'index')} "
          f"({im.bytes / 1e6:.1f} MB)\nsheet:    {sheet}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
