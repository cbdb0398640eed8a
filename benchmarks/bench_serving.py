"""Serving: query latency, batch throughput and retrieval quality, with their baselines in the same run.

* **Latency, vector given** (p50/p99 of ``Searcher.search``, one query at a time) and **batch throughput**
  (``Searcher.search_arrays``) on a synthetic index of clustered 512-d vectors (PCA to 256) built by the
  real ``cbir index`` job at 1 and several shards, for exact, Annoy, Annoy + re-rank, LSH and
  Annoy + re-rank + QE, next to the baseline: numpy brute force over a float32 matrix in RAM.
  Recall@10 against exact search is printed with each, so speed is never read without quality.
* **Latency, image given**: decode + backbone + transform_fn + search for one photo at a time on the
  flowers17-dev index (MobileNet v1 0.25), split into its embedding and search parts.
* **Quality**: mAP over the full leave-one-out ranking (exact, and exact + query expansion) and
  mAP@100 / P@10 of the lists Annoy (without and with re-rank and QE) and LSH return, on
  flowers17-dev and imagenette-dev; the baseline is Annoy without re-rank.

    .venv/bin/python -m benchmarks.bench_serving            # full run (100k vectors), writes RESULTS.md
    .venv/bin/python -m benchmarks.bench_serving --quick    # 5k vectors, flowers only; prints only

Features of the dev photos and the indexes are kept under ``--work`` and reused by later runs (the
extract and index jobs are not what this measures).
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
import os
import shutil
import sys
import time

import numpy as np

from benchmarks._results import machine, md_table, update_section
from evaluation.metrics import recall_at_k
from index_builder.types import annoy as annoy_type

log = logging.getLogger("bench_serving")

DATA = os.environ.get("CBIR_DATA_DIR", os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))
MODEL = "mobilenet_v1_025"
K = 10


# -- building what we measure -----------------------------------------------------------------------


def _index(features: str, out: str, shards: int, dims: int, trees: int) -> str:
    """An index of ``features`` at ``out``, built once (a finished build is reused)."""
    from pipelines import index

    if os.path.exists(os.path.join(out, "LATEST")):
        return out
    shutil.rmtree(out, ignore_errors=True)
    t = time.perf_counter()
    m = index.run(index.IndexConfig(features=features, output=out, shards=shards, dims=dims,
                                    type_params={"annoy": annoy_type.Params(trees=trees)}))
    print(f"  built {out}: {m.items} items, {shards} shard(s), {m.dimension.output} dims, "
          f"{trees} trees in {time.perf_counter() - t:.0f}s")
    return out


def real_index(name: str, work: str, shards: int = 2) -> str:
    """flowers17-dev / imagenette-dev through cbir extract (MobileNet v1 0.25) and cbir index."""
    from models.backbone.network import ModelSpec
    from pipelines import extract

    features = os.path.join(work, name, "features")
    if not os.path.exists(os.path.join(features, "MANIFEST.json")):
        t = time.perf_counter()
        m = extract.run(extract.ExtractConfig(input=os.path.join(DATA, name), output=features,
                                              model=ModelSpec(MODEL)))
        print(f"  extracted {name}: {m.counts.ok} ok, {m.counts.failed} failed in "
              f"{time.perf_counter() - t:.0f}s")
    return _index(features, os.path.join(work, name, f"index-s{shards}"), shards, 128, 50)


def synthetic_features(out: str, n: int, dim: int, clusters: int, seed: int = 0) -> str:
    """Vectors shaped like pooled CNN features, written as an extract output.

    Real bottlenecks have a low intrinsic dimension (a fast-decaying PCA spectrum)
    and form clusters of very unequal sizes, which is what makes tree and hash
    indexes work at all on them; isotropic Gaussians would make every method look
    bad. So: a Gaussian mixture (Zipf cluster sizes) in 32 latent dimensions, mapped
    linearly to ``dim``, plus a little isotropic noise, then made non-negative like
    ReLU outputs.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from transforms.features_io import feature_schema

    if os.path.exists(os.path.join(out, "MANIFEST.json")):
        return out
    rng = np.random.default_rng(seed)
    latent_dim = 32
    centres = rng.standard_normal((clusters, latent_dim)).astype(np.float32)
    sizes = rng.zipf(1.6, clusters).astype(np.float64)
    member = rng.choice(clusters, size=n, p=sizes / sizes.sum())
    latent = centres[member] + 0.35 * rng.standard_normal((n, latent_dim)).astype(np.float32)
    mixing = rng.standard_normal((latent_dim, dim)).astype(np.float32) / np.sqrt(latent_dim)
    vectors = np.abs(latent @ mixing + 0.05 * rng.standard_normal((n, dim)).astype(np.float32))
    os.makedirs(os.path.join(out, "features"), exist_ok=True)
    schema = feature_schema(dim)
    ids = [f"synthetic/{i:08d}" for i in range(n)]
    table = pa.Table.from_arrays([
        pa.array(ids), pa.array(ids), pa.array([f"{i:064x}" for i in range(n)]),
        pa.array(np.zeros(n, np.int32)), pa.array(np.zeros(n, np.int32)),
        pa.array([str(c) for c in member.tolist()]),
        pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), dim),
        pa.array(ids),  # unit: each synthetic item its own input
    ], schema=schema)
    pq.write_table(table, os.path.join(out, "features", "part-0.parquet"))
    manifest = {"kind": "features", "format_version": 1, "run_id": "synthetic", "created_utc": "",
                "model": {"preset": "synthetic", "dim": dim}, "model_fingerprint": f"synthetic-{dim}-{seed}",
                "dimension": dim, "counts": {"read": n, "ok": n, "failed": 0},
                "files": {"features": [{"path": "features/part-0.parquet", "rows": n}], "failures": []}}
    with open(os.path.join(out, "MANIFEST.json"), "w") as f:
        json.dump(manifest, f)
    return out


