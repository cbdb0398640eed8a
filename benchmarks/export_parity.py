"""How close are the exported SavedModel's features to the batch pipeline's?

The pipeline decodes with Pillow (reduced-scale JPEG draft, EXIF transpose, bilinear
squash); the exported ``serving_default`` signature decodes in the graph. This
measures, on real photos, the cosine between the two feature vectors per image and
whether retrieval changes (top-1 / top-10 neighbours of each photo among the pipeline's
features), for the exported decode and for the alternatives it was chosen over:

* ``export``: decode_jpeg at Pillow's reduced scale with the accurate DCT, bilinear antialias resize;
* ``full-decode``: the same but always decoding JPEG at full scale (what decode_image alone does);
* ``no-antialias``: reduced-scale decode, plain bilinear resize (tf.image.resize's default).

imagenette-dev photos are 224×224 already (no resize: both decodes agree exactly), flowers17-dev
photos are at least twice the input size (reduced-scale JPEG decode, then a resize); a third set,
the flowers re-encoded at 400×300, covers the full-scale decode with a downscale.

It also checks that the ``pixels`` signature equals ``Backbone.predict`` and times both paths.

    .venv/bin/python -m benchmarks.export_parity            # all of flowers17-dev + imagenette-dev (+ 240)
    .venv/bin/python -m benchmarks.export_parity --quick    # 72 photos, prints only (no RESULTS.md)
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks._results import machine, md_table, update_section  # noqa: E402

SECTION = "export_parity"
DATASETS = ("flowers17-dev", "imagenette-dev")
REENCODED = "flowers17-dev at 400x300"


def _photos(data_dir: Path, per_dataset: int | None) -> list[tuple[str, bytes]]:
    import io

    from PIL import Image

    out = []
    for name in DATASETS:
        files = sorted(p for p in (data_dir / name).rglob("*") if p.is_file())
        if per_dataset:
            step = max(1, len(files) // per_dataset)
            files = files[::step][:per_dataset]
        out += [(name, p.read_bytes()) for p in files]
    flowers = [b for d, b in out if d == DATASETS[0]]
    for blob in flowers[:: max(1, len(flowers) // (per_dataset or 240))]:
        buf = io.BytesIO()
        Image.open(io.BytesIO(blob)).convert("RGB").resize((400, 300), Image.Resampling.LANCZOS).save(
            buf, "JPEG", quality=90)
        out.append((REENCODED, buf.getvalue()))
    return out


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def _neighbours(queries: np.ndarray, corpus: np.ndarray, k: int) -> np.ndarray:
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    c = corpus / np.linalg.norm(corpus, axis=1, keepdims=True)
    sims = q @ c.T
    np.fill_diagonal(sims, -np.inf)  # leave-one-out: a photo is not its own neighbour
    return np.argsort(-sims, axis=1)[:, :k]


def _batched(fn, items: list, batch: int) -> np.ndarray:
    return np.concatenate([fn(items[i:i + batch]) for i in range(0, len(items), batch)])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mobilenet_v1_025")
    ap.add_argument("--data-dir", default=os.environ.get("CBIR_DATA_DIR") or str(REPO.parent / "shared" / "data"))
    ap.add_argument("--weights-dir", default=os.environ.get("CBIR_WEIGHTS_DIR"))
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--quick", action="store_true", help="24 photos per set; print, do not write RESULTS.md")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    import tensorflow as tf

    from models.backbone import export, graph_decode
    from models.backbone.imaging import decode_and_resize
    from models.backbone.network import Backbone, ModelSpec

    photos = _photos(Path(args.data_dir), 24 if args.quick else None)
    blobs = [b for _, b in photos]
    names = np.array([d for d, _ in photos])
    sets = (*DATASETS, REENCODED)
    spec = ModelSpec(args.model, weights_dir=args.weights_dir)
    backbone = Backbone(spec)
    size = backbone.size
    print(f"export parity: {args.model} ({size} px, {backbone.dim}-d), {len(photos)} photos "
          f"({', '.join(f'{d}: {(names == d).sum()}' for d in sets)}), batch {args.batch_size}")
    print(f"machine: {machine()}")

    # The pipeline: Pillow decode (DecodeFn) + Backbone.predict (RunInference), batched the same way.
    backbone.predict(np.zeros((2, size, size, 3), np.float32))  # first call traces; not timed
    t0 = time.perf_counter()
    ref = _batched(lambda b: backbone.predict(np.stack([decode_and_resize(x, size).pixels for x in b])),
                   blobs, args.batch_size)
    pipeline_s = time.perf_counter() - t0

    with tempfile.TemporaryDirectory() as tmp:
        result = export.export_savedmodel(spec, tmp, version=1, warmup=False)
        loaded = tf.saved_model.load(result.path)
        serve = loaded.signatures[export.BYTES_SIGNATURE]
        pixels_sig = loaded.signatures[export.PIXELS_SIGNATURE]
        serve(images=tf.constant(blobs[:2]))  # first call traces; not timed
        t0 = time.perf_counter()
        served = _batched(lambda b: serve(images=tf.constant(b))[export.FEATURES_OUTPUT].numpy(), blobs,
                          args.batch_size)
        served_s = time.perf_counter() - t0
        sample = np.stack([decode_and_resize(x, size).pixels for x in blobs[:args.batch_size]]).astype(np.float32)
        pixel_diff = float(np.abs(pixels_sig(pixels=tf.constant(sample))[export.FEATURES_OUTPUT].numpy()
                                  - backbone.predict(sample)).max())

    def variant(reduced: bool, antialias: bool) -> np.ndarray:
        fn = tf.function(lambda b: graph_decode.decode_batch(b, size, reduced_decode=reduced, antialias=antialias),
                         autograph=False)
        return _batched(lambda b: backbone.predict(fn(tf.constant(b)).numpy()), blobs, args.batch_size)

    variants = {
        "export (reduced-scale accurate-DCT JPEG, antialias bilinear)": served,
        "full-scale JPEG decode, antialias bilinear": variant(False, True),
        "reduced-scale JPEG, bilinear without antialias": variant(True, False),
    }
    rows = []
    for label, feats in variants.items():
        same1, overlap10 = np.zeros(len(names)), np.zeros(len(names))
        for d in sets:  # neighbours within each set: the re-encoded copies must not answer for their originals
            m = names == d
            ours, theirs = _neighbours(feats[m], ref[m], 10), _neighbours(ref[m], ref[m], 10)
            same1[m] = ours[:, 0] == theirs[:, 0]
            overlap10[m] = [len(set(a) & set(b)) / 10 for a, b in zip(ours, theirs, strict=True)]
        for d in (*sets, "all"):
            m = np.ones(len(names), bool) if d == "all" else names == d
            cos = _cosine(feats[m], ref[m])
            rows.append([label, d, int(m.sum()), f"{cos.min():.5f}", f"{np.percentile(cos, 1):.5f}",
                         f"{cos.mean():.6f}", f"{same1[m].mean():.3f}", f"{overlap10[m].mean():.3f}"])
    headers = ["in-graph decode", "photos", "n", "min cosine", "1st pct", "mean cosine", "same top-1",
               "top-10 overlap"]
    table = md_table(headers, rows)
    rate_pipeline = len(blobs) / pipeline_s
    rate_served = len(blobs) / served_s
    timing = (f"pixels signature vs Backbone.predict on {len(sample)} photos: max |diff| = {pixel_diff:.2e}\n\n"
              f"throughput, decode + features, batch {args.batch_size}, one process: pipeline path (Pillow + "
              f"Backbone.predict) {rate_pipeline:.1f} images/s, exported serving_default {rate_served:.1f} images/s")
    print(table)
    print(timing)
    if args.quick:
        print("(--quick: RESULTS.md not written)")
        return 0
    update_section(SECTION, "\n".join([
        "## Exported SavedModel vs the batch pipeline (features parity)",
        "",
        f"`.venv/bin/python -m benchmarks.export_parity --model {args.model}` — {machine()}.",
        f"{len(photos)} photos; reference = the pipeline's features (Pillow decode + Backbone.predict). "
        "Neighbours are leave-one-out among the reference features of the same set.",
        "",
        table,
        "",
        timing,
    ]))
    print(f"wrote section {SECTION} of benchmarks/RESULTS.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
