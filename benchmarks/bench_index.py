"""Search at millions: the index job and its three index types, against exact search and hnswlib.

In one run, for the dev-photo features and for class-shaped synthetic vectors at each
``--sizes`` (default 100k and 1M; ``benchmarks/synthetic.py`` fits the generator to the
dev features):

* ``cbir index`` as a user runs it (all three types, calibrated to recall@10 ≥ 0.95 per
  shard): wall time, peak memory of the process, bytes, and what calibration chose;
* the searcher with those calibrated efforts, one query at a time on one thread (the
  script pins BLAS and faiss to one thread), on held-out queries that are not in the index:
  recall@10 against exact search and queries/s, for HNSW (faiss), Annoy and LSH, next to
  exact search itself (the baseline) and hnswlib at equal or better recall (a peer; from
  ``requirements-bench.txt``, skipped when it is not installed);
* at the largest size, ``cbir neighbors --method hnsw`` over the whole index: wall time,
  and recall@10 of its rows on a sample of items against exact leave-one-out search;
* how each cost grows from the smallest to the largest size, and what that makes of 10M
  and 100M items on a cluster.

    .venv/bin/python -m benchmarks.bench_index                  # 100k and 1M, writes RESULTS.md
    .venv/bin/python -m benchmarks.bench_index --quick          # 20k, prints only
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # one thread per query: how a serving process is measured
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from benchmarks._proc import REPO, run_cbir  # noqa: E402
from benchmarks._results import machine, md_table, update_section  # noqa: E402
from benchmarks.synthetic import SyntheticModel, synthetic_dataset  # noqa: E402

K = 10
DATA = os.environ.get("CBIR_DATA_DIR", os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))


def _write_features(vectors: np.ndarray, out: Path, rows_per_part: int = 200_000) -> None:
    """Vectors as an extract output (parts + manifest), so ``cbir index`` takes them unchanged."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from artefacts.manifests import ExtractCounts, FeaturesManifest, PartFile, new_run_id, utc_now
    from plumbing import publish
    from transforms.features_io import feature_schema

    n, dim = vectors.shape
    schema = feature_schema(dim)
    parts = []
    (out / "features").mkdir(parents=True, exist_ok=True)
    for i, start in enumerate(range(0, n, rows_per_part)):
        chunk = vectors[start:start + rows_per_part]
        ids = [f"s/{j:08d}" for j in range(start, start + len(chunk))]
        table = pa.Table.from_arrays([
            pa.array(ids, pa.string()), pa.array(ids, pa.string()), pa.array([f"{j:064x}" for j in
                                                                              range(start, start + len(chunk))]),
            pa.array(np.full(len(chunk), 1, np.int32)), pa.array(np.full(len(chunk), 1, np.int32)),
            pa.array([None] * len(chunk), pa.string()),
            pa.FixedSizeListArray.from_arrays(pa.array(chunk.reshape(-1), pa.float32()), dim),
            pa.array(ids, pa.string()),  # unit: each synthetic item its own input
        ], schema=schema)
        name = f"features/part-synthetic-{i:05d}.parquet"
        pq.write_table(table, out / name)
        parts.append(PartFile(name, len(chunk)))
    manifest = FeaturesManifest(run_id=new_run_id(), created_utc=utc_now(), model={"preset": "synthetic"},
                                model_fingerprint="synthetic", dimension=dim,
                                counts=ExtractCounts(read=n, ok=n, failed=0, inputs=n),
                                files={"features": parts, "failures": []})
    publish.write_manifest(str(out / "MANIFEST.json"), manifest)


def _dev_features(workdir: Path, given: str | None) -> str:
    if given:
        return given
    corpus = workdir / "dev"
    for sub in ("flowers17-dev", "imagenette-dev"):
        for label in sorted(os.listdir(os.path.join(DATA, sub))):
            (corpus / label).mkdir(parents=True, exist_ok=True)
            for name in sorted(os.listdir(os.path.join(DATA, sub, label))):
                shutil.copyfile(os.path.join(DATA, sub, label, name), corpus / label / name)  # links are not read
    out = workdir / "dev-features"
    r = run_cbir("extract-dev", ["extract", "--input", str(corpus), "--output", str(out), "--model",
                                 "mobilenet_v1_025"], workdir / "logs")
    if r["code"]:
        raise SystemExit(f"extract of the dev photos failed: {r['tail']}")
    return str(out)


