"""Candidate generation over every shard: the fan-out over (shard, query chunk) tasks and the global merge.

A batch of normalised queries is cut into chunks so that every thread of the pool has a
task (Annoy and faiss release the GIL while they search, numpy while it multiplies); each
task asks the methods for one shard's candidates, re-scored exactly from the stored vectors
where asked or needed, and the per-shard lists are merged into one global top-k with ties
broken by ``image_id`` rank, so the result does not depend on how many shards the index
was built with. Methods that parallelise themselves (faiss's HNSW over OpenMP, BLAS for
exact search) run shard after shard instead.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import numpy as np

from index_builder import topk
from index_builder.types.base import IndexType
from search.options import SearchOptions

if TYPE_CHECKING:
    from search.shards import Shard

Plan = tuple[list[IndexType], list["Shard"]]


class ShardFanout:
    """The global top-k candidates of a batch, from every shard of one opened version."""

    def __init__(self, shards: list[Shard], methods: dict[str, IndexType], offsets: np.ndarray, id_rank: np.ndarray,
                 threads: int):
        self._shards = shards
        self._methods = methods
        self._offsets = offsets
        self._id_rank = id_rank
        self._threads = threads
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="cbir-search")
        self._plans: dict[SearchOptions, Plan] = {}

    def plan(self, opts: SearchOptions) -> Plan:
        """(index types, non-empty shards) of an options record, worked out once per record."""
        plan = self._plans.get(opts)
        if plan is None:
            if len(self._plans) >= 512:  # a service sending many distinct options: stay bounded
                self._plans.clear()
            plan = self._plans[opts] = ([self._methods[n] for n in opts.methods()], [s for s in self._shards if s.size])
        return plan

    def search(self, q: np.ndarray, opts: SearchOptions, excl: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(global ids (b, k), scores) of normalised queries ``q``; ``excl`` one global id per query (-1: none)."""
        methods, shards = self.plan(opts)
        extra = int(np.any(excl >= 0))  # the excluded item may take one of the places
        if not shards:
            return np.full((len(q), opts.k), -1, np.int64), np.full((len(q), opts.k), -np.inf, np.float32)
        parallel = all(m.parallel for m in methods)
        chunks = 1 if not parallel else max(1, min(len(q), -(-self._threads // len(shards))))
        if chunks == 1:
            tasks = [(s, 0, len(q)) for s in shards]
        else:
            bounds = np.linspace(0, len(q), chunks + 1).astype(int)
            tasks = [(s, lo, hi) for s in shards for lo, hi in zip(bounds[:-1], bounds[1:], strict=True) if hi > lo]

        def run(task):
            s, lo, hi = task
            return self._search_shard(s, q[lo:hi], methods, extra, opts)

        serial = len(tasks) == 1 or not parallel
        results = [run(t) for t in tasks] if serial else list(self._pool.map(run, tasks))
        if len(tasks) == 1:  # one shard, one chunk: no concatenation
            (s, _, _), (ids, scores) = tasks[0], results[0]
            gids = np.where(ids >= 0, ids + self._offsets[s.number], -1) if s.number else ids
            return topk.merge(gids, scores, opts.k, excl, self._id_rank)
        return self._merge(tasks, results, opts.k, excl)

    def _merge(self, tasks: list, results: list, k: int, excl: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Each task's local ids made global, the chunks of a shard stacked, the shards side by side, merged."""
        per_shard_ids: dict[int, list[np.ndarray]] = {}
        per_shard_scores: dict[int, list[np.ndarray]] = {}
        for (s, _, _), (ids, scores) in zip(tasks, results, strict=True):
            gids = np.where(ids >= 0, ids + self._offsets[s.number], -1)
            per_shard_ids.setdefault(s.number, []).append(gids)
            per_shard_scores.setdefault(s.number, []).append(scores)
        width = max(a.shape[1] for parts in per_shard_ids.values() for a in parts)
        all_ids = np.concatenate(
            [np.concatenate([topk.pad(a, width, -1) for a in parts]) for parts in per_shard_ids.values()], axis=1
        )
        all_scores = np.concatenate(
            [np.concatenate([topk.pad(a, width, -np.inf) for a in parts]) for parts in per_shard_scores.values()],
            axis=1,
        )
        return topk.merge(all_ids, all_scores, k, excl, self._id_rank)

    @staticmethod
    def _search_shard(shard: Shard, q: np.ndarray, methods: list[IndexType], extra: int,
                      opts: SearchOptions) -> tuple[np.ndarray, np.ndarray]:
        """(local ids (b, ≤n'), scores) of one shard for a query chunk; -1 / -inf pads.

        Each type is asked for its candidates with the effort the options give it (0: the shard's
        calibrated one). One type's own cosines are kept unless exact re-scoring was asked for; a
        union, or a type whose order is not by cosine, is re-scored from the stored vectors.
        """
        reranked = opts.rerank.exact or len(methods) > 1
        found = []
        for m in methods:
            handle, effort = shard.handles[m.name], opts.effort.of(m.effort_option)
            requested = opts.candidates or (effort if m.effort_is_candidates else 0)
            n = m.candidates(handle, opts.k, requested, reranked) + extra
            found.append(m.search(handle, q, min(n, shard.size), effort))
        if len(found) == 1:
            ids, scores = found[0]
            if scores is not None and (methods[0].name == "exact" or not opts.rerank.exact):
                return ids, scores
        else:
            ids = topk.union_rows(*(f[0] for f in found))
        return ids, topk.score(shard.dense(), q, ids)  # the float32 copy when the cache holds it: same values

    def close(self) -> None:
        self._pool.shutdown(wait=False)
