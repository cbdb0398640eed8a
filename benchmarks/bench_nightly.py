"""A night's re-index at scale: ``cbir index --incremental`` + ``cbir neighbors --incremental`` against a full night.

In one run, on class-shaped synthetic vectors fitted to the dev features (``benchmarks/synthetic.py``),
``--items`` of them (default 1M) in one shard:

* the base: ``cbir index`` and ``cbir neighbors --method hnsw -k 10`` of night 0;
* nights of 0.1 %, 1 % and 10 % churn (half additions, a quarter changes, a quarter removals), each
  applied to the base by the incremental index and table; the 1 % night is also built in full
  (index and table from scratch): the baseline the incremental night is measured against;
* recall@10 of the updated index's HNSW, Annoy and LSH (as calibrated) on held-out queries against
  exact search, next to the full build's; recall@10 of the updated table's rows against exact
  leave-one-out search; the item set equal to the full build's;
* seven 1 % nights in a row on the 1 % night's result: time per night, the tombstones the graph and
  the trees carry, and recall after the seventh.

    .venv/bin/python -m benchmarks.bench_nightly                     # 1M items, writes RESULTS.md
    .venv/bin/python -m benchmarks.bench_nightly --items 100000 --print-only
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # the measuring searches: one thread, as bench_index
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from benchmarks._proc import run_cbir  # noqa: E402
from benchmarks._results import machine, md_table, update_section  # noqa: E402
from benchmarks.bench_index import _dev_features, _leave_one_out_dev, _neighbour_recall  # noqa: E402
from benchmarks.synthetic import SyntheticModel  # noqa: E402

K = 10
CHURNS = (0.001, 0.01, 0.1)


class Corpus:
    """The night's items as arrays: id numbers, content stamps (the sha256), raw vectors; a pool to draw from."""

    def __init__(self, vectors: np.ndarray, pool: np.ndarray):
        self.ids = np.arange(len(vectors), dtype=np.int64)
        self.stamps = np.arange(len(vectors), dtype=np.int64)
        self.vectors = vectors
        self.pool, self.drawn, self.next = pool, 0, len(vectors)

    def copy(self) -> Corpus:
        out = Corpus.__new__(Corpus)
        out.__dict__ = {k: (v.copy() if isinstance(v, np.ndarray) and k != "pool" else v)
                        for k, v in self.__dict__.items()}
        return out

    def draw(self, n: int) -> np.ndarray:
        if self.drawn + n > len(self.pool):
            raise SystemExit("the pool of new vectors ran out: raise its size")
        out = self.pool[self.drawn:self.drawn + n]
        self.drawn += n
        return out

    def night(self, churn: float, seed: int) -> dict[str, int]:
        """Removes churn/4, changes churn/4 and adds churn/2 of the items, in place."""
        n = len(self.ids)
        rng = np.random.default_rng(seed)
        removed, changed = max(1, int(n * churn / 4)), max(1, int(n * churn / 4))
        added = max(1, int(n * churn / 2))
        picks = rng.choice(n, size=removed + changed, replace=False)
        change = picks[removed:]
        self.vectors[change] = self.draw(changed)
        self.stamps[change] = np.arange(self.next, self.next + changed)
        self.next += changed
        keep = np.ones(n, bool)
        keep[picks[:removed]] = False
        new_ids = np.arange(self.next, self.next + added)
        self.next += added
        self.ids = np.concatenate([self.ids[keep], new_ids])
        self.stamps = np.concatenate([self.stamps[keep], new_ids])
        self.vectors = np.concatenate([self.vectors[keep], self.draw(added)])
        return {"removed": removed, "changed": changed, "added": added}

    def write(self, out: Path, rows_per_part: int = 200_000) -> None:
        """The corpus as an extract output (parts + manifest) under ``out``, replacing what was there."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        from artefacts.manifests import ExtractCounts, FeaturesManifest, PartFile, new_run_id, utc_now
        from plumbing import publish
        from transforms.features_io import feature_schema

        shutil.rmtree(out, ignore_errors=True)
        (out / "features").mkdir(parents=True)
        n, dim = self.vectors.shape
        parts = []
        for i, lo in enumerate(range(0, n, rows_per_part)):
            hi = min(n, lo + rows_per_part)
            names = [f"s/{j:08d}" for j in self.ids[lo:hi].tolist()]
            table = pa.Table.from_arrays([
                pa.array(names, pa.string()), pa.array(names, pa.string()),
                pa.array([f"{j:064x}" for j in self.stamps[lo:hi].tolist()], pa.string()),
                pa.array(np.ones(hi - lo, np.int32)), pa.array(np.ones(hi - lo, np.int32)),
                pa.array([None] * (hi - lo), pa.string()),
                pa.FixedSizeListArray.from_arrays(pa.array(self.vectors[lo:hi].reshape(-1), pa.float32()), dim),
                pa.array(names, pa.string()),  # unit: each synthetic item its own input
            ], schema=feature_schema(dim))
            pq.write_table(table, out / f"features/part-night-{i:05d}.parquet")
            parts.append(PartFile(f"features/part-night-{i:05d}.parquet", hi - lo))
        publish.write_manifest(str(out / "MANIFEST.json"), FeaturesManifest(
            run_id=new_run_id(), created_utc=utc_now(), model={"preset": "synthetic"},
            model_fingerprint="synthetic", dimension=dim, counts=ExtractCounts(read=n, ok=n, failed=0, inputs=n),
            files={"features": parts, "failures": []}))


def _jobs(features: Path, index: Path, table: Path, logs: Path, name: str, incremental: bool) -> dict[str, Any]:
    flag = ["--incremental"] if incremental else []
    ix = run_cbir(f"index-{name}", ["index", "--features", str(features), "--output", str(index), *flag], logs)
    if ix["code"]:
        raise SystemExit(f"index {name} failed: {ix['tail']}")
    nb = run_cbir(f"neighbors-{name}", ["neighbors", "--index", str(index), "--output", str(table), "-k", str(K),
                                        "--method", "hnsw", *flag], logs)
    if nb["code"]:
        raise SystemExit(f"neighbors {name} failed: {nb['tail']}")
    return {"index": ix, "neighbors": nb, "wall": ix["wall"] + nb["wall"]}


def _latest(index: Path) -> tuple[str, dict[str, Any]]:
    version = json.loads((index / "LATEST").read_text())["version"]
    return version, json.loads((index / version / "MANIFEST.json").read_text())


def _measure(index: Path, table: Path, queries: np.ndarray) -> dict[str, Any]:
    """recall@10 of HNSW, Annoy and LSH on held-out queries against exact search; of the table's rows."""
    import faiss

    from evaluation.metrics import recall_at_k
    from search.index_files import load_transform
    from search.searcher import Searcher

    faiss.omp_set_num_threads(1)
    out: dict[str, Any] = {}
    with Searcher(str(index), verify=False, threads=1) as s:
        q = load_transform(s.version_dir, s.manifest)(queries)
        truth, _ = s.search_arrays(q, k=K, method="exact", batch_size=256)
        for method in ("hnsw", "annoy", "lsh"):
            ids, _ = s.search_arrays(q, k=K, method=method, batch_size=1)
            out[method] = float(np.nanmean(recall_at_k(ids, truth)))
        out["ids"] = sorted(s.image_ids)
    out["rows"] = _neighbour_recall(table, str(index))
    return out


