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
from collections.abc import Callable
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


class _Bench:
    """What :func:`configurations` measures with: one searcher, the queries (global ids, each left out of its
    own ranking), their query vectors, the stored vectors, and the plain exact options every row starts from."""

    def __init__(self, searcher: Searcher, queries: np.ndarray, qv: np.ndarray, vectors: np.ndarray,
                 exact: SearchOptions):
        self.searcher, self.queries, self.qv, self.vectors, self.exact = searcher, queries, qv, vectors, exact
        self.rows: list[dict[str, Any]] = []

    def expanded(self, alpha: float, n: int) -> np.ndarray:
        """The query vectors after query expansion with the top ``n`` (weighted by similarity**alpha)."""
        top, top_scores = self.searcher.search_arrays(self.qv, self.exact, exclude=self.queries, k=n)
        return self.searcher.expand(self.qv, top, n, top_scores, alpha)

    def _head(self, qids: np.ndarray, ranked: np.ndarray, n: int, query_vectors: np.ndarray | None = None
              ) -> tuple[np.ndarray, np.ndarray]:
        """(the rankings' first ``n`` ids, their scores against the query vectors of ``qids``)."""
        qrows = np.searchsorted(self.queries, qids)
        q = self.qv[qrows] if query_vectors is None else query_vectors[qrows]
        head = ranked[:, :n]
        return head, _scored(self.vectors, q, head)

    def diffusion_head(self, candidates: int, query_vectors: np.ndarray | None) -> Callable:
        def reorder(qids: np.ndarray, ranked: np.ndarray) -> np.ndarray:
            n = min(candidates, ranked.shape[1])
            head, scores = self._head(qids, ranked, n, query_vectors)
            ids, _ = self.searcher.diffuse_lists(head, scores, n)
            out = ranked.copy()
            out[:, :n] = ids
            return out
        return reorder

    def verify_head(self, candidates: int) -> Callable:
        def reorder(qids: np.ndarray, ranked: np.ndarray) -> np.ndarray:
            n = min(candidates, ranked.shape[1])
            head, scores = self._head(qids, ranked, n)
            ids, _, _ = self.searcher.verify_arrays([self.searcher.local_features_of(int(g)) for g in qids], head,
                                                    scores, n)
            out = ranked.copy()
            out[:, :n] = ids
            return out
        return reorder

    def verify_run(self, n: int) -> Callable[[], None]:
        """What verifying ``n`` candidates per query costs: the exact search, then the verification."""
        def run() -> None:
            ids, scores = self.searcher.search_arrays(self.qv, self.exact.replace(k=n), exclude=self.queries)
            self.searcher.verify_arrays([self.searcher.local_features_of(int(g)) for g in self.queries], ids,
                                        scores, n)
        return run

    def timed(self, opts: SearchOptions, run: Callable[[], None] | None = None) -> float:
        """Queries per second of searching with ``opts`` (or of ``run``)."""
        started = time.perf_counter()
        if run is None:
            self.searcher.search_arrays(self.qv, opts, exclude=self.queries)
        else:
            run()
        return len(self.queries) / max(time.perf_counter() - started, 1e-9)

    def add(self, name: str, options: dict[str, Any], qps: float, **kw: Any) -> None:
        kw.setdefault("query_vectors", self.qv)
        m = metrics.label_metrics(self.vectors, self.searcher.labels, self.queries, ks=KS, **kw)
        self.rows.append({"name": name, "options": options, "map": m["map"], "p@1": m["p@1"], "p@10": m["p@10"],
                          "queries": m["queries"], "qps": qps})


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
    exact = base.replace(method="exact", rerank=False, qe=0, qe_alpha=0.0, diffusion=False, verify=0)
    qe_n = base.rerank.qe or BASELINE_QE
    alpha = base.rerank.qe_alpha or 3.0
    bench = _Bench(searcher, queries, qv, vectors, exact)
    add, timed = bench.add, bench.timed
    add("exact", {}, timed(exact))
    qe_vectors = bench.expanded(0.0, qe_n)
    if qe_n != BASELINE_QE:  # the customary baseline, so that every report can be read against it
        add(f"exact + QE {BASELINE_QE}", {"qe": BASELINE_QE}, timed(exact.replace(qe=BASELINE_QE)),
            query_vectors=bench.expanded(0.0, BASELINE_QE))
    add(f"exact + QE {qe_n}", {"qe": qe_n}, timed(exact.replace(qe=qe_n)), query_vectors=qe_vectors)
    aqe_vectors = bench.expanded(alpha, qe_n)
    add(f"exact + αQE {qe_n} (α={alpha:g})", {"qe": qe_n, "qe_alpha": alpha},
        timed(exact.replace(qe=qe_n, qe_alpha=alpha)), query_vectors=aqe_vectors)
    if caps["diffusion"]:
        n = base.rerank.diffusion_candidates
        add(f"exact + diffusion ({n})", {"diffusion": True, "diffusion_candidates": n},
            timed(exact.replace(diffusion=True, diffusion_candidates=n)), reorder=bench.diffusion_head(n, None))
        add(f"exact + QE {qe_n} + diffusion ({n})", {"qe": qe_n, "diffusion": True, "diffusion_candidates": n},
            timed(exact.replace(qe=qe_n, diffusion=True, diffusion_candidates=n)),
            query_vectors=qe_vectors, reorder=bench.diffusion_head(n, qe_vectors))
    if caps["verify"] and base.rerank.verify > 0:
        n = base.rerank.verify
        add(f"exact + verification ({n})", {"verify": n}, timed(exact, bench.verify_run(n)),
            reorder=bench.verify_head(n))
    index = {"dba": (searcher.manifest.dba or {}).get("k"), "graph_k": (searcher.manifest.graph or {}).get("k")}
    for row in bench.rows:
        row["index"] = dict(index)
    return bench.rows


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
