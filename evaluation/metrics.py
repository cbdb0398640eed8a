"""Retrieval metrics in plain numpy: average precision, precision@k, recall@k, precision–recall curves.

Conventions (``cbir evaluate`` and the serving benchmark use them, the tests check
them against a loop written from the textbook definitions):

* Leave-one-out: every query is an indexed item; it is removed from its own
  ranking, and the other items with its label are the relevant ones (R of them).
* Label metrics use the labelled items only: an item without a label is neither
  a query nor a candidate, since whether it is relevant is unknown.
* AP over a ranking of length L: ``sum_{i: rel_i} P@i / min(R, L)``; over the full
  ranking L = N - 1 so it is the usual AP, over a returned top-K it is AP@K.
  Queries with R = 0 are skipped (AP is undefined) and counted.
* P@k = relevant among the first k / k. Recall@k of an approximate search =
  |approximate top-k ∩ exact top-k| / |exact top-k|.
* The precision–recall curve is the mean over queries of interpolated precision
  (the best precision at any recall ≥ r) at recall levels 0, 0.01, …, 1.
* Rankings sort by descending score, ties by position in the database (stable).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

RECALL_LEVELS = np.linspace(0.0, 1.0, 101)
_RANK_ELEMENTS = 1 << 24  # float64 similarities ranked at a time by leave_one_out_rankings


def relevance(ranked: np.ndarray, query_labels: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(Q, L) bool: whether each ranked id (-1 = padding) has its query's label.

    Unlabelled candidates (label None) are dropped from the ranking first, the rest
    moving up, so that they count neither for nor against a query.
    """
    ranked = np.asarray(ranked, np.int64)
    lab = np.asarray(labels, dtype=object)
    known = (ranked >= 0) & _has_label(lab)[np.maximum(ranked, 0)]
    if not known.all():
        order = np.argsort(~known, axis=1, kind="stable")  # known first, in their ranked order
        ranked = np.where(np.take_along_axis(known, order, axis=1), np.take_along_axis(ranked, order, axis=1), -1)
    ql = np.asarray(query_labels, dtype=object)[:, None]
    return (ranked >= 0) & (lab[np.maximum(ranked, 0)] == ql)


def average_precision(rel: np.ndarray, n_relevant: np.ndarray) -> np.ndarray:
    """AP per query (NaN where R = 0), normalised by min(R, L) for a ranking truncated at L."""
    rel = np.asarray(rel, bool)
    n_relevant = np.asarray(n_relevant, np.int64)
    length = rel.shape[1]
    hits = np.cumsum(rel, axis=1)
    precision = hits / np.arange(1, length + 1)
    total = np.sum(np.where(rel, precision, 0.0), axis=1)
    denom = np.minimum(n_relevant, length).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n_relevant > 0, total / denom, np.nan)


def precision_at(rel: np.ndarray, k: int) -> np.ndarray:
    """P@k per query; a ranking shorter than k counts its missing places as misses."""
    return np.sum(np.asarray(rel, bool)[:, :k], axis=1) / float(k)


def recall_at_k(approx: np.ndarray, exact: np.ndarray) -> np.ndarray:
    """Per query: share of the exact top-k ids (-1 = padding) that the approximate top-k found."""
    approx = np.asarray(approx, np.int64)
    exact = np.asarray(exact, np.int64)
    out = np.empty(len(exact), np.float64)
    for i, (a, e) in enumerate(zip(approx, exact, strict=True)):
        e = e[e >= 0]
        out[i] = np.isin(e, a[a >= 0]).mean() if len(e) else np.nan
    return out


