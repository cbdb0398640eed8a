"""The re-rankers over the searcher's arrays, and the index data they read beyond the vectors.

``search.rerank`` (feedback and diffusion) and ``search.verify`` are the arithmetic on one
result list; this module is the glue that feeds them from an opened version: the k-NN
graph diffusion walks, each shard's local features and local-descriptor vote index
(opened on first use), the stored vectors that query expansion and feedback read. Which
stage runs when is decided in one place only, ``search.query_path``.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from artefacts import layout
from artefacts.manifests import IndexManifest
from index_builder import local_store
from index_builder.topk import normalise_rows
from index_builder.types import votes as votes_type
from models.backbone.local_features import LocalFeatures
from search import rerank, verify

if TYPE_CHECKING:
    from search.shards import Shard


@dataclasses.dataclass(frozen=True)
class Marks:
    """Relevance-feedback marks of one search, resolved to what the stages read."""

    liked: np.ndarray  # (m, d) stored vectors of the results marked relevant
    unliked: np.ndarray  # (m', d) of those marked not relevant
    rejected: np.ndarray  # the unique global ids marked not relevant: never returned


def open_graph(version_dir: str, manifest: IndexManifest) -> tuple[np.ndarray, np.ndarray] | None:
    """(neighbour ids, similarities) of the index's k-NN graph, memory-mapped; None when it has none."""
    info = manifest.graph
    if not info:
        return None
    ids = np.load(os.path.join(version_dir, info["neighbours"]), mmap_mode="r")
    sims = np.load(os.path.join(version_dir, info["similarities"]), mmap_mode="r")
    if ids.shape != sims.shape or ids.ndim != 2 or ids.shape[0] != manifest.items:
        raise layout.IndexIntegrityError(f"{version_dir}: the k-NN graph is {ids.shape} / {sims.shape}, "
                                         f"not (items={manifest.items}, k)")
    return ids, sims