def _state(index: Path) -> dict[str, Any]:
    """The shard's tombstones after the night: HNSW nodes removed, Annoy items removed and not yet planted."""
    version, manifest = _latest(index)
    shard = json.loads((index / version / "shards" / "shard-00000" / "SHARD.json").read_text())
    return {"version": version, "decision": (manifest.get("incremental") or {}).get("decision", "full"),
            "hnsw_tombstones": (shard.get("hnsw") or {}).get("tombstones", 0),
            "annoy_removed": (shard.get("annoy") or {}).get("removed", 0),
            "annoy_delta": (shard.get("annoy") or {}).get("delta", 0), "items": manifest["items"]}


def _clone(src: Path, dst: Path) -> None:
    """A copy of a published folder that shares its files (hard links): jobs only ever add and rename."""
    subprocess.run(["cp", "-al", str(src), str(dst)], check=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--nights", type=int, default=7, help="1 %% nights in a row")
    parser.add_argument("--features", default=None, help="an extract output of the dev photos (default: extract)")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--print-only", action="store_true", help="leave RESULTS.md as it is")
    args = parser.parse_args(argv)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-nightly-"))
    logs = work / "logs"
    print(f"setup: {machine()}\n       {args.items:,} items in one shard, nights of {CHURNS} churn, "
          f"{args.nights} nights of 1 % in a row, {args.queries} held-out queries", flush=True)
    dev = _leave_one_out_dev(_dev_index(work, args.features, logs))
    model = SyntheticModel.fit(dev.pop("vectors"), dev.pop("labels"))
    pool = int(args.items * (0.75 * sum(CHURNS) + 0.0075 * args.nights)) + 1000
    allv = model.sample(args.items + args.queries + pool, seed=args.items)
    allv = allv[np.random.default_rng(1).permutation(len(allv))]
    queries = allv[args.items:args.items + args.queries]
    base = Corpus(allv[:args.items].copy(), allv[args.items + args.queries:])
    del allv
    base.write(work / "features-0")
    jobs = {"base": _jobs(work / "features-0", work / "index-base", work / "table-base", logs, "base", False)}
    results: dict[str, Any] = {"jobs": jobs, "churn": {}, "nights": []}
    for i, churn in enumerate(CHURNS):
        night = base.copy()
        counts = night.night(churn, seed=10 + i)
        name = f"{churn:g}"
        night.write(work / f"features-{name}")
        _clone(work / "index-base", work / f"index-{name}")
        _clone(work / "table-base", work / f"table-{name}")
        run = _jobs(work / f"features-{name}", work / f"index-{name}", work / f"table-{name}", logs,
                    f"incremental-{name}", True)
        entry = {"counts": counts, "incremental": run, "state": _state(work / f"index-{name}"),
                 "recall": _measure(work / f"index-{name}", work / f"table-{name}", queries)}
        if churn == 0.01:
            entry["full"] = _jobs(work / f"features-{name}", work / "index-full", work / "table-full", logs,
                                  "full-0.01", False)
            entry["full_recall"] = _measure(work / "index-full", work / "table-full", queries)
            chain = night
        ids = entry["recall"].pop("ids")
        entry["same_items"] = ids == entry["full_recall"].pop("ids") if "full_recall" in entry else None
        results["churn"][name] = entry
        print(f"  {name}: incremental {run['wall']:.0f}s ({_state(work / f'index-{name}')})", flush=True)
        shutil.rmtree(work / f"features-{name}", ignore_errors=True)
    for n in range(args.nights):
        counts = chain.night(0.01, seed=100 + n)
        chain.write(work / "features-chain")
        run = _jobs(work / "features-chain", work / "index-0.01", work / "table-0.01", logs, f"night-{n + 1}", True)
        results["nights"].append({"counts": counts, "run": run, "state": _state(work / "index-0.01")})
        print(f"  night {n + 1}: {run['wall']:.0f}s {results['nights'][-1]['state']}", flush=True)
    results["after_nights"] = _measure(work / "index-0.01", work / "table-0.01", queries)
    results["after_nights"].pop("ids")
    text = _report(results, args)
    print(text)
    if not args.print_only:
        update_section("bench_nightly", text)
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def _dev_index(work: Path, features: str | None, logs: Path) -> str:
    out = work / "dev-index"
    r = run_cbir("index-dev", ["index", "--features", _dev_features(work, features), "--output", str(out)], logs)
    if r["code"]:
        raise SystemExit(f"index of the dev features failed: {r['tail']}")
    return str(out)


def _recall_cells(r: dict[str, Any]) -> list[str]:
    return [f"{r[m]:.3f}" for m in ("hnsw", "annoy", "lsh", "rows")]


def _report(results: dict[str, Any], args) -> str:
    base = results["jobs"]["base"]
    full = results["churn"]["0.01"]["full"]
    rows = []
    for name, e in results["churn"].items():
        inc = e["incremental"]
        rows.append([f"{float(name):.1%}", f"{e['counts']['added']:,} / {e['counts']['changed']:,} / "
                     f"{e['counts']['removed']:,}", f"{inc['index']['wall']:.0f}", f"{inc['neighbors']['wall']:.0f}",
                     f"{inc['wall']:.0f}", f"{inc['wall'] / full['wall']:.3f}", *_recall_cells(e["recall"]),
                     e["state"]["decision"]])
    fr = results["churn"]["0.01"]["full_recall"]
    rows.append(["1.0% full build", "-", f"{full['index']['wall']:.0f}", f"{full['neighbors']['wall']:.0f}",
                 f"{full['wall']:.0f}", "1", *_recall_cells(fr), "full"])
    table = md_table(["churn", "added / changed / removed", "index s", "neighbours s", "night s", "× full night",
                      "HNSW recall@10", "Annoy recall@10", "LSH recall@10", "row recall@10", "decision"], rows)
    nights = md_table(["night", "index s", "neighbours s", "HNSW tombstones", "Annoy removed + unplanted", "items"],
                      [[str(i + 1), f"{n['run']['index']['wall']:.0f}", f"{n['run']['neighbors']['wall']:.0f}",
                        f"{n['state']['hnsw_tombstones']:,}",
                        f"{n['state']['annoy_removed']:,} + {n['state']['annoy_delta']:,}", f"{n['state']['items']:,}"]
                       for i, n in enumerate(results["nights"])])
    after = results["after_nights"]
    return "\n".join([
        "## Nightly: incremental index and neighbour table against a full night",
        "",
        "`.venv/bin/python -m benchmarks.bench_nightly" + (f" --items {args.items}" if args.items != 1_000_000
                                                          else "") + "`",
        "",
        f"Setup: {machine()}; {args.items:,} class-shaped synthetic vectors (fitted to the dev features) in one "
        f"shard, all three index types calibrated to recall@10 ≥ 0.95; tables `--method hnsw -k 10`; every job a "
        f"`cbir` process on the local runner. Base night: index {base['index']['wall']:.0f} s, table "
        f"{base['neighbors']['wall']:.0f} s. Recall on {args.queries} held-out queries against exact search; row "
        f"recall on 500 sampled rows against exact leave-one-out search. The 1 % night's incremental version holds "
        f"the same items as its full build: {results['churn']['0.01']['same_items']}.",
        "",
        table,
        "",
        f"{args.nights} nights of 1 % in a row on the 1 % night (each applied to the previous night's version):",
        "",
        nights,
        "",
        f"After the last night: HNSW {after['hnsw']:.3f}, Annoy {after['annoy']:.3f}, LSH {after['lsh']:.3f}, "
        f"rows {after['rows']:.3f} (full build of the 1 % night: {fr['hnsw']:.3f}, {fr['annoy']:.3f}, "
        f"{fr['lsh']:.3f}, {fr['rows']:.3f}).",
    ])


if __name__ == "__main__":
    raise SystemExit(main())
