"""Extract throughput: the whole Beam pipeline against the bare model, side by side.

For each backbone it measures, in one run on the same photos:

* ``model loop``: Backbone.predict over batches of already-decoded pixels (the ceiling);
* ``decode``: decode + resize alone, one core;
* ``parquet``: Arrow conversion + Parquet write of the feature rows alone;
* ``pipeline``: ``pipelines.extract.run`` end to end on the DirectRunner (read, decode,
  RunInference, Parquet, publish), in-memory and multi-process modes;

and reports pipeline / model-loop ratios. Each pipeline mode also runs over a small
corpus (one batch of photos) so its fixed cost (pipeline construction, model load,
publish) can be taken out: ``marginal`` = (photos − small photos) / (wall − small wall),
the rate a nightly job over millions of photos runs at. It also measures what float16 feature
storage costs in retrieval quality (precision@10 and mAP of same-label neighbours).

    .venv/bin/python -m benchmarks.bench_extract                  # full run, writes RESULTS.md
    .venv/bin/python -m benchmarks.bench_extract --quick          # 120 photos, prints only
"""

from __future__ import annotations

import argparse
import glob
import logging
import os
import shutil
import tempfile
import time

import numpy as np

from benchmarks._results import machine, md_table, update_section

log = logging.getLogger("bench_extract")

DATA = os.environ.get("CBIR_DATA_DIR", os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))


