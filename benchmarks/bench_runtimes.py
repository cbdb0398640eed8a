"""Backbone runtimes, decode, and `cbir extract` end to end: where the time of an extract goes.

In one run on the same photos and weights:

1. **bare runtimes**: each runtime of ``models/backbone/runtimes.py`` (keras ``predict_on_batch``, the
   traced graph, XLA, LiteRT with XNNPACK) and OpenVINO as a peer (converted from the same
   traced graph) on already-decoded pixels, at several batch sizes, warm, best of
   ``--repeat`` passes; max |Δ| of the features to Keras on the same pixels;
2. **decode**: the product's decode + resize on one core, split into decode and resize, next to
   OpenCV's reduced-scale decode with area resize, and what that alternative does to features
   (cosine to the product's decode); the decode + model bound of two cores is
   ``cores / (decode core-ms + model core-ms)``;
3. **extract end to end**: ``pipelines.extract.run`` (DirectRunner, the default in-memory mode
   and decode pool) with ``--runtime auto`` (the CLI default) against ``--runtime graph`` (the
   code path every release before this one ran: a ``tf.function``), and against a bare loop
   of the same decode pool feeding the same runtime. Each pipeline also runs over one batch
   of photos so its fixed cost can be taken out: ``marginal`` = extra photos / extra seconds.

    .venv/bin/python -m benchmarks.bench_runtimes            # full run, writes its RESULTS.md section
    .venv/bin/python -m benchmarks.bench_runtimes --quick    # tiny run, prints only
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import glob
import logging
import os
import shutil
import sys
import tempfile
import time

import numpy as np

from benchmarks._results import machine, md_table, update_section

log = logging.getLogger("bench_runtimes")

DATA = os.environ.get("CBIR_DATA_DIR", os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))
CORES = os.cpu_count() or 1


def dev_photos() -> list[str]:
    paths = sorted(glob.glob(os.path.join(DATA, "flowers17-dev", "*", "*.jpg")))
    paths += sorted(glob.glob(os.path.join(DATA, "imagenette-dev", "*", "*.JPEG")))
    if not paths:
        sys.exit(f"no photos under {DATA}: set CBIR_DATA_DIR")
    return paths


def corpus(paths: list[str], n: int) -> str:
    """A temporary folder of ``n`` photos (the dev photos repeated under distinct names when n is larger)."""
    root = tempfile.mkdtemp(prefix="bench-runtimes-")
    for i in range(n):
        src = paths[i % len(paths)]
        folder = os.path.join(root, f"{os.path.basename(os.path.dirname(src))}-{i // len(paths)}")
        os.makedirs(folder, exist_ok=True)
        shutil.copyfile(src, os.path.join(folder, os.path.basename(src)))
    return root


def _timed(fn, pixels: np.ndarray, batch: int, repeat: int) -> float:
    """Images/s of ``fn`` over ``pixels`` in batches (warm; best of ``repeat`` passes)."""
    fn(pixels[:batch])
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        for i in range(0, len(pixels) - batch + 1, batch):
            fn(pixels[i:i + batch])
        best = min(best, time.perf_counter() - t)
    return (len(pixels) // batch) * batch / best


def openvino_runner(backbone) -> tuple[object, float]:
    """OpenVINO compiled from the same traced graph, on all cores; (callable, seconds to convert)."""
    import openvino as ov

    t = time.perf_counter()
    model = ov.convert_model(backbone.graph.get_concrete_function())
    compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": CORES})
    seconds = time.perf_counter() - t
    return (lambda pixels: np.asarray(compiled(np.ascontiguousarray(pixels, np.float32))[0])), seconds


def bare_runtimes(spec, pixels: np.ndarray, batches: list[int], repeat: int, only: tuple[str, ...]
                  ) -> tuple[list[list], dict[str, float]]:
    """Rows of the bare table and images/s per runtime at the largest batch."""
    from models.backbone import runtimes
    from models.backbone.network import Backbone

    rows, best = [], {}
    probe = pixels[:16]
    # One instance for every runtime: with random weights (InceptionV3 here) each instance draws its own,
    # so only runtimes of the same instance can be compared.
    keras = Backbone(dataclasses.replace(spec, runtime="keras"))
    reference = keras.predict(probe)
    candidates = [r for r in (*runtimes.RUNTIMES, "openvino") if r in only]
    for name in candidates:
        t = time.perf_counter()
        try:
            if name == "openvino":
                fn, _ = openvino_runner(keras)
            else:
                fn = keras.runner(name)
            diff = float(np.max(np.abs(fn(probe) - reference)))
        except Exception as exc:  # a peer that does not install or convert is reported, not fatal
            rows.append([spec.name, name, "—", "—", "—", f"unavailable: {str(exc).splitlines()[0][:80]}"])
            continue
        setup_s = time.perf_counter() - t
        for batch in batches:
            rate = _timed(fn, pixels, batch, repeat)
            best[name] = rate  # batches ascend: the last one is the largest
            rows.append([spec.name, name, batch, f"{rate:.1f}", f"{2000 / rate * CORES / 2:.2f}",
                         f"{diff:.1e}; setup {setup_s:.1f} s"])
            print(f"  {spec.name:18s} {name:9s} batch {batch:3d}: {rate:8.1f} img/s  max|Δ| {diff:.1e}",
                  flush=True)
    return rows, best


def decode_costs(paths: list[str], size: int, spec, repeat: int) -> tuple[list[list], float, np.ndarray]:
    """Rows of the decode table, the product decode's ms per image on one core, and its pixels."""
    import io

    import cv2
    from PIL import Image

    from models.backbone.imaging import decode_and_resize
    from models.backbone.network import Backbone

    cv2.setNumThreads(1)
    blobs = [open(p, "rb").read() for p in paths]

    def best_ms(fn) -> float:
        best = float("inf")
        for _ in range(repeat):
            t = time.perf_counter()
            for b in blobs:
                fn(b)
            best = min(best, time.perf_counter() - t)
        return best / len(blobs) * 1e3

    def pil_decode(b: bytes):
        im = Image.open(io.BytesIO(b))
        im.draft("RGB", (size, size))
        return im.convert("RGB")

    decoded = [pil_decode(b) for b in blobs]

    def resize_ms() -> float:
        best = float("inf")
        for _ in range(repeat):
            t = time.perf_counter()
            for im in decoded:
                np.asarray(im.resize((size, size), Image.Resampling.BILINEAR))
            best = min(best, time.perf_counter() - t)
        return best / len(blobs) * 1e3

    def cv2_decode(b: bytes) -> np.ndarray:
        arr = np.frombuffer(b, np.uint8)
        h, w = cv2.imdecode(arr, cv2.IMREAD_REDUCED_GRAYSCALE_8).shape[:2]
        flag = cv2.IMREAD_COLOR
        for factor, reduced in ((8, cv2.IMREAD_REDUCED_COLOR_8), (4, cv2.IMREAD_REDUCED_COLOR_4),
                                (2, cv2.IMREAD_REDUCED_COLOR_2)):
            if min(h, w) * 8 // factor >= size:  # same rule as the product: never below the target
                flag = reduced
                break
        bgr = cv2.imdecode(arr, flag)
        return cv2.cvtColor(cv2.resize(bgr, (size, size), interpolation=cv2.INTER_AREA), cv2.COLOR_BGR2RGB)

    product = best_ms(lambda b: decode_and_resize(b, size))
    pil = best_ms(pil_decode)
    resize = resize_ms()
    opencv = best_ms(cv2_decode)
    pixels = np.stack([decode_and_resize(b, size).pixels for b in blobs])
    alt = np.stack([cv2_decode(b) for b in blobs])
    backbone = Backbone(dataclasses.replace(spec, runtime="graph"))
    a, b = backbone.predict(pixels[:256].astype(np.float32)), backbone.predict(alt[:256].astype(np.float32))
    cos = np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    rows = [
        ["product: Pillow reduced-scale decode + bilinear (antialiased) resize", f"{product:.2f}",
         f"{1000 / product:.0f}", "1 (itself)"],
        ["  of which: Pillow decode at reduced scale", f"{pil:.2f}", f"{1000 / pil:.0f}", ""],
        ["  of which: Pillow bilinear resize + array", f"{resize:.2f}", f"{1000 / resize:.0f}", ""],
        ["OpenCV reduced-scale decode + INTER_AREA resize", f"{opencv:.2f}", f"{1000 / opencv:.0f}",
         f"mean {cos.mean():.4f}, min {cos.min():.4f}"],
    ]
    print(f"  decode per core: product {product:.2f} ms (decode {pil:.2f} + resize {resize:.2f}); "
          f"opencv {opencv:.2f} ms, cosine to product mean {cos.mean():.4f} min {cos.min():.4f}", flush=True)
    return rows, product, pixels