def interpolated_pr(rel: np.ndarray, n_relevant: np.ndarray, levels: np.ndarray = RECALL_LEVELS) -> np.ndarray:
    """(Q, len(levels)) interpolated precision: max precision at any rank with recall ≥ level.

    Only the ranks of relevant items matter (precision peaks there), so each query
    costs O(R + levels) after locating its relevant ranks. Levels beyond the
    recall a truncated ranking reaches get precision 0.
    """
    rel = np.asarray(rel, bool)
    out = np.zeros((len(rel), len(levels)), np.float64)
    rows, cols = np.nonzero(rel)
    starts = np.searchsorted(rows, np.arange(len(rel) + 1))
    for q in range(len(rel)):
        r = int(n_relevant[q])
        pos = cols[starts[q]:starts[q + 1]]
        if r == 0 or len(pos) == 0:
            continue
        j = np.arange(1, len(pos) + 1)
        best_after = np.maximum.accumulate((j / (pos + 1))[::-1])[::-1]  # best precision from the j-th hit on
        need = np.maximum(np.ceil(levels * r - 1e-9).astype(np.int64), 1)  # hits needed for each recall level
        ok = need <= len(pos)
        out[q, ok] = best_after[need[ok] - 1]
    return out


def leave_one_out_rankings(
    vectors: np.ndarray, queries: np.ndarray, query_vectors: np.ndarray | None = None, block: int = 256
):
    """Yields (query positions, (b, N-1) ranked database ids) blockwise: the full exact ranking of
    each query over ``vectors`` without the query item itself, best first, ties by position.

    ``query_vectors`` replaces the query items' own vectors (expanded queries);
    the item itself is still the one removed.

    Similarities are computed in float64. In float32 a matrix product and a
    matrix-vector product round differently (up to ~1e-6 on unit vectors), and
    full rankings hold neighbours closer than that, so mAP would depend on the
    BLAS kernel and the block size of the machine that ran it. Stored vectors are
    float16, so float64 products are exact and the sums nearly so: the ranking
    is the one the stored vectors define.
    """
    vectors = np.asarray(vectors, np.float64)
    queries = np.asarray(queries, np.int64)
    qv = vectors[queries] if query_vectors is None else np.asarray(query_vectors, np.float64)
    # a block's similarities, their negation and the sort order are each (rows, N) of 8 bytes:
    # bound them to _RANK_ELEMENTS so a million-item index ranks in a few hundred MB
    block = max(1, min(block, _RANK_ELEMENTS // max(1, len(vectors))))
    for lo in range(0, len(queries), block):
        idx = queries[lo:lo + block]
        sims = qv[lo:lo + block] @ vectors.T
        sims[np.arange(len(idx)), idx] = -np.inf
        order = np.argsort(-sims, axis=1, kind="stable")[:, :-1]  # the item itself sorts last
        yield np.arange(lo, lo + len(idx)), order


def label_metrics(
    vectors: np.ndarray,
    labels: list[str | None],
    queries: np.ndarray | None = None,
    query_vectors: np.ndarray | None = None,
    ks: tuple[int, ...] = (1, 5, 10),
    levels: np.ndarray = RECALL_LEVELS,
    block: int = 256,
    reorder: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
) -> dict[str, Any]:
    """mAP over the full leave-one-out ranking, P@k and the PR curve, over labelled items.

    ``queries`` are positions in ``vectors`` (default: every labelled item); unlabelled
    queries are skipped, and so are queries whose label no other item carries.
    ``reorder(query ids, ranked ids)`` (both positions in ``vectors``; ranked (b, m)) may
    return each ranking with its head re-ordered (a re-ranker: diffusion, verification);
    the rest of the ranking stays as it was, so mAP stays a full-ranking figure.
    """
    lab = np.asarray(labels, dtype=object)
    labelled = np.flatnonzero(_has_label(lab))
    queries = labelled if queries is None else np.asarray(queries, np.int64)
    keep = np.isin(queries, labelled)
    if query_vectors is not None:
        query_vectors = np.asarray(query_vectors, np.float32)[keep]
    queries = queries[keep]
    # work inside the labelled sub-collection: positions there, and the query's position in it
    where = np.full(len(lab), -1, np.int64)
    where[labelled] = np.arange(len(labelled))
    sub_vectors = np.asarray(vectors, np.float32)[labelled]
    sub_labels = lab[labelled]
    _, label_index, counts = np.unique(sub_labels.astype(str), return_inverse=True, return_counts=True)
    n_relevant_all = counts[label_index] - 1  # the other items with the same label
    aps, precisions, curves = [], {k: [] for k in ks}, []
    for pos, ranked in leave_one_out_rankings(sub_vectors, where[queries], query_vectors, block):
        qsub = where[queries[pos]]
        if reorder is not None:
            ranked = where[reorder(queries[pos], labelled[ranked])]
        rel = sub_labels[ranked] == sub_labels[qsub][:, None]
        r = n_relevant_all[qsub]
        aps.append(average_precision(rel, r))
        for k in ks:
            precisions[k].append(precision_at(rel, k))
        curves.append(interpolated_pr(rel, r, levels))
    return _label_summary(aps, precisions, curves, int((~keep).sum()), int(len(counts)), levels)


def _label_summary(aps: list[np.ndarray], precisions: dict[int, list[np.ndarray]], curves: list[np.ndarray],
                   skipped_unlabelled: int, classes: int, levels: np.ndarray) -> dict[str, Any]:
    """Per-block figures of :func:`label_metrics` → its report: means over the queries with a relevant item."""
    ap = np.concatenate(aps) if aps else np.zeros(0)
    valid = ~np.isnan(ap)
    out: dict[str, Any] = {
        "queries": int(valid.sum()),
        "skipped_unlabelled": skipped_unlabelled,
        "skipped_no_relevant": int((~valid).sum()),
        "classes": classes,
        "map": float(ap[valid].mean()) if valid.any() else float("nan"),
    }
    for k, blocks in precisions.items():
        p = np.concatenate(blocks) if blocks else np.zeros(0)
        out[f"p@{k}"] = float(p[valid].mean()) if valid.any() else float("nan")
    curve = np.concatenate(curves) if curves else np.zeros((0, len(levels)))
    out["pr_curve"] = {
        "recall": [round(float(x), 4) for x in levels],
        "precision": [float(x) for x in (curve[valid].mean(axis=0) if valid.any() else np.zeros(len(levels)))],
    }
    return out


def list_metrics(
    ranked: np.ndarray, query_items: np.ndarray, labels: list[str | None], ks: tuple[int, ...] = (1, 5, 10)
) -> dict[str, Any]:
    """Label metrics of returned top-K lists (global ids): AP@K (normalised by min(R, K)) and P@k.

    The same conventions as :func:`label_metrics`: unlabelled queries and candidates
    are left out, queries without relevant items are skipped.
    """
    lab = np.asarray(labels, dtype=object)
    query_items = np.asarray(query_items, np.int64)
    has = _has_label(lab)
    keep = has[query_items]
    ranked, query_items = np.asarray(ranked, np.int64)[keep], query_items[keep]
    known = lab[has].astype(str)
    names, counts = np.unique(known, return_counts=True)
    count_of = dict(zip(names.tolist(), counts.tolist(), strict=True))
    r = np.asarray([count_of[str(lab[q])] - 1 for q in query_items], np.int64)
    rel = relevance(ranked, lab[query_items], lab)
    ap = average_precision(rel, r)
    valid = ~np.isnan(ap)
    out: dict[str, Any] = {"queries": int(valid.sum()), "k": int(ranked.shape[1]) if ranked.ndim == 2 else 0,
                           "map@k": float(ap[valid].mean()) if valid.any() else float("nan")}
    for k in ks:
        if k <= out["k"]:
            out[f"p@{k}"] = float(precision_at(rel, k)[valid].mean()) if valid.any() else float("nan")
    return out


def _has_label(labels: np.ndarray) -> np.ndarray:
    """Whether each item has a label (None and "" both mean none)."""
    return np.asarray([x is not None and x != "" for x in labels], dtype=bool)


def label_precision_at_k(vectors: np.ndarray, labels: list, k: int = 10) -> float:
    """Same-label precision of the k exact cosine neighbours, every item a query (small sets only: n² memory).

    The quick check benchmarks and tests use to tell real weights (about 0.76 on
    flowers17-dev with MobileNet v1 0.25) from random ones (about 0.1).
    """
    x = np.asarray(vectors, dtype=np.float32)
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    sims = x @ x.T
    np.fill_diagonal(sims, -np.inf)
    top = np.argsort(-sims, axis=1)[:, :k]
    lab = np.asarray(labels)
    return float(np.mean(lab[top] == lab[:, None]))
