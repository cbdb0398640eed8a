"""Search effort chosen by measurement: the smallest effort that reaches a target recall, per shard.

At build time each shard holds back a seeded sample of its own items as queries, computes
their exact top-k (leaving each query out), and for every index type walks a grid of
efforts upwards (HNSW ``efSearch``, Annoy ``search_k``, LSH candidates) until mean
recall@k reaches the target. The value, the recall and the queries per second (one
thread, one query at a time) it measured go into the shard's ``SHARD.json`` and the
manifest; the searcher uses them unless told otherwise. This replaces fixed rules such as
``search_k = 100·√n``, which held on one data set and not necessarily on the next.

For Annoy and LSH the queries are items of the shard, so each search asks for k + 1 results
and drops the query itself, as a neighbour table or a leave-one-out evaluation does. HNSW is
calibrated on queries its graph has not seen yet (``index_builder.types.hnsw.build``), because an
item already in the graph is found through its own links and makes recall look better than
it is for new images.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

log = logging.getLogger(__name__)

DEFAULT_TARGET = 0.95
DEFAULT_K = 10
DEFAULT_QUERIES = 400
_EXACT_BLOCK = 65536

SearchFn = Callable[[np.ndarray, int, int], np.ndarray]  # (queries, n, effort) -> ids (b, n), -1 pads


@dataclasses.dataclass(frozen=True)
class Calibrated:
    effort: int
    recall: float  # mean recall@k on the calibration queries
    lower_bound: float  # one-sided 95 % lower confidence bound of that mean: what "reached" is judged on
    qps: float
    reached: bool

    def to_dict(self, name: str) -> dict:
        return {name: self.effort, "recall": round(self.recall, 4), "recall_lower_bound": round(self.lower_bound, 4),
                "qps": round(self.qps, 1), "reached_target": self.reached}


def held_out_queries(n: int, count: int, seed: int) -> np.ndarray:
    """Seeded sample of item ids used as calibration queries: ``count``, at most a quarter of a small shard.

    HNSW is calibrated on queries its graph does not hold yet, so the sample must leave most
    of the shard in the graph: holding every item out would calibrate against an empty graph.
    """
    count = max(1, min(count, n // 4))
    return np.sort(np.random.default_rng(seed).choice(n, size=count, replace=False)).astype(np.int64)


def exact_neighbours(vectors: np.ndarray, query_ids: np.ndarray, k: int, leave_out_all: bool = False) -> np.ndarray:
    """(q, k) ids of each query's exact top-k by inner product, the query itself left out.

    ``leave_out_all`` leaves every query out of every list: the truth for queries that are
    not in the index being searched (HNSW calibration adds them to the graph afterwards).
    """
    q = np.asarray(vectors[query_ids], dtype=np.float32)
    k = min(k, len(vectors) - (len(query_ids) if leave_out_all else 1))
    excluded = np.zeros(len(vectors), bool)
    excluded[query_ids] = True
    best_s = np.full((len(q), 0), -np.inf, np.float32)
    best_i = np.zeros((len(q), 0), np.int64)
    for start in range(0, len(vectors), _EXACT_BLOCK):
        block = np.asarray(vectors[start:start + _EXACT_BLOCK], dtype=np.float32)
        sims = q @ block.T
        ids = np.broadcast_to(np.arange(start, start + len(block)), sims.shape)
        if leave_out_all:
            sims = np.where(excluded[start:start + len(block)][None, :], -np.inf, sims)
        else:
            sims = np.where(ids == query_ids[:, None], -np.inf, sims)
        sims, ids = np.concatenate([best_s, sims], axis=1), np.concatenate([best_i, ids], axis=1)
        keep = np.argpartition(-sims, k - 1, axis=1)[:, :k] if sims.shape[1] > k else np.argsort(-sims, axis=1)
        best_s, best_i = np.take_along_axis(sims, keep, axis=1), np.take_along_axis(ids, keep, axis=1)
    return best_i


def per_query_recall(found: np.ndarray, query_ids: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Recall@k of each query: ``found`` has k + 1 columns, the query possibly among them."""
    k = truth.shape[1]
    out = np.zeros(len(truth))
    for i, (row, qid, want) in enumerate(zip(found, query_ids, truth, strict=True)):
        got = [j for j in row.tolist() if j >= 0 and j != qid][:k]
        out[i] = len(set(got) & set(want.tolist())) / max(1, k)
    return out