def bare_loop(spec, paths: list[str], batch: int) -> float:
    """Images/s of the decode pool (one thread per core) feeding the default runtime, no Beam."""
    from models.backbone.imaging import decode_and_resize
    from models.backbone.network import Backbone

    backbone = Backbone(dataclasses.replace(spec, runtime="auto"))
    backbone.resolve_runtime()
    size = backbone.size
    backbone.predict(np.zeros((batch, size, size, 3), np.float32))
    t = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(CORES) as pool:
        for i in range(0, len(paths), batch):
            chunk = list(pool.map(lambda p: decode_and_resize(open(p, "rb").read(), size).pixels,
                                  paths[i:i + batch]))
            backbone.predict(np.stack(chunk).astype(np.float32))
    return len(paths) / (time.perf_counter() - t)


def pipeline(spec, folder: str, batch: int) -> dict:
    from pipelines import extract
    from transforms.inference import BatchingOptions

    out = tempfile.mkdtemp(prefix="bench-runtimes-out-")
    try:
        t = time.perf_counter()
        m = extract.run(extract.ExtractConfig(input=folder, output=out, model=spec,
                                              batching=BatchingOptions(min_batch_size=batch // 2,
                                                                       max_batch_size=batch)))
        return {"wall": time.perf_counter() - t, "ok": m.counts.ok, "inputs": m.counts.inputs,
                "runtime": m.runtime}
    finally:
        shutil.rmtree(out, ignore_errors=True)


