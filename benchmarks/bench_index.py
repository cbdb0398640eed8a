"""Index build and search: Annoy, LSH + multi-index hashing and exact search, at scale and on real features.

What it measures, all in one run and against exact numpy search as the baseline:

* **Real dev-photo features** (imagenette-dev + flowers17-dev, MobileNet v1 α=0.25, 1,720 photos): the
  Beam index job (``pipelines.index.run``: tf.Transform fit + shard builds + publish) timed per shard
  count, then every method's recall@10 and queries/s on the index's own vectors (leave-one-out queries).
* **Synthetic vectors at 100k and 1M** (``--sizes``) with the structure of those real features, built with
  the ``index_builder`` functions directly (no Beam):

  - build time and index size per shard count (``build_shard``: Annoy + LSH + vectors + id map), and the
    recall and queries/s of a search that fans out over the shards and merges;
  - Annoy: trees × search_k; LSH: bits × MIH substring radius, ranked by Hamming distance alone, by
    re-ranking the 100 Hamming-nearest candidates exactly, or by re-ranking every candidate;
  - exact numpy search (float32 matmul + argpartition), one query at a time and in batches of 256;
  - a lower ``--dims`` (64, 128): how many true neighbours survive a further PCA, and Annoy there;
  - hnswlib and faiss-cpu as peers when they are importable (they are not project dependencies).

**How the synthetic vectors are made** (``SyntheticModel``): the real features are transformed as the
index does (L2 → PCA to 256 → L2: the vectors of the Beam-built index), and from them we measure the mean,
the covariance Σ, the share alpha of the variance that lies between class means (folder labels), and each
class's own within-class covariance. Synthetic items form a Gaussian mixture of ~``per_class``-item
components: centres drawn around the real mean with covariance alpha·Σ, items around their centre with the
within-class covariance of a randomly chosen real class, then L2-normalised. Borrowing real class shapes
matters: real classes spread along a few dozen directions, and a mixture with globally-shaped noise made
Annoy's recall 0.76 where the real set gives 0.87 at the same size. The report prints the neighbour
cosines and that Annoy recall for the real set and a synthetic set of the same size, so the match can be
judged. Queries are further draws from the same mixture, never indexed.

Searches run one query at a time on one thread (the script sets OPENBLAS_NUM_THREADS=1 unless it is
set: on this shared 2-core machine a 2-thread matrix-vector product ran 3-5× slower than one thread);
builds use every core (Annoy ``n_jobs=-1``). Other jobs on
the machine make figures noisy: compare rows of one run, not runs.

    .venv/bin/python benchmarks/bench_index.py --quick          # ~20k vectors, prints only (about a minute)
    .venv/bin/python benchmarks/bench_index.py                  # 100k and 1M, writes RESULTS.md

The full run was not made on the project machine; from a 100k Annoy build (8 s of add_item, 20 s for 50
trees on 2 cores) expect roughly 45-60 minutes on 2 cores, a peak of ~6 GB of RAM and ~4 GB of scratch
disk at 1M, most of it Annoy builds (three shard layouts and the trees grid at 1M).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # per-query timings compare one core each

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks._results import machine, md_table, update_section  # noqa: E402
from index_builder import layout, lsh  # noqa: E402
from index_builder.shard import ShardItems, ShardParams, build_annoy, build_shard  # noqa: E402

log = logging.getLogger("bench_index")

K = 10
RERANK_TOP = 100  # LSH "re-rank top-C": Hamming-nearest candidates re-ranked exactly
TARGET = 0.95
SECTION = "bench_index"


# -- data ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Dataset:
    name: str
    base: np.ndarray  # (n, d) float32, unit norm
    queries: np.ndarray  # (q, d) float32, unit norm
    exclude: np.ndarray | None = None  # per query, a base id that must not count (leave-one-out), or None
    truth: np.ndarray | None = None  # (q, K) exact neighbour ids


def _normalise(x: np.ndarray) -> np.ndarray:
    return (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)).astype(np.float32)


@dataclasses.dataclass
class SyntheticModel:
    """A class-shaped Gaussian mixture fitted to real transformed features.

    Centres of the mixture components are drawn around the real mean with
    covariance alpha·Σ (Σ the real covariance, alpha the between-class share of the
    variance). Each component borrows the within-class covariance of one real
    class (its centred items' SVD, so of rank at most that class's size − 1): real
    classes spread along a few dozen directions, not all 256, and an isotropic or
    globally-shaped noise makes neighbours far harder to find than in real data.
    """

    mean: np.ndarray  # (d,)
    basis: np.ndarray  # (d, d) columns: eigenvectors of the covariance
    scales: np.ndarray  # (d,) square roots of the eigenvalues
    alpha: float  # between-class share of the variance
    per_class: int  # items per mixture component
    shapes: list[np.ndarray]  # per real class, (r, d): z @ shape has that class's covariance

    @classmethod
    def fit(cls, vectors: np.ndarray, labels: list[str | None]) -> SyntheticModel:
        x = vectors.astype(np.float64)
        mean = x.mean(axis=0)
        eigval, eigvec = np.linalg.eigh(np.cov(x - mean, rowvar=False))
        order = np.argsort(eigval)[::-1]
        eigval, eigvec = np.clip(eigval[order], 0, None), eigvec[:, order]
        lab = np.asarray([str(v) for v in labels])
        between, shapes = 0.0, []
        for c in np.unique(lab):
            members = x[lab == c]
            if len(members) < 2:
                continue
            centre = members.mean(axis=0)
            between += len(members) * np.sum((centre - mean) ** 2)
            _, sv, vt = np.linalg.svd(members - centre, full_matrices=False)
            shapes.append((sv[:, None] * vt / np.sqrt(len(members) - 1)).astype(np.float32))
        alpha = float(between / np.sum((x - mean) ** 2))
        return cls(mean.astype(np.float32), eigvec.astype(np.float32), np.sqrt(eigval).astype(np.float32),
                   alpha, max(2, round(len(x) / max(1, len(shapes)))), shapes)

    def describe(self) -> dict[str, Any]:
        var = self.scales.astype(np.float64) ** 2
        share = np.cumsum(var) / var.sum()
        return {
            "alpha_between_class": round(self.alpha, 3),
            "items_per_class": self.per_class,
            "class_shapes": len(self.shapes),
            "variance_top10_axes": round(float(share[9]), 3),
            "axes_for_90pct": int(np.searchsorted(share, 0.9) + 1),
        }

    def sample(self, n: int, seed: int) -> np.ndarray:
        rng = np.random.default_rng(seed)
        d = len(self.mean)
        a = (self.basis * self.scales[None, :]).T  # z @ a has covariance Σ
        n_comp = max(1, n // self.per_class)
        centres = self.mean + np.sqrt(self.alpha) * (rng.standard_normal((n_comp, d), dtype=np.float32) @ a)
        shape_of = rng.integers(0, len(self.shapes), size=n_comp)
        which = rng.integers(0, n_comp, size=n)
        out = centres[which]
        for s, shape in enumerate(self.shapes):  # one matmul per real class shape
            idx = np.flatnonzero(shape_of[which] == s)
            out[idx] += rng.standard_normal((len(idx), shape.shape[0]), dtype=np.float32) @ shape
        return _normalise(out)


def synthetic_dataset(model: SyntheticModel, n: int, n_queries: int, seed: int) -> Dataset:
    allv = model.sample(n + n_queries, seed)
    perm = np.random.default_rng(seed + 1).permutation(len(allv))
    return Dataset(f"synthetic {n:,}", allv[perm[:n]], allv[perm[n:]])


# -- exact search --------------------------------------------------------------------------------------


def _top_k(sims: np.ndarray, k: int) -> np.ndarray:
    part = np.argpartition(-sims, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(sims, part, axis=1), axis=1, kind="stable")
    return np.take_along_axis(part, order, axis=1)


def exact_truth(ds: Dataset, batch: int = 256) -> tuple[np.ndarray, float]:
    """Ground truth top-K (excluding a query's own id) and batched queries/s."""
    out = np.empty((len(ds.queries), K), dtype=np.int64)
    t0 = time.perf_counter()
    for s in range(0, len(ds.queries), batch):
        sims = ds.queries[s:s + batch] @ ds.base.T
        if ds.exclude is not None:
            sims[np.arange(sims.shape[0]), ds.exclude[s:s + batch]] = -np.inf
        out[s:s + batch] = _top_k(sims, K)
    elapsed = time.perf_counter() - t0
    ds.truth = out
    return out, len(ds.queries) / elapsed


def exact_single_qps(ds: Dataset, n: int) -> float:
    qs = ds.queries[:n]
    t0 = time.perf_counter()
    for q in qs:
        sims = ds.base @ q
        np.argpartition(-sims, K)[: K + 1]
    return len(qs) / (time.perf_counter() - t0)


def recall(found: list[np.ndarray] | np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(np.intersect1d(f[:K], t)) / K for f, t in zip(found, truth, strict=True)]))