def _search_one_by_one(searcher, queries: np.ndarray, **opts: Any) -> tuple[np.ndarray, float]:
    """Top-K of each query searched alone, with one options record as a service holds it: (ids, q/s)."""
    from search.options import SearchOptions

    options = SearchOptions.from_dict({"k": K, **opts})
    out = np.full((len(queries), K), -1, np.int64)
    # Steady state, as a serving process is after its first minutes: one untimed pass pages in what the
    # memory-mapped files need (hnswlib, the peer, holds its graph in memory from the start).
    for i in range(len(queries)):
        searcher.search_arrays(queries[i:i + 1], options)
    started = time.perf_counter()
    for i in range(len(queries)):
        out[i] = searcher.search_arrays(queries[i:i + 1], options)[0][0]
    return out, len(queries) / (time.perf_counter() - started)


def _hnswlib_peer(base: np.ndarray, queries: np.ndarray, truth: np.ndarray, want: float, m: int,
                  ef_construction: int) -> dict[str, Any] | None:
    """hnswlib at the same M and efConstruction, with the smallest ef whose recall reaches ``want``."""
    try:
        import hnswlib
    except ImportError:
        return None
    from evaluation.metrics import recall_at_k

    started = time.perf_counter()
    index = hnswlib.Index(space="ip", dim=base.shape[1])
    index.init_index(max_elements=len(base), M=m, ef_construction=ef_construction, random_seed=1)
    index.add_items(base, np.arange(len(base)), num_threads=os.cpu_count() or 1)
    build = time.perf_counter() - started
    index.set_num_threads(1)
    best = None
    for ef in (10, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024):
        index.set_ef(max(ef, K))
        started = time.perf_counter()
        ids = np.stack([index.knn_query(q[None, :], k=K)[0][0] for q in queries])
        qps = len(queries) / (time.perf_counter() - started)
        rec = float(np.nanmean(recall_at_k(ids, truth)))
        best = {"ef": ef, "recall": rec, "qps": qps, "build_s": build}
        if rec >= want:
            break
    return best


def _measure(index_dir: str, queries_raw: np.ndarray, label: str, m: int, ef_c: int, base_for_peer=None
             ) -> dict[str, Any]:
    """Per method: recall@K on held-out queries (not in the index) and one-thread queries/s."""
    import faiss

    from evaluation.metrics import recall_at_k
    from search.searcher import Searcher

    faiss.omp_set_num_threads(1)
    with Searcher(index_dir, verify=False, threads=1) as s:
        from search.index_files import load_transform

        q = load_transform(s.version_dir, s.manifest)(queries_raw)
        truth, _ = s.search_arrays(q, k=K, method="exact", batch_size=256)
        out: dict[str, Any] = {"label": label, "items": s.size, "shards": len(s.shards), "methods": {}}
        for method in ("hnsw", "annoy", "lsh", "exact"):
            ids, qps = _search_one_by_one(s, q, method=method)
            out["methods"][method] = {"recall": float(np.nanmean(recall_at_k(ids, truth))), "qps": qps}
            print(f"    {label} {method}: recall@10 {out['methods'][method]['recall']:.3f}, {qps:.0f} q/s", flush=True)
        out["manifest"] = s.manifest
        if base_for_peer is not None:
            base = s.all_vectors()
            peer = _hnswlib_peer(base, q, truth, out["methods"]["hnsw"]["recall"], m, ef_c)
            out["hnswlib"] = peer
            if peer:
                print(f"    {label} hnswlib: ef {peer['ef']}, recall {peer['recall']:.3f}, {peer['qps']:.0f} q/s, "
                      f"build {peer['build_s']:.0f}s", flush=True)
    return out


def _leave_one_out_dev(index_dir: str) -> dict[str, Any]:
    from evaluation.metrics import recall_at_k
    from search.searcher import Searcher

    with Searcher(index_dir, verify=False, threads=1) as s:
        v = s.all_vectors()
        everyone = np.arange(s.size)
        truth, _ = s.search_arrays(v, k=K, method="exact", exclude=everyone)
        out = {"items": s.size, "methods": {}, "labels": s.labels, "vectors": v}
        for method in ("hnsw", "annoy", "lsh"):
            started = time.perf_counter()
            ids = np.stack([s.search_arrays(v[i:i + 1], k=K, method=method, exclude=everyone[i:i + 1])[0][0]
                            for i in range(len(v))])
            qps = len(v) / (time.perf_counter() - started)
            out["methods"][method] = {"recall": float(np.nanmean(recall_at_k(ids, truth))), "qps": qps}
        return out