class Rerankers:
    """Query expansion, diffusion, feedback and verification over one opened version's arrays.

    ``vectors_of`` (global ids of any shape → float32 vectors) and ``locate`` (global id →
    (shard, id)) are the searcher's; every id here is a global id.
    """

    def __init__(self, version_dir: str, manifest: IndexManifest, shards: list[Shard], offsets: np.ndarray,
                 id_rank: np.ndarray, vectors_of: Callable[[np.ndarray], np.ndarray],
                 locate: Callable[[int], tuple[int, int]]):
        self.version_dir = version_dir
        self.graph = open_graph(version_dir, manifest)
        self.local = ([local_store.ShardLocal(os.path.join(version_dir, layout.shard_dir(s.number)), s.size)
                       for s in shards] if manifest.local_features else None)
        self.has_votes = bool((manifest.local_features or {}).get("vote_index"))
        self._shards = shards
        self._offsets = offsets
        self._id_rank = id_rank
        self._vectors_of = vectors_of
        self._locate = locate
        self._votes: dict[int, Any] = {}  # shard number -> its local-descriptor vote index, opened on first use
        self._votes_lock = threading.Lock()

    # -- query expansion and diffusion ----------------------------------------------------------------

    def expand(self, queries: np.ndarray, ids: np.ndarray, n: int, scores: np.ndarray | None = None,
               alpha: float = 0.0) -> np.ndarray:
        """Each query plus its top ``n`` stored vectors, re-normalised (``alpha`` > 0: αQE weights)."""
        top = ids[:, :n]
        neighbours = self._vectors_of(top)
        if alpha > 0 and scores is not None:
            w = np.where(top >= 0, np.maximum(scores[:, :n], 0.0), 0.0) ** alpha
            neighbours = neighbours * w[..., None].astype(np.float32)
        return normalise_rows(np.asarray(queries, np.float32) + neighbours.sum(axis=1))

    def diffuse_lists(self, ids: np.ndarray, scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Each row's candidates re-ordered by diffusion over the graph, top ``k``; scores stay the cosines."""
        if self.graph is None:
            raise ValueError(f"{self.version_dir} has no k-NN graph, so --diffusion cannot run: rebuild the index "
                             "with --graph-k K (e.g. 20)")
        graph_ids, graph_sims = self.graph
        out_ids = np.full((len(ids), k), -1, np.int64)
        out_scores = np.full((len(ids), k), -np.inf, np.float32)
        dopts = rerank.DiffusionOptions(candidates=ids.shape[1])
        for row in range(len(ids)):
            keep = ids[row] >= 0
            cand, cs = ids[row][keep], scores[row][keep]
            if not len(cand):
                continue
            f = rerank.diffuse(cand, cs, graph_ids[cand], graph_sims[cand], dopts)
            order = rerank.order_by(f, cs)[:k]
            out_ids[row, : len(order)], out_scores[row, : len(order)] = cand[order], cs[order]
        return out_ids, out_scores

    # -- relevance feedback ---------------------------------------------------------------------------

    def marks(self, like: Any, unlike: Any) -> Marks:
        """The stored vectors of the marked items (IndexError for an id this version does not hold)."""
        for gid in [*like, *unlike]:
            self._locate(int(gid))
        unlike_ids = np.asarray(list(unlike), np.int64).reshape(-1)
        return Marks(self._vectors_of(np.asarray(list(like), np.int64).reshape(-1)), self._vectors_of(unlike_ids),
                     np.unique(unlike_ids))

    def feedback_rows(self, queries: np.ndarray, ids: np.ndarray, scores: np.ndarray, marks: Marks,
                      weights: rerank.FeedbackWeights, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Each row without the rejected ids, re-ordered by the kernel on the marks (power > 0), top ``k``.

        ``queries`` are the queries as given, before Rocchio moved them: the kernel scores
        closeness to them and to the items marked relevant.
        """
        out_ids = np.full((len(ids), k), -1, np.int64)
        out_scores = np.full((len(ids), k), -np.inf, np.float32)
        for row in range(len(ids)):
            keep = (ids[row] >= 0) & ~np.isin(ids[row], marks.rejected)
            rids, rscores = ids[row][keep], scores[row][keep]
            if weights.power > 0 and len(rids):
                relevance = rerank.feedback_scores(queries[row], marks.liked, marks.unliked,
                                                   self._vectors_of(rids), weights)
                order = rerank.order_by(relevance, rscores)
                rids, rscores = rids[order], rscores[order]
            n = min(k, len(rids))
            out_ids[row, :n], out_scores[row, :n] = rids[:n], rscores[:n]
        return out_ids, out_scores

    # -- geometric verification -----------------------------------------------------------------------

    def local_features_of(self, gid: int) -> LocalFeatures | None:
        """The stored local features of an indexed item (None when this index carries none)."""
        if self.local is None:
            return None
        shard, item = self._locate(gid)
        points, descriptors = self.local[shard].item(item)
        return LocalFeatures(points, descriptors)

    def verify_arrays(self, queries: Sequence[LocalFeatures | None], ids: np.ndarray, scores: np.ndarray, n: int
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Each row's top ``n`` re-ordered by verified inliers (global score breaking ties).

        Returns (ids, scores, inliers); inliers is -1 beyond the verified top ``n`` and where
        the query had no local features. Only the candidates' local features are read.
        """
        if self.local is None:
            raise ValueError(f"{self.version_dir} carries no local features, so --verify cannot run: extract with "
                             "--local-features K (e.g. 256), then rebuild the index from those features")
        ids, scores = ids.copy(), scores.copy()
        counts = np.full(ids.shape, -1, np.int32)
        for row, query in enumerate(queries):
            if query is None:
                continue
            top = min(n, int((ids[row] >= 0).sum()))
            cand = ids[row, :top]
            found = verify.verify(query, [self.local_features_of(int(g)) for g in cand])
            order = verify.rerank(cand, scores[row, :top], found)
            ids[row, :top], scores[row, :top], counts[row, :top] = cand[order], scores[row, :top][order], found[order]
        return ids, scores, counts

    def vote_candidates(self, local: LocalFeatures, n: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``n`` items most query descriptors match (ratio-tested, in the shards' vote indexes).

        (global ids, votes), most votes first, items with no vote left out. This finds an
        edited copy whose global descriptor drifted out of the top N (a crop, a rotation):
        the pixels it kept still carry their local features.
        """
        if not self.has_votes:
            raise ValueError(f"{self.version_dir} has no local-descriptor vote index: rebuild it from features "
                             "extracted with --local-features K")
        root = (local_store.root_sift(local.descriptors) if local.size
                else np.zeros((0, local_store.DESCRIPTOR_DIM), np.float32))
        gids, counts = [], []
        for s in self._shards:
            with self._votes_lock:
                index = self._votes.get(s.number)
                if index is None:
                    index = self._votes[s.number] = votes_type.open_vote_index(
                        os.path.join(self.version_dir, layout.shard_dir(s.number)))
            v = votes_type.votes(index, root, s.size)
            top = np.flatnonzero(v)
            gids.append(top + self._offsets[s.number])
            counts.append(v[top])
        gid, count = np.concatenate(gids), np.concatenate(counts)
        order = np.lexsort((self._id_rank[gid], -count))[:n]
        return gid[order], count[order]

    def with_voted(self, q: np.ndarray, local: LocalFeatures, ids: np.ndarray, scores: np.ndarray, n: int,
                   exclude: int | None, rejected: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
        """One row's global top ``n`` followed by up to ``n`` more candidates from votes, and how many to verify."""
        head = ids[0, :n][ids[0, :n] >= 0]
        voted, _ = self.vote_candidates(local, n)
        drop = np.concatenate([head, rejected, [] if exclude is None else [exclude]]).astype(np.int64)
        voted = voted[~np.isin(voted, drop)][:n]
        if not len(voted):
            return ids, scores, n
        cos = self._vectors_of(voted) @ normalise_rows(q.reshape(1, -1))[0]
        tail = ~np.isin(ids[0, n:], voted)
        rest, rest_scores = ids[0, n:][tail], scores[0, n:][tail]
        out_ids = np.concatenate([head, voted, rest])[None, :]
        out_scores = np.concatenate([scores[0, : len(head)], cos.astype(np.float32), rest_scores])[None, :]
        return out_ids, out_scores, len(head) + len(voted)
