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


def _parser() -> argparse.ArgumentParser:
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
    return parser


def _corpus(args: argparse.Namespace, out: str) -> tuple[str, list[str]]:
    """(corpus folder, query files): the user's folder and a few of its images, or the built-in sample."""
    if args.input:
        print(f"corpus: {args.input}")
        return args.input, _sample_queries(args.input, args.queries)
    corpus, queries = build_sample_corpus(out)
    print(f"corpus: built-in sample ({corpus}): scikit-image's bundled photos in 6 variants each, "
          "plus 2 broken files")
    return corpus, queries[: args.queries]


def main(argv: list[str] | None = None) -> int:
    """Runs ``cbir extract``, ``cbir index`` and ``cbir query`` as a user would type them (the jobs' own
    console entry, so the demo is exactly the commands and imports none of the jobs), then the timings."""
    args, beam_args = _parser().parse_known_args(argv)
    quiet_tensorflow()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    quiet_known_noise()
    for noisy in ("apache_beam", "absl", "tensorflow", "root", "faiss"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    from pipelines.cli import main as cbir
    from search.index_files import resolve
    from transforms.feature_sets import read_features_manifest

    out = os.path.abspath(args.output)
    corpus, queries = _corpus(args, out)
    features, index, sheet = (os.path.join(out, name) for name in ("features", "index", "contact_sheet.png"))
    model = ["--runtime", args.runtime] + (["--weights-dir", args.weights_dir] if args.weights_dir else [])
    stages: dict[str, float] = {}

    def stage(name: str, command: list[str]) -> int:
        t = time.time()
        code = cbir([name, *command])
        stages[name] = time.time() - t
        return code

    if code := stage("extract", ["--input", corpus, "--output", features, "--model", args.model, *model, *beam_args]):
        return code
    fm = read_features_manifest(features)
    dims = min(args.dims, max(1, fm.counts.ok - 1))
    if code := stage("index", ["--features", features, "--output", index, "--shards", str(args.shards),
                               "--dims", str(dims), *beam_args]):
        return code
    _, im = resolve(index)
    code = stage("query", ["--index", index, *queries, "-k", "5", "--rerank", "--sheet", sheet, *model])
    print()
    print("stage      seconds   items   items/s")
    counts = {"extract": fm.counts.read, "index": im.items, "query": len(queries)}
    for name, secs in stages.items():
        print(f"{name:<9} {secs:>8.1f} {counts[name]:>7} {counts[name] / secs:>9.1f}")
    print(f"\nfeatures: {features}\nindex:    {index} ({im.bytes / 1e6:.1f} MB)\nsheet:    {sheet}")
    return code


if __name__ == "__main__":
    sys.exit(main())
