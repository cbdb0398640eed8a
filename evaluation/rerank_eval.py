"""Measuring the re-rankers: every configuration an index supports, and simulated relevance feedback.

Each configuration is scored like the plain exact ranking in ``cbir evaluate``: mAP over
the *full* leave-one-out ranking (a re-ranker re-orders the head, the tail stays as the
exact ranking has it), precision@1 and @10, plus its cost as queries per second of the
searcher doing it (``Searcher.search_arrays`` / ``verify_arrays``) over the same queries.

Relevance feedback is simulated as a user who, round after round, marks each of the shown
top 10 relevant when its label is the query's and not relevant otherwise; marks
accumulate over rounds, and the next list is what ``Searcher.feedback_arrays`` returns for
them (the Rocchio-moved query's candidates re-scored by the kernel on the marks, rejected
items left out), exactly as ``cbir query --like/--unlike`` and the service answer.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from evaluation import metrics
from search import rerank
from search.options import SearchOptions
from search.searcher import Searcher, normalise_rows

KS = (1, 5, 10)
BASELINE_QE = 3  # exact + QE 3: the row every configuration is compared with (issue 13)


def _scored(vectors: np.ndarray, qv: np.ndarray, ranked: np.ndarray) -> np.ndarray:
    return np.einsum("bd,bnd->bn", qv.astype(np.float32), vectors[ranked])


def configurations(searcher: Searcher, queries: np.ndarray, qv: np.ndarray, vectors: np.ndarray,
                   base: SearchOptions) -> list[dict[str, Any]]:
    """Plain, QE (and QE 3, the baseline), αQE, diffusion (graph), QE + diffusion, verification, as the index allows.

    ``queries`` are global ids (each left out of its own ranking), ``qv`` their query vectors:
    ``cbir evaluate`` passes the stored vectors (on a DBA index, augmented ones, as a neighbour
    table's queries are); a benchmark may pass the plain vectors new images would have.

    ``base`` carries the knobs: ``qe`` (default 3 when 0), ``qe_alpha`` (default 3 for the αQE
    row), ``diffusion_candidates``, ``verify`` (verification runs only when > 0 and the
    index has local features: it costs milliseconds per candidate).
    """
    caps = searcher.capabilities
    labels = searcher.labels
    exact = base.replace(method="exact", rerank=False, qe=0, qe_alpha=0.0, diffusion=False, verify=0)
    qe_n = base.rerank.qe or BASELINE_QE
    alpha = base.rerank.qe_alpha or 3.0
    rows: list[dict[str, Any]] = []

    def expanded(a: float, n: int = qe_n) -> np.ndarray:
        top, top_scores = searcher.search_arrays(qv, exact, exclude=queries, k=n)
        return searcher.expand(qv, top, n, top_scores, a)

    def diffusion_head(query_vectors: np.ndarray | None):
        def reorder(qids: np.ndarray, ranked: np.ndarray) -> np.ndarray:
            n = min(base.rerank.diffusion_candidates, ranked.shape[1])
            qrows = np.searchsorted(queries, qids)
            q = qv[qrows] if query_vectors is None else query_vectors[qrows]
            head = ranked[:, :n]
            ids, _ = searcher.diffuse_lists(head, _scored(vectors, q, head), n)
            out = ranked.copy()
            out[:, :n] = ids
            return out
        return reorder

    def verify_head(qids: np.ndarray, ranked: np.ndarray) -> np.ndarray:
        n = min(base.rerank.verify, ranked.shape[1])
        qrows = np.searchsorted(queries, qids)
        head = ranked[:, :n]
        ids, _, _ = searcher.verify_arrays([searcher.local_features_of(int(g)) for g in qids], head,
                                           _scored(vectors, qv[qrows], head), n)
        out = ranked.copy()
        out[:, :n] = ids
        return out

    def timed(opts: SearchOptions, run=None) -> float:
        started = time.perf_counter()
        if run is None:
            searcher.search_arrays(qv, opts, exclude=queries)
        else:
            run()
        return len(queries) / max(time.perf_counter() - started, 1e-9)

    def add(name: str, options: dict[str, Any], qps: float, **kw: Any) -> None:
        kw.setdefault("query_vectors", qv)
        m = metrics.label_metrics(vectors, labels, queries, ks=KS, **kw)
        rows.append({"name": name, "options": options, "map": m["map"], "p@1": m["p@1"], "p@10": m["p@10"],
                     "queries": m["queries"], "qps": qps})

    add("exact", {}, timed(exact))
    qe_vectors = expanded(0.0)
    if qe_n != BASELINE_QE:  # the customary baseline, so that every report can be read against it
        add(f"exact + QE {BASELINE_QE}", {"qe": BASELINE_QE}, timed(exact.replace(qe=BASELINE_QE)),
            query_vectors=expanded(0.0, BASELINE_QE))
    add(f"exact + QE {qe_n}", {"qe": qe_n}, timed(exact.replace(qe=qe_n)), query_vectors=qe_vectors)
    aqe_vectors = expanded(alpha)
    add(f"exact + αQE {qe_n} (α={alpha:g})", {"qe": qe_n, "qe_alpha": alpha},
        timed(exact.replace(qe=qe_n, qe_alpha=alpha)), query_vectors=aqe_vectors)
    if caps["diffusion"]:
        n = base.rerank.diffusion_candidates
        add(f"exact + diffusion ({n})", {"diffusion": True, "diffusion_candidates": n},
            timed(exact.replace(diffusion=True, diffusion_candidates=n)), reorder=diffusion_head(None))
        add(f"exact + QE {qe_n} + diffusion ({n})", {"qe": qe_n, "diffusion": True, "diffusion_candidates": n},
            timed(exact.replace(qe=qe_n, diffusion=True, diffusion_candidates=n)),
            query_vectors=qe_vectors, reorder=diffusion_head(qe_vectors))
    if caps["verify"] and base.rerank.verify > 0:
        n = base.rerank.verify

        def verify_run() -> None:
            ids, scores = searcher.search_arrays(qv, exact.replace(k=n), exclude=queries)
            searcher.verify_arrays([searcher.local_features_of(int(g)) for g in queries], ids, scores, n)
        add(f"exact + verification ({n})", {"verify": n}, timed(exact, verify_run), reorder=verify_head)
    dba = (searcher.manifest.dba or {}).get("k")
    for row in rows:
        row["index"] = {"dba": dba, "graph_k": (searcher.manifest.graph or {}).get("k")}
    return rows


def feedback_rounds(searcher: Searcher, queries: np.ndarray, qv: np.ndarray, rounds: int,
                    weights: rerank.FeedbackWeights = rerank.FeedbackWeights(), shown: int = 10,
                    opts: SearchOptions | None = None) -> list[dict[str, Any]]:
    """Precision@``shown`` of the first list and after each of ``rounds`` simulated feedback rounds."""
    lab = np.asarray(searcher.labels, dtype=object)
    keep = np.asarray([lab[q] is not None for q in queries])
    queries, qv = queries[keep], qv[keep]
    search = (opts or SearchOptions()).replace(method="exact", k=shown, qe=0, diffusion=False, verify=0,
                                               feedback=weights)
    liked: list[set[int]] = [set() for _ in queries]
    unliked: list[set[int]] = [set() for _ in queries]
    current = normalise_rows(np.asarray(qv, np.float32))
    out = []
    for r in range(rounds + 1):
        if r == 0:
            ids, _ = searcher.search_arrays(current, search, exclude=queries)
        else:
            ids = np.concatenate([
                searcher.feedback_arrays(qv[i], sorted(liked[i]), sorted(unliked[i]), search,
                                         exclude=int(queries[i]))[0] for i in range(len(queries))])
        rel = metrics.relevance(ids, lab[queries], lab)
        out.append({"round": r, "p@10" if shown == 10 else f"p@{shown}": float(rel.mean()) if len(rel) else 0.0})
        if r == rounds:
            break
        shown_labels = lab[np.maximum(ids, 0)]
        for i, row in enumerate(ids):
            for gid, label in zip(row.tolist(), shown_labels[i].tolist(), strict=True):
                if gid >= 0 and label is not None:  # an unlabelled result is left unmarked
                    (liked[i] if label == lab[queries[i]] else unliked[i]).add(gid)
    return out