def _neighbour_recall(neighbors_dir: Path, index_dir: str, sample: int = 500) -> float:
    """recall@K of the published neighbour table's rows against exact leave-one-out search."""
    from evaluation.metrics import recall_at_k
    from pipelines.neighbors import read_neighbors
    from search.searcher import Searcher

    table = read_neighbors(str(neighbors_dir))
    rows = dict(zip(table.column("image_id").to_pylist(), table.column("neighbor_ids").to_pylist(), strict=True))
    with Searcher(index_dir, verify=False) as s:
        rng = np.random.default_rng(0)
        picks = np.sort(rng.choice(s.size, size=min(sample, s.size), replace=False))
        truth, _ = s.search_arrays(s.vectors_of(picks), k=K, method="exact", exclude=picks)
        position = {iid: g for g, iid in enumerate(s.image_ids)}
        found = np.asarray([[position[n] for n in rows[s.image_ids[g]]][:K] for g in picks.tolist()])
    return float(np.nanmean(recall_at_k(found, truth)))


def _calibration_cells(manifest) -> dict[str, str]:
    cells = {}
    for kind, key in (("hnsw", "ef_search"), ("annoy", "search_k"), ("lsh", "candidates")):
        params = getattr(manifest, kind)
        cal = params.calibration if params else None
        if cal:
            values = [p[key] for p in cal["per_shard"] if p]
            cells[kind] = f"{key} {min(values):,}–{max(values):,}" if min(values) != max(values) else \
                f"{key} {values[0]:,}"
    return cells


