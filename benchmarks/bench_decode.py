"""Decode + resize per core, full decode against reduced-scale JPEG decode, and what it does to features.

Two sets of the same pictures, measured in one run:

* ``dev``: the flowers17 dev photos as they are (about 0.3 MP);
* ``12 MP``: the same photos upscaled to 12 megapixels and re-encoded as JPEG (quality 90) in a
  temporary folder, the size a phone or camera delivers.

For each set, ``models.backbone.imaging.decode_and_resize`` runs in one process (one core) with
``reduced_decode=False`` (the baseline: full decode, then a bilinear squash) and with
``reduced_decode=True`` (Pillow draft mode: the JPEG is decoded at 1/2, 1/4 or 1/8 scale in
the DCT domain, never below the target side, then squashed), and with the reduction stopped
at twice the target side (``draft_side=2*size``). Best of ``--repeat`` passes.

Then the cost in quality: MobileNet v1 0.25 features (the test backbone, real weights) of the
full and the reduced decode of every photo, compared by cosine similarity. For scale, the same
figure for a full decode of the photo against a full decode of the photo re-saved as JPEG
quality 85, a change nobody would call a different picture. And what it does to retrieval:
same-label precision@10 over the dev photos with each decode.

    .venv/bin/python -m benchmarks.bench_decode             # full run, writes the bench_decode section of RESULTS.md
    .venv/bin/python -m benchmarks.bench_decode --quick     # small run, prints only
"""

from __future__ import annotations

import argparse
import glob
import io
import logging
import math
import os
import shlex
import sys
import tempfile
import time

import numpy as np
from PIL import Image

from benchmarks._results import machine, md_table, update_section
from evaluation.metrics import label_precision_at_k
from models.backbone.imaging import decode_and_resize, open_image

log = logging.getLogger("bench_decode")

DATA = os.environ.get("CBIR_DATA_DIR", os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))


