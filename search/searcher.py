"""Offline searcher over a published index: what an opened version holds, and its search entry points.

Opening checks the manifest (and by default every file digest), opens each shard's
search structures through their method (memory-mapped where the library allows) and
keeps the id maps in memory. Searching is the query path (``search.query_path``, the one
order of every stage), which asks ``search.fanout`` for each shard's candidates merged
into a global top-k and ``search.rerankers`` for expansion, diffusion, feedback and
verification.

Items have two names: ``(shard, id)`` as stored, and a *global id*, the position in
the concatenation of the shards (``offsets[shard] + id``). The array API
(:meth:`Searcher.rank`, :meth:`Searcher.search_arrays`) speaks global ids so that batch
users (evaluation, neighbour tables) never build a Python object per hit; the
:class:`Hit` API on top of it is what the query command prints.

Ties are broken by ``image_id``, never by shard or position, so the merged top-k of
an index does not depend on how many shards it was built with.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from artefacts import layout
from artefacts.manifests import IndexManifest
from artefacts.vector_space import space_fingerprint, transform_fingerprint
from index_builder import topk
from index_builder.types import registry
from index_builder.types.base import IndexType
from models.backbone.local_features import LocalFeatures
from search import compatibility, index_files, query_path
from search.fanout import ShardFanout
from search.options import SearchOptions
from search.query_path import Ranking
from search.rerankers import Rerankers
from search.shards import DenseVectors, Shard, open_shard

log = logging.getLogger(__name__)

normalise_rows = topk.normalise_rows  # re-exported: callers normalise queries as the searcher does
_DEFAULT_OPTIONS = SearchOptions()


@dataclasses.dataclass(frozen=True)
class Hit:
    score: float  # cosine similarity in the transformed space
    shard: int
    id: int
    inliers: int | None = None  # geometric verification (Rerank.verify): matches one homography explains


class Searcher:
    """Nearest-neighbour search over every shard of one index version.

    ``expected_model`` (a model fingerprint or a ``ModelSpec``) and
    ``expected_fingerprint`` (a space fingerprint, e.g. an embedder's) make a service
    refuse an index whose vectors it cannot query; ``signing_key`` makes it refuse a version
    that is not signed with that key. Exact search and re-scoring keep up to ``cache_mb``
    of shards' vectors as float32 in memory (converted on first use; 1 GB holds a shard of
    1M × 256); larger shards are converted block by block per query. Re-scoring an LSH
    query's ~1,000 candidates at 1M items took 1.4 ms from the float16 map (gather and
    conversion) against 0.2 ms from the float32 copy, a quarter of the query's time.
    """

    def __init__(
        self,
        index_dir: str,
        version: str | None = None,
        verify: bool = True,
        threads: int = 0,
        expected_fingerprint: str | None = None,
        expected_model: Any = None,
        cache_mb: int = 1024,
        signing_key: bytes | None = None,
        manifest_sha256: str | None = None,
    ):
        self.version, self.manifest = index_files.resolve(index_dir, version, signing_key, manifest_sha256)
        self.version_dir = os.path.join(index_dir, self.version)
        compatibility.check_expected(self.manifest, self.version_dir, expected_fingerprint, expected_model)
        index_files.verify_files(self.version_dir, self.manifest, full=verify)
        self.dim = self.manifest.dimension.output
        built = [t for t in self.manifest.index_types if t in registry.SELECTABLE]
        self.methods: dict[str, IndexType] = {n: registry.get(n)(self.version_dir, self.manifest)
                                              for n in ["exact", *built]}
        dense = DenseVectors(cache_mb)
        self.shards = [open_shard(self.version_dir, number, self.dim, self.methods, dense)
                       for number in range(self.manifest.shards)]
        sizes = [s.size for s in self.shards]
        if sum(sizes) != self.manifest.items:
            raise layout.IndexIntegrityError(
                f"{self.version_dir}: the id maps hold {sum(sizes)} items, the manifest {self.manifest.items}"
            )
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.image_ids: list[str] = [i for s in self.shards for i in s.image_ids]
        self.labels: list[str | None] = [x for s in self.shards for x in s.labels]
        self.uris: list[str] = [x for s in self.shards for x in s.uris]
        self.sha256: list[str] = [x for s in self.shards for x in s.sha256]
        # rank of each item's image_id among all ids: the tie-break that makes results layout-independent
        self._id_rank = np.empty(len(self.image_ids), dtype=np.int64)
        self._id_rank[np.argsort(np.asarray(self.image_ids, dtype=object), kind="stable")] = np.arange(
            len(self.image_ids)
        )
        self._resolved_cache: dict[SearchOptions, SearchOptions] = {}
        self._gid_of: dict[str, int] | None = None
        self.rerankers = Rerankers(self.version_dir, self.manifest, self.shards, self.offsets, self._id_rank,
                                   self.vectors_of, self.locate)
        self.fanout = ShardFanout(self.shards, self.methods, self.offsets, self._id_rank,
                                  threads or min(8, max(2, os.cpu_count() or 1)))
        log.info("opened %s: %d items in %d shards (%s)", self.version_dir, self.size, len(self.shards),
                 ", ".join(str(n) for n in sizes))

    # -- identity ---------------------------------------------------------------------------------

    @property
    def size(self) -> int:
        return int(self.offsets[-1])

    @property
    def model_fingerprint(self) -> str:
        return self.manifest.model_fingerprint

    @property
    def transform_fingerprint(self) -> str:
        return transform_fingerprint(self.manifest)

    @property
    def space_fingerprint(self) -> str:
        return space_fingerprint(self.manifest)

    @property
    def available_methods(self) -> tuple[str, ...]:
        return tuple(self.methods)

    @property
    def default_search_k(self) -> int:
        annoy = self.methods.get("annoy")
        return annoy.default_search_k if annoy is not None else -1

    @property
    def capabilities(self) -> dict[str, Any]:
        """What this version can be asked for beyond plain search (a service shows the matching controls)."""
        return {
            "methods": list(self.available_methods),
            "verify": self.rerankers.local is not None,
            "votes": self.rerankers.has_votes,
            "diffusion": self.rerankers.graph is not None,
            "dba": (self.manifest.dba or {}).get("k"),
            "labels": any(label is not None for label in self.labels),
        }

    def find(self, image_id: str) -> int:
        """The global id of an indexed image (KeyError when this version does not hold it)."""
        if self._gid_of is None:
            self._gid_of = {i: g for g, i in enumerate(self.image_ids)}
        return self._gid_of[image_id]

    def check_embedder(self, embedder: Any) -> None:
        """Refuses an embedder made for another version's model or transform."""
        compatibility.check_space(embedder.space_fingerprint, self.manifest, self.version_dir)

    def open_embedder(self, weights_dir: str | None = None, precision: str | None = None,
                      model: str | None = None, runtime: str = "auto") -> Any:
        """An :class:`search.embedder.Embedder` for image queries against this very version.

        ``model`` (``savedmodel:PATH``) is needed for an index built with a SavedModel backbone.
        """
        from search.embedder import open_embedder

        return open_embedder(self.version_dir, self.manifest, weights_dir, model=model, precision=precision,
                             runtime=runtime)

    # -- ids --------------------------------------------------------------------------------------

    def global_id(self, shard: int, item: int) -> int:
        if not 0 <= item < self.shards[shard].size:
            raise IndexError(f"shard {shard} has no item {item}")
        return int(self.offsets[shard]) + int(item)

    def locate(self, gid: int) -> tuple[int, int]:
        """(shard, id) of a global id."""
        if not 0 <= gid < self.size:
            raise IndexError(f"no item {gid} in an index of {self.size}")
        shard = int(np.searchsorted(self.offsets, gid, side="right")) - 1
        return shard, int(gid - self.offsets[shard])

    # -- search -----------------------------------------------------------------------------------

    def options(self, opts: SearchOptions | None = None, **overrides: Any) -> SearchOptions:
        """``opts`` (default :class:`SearchOptions`) with ``overrides`` (flat names), checked against this index."""
        return (opts or SearchOptions()).replace(**overrides).resolve(self.available_methods)

    def _resolved(self, opts: SearchOptions | None) -> SearchOptions:
        """:meth:`options` without overrides, remembered per options record (a service reuses one)."""
        key = opts or _DEFAULT_OPTIONS
        found = self._resolved_cache.get(key)
        if found is None:
            if len(self._resolved_cache) >= 512:  # a service sending many distinct options: stay bounded
                self._resolved_cache.clear()
            found = self._resolved_cache[key] = self.options(key)
        return found

    def rank(self, vectors: np.ndarray, opts: SearchOptions | None = None, exclude: np.ndarray | None = None,
             like: Any = (), unlike: Any = (), local: Sequence[LocalFeatures | None] | None = None,
             **overrides: Any) -> Ranking:
        """Top-k of a batch through every stage of the query path (``search.query_path``), in its one order.

        Rows with fewer than k results (LSH finding few candidates, tiny indexes) are padded
        with id -1 and score -inf. ``exclude`` holds one global id per query (-1 for none).
        ``like`` / ``unlike`` (global ids) are relevance feedback for every query of the batch:
        the queries move toward / away from them (Rocchio, ``opts.feedback``) and a kernel on
        the marks re-orders the results; rejected items are never returned. With
        ``opts.rerank.verify`` N, the top N are re-ordered by geometric verification against
        ``local`` (each query's local features; a None row, or no list, uses the excluded
        item's own). Keywords override fields of ``opts`` by their flat names.
        """
        opts = self._resolved(opts) if not overrides else self.options(opts, **overrides)
        q = np.asarray(vectors, dtype=np.float32)
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise ValueError(f"queries of shape {q.shape} do not match the index dimension {self.dim}")
        if not np.isfinite(q).all():
            raise ValueError("query vectors contain NaN or infinity")
        excl = np.full(len(q), -1, np.int64) if exclude is None else np.asarray(exclude, np.int64).reshape(-1)
        if len(excl) != len(q):
            raise ValueError(f"exclude holds {len(excl)} ids for {len(q)} queries")
        marks = self.rerankers.marks(like, unlike) if len(like) or len(unlike) else None
        return query_path.rank(self, q, opts, excl, marks, local)

    def search_arrays(self, vectors: np.ndarray, opts: SearchOptions | None = None,
                      exclude: np.ndarray | None = None, like: Any = (), unlike: Any = (),
                      local: Sequence[LocalFeatures | None] | None = None, **overrides: Any
                      ) -> tuple[np.ndarray, np.ndarray]:
        """(global ids (B, k) int64, scores (B, k) float32) of :meth:`rank`, for batch users (no objects per hit)."""
        ranking = self.rank(vectors, opts, exclude, like, unlike, local, **overrides)
        return ranking.ids, ranking.scores

    def search(self, vector: np.ndarray, opts: SearchOptions | None = None,
               exclude: tuple[int, int] | int | None = None, like: Any = (), unlike: Any = (),
               local: LocalFeatures | None = None, **overrides: Any) -> list[Hit]:
        """Top-k hits of one transformed query vector: :meth:`rank` of a batch of one.

        ``exclude`` drops one item, given as (shard, id) or global id, for leave-one-out
        evaluation and neighbour tables; verification (``opts.rerank.verify``) then uses its own
        local features when ``local`` is None.
        """
        if exclude is not None and not isinstance(exclude, int | np.integer):
            exclude = self.global_id(*exclude)
        excl = None if exclude is None else np.asarray([exclude], dtype=np.int64)
        q = np.asarray(vector, dtype=np.float32).reshape(1, -1)
        ranking = self.rank(q, opts, excl, like, unlike, None if local is None else [local], **overrides)
        return self._hits(ranking.ids[0], ranking.scores[0], None if ranking.inliers is None else ranking.inliers[0])

    def search_batch(self, vectors: np.ndarray, opts: SearchOptions | None = None, **kw: Any) -> list[list[Hit]]:
        """:meth:`search` for many queries at once (``exclude`` is one global id per query)."""
        ranking = self.rank(vectors, opts, **kw)
        inliers = [None] * len(ranking.ids) if ranking.inliers is None else ranking.inliers
        return [self._hits(i, s, c) for i, s, c in zip(ranking.ids, ranking.scores, inliers, strict=True)]

    def feedback_arrays(self, vector: np.ndarray, like: Any, unlike: Any, opts: SearchOptions | None = None,
                        exclude: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k of one query through the feedback stages even with no marks, without verification.

        (ids (1, k), cosines to the moved query). A simulated user's round (``evaluation``)
        is scored this way whether or not it marked anything, as ``cbir query --like`` is.
        """
        opts = self._resolved(opts).replace(verify=0)
        q = np.asarray(vector, dtype=np.float32).reshape(1, -1)
        excl = np.asarray([-1 if exclude is None else exclude], np.int64)
        ranking = query_path.rank(self, q, opts, excl, self.rerankers.marks(like, unlike), None)
        return ranking.ids, ranking.scores

    # -- the re-rankers' own entry points (``search.rerankers``) ------------------------------------

    def expand(self, queries: np.ndarray, ids: np.ndarray, n: int, scores: np.ndarray | None = None,
               alpha: float = 0.0) -> np.ndarray:
        """Query expansion: each query plus its top ``n`` stored vectors, re-normalised.

        ``alpha`` 0 is the plain average (AQE); above 0 each neighbour is weighted by its
        similarity to the query raised to ``alpha`` (αQE, Radenović et al.), negative
        similarities weighing nothing.
        """
        return self.rerankers.expand(queries, ids, n, scores, alpha)

    def diffuse_lists(self, ids: np.ndarray, scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Each row's candidates (global ids, cosines) re-ordered by diffusion over the graph, top ``k``."""
        return self.rerankers.diffuse_lists(ids, scores, k)

    def verify_arrays(self, queries: list[LocalFeatures | None], ids: np.ndarray, scores: np.ndarray, n: int
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Each row's top ``n`` re-ordered by verified inliers: (ids, scores, inliers, -1 where unverified)."""
        return self.rerankers.verify_arrays(queries, ids, scores, n)

    def vote_candidates(self, local: LocalFeatures, n: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``n`` items most query descriptors match: (global ids, votes), most votes first."""
        return self.rerankers.vote_candidates(local, n)

    def local_features_of(self, gid: int) -> LocalFeatures | None:
        """The stored local features of an indexed item (None when this index carries none)."""
        return self.rerankers.local_features_of(gid)

    def query_local_features(self, image_bytes: bytes) -> LocalFeatures | None:
        """Local features of a query image, extracted as the index's were (None when it carries none)."""
        info = self.manifest.local_features
        if not info:
            return None
        from models.backbone.local_features import from_image_bytes

        return from_image_bytes(image_bytes, int(info["max_keypoints"]), int(info.get("max_side", 512)))

    def near_duplicates(self, vectors: np.ndarray, max_hamming: int | None = None) -> list[list[tuple[int, int]]]:
        """Per query vector, every indexed item whose LSH code lies within ``max_hamming`` bits:
        (global id, distance), nearest first. Exact over the codes, through the multi-index
        hashing tables, so its cost does not grow with the corpus the way a scan does. The
        default radius is a sixteenth of the code length (8 bits of 128, 16 of 256), so it means
        the same angle whatever ``--lsh-bits`` the index was built with."""
        method = self.methods.get("lsh")
        if method is None:
            raise ValueError(f"{self.version_dir} has no LSH codes: build it with --index-types including lsh")
        if max_hamming is None:
            max_hamming = int(method.planes.shape[1]) // 16
        q = normalise_rows(np.asarray(vectors, np.float32).reshape(-1, self.dim))
        out: list[list[tuple[int, int]]] = [[] for _ in range(len(q))]
        for s in self.shards:
            if not s.size:
                continue
            for row, (ids, dist) in enumerate(method.within_radius(s.handles["lsh"], q, max_hamming)):
                out[row] += [(int(i) + int(self.offsets[s.number]), int(d)) for i, d in zip(ids, dist, strict=True)]
        return [sorted(r, key=lambda x: (x[1], self.image_ids[x[0]])) for r in out]

    # -- lookups ----------------------------------------------------------------------------------

    def _hits(self, gids: np.ndarray, scores: np.ndarray, inliers: np.ndarray | None = None) -> list[Hit]:
        keep = gids >= 0
        gids, scores = gids[keep], scores[keep]
        counts = [None] * len(gids) if inliers is None else [int(c) if c >= 0 else None for c in inliers[keep]]
        shards = np.searchsorted(self.offsets, gids, side="right") - 1
        return [
            Hit(float(s), int(sh), int(g - self.offsets[sh]), c)
            for s, sh, g, c in zip(scores.tolist(), shards.tolist(), gids.tolist(), counts, strict=True)
        ]

    def vector(self, shard: int, item: int) -> np.ndarray:
        return self.shards[shard].vectors[item].astype(np.float32)

    def vectors_of(self, gids: np.ndarray) -> np.ndarray:
        """Stored vectors (float32) of global ids of any shape; zeros where the id is -1."""
        gids = np.asarray(gids, np.int64)
        out = np.zeros(gids.shape + (self.dim,), np.float32)
        for s in self.shards:
            lo, hi = self.offsets[s.number], self.offsets[s.number + 1]
            mask = (gids >= lo) & (gids < hi)
            if mask.any():
                out[mask] = s.vectors[gids[mask] - lo]
        return out

    def describe(self, hit: Hit, rank: int) -> dict[str, Any]:
        s = self.shards[hit.shard]
        out = {
            "rank": rank,
            "image_id": s.image_ids[hit.id],
            "uri": s.uris[hit.id],
            "label": s.labels[hit.id],
            "score": round(hit.score, 6),
        }
        if hit.inliers is not None:
            out["inliers"] = hit.inliers
        return out

    def items(self) -> Iterator[tuple[int, int]]:
        """(shard, id) for every indexed item, in id-map order."""
        for s in self.shards:
            for i in range(s.size):
                yield s.number, i

    def all_vectors(self) -> np.ndarray:
        """Every stored vector as float32, in global-id order."""
        if not self.shards:
            return np.zeros((0, self.dim), np.float32)
        return np.concatenate([np.asarray(s.vectors, dtype=np.float32).reshape(-1, self.dim) for s in self.shards])

    def close(self) -> None:
        self.fanout.close()
        for s in self.shards:
            for name, handle in s.handles.items():
                self.methods[name].close_shard(handle)

    def __enter__(self) -> Searcher:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


__all__ = ["Hit", "IndexManifest", "Ranking", "Searcher", "SearchOptions", "Shard", "normalise_rows"]