# -- measurements -----------------------------------------------------------------------------------

METHOD_CONFIGS = [
    ("exact", {"method": "exact"}),
    ("annoy", {"method": "annoy"}),
    ("annoy+rerank", {"method": "annoy", "rerank": True}),
    ("annoy+rerank, search_k 10000", {"method": "annoy", "rerank": True, "search_k": 10000}),
    ("lsh (re-ranked)", {"method": "lsh"}),
    ("annoy+rerank+qe3", {"method": "annoy", "rerank": True, "qe": 3}),
]


def _pcts(seconds: list[float]) -> tuple[float, float]:
    ms = np.asarray(seconds) * 1e3
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 99))


def _recall(ids: np.ndarray, exact: np.ndarray) -> float:
    return float(np.nanmean(recall_at_k(ids, exact)))


def brute_force(matrix: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """The baseline: one float32 matrix product and a partial sort, no index at all."""
    sims = queries @ matrix.T
    part = np.argpartition(-sims, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(sims, part, axis=1), axis=1)
    return np.take_along_axis(part, order, axis=1)


def bench_vectors(index_dir: str, n_queries: int, batch_queries: int, seed: int = 1) -> list[list]:
    """Rows: shards, method, p50, p99 (single query), batch queries/s, recall@10 vs exact."""
    from search.searcher import Searcher, normalise_rows

    rows = []
    with Searcher(index_dir, verify=False) as s:
        rng = np.random.default_rng(seed)
        matrix = s.all_vectors()
        picks = rng.choice(s.size, size=max(n_queries, batch_queries), replace=False)
        # queries near indexed items, not the items themselves: a perturbed stored vector
        queries = normalise_rows(matrix[picks] + 0.05 * rng.standard_normal(matrix[picks].shape).astype(np.float32))
        single, batch = queries[:n_queries], queries[:batch_queries]
        shards = len(s.shards)
        # baseline: numpy brute force, float32 in RAM (order of the stored matrix = global ids)
        times = []
        for q in single:
            t = time.perf_counter()
            brute_force(matrix, q[None, :], K)
            times.append(time.perf_counter() - t)
        t = time.perf_counter()
        truth = np.concatenate([brute_force(matrix, batch[i:i + 1024], K) for i in range(0, len(batch), 1024)])
        qps = len(batch) / (time.perf_counter() - t)
        rows.append([shards, "numpy brute force (baseline)", *(f"{x:.3f}" for x in _pcts(times)), f"{qps:.0f}",
                     "1.000"])
        print("  " + " | ".join(str(c) for c in rows[-1]), flush=True)
        for name, kw in METHOD_CONFIGS:
            s.search(single[0], k=K, **kw)  # warm-up (caches, first-touch of the memory maps)
            times = []
            for q in single:
                t = time.perf_counter()
                s.search(q, k=K, **kw)
                times.append(time.perf_counter() - t)
            t = time.perf_counter()
            ids, _ = s.search_arrays(batch, k=K, **kw)
            qps = len(batch) / (time.perf_counter() - t)
            ref = truth if "qe" not in kw else s.search_arrays(batch, k=K, method="exact", qe=kw["qe"])[0]
            rows.append([shards, name, *(f"{x:.3f}" for x in _pcts(times)), f"{qps:.0f}",
                         f"{_recall(ids, ref):.3f}"])
            print("  " + " | ".join(str(c) for c in rows[-1]), flush=True)
    return rows


def bench_images(index_dir: str, corpus: str, n_images: int) -> tuple[list[list], str]:
    """p50/p99 of embed (decode + backbone + transform_fn) and search, one photo at a time."""
    from search.searcher import Searcher

    paths = sorted(glob.glob(os.path.join(DATA, corpus, "*", "*.jpg")))
    paths = paths[:: max(1, len(paths) // (n_images + 2))][: n_images + 2]
    with Searcher(index_dir, verify=False) as s:
        t = time.perf_counter()
        embedder = s.open_embedder()
        load = time.perf_counter() - t
        for p in paths[:2]:  # warm-up: traces the backbone and the transform for batch size 1
            s.search(embedder.embed_files([p])[0][0], k=K, rerank=True)
        embed_t, search_t, total_t = [], [], []
        for p in paths[2:]:
            t0 = time.perf_counter()
            vectors, _, failures = embedder.embed_files([p])
            t1 = time.perf_counter()
            s.search(vectors[0], k=K, rerank=True)
            t2 = time.perf_counter()
            assert not failures, failures
            embed_t.append(t1 - t0)
            search_t.append(t2 - t1)
            total_t.append(t2 - t0)
        t = time.perf_counter()
        vectors, _, _ = embedder.embed_files(paths[2:])
        s.search_arrays(vectors, k=K, rerank=True)
        batch_rate = len(paths[2:]) / (time.perf_counter() - t)
    rows = [["decode + backbone + transform_fn", *(f"{x:.1f}" for x in _pcts(embed_t))],
            ["search (annoy + re-rank, k=10)", *(f"{x:.2f}" for x in _pcts(search_t))],
            ["image → top-10 (total)", *(f"{x:.1f}" for x in _pcts(total_t))]]
    note = (f"{len(total_t)} photos one at a time; the same photos as one batch: {batch_rate:.0f} images/s; "
            f"opening the model + transform_fn took {load:.1f}s")
    return rows, note


def bench_quality(index_dir: str, corpus: str, qe: int) -> list[list]:
    """Rows: corpus, configuration, full-ranking mAP, mAP@100, P@10, recall@100 vs exact (same QE)."""
    from pipelines.evaluate import EvaluateConfig, evaluate
    from search.options import Rerank, SearchOptions
    from search.searcher import Searcher

    rows = []
    with Searcher(index_dir, verify=False) as s:
        plain = evaluate(s, EvaluateConfig(index=index_dir, search=SearchOptions(k=100), methods=("annoy", "lsh")))
        rerank = evaluate(s, EvaluateConfig(index=index_dir, search=SearchOptions(k=100, rerank=Rerank(exact=True)),
                                            methods=("annoy",)))
        expanded = evaluate(s, EvaluateConfig(index=index_dir,
                                              search=SearchOptions(k=100, rerank=Rerank(exact=True, qe=qe)),
                                              methods=("annoy", "lsh")))

    def row(name, m, full="-"):
        return [corpus, name, full, f"{m['map@k']:.4f}", f"{m['p@10']:.4f}", f"{m['recall@k']:.3f}"]

    rows.append(row("annoy (baseline)", plain["methods"]["annoy"]))
    rows.append(row("annoy + re-rank", rerank["methods"]["annoy"]))
    rows.append(row(f"annoy + re-rank + QE {qe}", expanded["methods"]["annoy"]))
    rows.append(row("lsh (re-ranked)", plain["methods"]["lsh"]))
    rows.append(row(f"lsh + QE {qe}", expanded["methods"]["lsh"]))
    rows.append(row("exact", plain["methods"]["exact"], f"{plain['exact']['map']:.4f}"))
    rows.append(row(f"exact + QE {qe}", expanded["methods"]["exact"], f"{expanded['exact_qe']['map']:.4f}"))
    for r in rows:
        print("  " + " | ".join(r), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="5k vectors, flowers only, few queries; no RESULTS.md")
    parser.add_argument("--work", default=os.path.join("out", "bench_serving"),
                        help="features and indexes are kept (and reused) here")
    parser.add_argument("--vectors", type=int, default=None, help="synthetic index size (default 100000)")
    parser.add_argument("--shards", default="1,4", help="shard counts of the synthetic index")
    parser.add_argument("--queries", type=int, default=None, help="single queries per method (default 500)")
    parser.add_argument("--images", type=int, default=None, help="photos for image-given latency (default 100)")
    parser.add_argument("--qe", type=int, default=3)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("CBIR_WEIGHTS_DIR", os.path.join(DATA, "..", "models", "keras"))
    n_vectors = args.vectors or (5000 if args.quick else 100_000)
    n_queries = args.queries or (50 if args.quick else 500)
    n_images = args.images or (8 if args.quick else 100)
    shard_counts = [int(x) for x in args.shards.split(",")]
    if args.quick:
        shard_counts = shard_counts[:2] if len(shard_counts) > 1 else shard_counts
    corpora = ["flowers17-dev"] if args.quick else ["flowers17-dev", "imagenette-dev"]
    work = os.path.abspath(args.work + ("-quick" if args.quick else ""))
    os.makedirs(work, exist_ok=True)
    print(f"bench_serving: {machine()}\n  synthetic {n_vectors} × 512 → PCA 256 (clustered), "
          f"shards {shard_counts}, {n_queries} single queries, {n_images} image queries, corpora {corpora}, "
          f"QE {args.qe}, work {work}")

    print("\nlatency and throughput, vector given (ms; queries/s):")
    features = synthetic_features(os.path.join(work, f"synthetic-{n_vectors}x512"), n_vectors, 512,
                                  max(50, n_vectors // 100))
    vector_rows = []
    for shards in shard_counts:
        name = f"synthetic-{n_vectors}x512-pca256-s{shards}"
        idx = _index(features, os.path.join(work, name), shards, 256, 50)
        vector_rows += bench_vectors(idx, n_queries, min(n_vectors, 2000 if not args.quick else 500))

    print("\nquality (leave-one-out, labels = folders):")
    indexes = {c: real_index(c, work) for c in corpora}
    quality_rows = []
    for c in corpora:
        quality_rows += bench_quality(indexes[c], c, args.qe)

    print("\nlatency, image given (ms):")
    image_rows, image_note = bench_images(indexes["flowers17-dev"], "flowers17-dev", n_images)
    for r in image_rows:
        print("  " + " | ".join(r))
    print("  " + image_note)

    given = sys.argv[1:] if argv is None else argv
    command = "CBIR_WEIGHTS_DIR=../shared/models/keras .venv/bin/python -m benchmarks.bench_serving" + (
        " " + " ".join(given) if given else "")
    md = "\n\n".join([
        "## bench_serving: query latency, batch throughput, retrieval quality",
        f"Command: `{command}`  \nMachine: {machine()}",
        f"**Vector given**: synthetic index of {n_vectors} clustered 512-d vectors (`cbir index --dims 256 "
        f"--trees 50`), queries are perturbed indexed vectors; p50/p99 of one `Searcher.search` at a time "
        f"({n_queries} queries), batch = `search_arrays` over {min(n_vectors, 2000)} queries; recall@10 against "
        "exact search (with the same QE). Baseline: numpy brute force over a float32 matrix in RAM.",
        md_table(["shards", "method", "p50 ms", "p99 ms", "batch queries/s", "recall@10"], vector_rows),
        f"**Image given** (flowers17-dev index, {MODEL}, 2 shards, 128 dims): {image_note}.",
        md_table(["stage", "p50 ms", "p99 ms"], image_rows),
        f"**Quality** ({MODEL}, 2 shards, PCA 128, 50 trees): leave-one-out over every photo, relevant = same "
        "folder. Full mAP ranks the whole collection; mAP@100 / P@10 score the returned top-100 lists; "
        "recall@100 is against exact search with the same QE. Baseline: Annoy without re-rank.",
        md_table(["corpus", "configuration", "mAP (full)", "mAP@100", "P@10", "recall@100"], quality_rows),
    ])
    if args.quick:
        print("\n--quick: RESULTS.md not written")
    else:
        update_section("bench_serving", md)
        print("\nwrote the bench_serving section of benchmarks/RESULTS.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