def _baseline_build(rev: str, features: Path, out: Path, shards: int, work: Path) -> dict[str, Any] | None:
    """``cbir index`` of the revision before this search layer, as the issue measured it (Annoy + LSH,
    ``shards`` shards), on the same features in the same run: what the machine makes of the old
    build, so the new one's wall time and memory are compared here, not against another machine."""
    tree = work / "baseline-tree"
    made = subprocess.run(["git", "worktree", "add", "--detach", str(tree), rev], cwd=REPO, capture_output=True,
                          text=True)
    if made.returncode:
        print(f"  baseline {rev}: no worktree ({made.stderr.strip()[:200]}), skipped", flush=True)
        return None
    try:
        r = run_cbir("index-baseline", ["index", "--features", str(features), "--output", str(out), "--shards",
                                        str(shards)], work / "logs", cwd=tree)
        return {**r, "rev": subprocess.run(["git", "rev-parse", "--short", rev], cwd=REPO, capture_output=True,
                                           text=True).stdout.strip(), "shards": shards} if r["code"] == 0 else None
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=REPO, capture_output=True)
        shutil.rmtree(out, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100000,1000000")
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("--shard-items", type=int, default=1_000_000, help="items per index shard at scale")
    parser.add_argument("--features", default=None, help="an extract output of the dev photos (default: extract)")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--hnsw-m", type=int, default=None)
    parser.add_argument("--hnsw-ef-construction", type=int, default=None)
    parser.add_argument("--no-neighbors", action="store_true")
    parser.add_argument("--baseline-rev", default="18d8151^",
                        help="revision whose `cbir index` (Annoy + LSH, 8 shards) is the same-run baseline at the "
                             "largest size; '' skips it")
    parser.add_argument("--quick", action="store_true", help="20k vectors, no neighbours job, no RESULTS.md")
    parser.add_argument("--print-only", action="store_true", help="print the report, leave RESULTS.md as it is")
    args = parser.parse_args(argv)
    from index_builder.types import hnsw

    m = args.hnsw_m or hnsw.DEFAULT_M
    ef_c = args.hnsw_ef_construction or hnsw.DEFAULT_EF_CONSTRUCTION
    sizes = [20_000] if args.quick else [int(x) for x in args.sizes.split(",")]
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-index-"))
    logs = work / "logs"
    extra = ["--hnsw-m", str(m), "--hnsw-ef-construction", str(ef_c)]
    print(f"setup: {machine()}\n       sizes {sizes}, {args.queries} held-out queries, HNSW M={m} efC={ef_c}, "
          "searches one query at a time on one thread", flush=True)

    features = _dev_features(work, args.features)
    dev_index = work / "dev-index"
    r = run_cbir("index-dev", ["index", "--features", features, "--output", str(dev_index), *extra], logs)
    if r["code"]:
        raise SystemExit(f"index of the dev features failed: {r['tail']}")
    dev = _leave_one_out_dev(str(dev_index))
    model = SyntheticModel.fit(dev.pop("vectors"), dev.pop("labels"))
    print(f"  dev features: {dev['items']} items; " + ", ".join(
        f"{k} recall {v['recall']:.3f} at {v['qps']:.0f} q/s" for k, v in dev["methods"].items()), flush=True)

    results = []
    for n in sizes:
        ds = synthetic_dataset(model, n, args.queries, seed=n)
        feat = work / f"synthetic-{n}"
        _write_features(ds.base, feat)
        shards = max(1, math.ceil(n / args.shard_items))
        out = work / f"index-{n}"
        build = run_cbir(f"index-{n}", ["index", "--features", str(feat), "--output", str(out), "--shards",
                                        str(shards), *extra], logs)
        if build["code"]:
            raise SystemExit(f"index of {n} vectors failed: {build['tail']}")
        res = _measure(str(out), ds.queries, f"{n:,}", m, ef_c, base_for_peer=True)
        res["build"] = build
        if n == max(sizes) and args.baseline_rev and not args.quick:
            res["baseline"] = _baseline_build(args.baseline_rev, feat, work / f"index-baseline-{n}", 8, work)
        if n == max(sizes) and not (args.quick or args.no_neighbors):
            nb = work / f"neighbors-{n}"
            job = run_cbir(f"neighbors-{n}", ["neighbors", "--index", str(out), "--output", str(nb), "-k", str(K),
                                              "--method", "hnsw"], logs)
            res["neighbors"] = {**job, "recall": _neighbour_recall(nb, str(out)) if job["code"] == 0 else None}
            print(f"    neighbours: {job['wall']:.0f}s, recall {res['neighbors']['recall']}", flush=True)
        shutil.rmtree(feat, ignore_errors=True)
        results.append(res)

    text = _report(dev, results, m, ef_c, args)
    print(text)
    if not (args.quick or args.print_only):
        update_section("bench_index", text)
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def _report(dev: dict[str, Any], results: list[dict[str, Any]], m: int, ef_c: int, args) -> str:
    rows = [["dev photos (leave-one-out)", f"{dev['items']:,}", "1", "-", "-"]
            + [f"{dev['methods'][k]['recall']:.3f} @ {dev['methods'][k]['qps']:,.0f}" for k in ("hnsw", "annoy", "lsh")]
            + ["-", "-"]]
    for r in results:
        meth = r["methods"]
        peer = r.get("hnswlib")
        rows.append([
            "synthetic (held-out queries)", f"{r['items']:,}", str(r["shards"]), f"{r['build']['wall']:.0f}",
            f"{r['build']['peak_mb']:,.0f}",
            *[f"{meth[k]['recall']:.3f} @ {meth[k]['qps']:,.0f}" for k in ("hnsw", "annoy", "lsh")],
            f"{meth['exact']['qps']:,.0f}",
            f"{peer['recall']:.3f} @ {peer['qps']:,.0f} (ef {peer['ef']})" if peer else "not installed",
        ])
    table = md_table(["vectors", "items", "shards", "cbir index s", "index peak MB", "HNSW recall@10 @ q/s",
                      "Annoy recall@10 @ q/s", "LSH recall@10 @ q/s", "exact q/s", "hnswlib recall @ q/s"], rows)
    cal_rows = []
    for r in results:
        man = r["manifest"]
        cells = _calibration_cells(man)
        size_mb = man.bytes / 1e6
        cal_rows.append([f"{r['items']:,}", cells.get("hnsw", "-"), cells.get("annoy", "-"), cells.get("lsh", "-"),
                         f"{size_mb:,.0f}", f"{man.bytes / r['items']:.0f}"])
    cal_table = md_table(["items", "HNSW (per shard)", "Annoy (per shard)", "LSH (per shard)", "index MB",
                          "bytes/item"], cal_rows)
    parts = [
        "## Index: three types at scale, calibrated, against exact search and hnswlib",
        "`.venv/bin/python -m benchmarks.bench_index`",
        f"Setup: {machine()}; HNSW M={m}, efConstruction={ef_c}; calibration target recall@10 ≥ 0.95 per shard; "
        f"{args.queries} held-out queries drawn from the same mixture, never indexed; searches one query at a time "
        "on one thread; `cbir index` runs as its own process on both cores (peak memory is its own). Synthetic "
        "vectors: `benchmarks/synthetic.py`, fitted to the dev features. Each cell is recall@10 against exact "
        "search over the same index vectors, and queries/s.",
        table,
        "What calibration chose (smallest effort reaching the target on each shard's held-out items):",
        cal_table,
    ]
    big = results[-1] if results else None
    if big and big.get("baseline"):
        base = big["baseline"]
        parts.append(
            f"Same-run baseline: `cbir index` of revision {base['rev']} (before this search layer: Annoy + LSH, no "
            f"HNSW, no calibration) at {big['items']:,} items in {base['shards']} shards, as the issue measured it "
            f"(210 s, 7.8 GB on its machine): {base['wall']:.0f} s, peak {base['peak_mb']:,.0f} MB here. This "
            f"build, all three types in {big['shards']} shard(s) and calibrated: {big['build']['wall']:.0f} s "
            f"({big['build']['wall'] / base['wall']:.2f}× the baseline's time), peak "
            f"{big['build']['peak_mb']:,.0f} MB ({big['build']['peak_mb'] / base['peak_mb']:.2f}×).")
    if big and big.get("neighbors"):
        nb = big["neighbors"]
        parts.append(f"`cbir neighbors --method hnsw -k 10` over the {big['items']:,}-item index: {nb['wall']:.0f} s "
                     f"({big['items'] / nb['wall']:,.0f} items/s), peak {nb['peak_mb']:,.0f} MB, recall@10 of its rows "
                     f"{nb['recall']:.3f} on 500 sampled items against exact leave-one-out search.")
    if len(results) >= 2:
        a, b = results[0], results[-1]
        f = b["items"] / a["items"]
        grow = md_table(["cost", f"{a['items']:,}", f"{b['items']:,}", f"× for {f:.0f}× items"], [
            ["cbir index wall s", f"{a['build']['wall']:.0f}", f"{b['build']['wall']:.0f}",
             f"{b['build']['wall'] / a['build']['wall']:.1f}"],
            ["index MB", f"{a['manifest'].bytes / 1e6:,.0f}", f"{b['manifest'].bytes / 1e6:,.0f}",
             f"{b['manifest'].bytes / a['manifest'].bytes:.1f}"],
            *[[f"{k} q/s", f"{a['methods'][k]['qps']:,.0f}", f"{b['methods'][k]['qps']:,.0f}",
               f"{b['methods'][k]['qps'] / a['methods'][k]['qps']:.2f}"] for k in ("hnsw", "annoy", "lsh", "exact")],
        ])
        per_item_build = b["build"]["wall"] / b["items"]
        bytes_per_item = b["manifest"].bytes / b["items"]
        shard_items = args.shard_items
        extrap = []
        for total, workers in ((10_000_000, 10), (100_000_000, 50)):
            shards = math.ceil(total / shard_items)
            hours = per_item_build * total / workers / 3600
            extrap.append([f"{total:,}", str(shards), str(workers), f"{bytes_per_item * shard_items / 1e9:.1f}",
                           f"{bytes_per_item * total / 1e9:,.0f}", f"{hours:.1f}"])
        parts += [f"How cost grows from {a['items']:,} to {b['items']:,} items (shards of ≤ {shard_items:,}):", grow,
                  "What that makes of larger corpora on a cluster, from the measured cost per item on these 2 cores "
                  "(build time linear in items, shards built in parallel, one 2-core worker per shard at a time; "
                  "per-shard query cost grows with log n for HNSW, so a query fans out over shards in parallel):",
                  md_table(["items", "shards", "workers (2 cores)", "GB per shard", "index GB", "build hours"],
                           extrap)]
    return "\n\n".join(parts)


if __name__ == "__main__":
    raise SystemExit(main())