def recall_without_self(found: np.ndarray, query_ids: np.ndarray, truth: np.ndarray) -> float:
    """Mean recall@k of ``found`` (k + 1 columns, the query possibly among them) against ``truth``."""
    return float(per_query_recall(found, query_ids, truth).mean())


Z_95 = 1.645  # one-sided 95 % normal quantile


BLOCK = 100  # queries per block: an effort whose recall is clearly short of the target stops after one
TIMING_QUERIES = 100  # the chosen effort's q/s is timed on this many queries, one at a time on one thread


def calibrate(search: SearchFn, grid: Sequence[int], vectors: np.ndarray, query_ids: np.ndarray,
              truth: np.ndarray, target: float, threads: int = 1) -> Calibrated:
    """The first effort of ``grid`` (ascending) whose recall reaches ``target``; else the last one.

    "Reaches" means the one-sided 95 % lower confidence bound of the mean recall over the
    queries is at least the target: stopping at the first effort whose sample mean crossed it
    would, on average, pick efforts whose true recall lies a little below it (measured: 0.936
    on new queries for a target of 0.95).

    Cost: queries go in blocks of :data:`BLOCK`; an effort whose *upper* bound after a block is
    already below the target is abandoned there, so only the last efforts (the expensive ones)
    see every query. Recall is measured with ``threads`` threads (the libraries release the
    GIL while they search); the q/s recorded is timed separately, one query at a time on one
    thread, at the effort chosen.
    """
    k = truth.shape[1]
    queries = np.asarray(vectors[query_ids], dtype=np.float32)
    pool = ThreadPoolExecutor(threads) if threads > 1 else None

    def one(i: int, effort: int) -> np.ndarray:
        return search(queries[i:i + 1], k + 1, effort)

    try:
        result = None
        for effort in grid:
            recalls = np.zeros(0)
            for lo in range(0, len(queries), BLOCK):
                hi = min(lo + BLOCK, len(queries))
                rows = range(lo, hi)
                found = list(pool.map(one, rows, [effort] * len(rows))) if pool else [one(i, effort) for i in rows]
                block = per_query_recall(np.concatenate(found), query_ids[lo:hi], truth[lo:hi])
                recalls = np.concatenate([recalls, block])
                mean, half = _mean_and_margin(recalls)
                if mean + half < target and lo + BLOCK < len(queries):
                    break  # clearly short: the remaining blocks cannot change the verdict
            mean, half = _mean_and_margin(recalls)
            reached = len(recalls) == len(queries) and mean - half >= target
            result = (effort, mean, mean - half, reached)
            if reached:
                break
    finally:
        if pool is not None:
            pool.shutdown()
    if result is None:
        raise ValueError("an empty grid")
    effort, mean, bound, reached = result
    timed = queries[:TIMING_QUERIES]
    started = time.perf_counter()
    for i in range(len(timed)):
        search(timed[i:i + 1], k + 1, effort)
    qps = len(timed) / max(time.perf_counter() - started, 1e-9)
    if not reached:
        log.warning("calibration did not reach recall %.3f (best %.3f at effort %d)", target, mean, effort)
    return Calibrated(int(effort), float(mean), float(bound), qps, bool(reached))


def _mean_and_margin(recalls: np.ndarray) -> tuple[float, float]:
    """Mean recall and its one-sided 95 % margin (0 for a single query)."""
    mean = float(recalls.mean())
    half = Z_95 * float(recalls.std(ddof=1)) / np.sqrt(len(recalls)) if len(recalls) > 1 else 0.0
    return mean, half


def starting_at(grid: Sequence[int], effort: int | None) -> list[int]:
    """``grid`` from ``effort`` up (``effort`` first): an update re-measures the effort its shard had and
    walks up only when that no longer reaches the target, instead of walking the whole grid again."""
    if not effort:
        return list(grid)
    return [int(effort), *[e for e in grid if e > effort]]


def geometric_grid(start: int, stop: int, factor: float = 1.5) -> list[int]:
    """Increasing integers from ``start`` to ``stop`` (both included), each about ``factor`` times the last."""
    start, stop = max(1, int(start)), max(1, int(stop))
    out = [start]
    while out[-1] < stop:
        out.append(min(stop, max(out[-1] + 1, int(round(out[-1] * factor)))))
    return out