def dev_photos(limit: int) -> list[str]:
    paths = sorted(glob.glob(os.path.join(DATA, "flowers17-dev", "*", "*.jpg")))
    if not paths:
        sys.exit(f"no photos under {DATA}/flowers17-dev: set CBIR_DATA_DIR")
    return paths[:: max(1, len(paths) // limit)][:limit]


def make_12mp(paths: list[str], folder: str, megapixels: float = 12.0) -> list[str]:
    """The same photos upscaled to ``megapixels`` (aspect kept) and saved as JPEG q90 in ``folder``."""
    out = []
    for i, p in enumerate(paths):
        with Image.open(p) as im:
            im = im.convert("RGB")
            f = math.sqrt(megapixels * 1e6 / (im.width * im.height))
            big = im.resize((round(im.width * f), round(im.height * f)), Image.Resampling.BICUBIC)
        dest = os.path.join(folder, f"{i:04d}.jpg")
        big.save(dest, "JPEG", quality=90)
        out.append(dest)
    return out


# name → (reduced_decode, draft_side as a multiple of the target side)
MODES = {"full": (False, 1), "reduced (default)": (True, 1), "reduced, ≥2× target": (True, 2)}


def time_decode(blobs: list[bytes], size: int, mode: str, repeat: int) -> tuple[float, list]:
    """Best images/s over ``repeat`` passes in this process (one core), and the decoded images."""
    reduced, margin = MODES[mode]
    best, decoded = 0.0, []
    for _ in range(repeat):
        t = time.perf_counter()
        decoded = [decode_and_resize(b, size, reduced_decode=reduced, draft_side=size * margin) for b in blobs]
        best = max(best, len(blobs) / (time.perf_counter() - t))
    return best, decoded


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return np.sum(a * b, axis=1)


def resave(blob: bytes, quality: int = 85) -> bytes:
    buf = io.BytesIO()
    with Image.open(io.BytesIO(blob)) as im:
        im.convert("RGB").save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--photos", type=int, default=720, help="dev photos (flowers17-dev, about 0.3 MP)")
    ap.add_argument("--big", type=int, default=40, help="photos re-encoded at 12 MP")
    ap.add_argument("--size", type=int, default=224, help="target side (MobileNet / ResNet 224, Inception 299)")
    ap.add_argument("--repeat", type=int, default=3, help="timing passes; the best counts")
    ap.add_argument("--model", default="mobilenet_v1_025", help="backbone for the feature-movement figure")
    ap.add_argument("--weights-dir", default=None)
    ap.add_argument("--quick", action="store_true", help="30 + 4 photos, one pass, print only (no RESULTS.md)")
    ap.add_argument("--no-results", action="store_true", help="print only, whatever the scale")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if args.quick:
        args.photos, args.big, args.repeat = 30, 4, 1
    command = "python -m benchmarks.bench_decode " + shlex.join(argv if argv is not None else sys.argv[1:])

    from models.backbone.network import Backbone, ModelSpec

    backbone = Backbone(ModelSpec(args.model, weights_dir=args.weights_dir))
    if backbone.size != args.size:
        log.info("the model eats %d px; using that as the target side", backbone.size)
        args.size = backbone.size

    paths = dev_photos(args.photos)
    with tempfile.TemporaryDirectory(prefix="bench-decode-") as tmp:
        started = time.perf_counter()
        big_paths = make_12mp(paths[:: max(1, len(paths) // args.big)][: args.big], tmp)
        log.info("wrote %d photos at 12 MP in %.1fs", len(big_paths), time.perf_counter() - started)
        sets = {
            "dev": [open(p, "rb").read() for p in paths],
            "12 MP": [open(p, "rb").read() for p in big_paths],
        }

    print(f"# bench_decode on {machine()}")
    print(f"target {args.size}x{args.size}, model {args.model}, {args.repeat} pass(es), one process")
    speed_rows, feature_rows, retrieval = [], [], []
    labels = [os.path.basename(os.path.dirname(p)) for p in paths]
    for name, blobs in sets.items():
        mp = np.mean([math.prod(open_image(b).size) for b in blobs]) / 1e6  # header only
        decoded, rates = {}, {}
        for mode in MODES:
            rates[mode], decoded[mode] = time_decode(blobs, args.size, mode, args.repeat)
            log.info("%s %s: %.1f images/s", name, mode, rates[mode])
        feats = {mode: backbone.predict(np.stack([d.pixels for d in decoded[mode]])) for mode in MODES}
        resaved = [decode_and_resize(resave(b), args.size, reduced_decode=False).pixels for b in blobs]
        base = cosines(feats["full"], backbone.predict(np.stack(resaved)))
        for mode in MODES:
            reduced = np.asarray([d.reduced_scale > 1 for d in decoded[mode]])
            scales = sorted({d.reduced_scale for d in decoded[mode] if d.reduced_scale > 1})
            speed_rows.append([name, len(blobs), f"{mp:.2f}", mode, f"{rates[mode]:.1f}",
                               f"{1000 / rates[mode]:.2f}", f"{rates[mode] / rates['full']:.2f}",
                               f"{reduced.sum()}/{len(blobs)}" + (f" (1/{', 1/'.join(map(str, scales))})"
                                                                  if scales else "")])
            if mode == "full":
                continue
            cos = cosines(feats["full"], feats[mode])[reduced] if reduced.any() else np.ones(1)
            pix = np.mean([np.mean(np.abs(a.pixels.astype(np.int16) - b.pixels.astype(np.int16)))
                           for a, b, r in zip(decoded["full"], decoded[mode], reduced, strict=True) if r] or [0.0])
            feature_rows.append([name, mode, f"{reduced.sum()}/{len(blobs)}", f"{pix:.2f}", f"{cos.mean():.4f}",
                                 f"{cos.min():.4f}", f"{np.percentile(cos, 5):.4f}", f"{base.mean():.4f}",
                                 f"{base.min():.4f}"])
        if name == "dev":
            retrieval = [[mode, f"{label_precision_at_k(feats[mode], labels):.4f}"] for mode in MODES]

    speed = md_table(["photos", "n", "mean MP", "decode", "images/s per core", "ms/image", "vs full",
                      "decoded at reduced scale"], speed_rows)
    features = md_table(["photos", "decode", "reduced", "mean abs pixel diff", "cosine mean", "cosine min",
                         "cosine p5", "JPEG q85 re-save: cosine mean", "re-save min"], feature_rows)
    precision = md_table(["decode (corpus and queries)", "same-label precision@10"], retrieval)
    text = (
        "## bench_decode: decode + resize per core, full vs reduced-scale JPEG decode\n\n"
        f"`{command}` on {machine()}.\n\n"
        f"Target {args.size}x{args.size} (bilinear squash), one process, best of {args.repeat} pass(es). "
        "`full`: Pillow decodes every pixel, then resizes (the baseline). `reduced`: JPEGs at least twice the "
        "target on the short side are decoded at 1/2, 1/4 or 1/8 scale in the DCT domain (draft mode), never "
        "below the target, then resized (what `cbir extract` does unless `--full-decode`); `reduced, ≥2× target` "
        "(`draft_side=2*size`) never goes below twice the target. The 12 MP set is the dev photos upscaled and "
        "re-saved as JPEG q90.\n\n"
        f"{speed}\n\n"
        f"What it does to {args.model} features (cosine between the features of the full and the reduced "
        "decode of the same photo, over the photos that were reduced), next to what re-saving the photo as "
        "JPEG quality 85 does to them:\n\n"
        f"{features}\n\n"
        f"Retrieval on the {len(paths)} dev photos with each decode (exact cosine, every photo a query):\n\n"
        f"{precision}\n"
    )
    print(text)
    if args.quick or args.no_results:
        print("(RESULTS.md not written)")
    else:
        update_section("bench_decode", text)
        print("wrote the bench_decode section of benchmarks/RESULTS.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