def _drop(ids, exclude_id: int | None, k: int = K) -> np.ndarray:
    ids = np.asarray(ids, dtype=np.int64)
    if exclude_id is not None:
        ids = ids[ids != exclude_id]
    return ids[:k]


def _exclusions(ds: Dataset) -> list[int | None]:
    return [None] * len(ds.queries) if ds.exclude is None else [int(e) for e in ds.exclude]


# -- Annoy ---------------------------------------------------------------------------------------------


def bench_annoy(ds: Dataset, trees_grid: list[int], search_ks: list[int], workdir: Path,
                prebuilt: dict[int, tuple[str, float]] | None = None) -> list[dict[str, Any]]:
    from annoy import AnnoyIndex

    rows = []
    excl = _exclusions(ds)
    extra = 0 if ds.exclude is None else 1
    for trees in trees_grid:
        if prebuilt and trees in prebuilt:
            path, build_s = prebuilt[trees]
        else:
            path = str(workdir / f"annoy-{trees}.ann")
            t0 = time.perf_counter()
            build_annoy(ds.base, path, ShardParams(trees=trees))
            build_s = time.perf_counter() - t0
        index = AnnoyIndex(ds.base.shape[1], layout.METRIC)
        index.load(path)
        for sk in search_ks:
            found = []
            t0 = time.perf_counter()
            for q, e in zip(ds.queries, excl, strict=True):
                found.append(_drop(index.get_nns_by_vector(q, K + extra, search_k=sk), e))
            elapsed = time.perf_counter() - t0
            rows.append({"method": "annoy", "trees": trees, "search_k": sk, "recall": recall(found, ds.truth),
                         "qps": len(found) / elapsed, "build_s": build_s, "bytes": os.path.getsize(path)})
            log.info("%s annoy trees=%d search_k=%d recall %.3f %.0f q/s", ds.name, trees, sk,
                     rows[-1]["recall"], rows[-1]["qps"])
        index.unload()
        if not (prebuilt and trees in prebuilt):
            os.remove(path)
    return rows


