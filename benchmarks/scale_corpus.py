"""A large corpus of small, distinct real images made from the dev photos (never committed).

Every image is a random crop (25–100 % of the area) of one dev photo, possibly mirrored,
with its exposure and colour moved a little, resized so that its long side is 64–128 px and
saved as JPEG at quality 70–95. Labels are the source photo's folder, so retrieval
quality can still be read off the corpus. Distinctness is checked by sha256: a variant
whose bytes repeat an earlier one is drawn again.

    .venv/bin/python -m benchmarks.scale_corpus --output /tmp/scale --images 103200
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import io
import logging
import os
import time
from multiprocessing import Pool

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

log = logging.getLogger("scale_corpus")

DATA = os.environ.get("CBIR_DATA_DIR", os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))


def dev_photos() -> list[str]:
    paths = sorted(glob.glob(os.path.join(DATA, "flowers17-dev", "*", "*.jpg")))
    paths += sorted(glob.glob(os.path.join(DATA, "imagenette-dev", "*", "*.JPEG")))
    if not paths:
        raise FileNotFoundError(f"no dev photos under {DATA}: set CBIR_DATA_DIR")
    return paths


def _variant(im: Image.Image, rng: np.random.Generator) -> bytes:
    w, h = im.size
    area = rng.uniform(0.25, 1.0)
    aspect = rng.uniform(0.75, 1.33)
    cw = int(min(w, max(16, round((area * w * h * aspect) ** 0.5))))
    ch = int(min(h, max(16, round((area * w * h / aspect) ** 0.5))))
    x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    out = im.crop((x, y, x + cw, y + ch))
    if rng.random() < 0.5:
        out = ImageOps.mirror(out)
    out = ImageEnhance.Brightness(out).enhance(rng.uniform(0.8, 1.2))
    out = ImageEnhance.Color(out).enhance(rng.uniform(0.8, 1.2))
    side = int(rng.integers(64, 129))
    scale = side / max(out.size)
    out = out.resize((max(8, round(out.size[0] * scale)), max(8, round(out.size[1] * scale))),
                     Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    out.save(buf, format="JPEG", quality=int(rng.integers(70, 96)))
    return buf.getvalue()


def _make(task: tuple[str, str, int, int]) -> list[str]:
    """Writes ``per_photo`` variants of one photo; returns their sha256 digests."""
    path, root, per_photo, seed = task
    rng = np.random.default_rng(seed)
    label = os.path.basename(os.path.dirname(path))
    stem = os.path.splitext(os.path.basename(path))[0]
    folder = os.path.join(root, label)
    os.makedirs(folder, exist_ok=True)
    im = Image.open(path)
    im.draft("RGB", (256, 256))
    im = im.convert("RGB")
    digests, seen = [], set()
    for k in range(per_photo):
        data = _variant(im, rng)
        while hashlib.sha256(data).digest() in seen:
            data = _variant(im, rng)
        seen.add(hashlib.sha256(data).digest())
        with open(os.path.join(folder, f"{stem}_{k:03d}.jpg"), "wb") as f:
            f.write(data)
        digests.append(hashlib.sha256(data).hexdigest())
    return digests


def make_corpus(root: str, images: int, seed: int = 0, processes: int | None = None) -> int:
    """Writes ``images`` distinct JPEGs under ``root/<label>/``; returns how many it wrote."""
    photos = dev_photos()
    per_photo = -(-images // len(photos))
    tasks = [(p, root, per_photo, seed * 1_000_003 + i) for i, p in enumerate(photos)]
    t = time.perf_counter()
    with Pool(processes or os.cpu_count()) as pool:
        digests = [d for part in pool.imap_unordered(_make, tasks, chunksize=8) for d in part]
    if len(set(digests)) != len(digests):
        raise RuntimeError(f"{len(digests) - len(set(digests))} repeated images in the corpus")
    log.info("%d distinct images in %.1fs under %s", len(digests), time.perf_counter() - t, root)
    return len(digests)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True)
    parser.add_argument("--images", type=int, default=103_200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    n = make_corpus(args.output, args.images, args.seed)
    print(f"{n} images under {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
