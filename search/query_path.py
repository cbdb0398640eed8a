"""The query path in one place: the order every search runs its stages in, one query or a batch.

1. relevance feedback moves the query (Rocchio), when the search has marks;
2. candidates: every shard's method, exact re-scoring where asked or needed, the global
   merge (``search.fanout``);
3. query expansion searches again with the query plus its top results;
4. diffusion re-orders the top ``diffusion_candidates`` over the k-NN graph;
5. feedback's kernel re-orders its pool and drops the rejected ids;
6. verification re-orders the top N by inliers, with up to N more candidates the query's
   local descriptors vote for (``verify_votes``).

A stage asks the earlier ones for as many results as it needs: verification the top
``max(k, N)``, feedback that plus its pool (and the rejected ids it will drop), diffusion
its candidates; the list is cut to ``k`` at the end. The single-query API
(:meth:`search.searcher.Searcher.search`) is a batch of one, so both give the same answer.
Scores stay cosines to the (moved, expanded) query whatever re-ordered them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from index_builder.topk import normalise_rows
from models.backbone.local_features import LocalFeatures
from search import rerank
from search.options import SearchOptions
from search.rerankers import Marks

if TYPE_CHECKING:
    from search.searcher import Searcher


@dataclasses.dataclass(frozen=True)
class Ranking:
    """A batch's results: global ids (B, k) int64 (-1 pads), cosines (B, k) float32 (-inf pads), best first."""

    ids: np.ndarray
    scores: np.ndarray
    inliers: np.ndarray | None = None  # (B, k) int32 when verifying: inliers, -1 where not verified


def rank(searcher: Searcher, queries: np.ndarray, opts: SearchOptions, excl: np.ndarray, marks: Marks | None,
         local: Sequence[LocalFeatures | None] | None) -> Ranking:
    """Every stage, in order, over ``queries`` (float32 (B, d) as given) in blocks of ``opts.batch_size``.

    ``opts`` is resolved against the index; ``excl`` holds one global id per query (-1:
    none); ``marks`` (None: no feedback) apply to every query; ``local`` holds each query's
    local features for verification (None rows: the excluded item's own stored ones).
    """
    if opts.rerank.verify:
        local = _query_local(searcher, local, excl)
    if 0 < len(queries) <= opts.batch_size:  # one block: no copy into output arrays
        return _rank_block(searcher, queries, opts, excl, marks, local)
    ids = np.full((len(queries), opts.k), -1, np.int64)
    scores = np.full((len(queries), opts.k), -np.inf, np.float32)
    inliers = np.full((len(queries), opts.k), -1, np.int32) if opts.rerank.verify else None
    for lo in range(0, len(queries), opts.batch_size):
        hi = min(lo + opts.batch_size, len(queries))
        block = _rank_block(searcher, queries[lo:hi], opts, excl[lo:hi], marks, None if local is None else local[lo:hi])
        ids[lo:hi], scores[lo:hi] = block.ids, block.scores
        if inliers is not None:
            inliers[lo:hi] = block.inliers
    return Ranking(ids, scores, inliers)


def _query_local(searcher: Searcher, local: Sequence[LocalFeatures | None] | None, excl: np.ndarray
                 ) -> list[LocalFeatures]:
    """Each query's local features: given, else its excluded item's stored ones; none at all is a usage error."""
    if local is not None and len(local) != len(excl):
        raise ValueError(f"local features for {len(local)} queries, not {len(excl)}")
    out = []
    for row, gid in enumerate(excl.tolist()):
        features = None if local is None else local[row]
        if features is None and gid >= 0:
            features = searcher.rerankers.local_features_of(int(gid))
        if features is None:
            raise ValueError("--verify needs the query's local features (an image query, or an indexed item)")
        out.append(features)
    return out


def _rank_block(searcher: Searcher, raw: np.ndarray, opts: SearchOptions, excl: np.ndarray, marks: Marks | None,
                local: Sequence[LocalFeatures] | None) -> Ranking:
    """Stages 1–6 for one block of queries (see the module docstring)."""
    verify_n = opts.rerank.verify
    wide = max(opts.k, verify_n) if verify_n else opts.k
    pool, moved = wide, raw
    if marks is not None:
        weights = opts.feedback
        pool = max(wide, weights.candidates if weights.power > 0 else 0) + len(marks.rejected)
        moved = np.stack([rerank.rocchio(v, marks.liked, marks.unliked, weights) for v in raw]) if len(raw) else raw
    ids, scores = _candidates(searcher, normalise_rows(moved), opts.replace(k=pool), excl)
    if marks is not None:
        ids, scores = searcher.rerankers.feedback_rows(raw, ids, scores, marks, opts.feedback, wide)
    if not verify_n:
        return Ranking(ids, scores)
    rejected = np.zeros(0, np.int64) if marks is None else marks.rejected
    return _verified(searcher, raw, Ranking(ids, scores), opts, excl, rejected, local)


def _candidates(searcher: Searcher, q: np.ndarray, opts: SearchOptions, excl: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray]:
    """Stages 2–4: candidate generation, query expansion and diffusion, top ``opts.k`` of normalised ``q``."""
    rr = opts.rerank
    first = opts.replace(k=max(opts.k, rr.diffusion_candidates)) if rr.diffusion else opts
    ids, scores = searcher.fanout.search(q, first, excl)
    if rr.qe > 0:
        expanded = searcher.rerankers.expand(q, ids, rr.qe, scores, rr.qe_alpha)
        ids, scores = searcher.fanout.search(expanded, first, excl)
    if rr.diffusion:
        ids, scores = searcher.rerankers.diffuse_lists(ids, scores, opts.k)
    return ids, scores


def _verified(searcher: Searcher, raw: np.ndarray, found: Ranking, opts: SearchOptions, excl: np.ndarray,
              rejected: np.ndarray, local: Sequence[LocalFeatures]) -> Ranking:
    """Stage 6: the top N of each row (with up to N voted candidates) re-ordered by inliers, cut to k."""
    n, k, rr = opts.rerank.verify, opts.k, searcher.rerankers
    if not (opts.rerank.verify_votes and rr.has_votes):
        ids, scores, counts = rr.verify_arrays(local, found.ids, found.scores, n)
        return Ranking(ids[:, :k], scores[:, :k], counts[:, :k])
    ids = np.full((len(raw), k), -1, np.int64)
    scores = np.full((len(raw), k), -np.inf, np.float32)
    counts = np.full((len(raw), k), -1, np.int32)
    for row, gid in enumerate(excl.tolist()):
        row_ids, row_scores, m = rr.with_voted(raw[row], local[row], found.ids[row:row + 1],
                                               found.scores[row:row + 1], n, gid if gid >= 0 else None, rejected)
        v_ids, v_scores, v_counts = rr.verify_arrays([local[row]], row_ids, row_scores, m)
        w = min(k, v_ids.shape[1])
        ids[row, :w], scores[row, :w], counts[row, :w] = v_ids[0, :w], v_scores[0, :w], v_counts[0, :w]
    return Ranking(ids, scores, counts)