# -- LSH -----------------------------------------------------------------------------------------------


def bench_lsh(ds: Dataset, bits_grid: list[int], radii: list[int], seed: int = 1234) -> list[dict[str, Any]]:
    rows = []
    excl = _exclusions(ds)
    base16 = ds.base.astype(np.float16)  # what a shard stores for re-ranking
    n = len(ds.base)
    for bits in bits_grid:
        t0 = time.perf_counter()
        planes = lsh.hyperplanes(ds.base.shape[1], bits, seed)
        codes = lsh.encode(ds.base, planes)
        tables = lsh.MIHTables.build(codes)
        build_s = time.perf_counter() - t0
        size = codes.nbytes + tables.offsets.nbytes + tables.ids.nbytes
        qcodes = lsh.encode(ds.queries, planes)
        for radius in radii:
            t_probe = t_ham = t_rr = t_all = 0.0
            found_h, found_rr, found_all, n_cand = [], [], [], []
            for q, code, e in zip(ds.queries, qcodes, excl, strict=True):
                a = time.perf_counter()
                cand = tables.probe(code, radius)
                if e is not None:
                    cand = cand[cand != e]
                b = time.perf_counter()
                dist = lsh.hamming_codes(code, codes[cand]) if len(cand) else np.zeros(0, np.int32)
                order = np.lexsort((cand, dist))
                c = time.perf_counter()
                found_h.append(cand[order[:K]])
                d = time.perf_counter()
                top = cand[order[:RERANK_TOP]]
                found_rr.append(top[np.argsort(-(base16[top].astype(np.float32) @ q), kind="stable")[:K]])
                f = time.perf_counter()
                found_all.append(cand[np.argsort(-(base16[cand].astype(np.float32) @ q), kind="stable")[:K]])
                g = time.perf_counter()
                t_probe += b - a
                t_ham += (c - b) + (d - c)
                t_rr += f - d
                t_all += g - f
                n_cand.append(len(cand))
            nq = len(ds.queries)
            common = {"method": "lsh", "bits": bits, "substring_radius": radius,
                      "hamming_radius": lsh.guaranteed_radius(bits, radius), "build_s": build_s, "bytes": size,
                      "candidates": float(np.mean(n_cand)), "candidate_share": float(np.mean(n_cand)) / n}
            for rank, found, t in (("hamming", found_h, t_probe + t_ham),
                                   (f"rerank top {RERANK_TOP}", found_rr, t_probe + t_ham + t_rr),
                                   ("rerank all", found_all, t_probe + t_all)):
                rows.append(common | {"rank": rank, "recall": recall(found, ds.truth), "qps": nq / t})
            log.info("%s lsh bits=%d r=%d cand %.0f recall %.3f/%.3f/%.3f", ds.name, bits, radius,
                     np.mean(n_cand), *(r["recall"] for r in rows[-3:]))
    return rows


# -- peers ---------------------------------------------------------------------------------------------