def _merge_rows(path: str, models: list[str], *tables: list[list]) -> tuple[list[list], ...]:
    """Rows of this run for ``models``, the file's rows for every other model; the file is rewritten."""
    import json

    try:
        with open(path) as f:
            stored = json.load(f)
    except FileNotFoundError:
        stored = [[], [], []]
    merged = []
    for old, new in zip(stored, tables, strict=True):
        kept = [r for r in old if r[0] not in models]
        merged.append(sorted(kept + [[str(c) for c in r] for r in new], key=lambda r: r[0] != "mobilenet_v1_025"))
    with open(path, "w") as f:
        json.dump(merged, f, indent=1)
    return tuple(merged)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="mobilenet_v1_025,inception_v3")
    parser.add_argument("--bare-images", default="mobilenet_v1_025=256,inception_v3=64",
                        help="decoded photos per bare pass, per model")
    parser.add_argument("--extract-images", default="mobilenet_v1_025=3200,inception_v3=320",
                        help="photos per end-to-end extract, per model")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--runtimes", default="keras,graph,xla,litert,openvino", help="bare runtimes to measure")
    parser.add_argument("--rows", default=None,
                        help="JSON file of table rows per model: models not run now keep their rows from it, "
                             "so one model can be re-measured without re-running the others")
    parser.add_argument("--quick", action="store_true", help="MobileNet only, few photos, prints only")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ["CBIR_CACHE_DIR"] = tempfile.mkdtemp(prefix="bench-runtimes-cache-")  # conversions are measured
    from models.backbone.network import ModelSpec

    models = ["mobilenet_v1_025"] if args.quick else args.models.split(",")
    sizes = dict(x.split("=") for x in args.extract_images.split(","))
    paths = dev_photos()
    print(f"setup: {machine()}\n       {len(paths)} dev photos; bare passes over {args.bare_images} decoded photos; "
          f"extracts of {args.extract_images} photos")
    bare_rows, decode_rows, e2e_rows = [], [], []
    for name in models:
        pretrained = name == "mobilenet_v1_025"
        spec = ModelSpec(name, weights=None if pretrained else "random")
        bare_n = 32 if args.quick else int(dict(x.split("=") for x in args.bare_images.split(",")).get(name, 64))
        step = max(1, len(paths) // bare_n)
        rows, decode_ms, pixels = decode_costs(paths[::step][:bare_n], spec.size(), spec, 1 if args.quick else
                                               args.repeat)
        decode_rows += [[name, *r] for r in rows]
        batches = [1, 16] if args.quick else ([1, 8, 16, 64] if pretrained else [1, 8, 32])
        rows, best = bare_runtimes(spec, pixels.astype(np.float32), batches, 1 if args.quick else args.repeat,
                                   tuple(args.runtimes.split(",")))
        bare_rows += rows
        batch = 64 if pretrained else 32
        n = 96 if args.quick else int(sizes.get(name, 480))
        folder, small = corpus(paths, n), corpus(paths, batch)
        try:
            loop_paths = sorted(glob.glob(os.path.join(folder, "*", "*")))
            loop = bare_loop(spec, loop_paths, batch)
            default_rt = max((r for r in best if r != "openvino"), key=lambda r: best[r])
            model_core_ms = 1000 * CORES / best.get("litert", best[default_rt])
            bound = 1000 * CORES / (decode_ms + model_core_ms)
            for label, runtime in (("--runtime auto (default)", "auto"), ("--runtime graph (before)", "graph")):
                s = dataclasses.replace(spec, runtime=runtime)
                p_small, p = pipeline(s, small, batch), pipeline(s, folder, batch)
                assert p["ok"] == p["inputs"] == n, p  # the counts, not only the speed
                rate = p["ok"] / p["wall"]
                marginal = (p["ok"] - p_small["ok"]) / max(1e-9, p["wall"] - p_small["wall"])
                e2e_rows.append([name, label, p["runtime"], n, f"{p['wall']:.1f}", f"{rate:.1f}",
                                 f"{marginal:.1f}", f"{loop:.1f}", f"{bound:.0f}",
                                 f"{marginal / loop:.2f}", f"{marginal / bound:.2f}"])
                print(f"  extract {name} {label}: {p['ok']}/{n} ok on {p['runtime']}, {rate:.1f} img/s, marginal "
                      f"{marginal:.1f}; bare loop {loop:.1f}; bound {bound:.0f}", flush=True)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
            shutil.rmtree(small, ignore_errors=True)
    if args.rows:
        bare_rows, decode_rows, e2e_rows = _merge_rows(args.rows, models, bare_rows, decode_rows, e2e_rows)
    for label, rows in (("bare", bare_rows), ("decode", decode_rows), ("end to end", e2e_rows)):
        print(f"\n{label}:")
        for r in rows:
            print("  " + " | ".join(map(str, r)))
    if args.quick:
        return 0
    before = {r[0]: float(r[6]) for r in e2e_rows if "before" in r[1]}
    after = {r[0]: float(r[6]) for r in e2e_rows if "default" in r[1]}
    speedups = ", ".join(f"{m} {after[m] / before[m]:.2f}×" for m in after if m in before)
    md = "\n".join([
        "## bench_runtimes: backbone runtimes, decode, and extract end to end",
        "",
        f"`python -m benchmarks.bench_runtimes` on {machine()}. Inception v3 with random weights (timing only; "
        "only MobileNet v1 0.25 has real weights offline). Dev photos (flowers17 + imagenette).",
        "",
        "Bare runtimes on decoded pixels (warm, best of passes; OpenVINO is a peer converted from the same traced "
        "graph; core-ms = 1000 × cores / img/s):",
        "",
        md_table(["model", "runtime", "batch", "img/s", "core-ms/img", "max |Δ| to Keras; setup"], bare_rows),
        "",
        "Decode + resize on one core (what a core spends per photo before the model):",
        "",
        md_table(["model", "decode", "ms/img", "img/s per core", "feature cosine to product"], decode_rows),
        "",
        "`cbir extract` end to end (DirectRunner in-memory, decode pool, Parquet, publish). `marginal` takes out "
        "the fixed cost measured on one batch of photos; `bare loop` is the same decode pool feeding the default "
        "runtime in plain Python; `bound` = cores / (product decode core-ms + LiteRT core-ms):",
        "",
        md_table(["model", "extract", "ran on", "photos", "wall s", "img/s", "marginal img/s", "bare loop img/s",
                  "decode+model bound", "marginal / bare", "marginal / bound"], e2e_rows),
        "",
        f"Default against before (marginal): {speedups}. Cost grows linearly with the number of photos (per-photo "
        "decode and model work; the fixed cost is the model load, one LiteRT conversion and the publish).",
    ])
    update_section("bench_runtimes", md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