def _photos(limit: int | None) -> tuple[str, list[str]]:
    """A temporary folder with copies of the dev photos (both sets): readers do not follow links."""
    paths = sorted(glob.glob(os.path.join(DATA, "flowers17-dev", "*", "*.jpg")))
    paths += sorted(glob.glob(os.path.join(DATA, "imagenette-dev", "*", "*.JPEG")))
    if limit:
        paths = paths[:: max(1, len(paths) // limit)][:limit]
    root = tempfile.mkdtemp(prefix="bench-extract-")
    for p in paths:
        label = os.path.basename(os.path.dirname(p))
        os.makedirs(os.path.join(root, label), exist_ok=True)
        shutil.copyfile(p, os.path.join(root, label, os.path.basename(p)))
    return root, paths


def _model_loop(spec, pixels: np.ndarray, batch: int) -> float:
    from models.backbone.network import Backbone

    backbone = Backbone(spec)
    backbone.predict(pixels[:batch])  # trace and warm up
    t = time.perf_counter()
    for i in range(0, len(pixels), batch):
        backbone.predict(pixels[i:i + batch])
    return len(pixels) / (time.perf_counter() - t)


def _decode_rate(paths: list[str], size: int) -> tuple[float, np.ndarray]:
    from models.backbone.imaging import decode_and_resize

    blobs = [open(p, "rb").read() for p in paths]
    t = time.perf_counter()
    pixels = np.stack([decode_and_resize(b, size).pixels for b in blobs])
    return len(blobs) / (time.perf_counter() - t), pixels


def _parquet_rate(n: int, dim: int) -> float:
    import pyarrow.parquet as pq

    from transforms.features_io import feature_schema, rows_to_table
    from transforms.records import FeatureRow, ImageMeta

    rows = [FeatureRow(ImageMeta(f"id/{i}.jpg", f"/x/id/{i}.jpg", "l", "0" * 64, 500, 400),
                       np.random.default_rng(i).random(dim, dtype=np.float32)) for i in range(n)]
    out = tempfile.mkdtemp()
    t = time.perf_counter()
    for i in range(0, n, 1024):
        pq.write_table(rows_to_table(rows[i:i + 1024], feature_schema(dim)), os.path.join(out, f"{i}.parquet"))
    rate = n / (time.perf_counter() - t)
    shutil.rmtree(out)
    return rate


def _pipeline(spec, corpus: str, batch: int, beam_args: list[str]) -> dict:
    from pipelines import extract
    from transforms.inference import BatchingOptions

    out = tempfile.mkdtemp(prefix="bench-extract-out-")
    try:
        t = time.perf_counter()
        m = extract.run(extract.ExtractConfig(
            input=corpus, output=out, model=spec, batching=BatchingOptions(min_batch_size=batch // 2,
                                                                            max_batch_size=batch)), beam_args)
        return {"wall": time.perf_counter() - t, "ok": m.counts.ok}
    finally:
        shutil.rmtree(out, ignore_errors=True)


def _quality(vectors: np.ndarray, labels: list[str]) -> tuple[float, float]:
    """precision@10 and mAP of same-label neighbours, exact cosine, leave-one-out."""
    v = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    sims = v @ v.T
    np.fill_diagonal(sims, -np.inf)
    order = np.argsort(-sims, axis=1)[:, :-1]
    lab = np.asarray(labels)
    rel = lab[order] == lab[:, None]
    p10 = float(rel[:, :10].mean())
    hits = np.cumsum(rel, axis=1)
    ranks = np.arange(1, rel.shape[1] + 1)
    ap = (rel * hits / ranks).sum(axis=1) / np.maximum(rel.sum(axis=1), 1)
    return p10, float(ap.mean())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="mobilenet_v1_025,inception_v3")
    parser.add_argument("--images", type=int, default=0, help="limit the number of photos (0: all 1,720)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--quick", action="store_true",
                        help="120 photos unless --images; MobileNet only; no RESULTS.md")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from models.backbone.network import ModelSpec

    limit = args.images or (120 if args.quick else None)
    models = ["mobilenet_v1_025"] if args.quick else args.models.split(",")
    corpus, paths = _photos(limit)
    small_corpus, small_paths = _photos(min(args.batch, len(paths)))
    print(f"setup: {machine()}\n       {len(paths)} dev photos, batch {args.batch}, DirectRunner")
    rows, notes = [], []
    try:
        for name in models:
            has_weights = name == "mobilenet_v1_025"
            spec = ModelSpec(name, weights=None if has_weights else "random")
            decode_rate, pixels = _decode_rate(paths, spec.size())
            loop = _model_loop(spec, pixels, args.batch)
            parquet = _parquet_rate(len(paths), spec.preset().dim)
            modes = {
                "in_memory": ["--direct_running_mode=in_memory"],
                f"multi_threading x{args.workers}": ["--direct_running_mode=multi_threading",
                                                     f"--direct_num_workers={args.workers}"],
                f"multi_processing x{args.workers}": ["--direct_running_mode=multi_processing",
                                                      f"--direct_num_workers={args.workers}"],
            }
            for mode, beam_args in modes.items():
                small = _pipeline(spec, small_corpus, args.batch, beam_args)
                m = _pipeline(spec, corpus, args.batch, beam_args)
                rate = m["ok"] / m["wall"]
                marginal = (m["ok"] - small["ok"]) / max(1e-9, m["wall"] - small["wall"])
                rows.append([name, "pretrained" if has_weights else "random", mode, f"{loop:.1f}",
                             f"{decode_rate:.0f}", f"{parquet:.0f}", f"{rate:.1f}", f"{rate / loop:.2f}",
                             f"{m['wall']:.1f}", f"{small['wall']:.1f}", f"{marginal:.1f}",
                             f"{marginal / loop:.2f}"])
                print(" | ".join(rows[-1]), flush=True)
            if has_weights:
                import pyarrow as pa  # noqa: F401

                from pipelines import extract
                from transforms import features_io
                from transforms.feature_sets import feature_files

                out = tempfile.mkdtemp()
                extract.run(extract.ExtractConfig(input=corpus, output=out, model=spec))
                tables = [features_io.read_table(p) for p in feature_files(out)]
                vec = np.concatenate([features_io.feature_matrix(t) for t in tables])
                labels = [lab for t in tables for lab in t.column("label").to_pylist()]
                shutil.rmtree(out)
                p32, m32 = _quality(vec, labels)
                p16, m16 = _quality(vec.astype(np.float16).astype(np.float32), labels)
                notes.append(md_table(
                    ["storage", "bytes/vector", "precision@10", "mAP"],
                    [["float32", spec.preset().dim * 4, f"{p32:.4f}", f"{m32:.4f}"],
                     ["float16", spec.preset().dim * 2, f"{p16:.4f}", f"{m16:.4f}"]],
                ))
                print(notes[-1])
    finally:
        shutil.rmtree(corpus, ignore_errors=True)
        shutil.rmtree(small_corpus, ignore_errors=True)
    table = md_table(["model", "weights", "runner mode", "model loop img/s", "decode img/s (1 core)",
                      "parquet rows/s", "pipeline img/s", "pipeline / loop", "pipeline wall s",
                      f"wall s, {len(small_paths)} photos", "marginal img/s", "marginal / loop"], rows)
    print(table)
    if not args.quick:
        update_section("bench_extract", "\n\n".join([
            "## Extract: pipeline against the bare model",
            "`.venv/bin/python -m benchmarks.bench_extract`",
            f"Setup: {machine()}; {len(paths)} dev photos (flowers17-dev + imagenette-dev), batch {args.batch}. "
            "`model loop` is Backbone.predict over already-decoded pixels; `pipeline` is `cbir extract` end to end "
            "on the DirectRunner (read, decode, RunInference, Parquet, publish; model load and pipeline start-up "
            "included in the wall time). `marginal` takes out the fixed cost measured by the same mode over "
            f"{len(small_paths)} photos: (photos − {len(small_paths)}) / (wall − small wall), the rate of a long job.",
            table,
            "Feature storage cost on the same photos (MobileNet v1 0.25, leave-one-out same-label retrieval):",
            *notes,
        ]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