def bench_peers(ds: Dataset, workdir: Path) -> list[dict[str, Any]]:
    """hnswlib and faiss-cpu, if installed: the libraries a team would otherwise pick."""
    rows: list[dict[str, Any]] = []
    excl = _exclusions(ds)
    extra = 0 if ds.exclude is None else 1
    n, d = ds.base.shape
    try:
        import hnswlib
    except ImportError:
        log.info("hnswlib not installed: skipped")
    else:
        t0 = time.perf_counter()
        index = hnswlib.Index(space="ip", dim=d)
        index.init_index(max_elements=n, ef_construction=200, M=16, random_seed=1)
        index.add_items(ds.base, np.arange(n), num_threads=-1)
        build_s = time.perf_counter() - t0
        path = workdir / "hnsw.bin"
        index.save_index(str(path))
        size = path.stat().st_size
        path.unlink()
        index.set_num_threads(1)
        for ef in (16, 32, 64, 128, 256):
            index.set_ef(max(ef, K + extra))
            found = []
            t0 = time.perf_counter()
            for q, e in zip(ds.queries, excl, strict=True):
                labels, _ = index.knn_query(q[None, :], k=K + extra)
                found.append(_drop(labels[0], e))
            elapsed = time.perf_counter() - t0
            rows.append({"method": "hnswlib", "params": f"M=16 efC=200 ef={ef}", "recall": recall(found, ds.truth),
                         "qps": len(found) / elapsed, "build_s": build_s, "bytes": size})
    try:
        import faiss
    except ImportError:
        log.info("faiss not installed: skipped")
    else:
        def run_faiss(index, label: str, build_s: float, knobs: list[tuple[str, Any]]):
            size = len(faiss.serialize_index(index))
            for knob, setter in knobs:
                setter()
                found = []
                t0 = time.perf_counter()
                for q, e in zip(ds.queries, excl, strict=True):
                    _, ids = index.search(q[None, :], K + extra)
                    found.append(_drop(ids[0], e))
                elapsed = time.perf_counter() - t0
                rows.append({"method": f"faiss {label}", "params": knob, "recall": recall(found, ds.truth),
                             "qps": len(found) / elapsed, "build_s": build_s, "bytes": size})

        t0 = time.perf_counter()
        hnsw = faiss.IndexHNSWFlat(d, 32, faiss.METRIC_INNER_PRODUCT)
        hnsw.hnsw.efConstruction = 200
        hnsw.add(ds.base)
        build_s = time.perf_counter() - t0
        faiss.omp_set_num_threads(1)
        run_faiss(hnsw, "HNSWFlat", build_s, [
            (f"M=32 efC=200 efSearch={ef}", lambda ef=ef: setattr(hnsw.hnsw, "efSearch", ef))
            for ef in (16, 32, 64, 128, 256)
        ])
        faiss.omp_set_num_threads(os.cpu_count() or 1)
        nlist = max(16, int(4 * np.sqrt(n)))
        t0 = time.perf_counter()
        quantizer = faiss.IndexFlatIP(d)
        ivf = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
        train = ds.base[np.random.default_rng(0).choice(n, size=min(n, 40 * nlist), replace=False)]
        ivf.train(train)
        ivf.add(ds.base)
        build_s = time.perf_counter() - t0
        faiss.omp_set_num_threads(1)
        run_faiss(ivf, "IVFFlat", build_s, [
            (f"nlist={nlist} nprobe={p}", lambda p=p: setattr(ivf, "nprobe", p)) for p in (1, 4, 16, 64)
        ])
    return rows


# -- PCA dimension -------------------------------------------------------------------------------------


def bench_dims(ds: Dataset, dims_grid: list[int], trees: int, search_ks: list[int],
               workdir: Path) -> list[dict[str, Any]]:
    """What ``--dims d`` trades: a further PCA of the vectors to d axes, then exact and Annoy search there.

    Recall is given twice: against exact search in the reduced space (what the index promises) and
    against exact search in the full space (which true neighbours survive the reduction). The PCA is
    fitted here on the already-transformed vectors, which approximates fitting it on the raw features.
    """
    from annoy import AnnoyIndex

    rows = []
    excl = _exclusions(ds)
    extra = 0 if ds.exclude is None else 1
    mean = ds.base.mean(axis=0)
    eigval, eigvec = np.linalg.eigh(np.cov(ds.base - mean, rowvar=False))
    eigvec = eigvec[:, np.argsort(eigval)[::-1]].astype(np.float32)
    for dims in dims_grid:
        if dims >= ds.base.shape[1]:
            continue
        proj = eigvec[:, :dims]
        red = Dataset(f"{ds.name} @ {dims}", _normalise((ds.base - mean) @ proj),
                      _normalise((ds.queries - mean) @ proj), ds.exclude)
        own, _ = exact_truth(red)
        qps = exact_single_qps(red, min(len(red.queries), 200))
        rows.append({"dims": dims, "method": "exact", "search_k": "", "recall_own": 1.0,
                     "recall_full": recall(own, ds.truth), "qps": qps, "build_s": 0.0, "bytes": red.base.nbytes})
        path = str(workdir / f"annoy-dims-{dims}.ann")
        t0 = time.perf_counter()
        build_annoy(red.base, path, ShardParams(trees=trees))
        build_s = time.perf_counter() - t0
        index = AnnoyIndex(dims, layout.METRIC)
        index.load(path)
        for sk in search_ks:
            found = []
            t0 = time.perf_counter()
            for q, e in zip(red.queries, excl, strict=True):
                found.append(_drop(index.get_nns_by_vector(q, K + extra, search_k=sk), e))
            elapsed = time.perf_counter() - t0
            rows.append({"dims": dims, "method": f"annoy {trees} trees", "search_k": sk,
                         "recall_own": recall(found, own), "recall_full": recall(found, ds.truth),
                         "qps": len(found) / elapsed, "build_s": build_s, "bytes": os.path.getsize(path)})
        index.unload()
        os.remove(path)
        log.info("%s dims %d: exact keeps %.3f of the full-space top-%d", ds.name, dims, rows[-len(search_ks) - 1]
                 ["recall_full"], K)
    return rows


# -- shards --------------------------------------------------------------------------------------------


def bench_shards(ds: Dataset, shard_counts: list[int], trees: int, bits: int, search_k: int,
                 workdir: Path, keep_single: bool) -> tuple[list[dict[str, Any]], tuple[str, float] | None]:
    """build_shard per shard (Annoy + LSH + vectors + id map), then a fan-out search over the shards."""
    from annoy import AnnoyIndex

    rows = []
    kept = None
    n, d = ds.base.shape
    ids = [f"synthetic/{i:08d}" for i in range(n)]
    planes = lsh.hyperplanes(d, bits, 1234)
    excl = _exclusions(ds)
    extra = 0 if ds.exclude is None else 1
    for count in shard_counts:
        assign = np.fromiter((layout.stable_shard(i, count) for i in ids), dtype=np.int64, count=n)
        root = workdir / f"shards-{count}"
        infos, members = [], []
        for s in range(count):
            member = np.flatnonzero(assign == s)  # ascending, and ids sort like their positions
            members.append(member)
            items = ShardItems([ids[i] for i in member], [""] * len(member), [None] * len(member),
                               [""] * len(member), ds.base[member])
            infos.append(build_shard(items, s, str(root / f"shard-{s:05d}"), planes, ShardParams(trees=trees)))
        sizes = [sum(f["bytes"] for f in i["files"].values()) for i in infos]
        indexes = []
        for s in range(count):
            a = AnnoyIndex(d, layout.METRIC)
            a.load(str(root / f"shard-{s:05d}" / layout.ANNOY_FILE))
            indexes.append(a)
        found = []
        t0 = time.perf_counter()
        for q, e in zip(ds.queries, excl, strict=True):
            hits = []
            for a, member in zip(indexes, members, strict=True):
                got, dist = a.get_nns_by_vector(q, K + extra, search_k=search_k, include_distances=True)
                hits += zip(dist, member[got], strict=True)
            hits.sort()
            found.append(_drop([i for _, i in hits], e))
        elapsed = time.perf_counter() - t0
        for a in indexes:
            a.unload()
        total_s = sum(i["seconds"]["total"] for i in infos)
        rows.append({
            "shards": count, "build_s_sum": total_s, "build_s_max": max(i["seconds"]["total"] for i in infos),
            "annoy_s_sum": sum(i["seconds"]["annoy"] for i in infos), "bytes": sum(sizes),
            "bytes_max_shard": max(sizes), "recall": recall(found, ds.truth), "qps": len(found) / elapsed,
        })
        log.info("%s %d shards: build %.1fs, %.1f MB, recall %.3f", ds.name, count, total_s, sum(sizes) / 1e6,
                 rows[-1]["recall"])
        if count == 1 and keep_single:
            kept = (str(root / "shard-00000" / layout.ANNOY_FILE), infos[0]["seconds"]["annoy"])
        else:
            shutil.rmtree(root)
    return rows, kept


# -- real features and the Beam job --------------------------------------------------------------------


def real_features(features: str | None, workdir: Path) -> str:
    """An extract output of the dev photos: the one given, or a fresh one made here."""
    if features:
        return features
    from models.backbone import ModelSpec
    from pipelines import extract

    data = Path(os.environ.get("CBIR_DATA_DIR") or REPO.parent / "shared" / "data")
    out = workdir / "dev-features"
    log.info("extracting %s/{imagenette-dev,flowers17-dev} with mobilenet_v1_025", data)
    weights = os.environ.get("CBIR_WEIGHTS_DIR") or str(REPO.parent / "shared" / "models" / "keras")
    extract.run(extract.ExtractConfig(input=f"{data}/*-dev/*/*", output=str(out),
                                      model=ModelSpec("mobilenet_v1_025", weights_dir=weights)))
    return str(out)


def bench_beam(features: str, shard_counts: list[int], workdir: Path) -> tuple[list[dict[str, Any]], str]:
    """The index job on the real features with the CLI defaults; returns rows and the last version folder."""
    from pipelines import index

    rows, version_dir = [], ""
    # untimed: the first run in a process pays for importing and tracing TensorFlow / tf.Transform
    index.run(index.IndexConfig(features=features, output=str(workdir / "beam-warm-up"), shards=1))
    shutil.rmtree(workdir / "beam-warm-up")
    for count in shard_counts:
        out = workdir / f"beam-index-{count}"
        t0 = time.perf_counter()
        m = index.run(index.IndexConfig(features=features, output=str(out), shards=count))
        wall = time.perf_counter() - t0
        rows.append({"shards": count, "items": m["items"], "wall_s": wall, "pipeline_s": m["elapsed_seconds"],
                     "bytes": m["bytes"], "dims": f"{m['dimension']['input']}→{m['dimension']['output']}"})
        version_dir = str(out / m["version"])
        log.info("beam index %d shards: %.1fs, %.1f MB", count, wall, m["bytes"] / 1e6)
    return rows, version_dir


def load_index_vectors(version_dir: str) -> tuple[np.ndarray, list[str | None]]:
    import pyarrow.parquet as pq

    manifest = json.loads((Path(version_dir) / layout.MANIFEST).read_text())
    vectors, labels = [], []
    for s in range(manifest["shards"]):
        d = Path(version_dir) / layout.shard_dir(s)
        vectors.append(np.load(d / layout.VECTORS_FILE).astype(np.float32))
        labels += pq.read_table(d / layout.IDMAP_FILE).column("label").to_pylist()
    return _normalise(np.concatenate(vectors)), labels


def neighbour_profile(vectors: np.ndarray, sample: int = 500) -> dict[str, float]:
    """Mean cosine of the 1st, 10th and 100th neighbour of a sample of items."""
    idx = np.random.default_rng(0).choice(len(vectors), size=min(sample, len(vectors)), replace=False)
    sims = vectors[idx] @ vectors.T
    sims[np.arange(len(idx)), idx] = -np.inf
    top = -np.sort(-sims, axis=1)
    return {f"nn{r}": round(float(np.mean(top[:, r - 1])), 3) for r in (1, 10, 100) if r <= top.shape[1]}


def annoy_difficulty(vectors: np.ndarray, trees: int = 10) -> float:
    """Leave-one-out recall@10 of a small Annoy index: how hard the set is for tree search."""
    ds = Dataset("check", vectors, vectors, exclude=np.arange(len(vectors)))
    exact_truth(ds)
    with tempfile.TemporaryDirectory() as tmp:
        return round(bench_annoy(ds, [trees], [-1], Path(tmp))[0]["recall"], 3)


# -- one dataset ----------------------------------------------------------------------------------------


def evaluate(ds: Dataset, args, workdir: Path, shard_counts: list[int]) -> dict[str, Any]:
    log.info("%s: %d base vectors, %d queries", ds.name, len(ds.base), len(ds.queries))
    _, batch_qps = exact_truth(ds)
    single_qps = exact_single_qps(ds, min(len(ds.queries), 200))
    result: dict[str, Any] = {"name": ds.name, "n": len(ds.base), "queries": len(ds.queries),
                              "dim": ds.base.shape[1],
                              "exact": {"qps_single": single_qps, "qps_batched": batch_qps,
                                        "bytes": ds.base.nbytes}}
    prebuilt = None
    if shard_counts:
        result["shards"], kept = bench_shards(ds, shard_counts, args.default_trees, args.default_bits,
                                              args.default_search_k, workdir,
                                              keep_single=args.default_trees in args.trees)
        prebuilt = {args.default_trees: kept} if kept else None
    result["annoy"] = bench_annoy(ds, args.trees, args.search_k, workdir, prebuilt)
    if prebuilt:
        shutil.rmtree(workdir / "shards-1", ignore_errors=True)
    result["lsh"] = bench_lsh(ds, args.lsh_bits, args.lsh_radius)
    result["dims"] = bench_dims(ds, args.dims, args.default_trees, args.search_k, workdir)
    result["peers"] = bench_peers(ds, workdir)
    return result


# -- report --------------------------------------------------------------------------------------------


def _mb(b: float) -> str:
    return f"{b / 1e6:,.1f}"


def ds_dim(res: dict[str, Any]) -> int:
    return int(res["dim"])


def _best(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The fastest configuration at or above the recall target."""
    ok = [r for r in rows if r["recall"] >= TARGET]
    return max(ok, key=lambda r: r["qps"]) if ok else None


def report(results: list[dict[str, Any]], beam_rows: list[dict[str, Any]], synth: dict[str, Any],
           command: str, args) -> str:
    out = [f"Command: `{command}`", "", f"Machine: {machine()}", ""]
    cr, cs = synth["check_real"], synth["check_synthetic"]
    out.append(
        f"Recall@{K} against exact float32 search; queries/s with one thread per query (BLAS limited to one "
        "thread unless OPENBLAS_NUM_THREADS says otherwise), so they compare per-core cost. Synthetic vectors: a "
        f"class-shaped Gaussian mixture fitted to the real transformed features (between-class share "
        f"{synth['alpha_between_class']}, {synth['items_per_class']} items per component, within-component "
        f"covariances of the {synth['class_shapes']} real classes; the top 10 axes hold "
        f"{synth['variance_top10_axes']:.0%} of the variance). At the real set's size, real vs synthetic: "
        f"1st/10th/100th-neighbour cosine {cr['nn1']}/{cr['nn10']}/{cr['nn100']} vs "
        f"{cs['nn1']}/{cs['nn10']}/{cs['nn100']}, leave-one-out recall of a 10-tree Annoy "
        f"{cr['annoy_10_trees_recall']} vs {cs['annoy_10_trees_recall']}."
    )
    if beam_rows:
        out += ["", "**Beam index job on the real dev features** (DirectRunner, CLI defaults: dims 256, trees 50, "
                "LSH 128 bits; wall includes tf.Transform fit and publish, after one untimed warm-up run)", ""]
        out.append(md_table(["shards", "items", "dims", "wall s", "pipeline s", "MB"],
                            [[r["shards"], r["items"], r["dims"], f"{r['wall_s']:.1f}", f"{r['pipeline_s']:.1f}",
                              _mb(r["bytes"])] for r in beam_rows]))
    for res in results:
        ex = res["exact"]
        out += ["", f"### {res['name']} ({res['n']:,} vectors, {res['queries']} queries)", ""]
        if "profile" in res:
            out.append("Mean cosine of the 1st / 10th / 100th neighbour: "
                       + " / ".join(f"{v:.3f}" for v in res["profile"].values()) + ".")
            out.append("")
        out.append(f"Exact numpy search: {ex['qps_single']:,.0f} q/s one at a time, {ex['qps_batched']:,.0f} q/s "
                   f"batched (256), {_mb(ex['bytes'])} MB of float32 vectors.")
        if res.get("shards"):
            out += ["", f"Shard builds (`build_shard`, trees {args.default_trees}, LSH {args.default_bits} bits; "
                    f"search fans out with search_k {args.default_search_k} per shard):", ""]
            out.append(md_table(
                ["shards", "build s (sum)", "build s (largest shard)", "Annoy s (sum)", "MB", "MB largest shard",
                 "recall", "q/s"],
                [[r["shards"], f"{r['build_s_sum']:.1f}", f"{r['build_s_max']:.1f}", f"{r['annoy_s_sum']:.1f}",
                  _mb(r["bytes"]), _mb(r["bytes_max_shard"]), f"{r['recall']:.3f}", f"{r['qps']:,.0f}"]
                 for r in res["shards"]]))
        out += ["", "Annoy (one index):", ""]
        out.append(md_table(["trees", "search_k", "recall", "q/s", "build s", "MB"],
                            [[r["trees"], r["search_k"], f"{r['recall']:.3f}", f"{r['qps']:,.0f}",
                              f"{r['build_s']:.1f}", _mb(r["bytes"])] for r in res["annoy"]]))
        out += ["", f"LSH + MIH (substring radius s guarantees Hamming radius r; candidates as a share of the "
                f"corpus; 'rerank top {RERANK_TOP}' re-ranks the Hamming-nearest {RERANK_TOP} exactly):", ""]
        out.append(md_table(["bits", "s", "r", "candidates", "ranking", "recall", "q/s", "build s", "MB"],
                            [[r["bits"], r["substring_radius"], r["hamming_radius"],
                              f"{r['candidates']:,.0f} ({r['candidate_share']:.1%})", r["rank"],
                              f"{r['recall']:.3f}", f"{r['qps']:,.0f}", f"{r['build_s']:.1f}", _mb(r["bytes"])]
                             for r in res["lsh"]]))
        if res.get("dims"):
            out += ["", f"Lower `--dims` (a further PCA of these vectors): recall against exact search in the reduced "
                    f"space and against the full {ds_dim(res)}-d exact top-{K}:", ""]
            out.append(md_table(["dims", "method", "search_k", "recall (own space)", f"recall ({ds_dim(res)}-d)",
                                 "q/s", "build s", "MB"],
                                [[r["dims"], r["method"], r["search_k"], f"{r['recall_own']:.3f}",
                                  f"{r['recall_full']:.3f}", f"{r['qps']:,.0f}", f"{r['build_s']:.1f}",
                                  _mb(r["bytes"])] for r in res["dims"]]))
        if res["peers"]:
            out += ["", "Peers:", ""]
            out.append(md_table(["library", "params", "recall", "q/s", "build s", "MB"],
                                [[r["method"], r["params"], f"{r['recall']:.3f}", f"{r['qps']:,.0f}",
                                  f"{r['build_s']:.1f}", _mb(r["bytes"])] for r in res["peers"]]))
        else:
            out += ["", "Peers: hnswlib and faiss-cpu are not installed here, so they were skipped."]
        best_a, best_l = _best(res["annoy"]), _best(res["lsh"])
        out += ["", f"Fastest at recall@{K} ≥ {TARGET}: "
                + (f"Annoy trees {best_a['trees']}, search_k {best_a['search_k']}: {best_a['recall']:.3f} at "
                   f"{best_a['qps']:,.0f} q/s ({best_a['qps'] / ex['qps_single']:.1f}× exact), built in "
                   f"{best_a['build_s']:.1f}s, {_mb(best_a['bytes'])} MB" if best_a else "no Annoy setting")
                + "; "
                + (f"LSH {best_l['bits']} bits, s={best_l['substring_radius']}, {best_l['rank']}: "
                   f"{best_l['recall']:.3f} at {best_l['qps']:,.0f} q/s" if best_l else "no LSH setting")
                + "."]
    return "\n".join(out)


# -- main ----------------------------------------------------------------------------------------------


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="20k vectors and small grids; prints, never writes RESULTS.md")
    p.add_argument("--sizes", type=_ints, default=None, help="synthetic corpus sizes (default 100000,1000000)")
    p.add_argument("--queries", type=int, default=None, help="held-out queries per synthetic size (default 500)")
    p.add_argument("--features", default=None, help="an extract output of the dev photos (default: extract them)")
    p.add_argument("--beam-shards", type=_ints, default=None, help="shard counts for the Beam job (default 1,2,4)")
    p.add_argument("--shards", type=_ints, default=None, help="shard counts for build_shard (default 1,4,16)")
    p.add_argument("--trees", type=_ints, default=None, help="Annoy trees grid (default 10,25,50,100)")
    p.add_argument("--search-k", type=_ints, default=None,
                   help="Annoy search_k grid, -1 = trees × k (default -1,1000,3000,10000,30000,100000)")
    p.add_argument("--lsh-bits", type=_ints, default=None, help="LSH bits grid (default 64,128,256)")
    p.add_argument("--lsh-radius", type=_ints, default=None, help="MIH substring radius grid (default 0,1,2,3)")
    p.add_argument("--dims", type=_ints, default=None, help="reduced PCA dimensions to compare (default 64,128)")
    p.add_argument("--default-trees", type=int, default=50)
    p.add_argument("--default-bits", type=int, default=128)
    p.add_argument("--default-search-k", type=int, default=-1)
    p.add_argument("--workdir", default=None, help="scratch folder (default: a temporary one, deleted)")
    p.add_argument("--json", default=None, help="also write every figure as JSON here")
    p.add_argument("--no-write", action="store_true", help="do not update benchmarks/RESULTS.md")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("apache_beam", "absl", "tensorflow", "index_builder", "pipelines", "transforms"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    quick = args.quick
    args.sizes = args.sizes or ([20_000] if quick else [100_000, 1_000_000])
    args.queries = args.queries or (200 if quick else 500)
    args.beam_shards = args.beam_shards or ([1, 2] if quick else [1, 2, 4])
    args.shards = args.shards if args.shards is not None else ([1, 4] if quick else [1, 4, 16])
    args.trees = args.trees or ([10, 50] if quick else [10, 25, 50, 100])
    args.search_k = args.search_k or ([-1, 1000, 5000, 20000] if quick else [-1, 1000, 3000, 10000, 30000, 100000])
    args.lsh_bits = args.lsh_bits or [64, 128, 256]
    args.dims = args.dims if args.dims is not None else ([128] if quick else [64, 128])
    args.lsh_radius = args.lsh_radius or ([0, 1, 2] if quick else [0, 1, 2, 3])
    command = "python benchmarks/bench_index.py " + " ".join(argv if argv is not None else sys.argv[1:])
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    own_workdir = args.workdir is None
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="cbir-bench-index-"))
    workdir.mkdir(parents=True, exist_ok=True)
    results, beam_rows = [], []
    try:
        features = real_features(args.features, workdir)
        beam_rows, version_dir = bench_beam(features, args.beam_shards, workdir)
        real_vectors, labels = load_index_vectors(version_dir)
        model = SyntheticModel.fit(real_vectors, labels)
        synth = model.describe()
        real_profile = neighbour_profile(real_vectors)
        twin = model.sample(len(real_vectors), seed=99)  # the same size as the real set: same difficulty?
        synth["check_real"] = real_profile | {"annoy_10_trees_recall": annoy_difficulty(real_vectors)}
        synth["check_synthetic"] = neighbour_profile(twin) | {"annoy_10_trees_recall": annoy_difficulty(twin)}
        log.info("synthetic model %s", synth)
        real = Dataset("real dev features, leave-one-out", real_vectors, real_vectors,
                       exclude=np.arange(len(real_vectors)))
        res = evaluate(real, args, workdir, shard_counts=[])
        res["profile"] = real_profile
        results.append(res)
        for n in args.sizes:
            ds = synthetic_dataset(model, n, args.queries, seed=n)
            res = evaluate(ds, args, workdir, args.shards)
            res["profile"] = neighbour_profile(ds.base)
            results.append(res)
            del ds
    finally:
        if own_workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    text = report(results, beam_rows, synth, command, args)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps({"beam": beam_rows, "synthetic_model": synth, "results": results},
                                              indent=2, default=float))
    if quick or args.no_write:
        print("\n(--quick / --no-write: benchmarks/RESULTS.md not updated)")
    else:
        update_section(SECTION, "## Index build and search (`benchmarks/bench_index.py`)\n\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
