"""Offline searcher over a published index.

Opening checks the manifest (and by default every file digest), opens each shard's
search structures through their method (memory-mapped where the library allows) and
keeps the id maps in memory. A batch of queries fans out over (shard, query chunk)
tasks in a thread pool (Annoy and faiss release the GIL while they search, numpy while
it multiplies), the per-shard candidate lists are merged into one global top-k,
optionally re-scored exactly against the stored vectors, and optionally expanded
(add the query's top N and search again).

Items have two names: ``(shard, id)`` as stored, and a *global id*, the position in
the concatenation of the shards (``offsets[shard] + id``). The array API
(:meth:`Searcher.search_arrays`) speaks global ids so that batch users (evaluation,
neighbour tables) never build a Python object per hit; the :class:`Hit` API on top of
it is what the query command prints.

Ties are broken by ``image_id``, never by shard or position, so the merged top-k of
an index does not depend on how many shards it was built with.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from artefacts import layout
from artefacts.manifests import IndexManifest
from artefacts.vector_space import space_fingerprint, transform_fingerprint
from index_builder import local_store
from models.backbone.local_features import LocalFeatures
from search import compatibility, index_files, rerank, topk, verify
from search.methods import METHODS, Method, SearchOptions

log = logging.getLogger(__name__)

normalise_rows = topk.normalise_rows  # re-exported: callers normalise queries as the searcher does
_DEFAULT_OPTIONS = SearchOptions()


@dataclasses.dataclass
class Shard:
    number: int
    vectors: np.ndarray  # (n, dim) float16, memory-mapped
    image_ids: list[str]
    uris: list[str]
    labels: list[str | None]
    sha256: list[str]
    handles: dict[str, Any]  # method name → its opened structure for this shard
    dense: Any = None  # () -> float32 (or the float16 map) view for exact search, set by the searcher

    @property
    def size(self) -> int:
        return len(self.image_ids)


@dataclasses.dataclass(frozen=True)
class Hit:
    score: float  # cosine similarity in the transformed space
    shard: int
    id: int
    inliers: int | None = None  # geometric verification (SearchOptions.verify): matches one homography explains


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
        names = ["exact", *[t for t in self.manifest.index_types if t in METHODS and t != "exact"]]
        self.methods: dict[str, Method] = {n: METHODS[n](self.version_dir, self.manifest) for n in names}
        self._cache_left = max(0, cache_mb) << 20
        self._dense: dict[int, np.ndarray] = {}
        self._dense_lock = threading.Lock()
        self.shards = [self._open_shard(s) for s in range(self.manifest.shards)]
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
        self._plans: dict[SearchOptions, tuple[list[Method], list[int], list[Shard]]] = {}
        self._gid_of: dict[str, int] | None = None
        self._graph = self._open_graph()
        self._local = ([local_store.ShardLocal(os.path.join(self.version_dir, layout.shard_dir(s.number)), s.size)
                        for s in self.shards] if self.manifest.local_features else None)
        self._votes: dict[int, Any] = {}  # shard number -> its local-descriptor vote index, opened on first use
        self._votes_lock = threading.Lock()
        self._threads = threads or min(8, max(2, os.cpu_count() or 1))
        self._pool = ThreadPoolExecutor(max_workers=self._threads, thread_name_prefix="cbir-search")
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
            "verify": self._local is not None,
            "votes": bool((self.manifest.local_features or {}).get("vote_index")),
            "diffusion": self._graph is not None,
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

    def _open_shard(self, number: int) -> Shard:
        d = os.path.join(self.version_dir, layout.shard_dir(number))
        idmap = pq.read_table(os.path.join(d, layout.IDMAP_FILE))
        n = idmap.num_rows
        vectors = np.load(os.path.join(d, layout.VECTORS_FILE), mmap_mode="r")
        if vectors.ndim != 2 or vectors.shape[0] != n or (n and vectors.shape[1] != self.dim):
            raise layout.IndexIntegrityError(
                f"{d}: the id map holds {n} items but the vectors are {vectors.shape} (index dimension {self.dim})"
            )
        if idmap.column("id").to_pylist() != list(range(n)):
            raise layout.IndexIntegrityError(f"{d}: the id map is not dense 0..{n - 1}")
        shard = Shard(
            number=number,
            vectors=vectors,
            image_ids=idmap.column("image_id").to_pylist(),
            uris=idmap.column("uri").to_pylist(),
            labels=idmap.column("label").to_pylist(),
            sha256=idmap.column("sha256").to_pylist(),
            handles={name: m.open_shard(d, n, number) for name, m in self.methods.items()},
        )
        shard.dense = lambda s=shard: self._exact_vectors(s)
        return shard

    def _exact_vectors(self, shard: Shard) -> np.ndarray:
        """The shard's vectors as float32 when the cache budget allows, else the float16 map."""
        dense = self._dense.get(shard.number)
        if dense is not None:
            return dense
        with self._dense_lock:
            if shard.number not in self._dense and shard.vectors.size * 4 <= self._cache_left:
                self._dense[shard.number] = topk.as_float32(shard.vectors)
                self._cache_left -= shard.vectors.size * 4
        return self._dense.get(shard.number, shard.vectors)

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
        """``opts`` (default :class:`SearchOptions`) with ``overrides``, checked against this index."""
        return dataclasses.replace(opts or SearchOptions(), **overrides).resolve(self.available_methods)

    def _resolved(self, opts: SearchOptions | None) -> SearchOptions:
        """:meth:`options` without overrides, remembered per options record (a service reuses one)."""
        key = opts or _DEFAULT_OPTIONS
        found = self._resolved_cache.get(key)
        if found is None:
            if len(self._resolved_cache) >= 512:  # a service sending many distinct options: stay bounded
                self._resolved_cache.clear()
            found = self._resolved_cache[key] = self.options(key)
        return found

    def search(self, vector: np.ndarray, opts: SearchOptions | None = None,
               exclude: tuple[int, int] | int | None = None, like: Any = (), unlike: Any = (),
               local: LocalFeatures | None = None, **overrides: Any) -> list[Hit]:
        """Top-k hits for one transformed query vector (normalised here).

        ``exclude`` drops one item, given as (shard, id) or global id, for leave-one-out
        evaluation and neighbour tables. ``like`` / ``unlike`` (global ids) are relevance
        feedback: the query moves toward / away from them (Rocchio, ``opts.feedback``) before
        the search. With ``opts.verify`` N, the top N are re-ordered by geometric verification
        against ``local`` (the query's local features; for an indexed item, its own are used
        when ``local`` is None and ``exclude`` names it). Keywords override fields of ``opts``.
        """
        opts = self._resolved(opts) if not overrides else self.options(opts, **overrides)
        if exclude is not None and not isinstance(exclude, int | np.integer):
            exclude = self.global_id(*exclude)
        excl = None if exclude is None else np.asarray([exclude], dtype=np.int64)
        q = np.asarray(vector, dtype=np.float32).reshape(1, -1)
        marked = bool(len(like) or len(unlike))
        if not opts.verify:
            if marked:
                ids, scores = self.feedback_arrays(q[0], like, unlike, opts, exclude=exclude)
            else:
                ids, scores = self.search_arrays(q, opts, exclude=excl)
            return self._hits(ids[0], scores[0])
        if local is None and exclude is not None:
            local = self.local_features_of(int(exclude))
        if local is None:
            raise ValueError("--verify needs the query's local features (an image query, or an indexed item)")
        wide = dataclasses.replace(opts, k=max(opts.k, opts.verify), verify=0)
        if marked:
            ids, scores = self.feedback_arrays(q[0], like, unlike, wide, exclude=exclude)
        else:
            ids, scores = self.search_arrays(q, wide, exclude=excl)
        n = opts.verify
        if opts.verify_votes and self.capabilities["votes"]:
            ids, scores, n = self._with_voted(q[0], local, ids, scores, opts.verify, exclude,
                                              np.asarray(list(unlike), np.int64))
        ids, scores, counts = self.verify_arrays([local], ids, scores, n)
        return self._hits(ids[0, : opts.k], scores[0, : opts.k], counts[0, : opts.k])

    def vote_candidates(self, local: LocalFeatures, n: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``n`` items most query descriptors match (ratio-tested, in the shards' vote indexes).

        (global ids, votes), most votes first, items with no vote left out. This finds an
        edited copy whose global descriptor drifted out of the top N (a crop, a rotation):
        the pixels it kept still carry their local features.
        """
        if not self.capabilities["votes"]:
            raise ValueError(f"{self.version_dir} has no local-descriptor vote index: rebuild it from features "
                             "extracted with --local-features K")
        root = (local_store.root_sift(local.descriptors) if local.size
                else np.zeros((0, local_store.DESCRIPTOR_DIM), np.float32))
        gids, counts = [], []
        for s in self.shards:
            with self._votes_lock:
                index = self._votes.get(s.number)
                if index is None:
                    index = self._votes[s.number] = local_store.open_vote_index(
                        os.path.join(self.version_dir, layout.shard_dir(s.number)))
            v = local_store.votes(index, root, s.size)
            top = np.flatnonzero(v)
            gids.append(top + self.offsets[s.number])
            counts.append(v[top])
        gid, count = np.concatenate(gids), np.concatenate(counts)
        order = np.lexsort((self._id_rank[gid], -count))[:n]
        return gid[order], count[order]

    def _with_voted(self, q: np.ndarray, local: LocalFeatures, ids: np.ndarray, scores: np.ndarray, n: int,
                    exclude: int | None, rejected: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
        """The global top ``n`` followed by up to ``n`` more candidates from local-descriptor votes, to verify."""
        head = ids[0, :n][ids[0, :n] >= 0]
        voted, _ = self.vote_candidates(local, n)
        drop = np.concatenate([head, rejected, [] if exclude is None else [exclude]]).astype(np.int64)
        voted = voted[~np.isin(voted, drop)][:n]
        if not len(voted):
            return ids, scores, n
        cos = self.vectors_of(voted) @ normalise_rows(q.reshape(1, -1))[0]
        tail = ~np.isin(ids[0, n:], voted)
        rest, rest_scores = ids[0, n:][tail], scores[0, n:][tail]
        out_ids = np.concatenate([head, voted, rest])[None, :]
        out_scores = np.concatenate([scores[0, : len(head)], cos.astype(np.float32), rest_scores])[None, :]
        return out_ids, out_scores, len(head) + len(voted)

    def _marked_vectors(self, like: Any, unlike: Any) -> tuple[np.ndarray, np.ndarray]:
        for gid in [*like, *unlike]:
            self.locate(int(gid))  # IndexError for an id this version does not hold
        return (self.vectors_of(np.asarray(list(like), np.int64).reshape(-1)),
                self.vectors_of(np.asarray(list(unlike), np.int64).reshape(-1)))

    def feedback_arrays(self, vector: np.ndarray, like: Any, unlike: Any, opts: SearchOptions | None = None,
                        exclude: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k of one query after relevance feedback: (ids (1, k), cosines to the moved query).

        Rocchio moves the query (``opts.feedback``); its top ``candidates`` (the method and
        re-rankers of ``opts`` apply) are re-ordered by :func:`rerank.feedback_scores` on the
        marks. Items marked not relevant are never returned: a user who rejected a result
        is not shown it again. ``like`` / ``unlike`` are global ids; ``exclude`` one more.
        """
        opts = self._resolved(opts)
        weights = opts.feedback
        liked, unliked = self._marked_vectors(like, unlike)
        rejected = np.unique(np.asarray(list(unlike), np.int64).reshape(-1))
        moved = rerank.rocchio(vector, liked, unliked, weights)
        pool = max(opts.k, weights.candidates if weights.power > 0 else 0) + len(rejected)
        excl = None if exclude is None else np.asarray([exclude], np.int64)
        ids, scores = self.search_arrays(moved[None, :], dataclasses.replace(opts, k=pool), exclude=excl)
        ids, scores = ids[0], scores[0]
        keep = (ids >= 0) & ~np.isin(ids, rejected)
        ids, scores = ids[keep], scores[keep]
        if weights.power > 0 and len(ids):
            relevance = rerank.feedback_scores(vector, liked, unliked, self.vectors_of(ids), weights)
            order = rerank.order_by(relevance, scores)
            ids, scores = ids[order], scores[order]
        out_ids = np.full((1, opts.k), -1, np.int64)
        out_scores = np.full((1, opts.k), -np.inf, np.float32)
        n = min(opts.k, len(ids))
        out_ids[0, :n], out_scores[0, :n] = ids[:n], scores[:n]
        return out_ids, out_scores

    def local_features_of(self, gid: int) -> LocalFeatures | None:
        """The stored local features of an indexed item (None when this index carries none)."""
        if self._local is None:
            return None
        shard, item = self.locate(gid)
        points, descriptors = self._local[shard].item(item)
        return LocalFeatures(points, descriptors)

    def query_local_features(self, image_bytes: bytes) -> LocalFeatures | None:
        """Local features of a query image, extracted as the index's were (None when it carries none)."""
        info = self.manifest.local_features
        if not info:
            return None
        from models.backbone.local_features import from_image_bytes

        return from_image_bytes(image_bytes, int(info["max_keypoints"]), int(info.get("max_side", 512)))

    def verify_arrays(self, queries: list[LocalFeatures | None], ids: np.ndarray, scores: np.ndarray, n: int
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Each row's top ``n`` re-ordered by verified inliers (global score breaking ties).

        Returns (ids, scores, inliers); inliers is -1 beyond the verified top ``n`` and where
        the query had no local features. Only the candidates' local features are read.
        """
        if self._local is None:
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

    def _open_graph(self) -> tuple[np.ndarray, np.ndarray] | None:
        info = self.manifest.graph
        if not info:
            return None
        ids = np.load(os.path.join(self.version_dir, info["neighbours"]), mmap_mode="r")
        sims = np.load(os.path.join(self.version_dir, info["similarities"]), mmap_mode="r")
        if ids.shape != sims.shape or ids.ndim != 2 or ids.shape[0] != self.manifest.items:
            raise layout.IndexIntegrityError(f"{self.version_dir}: the k-NN graph is {ids.shape} / {sims.shape}, "
                                             f"not (items={self.manifest.items}, k)")
        return ids, sims

    def diffuse_lists(self, ids: np.ndarray, scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Each row's candidates (global ids, cosines) re-ordered by diffusion over the graph, top ``k``.

        Scores stay the cosines (so a sheet still shows similarities); the order is diffusion's.
        """
        if self._graph is None:
            raise ValueError(f"{self.version_dir} has no k-NN graph, so --diffusion cannot run: rebuild the index "
                             "with --graph-k K (e.g. 20)")
        graph_ids, graph_sims = self._graph
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

    def _search_block(self, q: np.ndarray, opts: SearchOptions, excl: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One batch through candidate generation, query expansion and diffusion."""
        first = dataclasses.replace(opts, k=max(opts.k, opts.diffusion_candidates)) if opts.diffusion else opts
        ids, scores = self._search_once(q, first, excl)
        if opts.qe > 0:
            ids, scores = self._search_once(self.expand(q, ids, opts.qe, scores, opts.qe_alpha), first, excl)
        if opts.diffusion:
            ids, scores = self.diffuse_lists(ids, scores, opts.k)
        return ids, scores

    def search_batch(self, vectors: np.ndarray, opts: SearchOptions | None = None, **overrides: Any
                     ) -> list[list[Hit]]:
        """:meth:`search` for many queries at once (``exclude`` is one global id per query)."""
        ids, scores = self.search_arrays(vectors, opts, **overrides)
        return [self._hits(i, s) for i, s in zip(ids, scores, strict=True)]

    def search_arrays(self, vectors: np.ndarray, opts: SearchOptions | None = None,
                      exclude: np.ndarray | None = None, **overrides: Any) -> tuple[np.ndarray, np.ndarray]:
        """Top-k of a batch: (global ids (B, k) int64, scores (B, k) float32), best first.

        Rows with fewer than k results (LSH finding few candidates, tiny indexes) are
        padded with id -1 and score -inf. ``exclude`` holds one global id per query (-1
        for none).
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
        if len(q) <= opts.batch_size and opts.qe == 0 and not opts.diffusion:  # no copy into output arrays
            return self._search_once(normalise_rows(q), opts, excl)
        out_ids = np.full((len(q), opts.k), -1, np.int64)
        out_scores = np.full((len(q), opts.k), -np.inf, np.float32)
        for lo in range(0, len(q), opts.batch_size):
            hi = min(lo + opts.batch_size, len(q))
            ids, scores = self._search_block(normalise_rows(q[lo:hi]), opts, excl[lo:hi])
            out_ids[lo:hi], out_scores[lo:hi] = ids, scores
        return out_ids, out_scores

    def expand(self, queries: np.ndarray, ids: np.ndarray, n: int, scores: np.ndarray | None = None,
               alpha: float = 0.0) -> np.ndarray:
        """Query expansion: each query plus its top ``n`` stored vectors, re-normalised.

        ``alpha`` 0 is the plain average (AQE); above 0 each neighbour is weighted by its
        similarity to the query raised to ``alpha`` (αQE, Radenović et al.), negative
        similarities weighing nothing.
        """
        top = ids[:, :n]
        neighbours = self.vectors_of(top)
        if alpha > 0 and scores is not None:
            w = np.where(top >= 0, np.maximum(scores[:, :n], 0.0), 0.0) ** alpha
            neighbours = neighbours * w[..., None].astype(np.float32)
        return normalise_rows(np.asarray(queries, np.float32) + neighbours.sum(axis=1))

    def _plan(self, opts: SearchOptions) -> tuple[list[Method], list[int], list[Shard]]:
        """(methods, candidates per method, non-empty shards) of an options record, worked out once per record."""
        plan = self._plans.get(opts)
        if plan is None:
            methods = [self.methods[n] for n in opts.methods()]
            union = len(methods) > 1
            counts = [opts.candidates or m.default_candidates(opts, union) for m in methods]
            if len(self._plans) >= 512:
                self._plans.clear()
            plan = self._plans[opts] = (methods, counts, [s for s in self.shards if s.size])
        return plan

    def _search_once(self, q: np.ndarray, opts: SearchOptions, excl: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        methods, counts, shards = self._plan(opts)
        if np.any(excl >= 0):  # the excluded item may take one of the places
            counts = [c + 1 for c in counts]
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
            return self._search_shard(s, q[lo:hi], methods, counts, opts)

        serial = len(tasks) == 1 or not parallel
        results = [run(t) for t in tasks] if serial else list(self._pool.map(run, tasks))
        if len(tasks) == 1:  # one shard, one chunk: no concatenation
            (s, _, _), (ids, scores) = tasks[0], results[0]
            gids = np.where(ids >= 0, ids + self.offsets[s.number], -1) if s.number else ids
            return topk.merge(gids, scores, opts.k, excl, self._id_rank)
        per_shard_ids: dict[int, list[np.ndarray]] = {}
        per_shard_scores: dict[int, list[np.ndarray]] = {}
        for (s, _, _), (ids, scores) in zip(tasks, results, strict=True):
            gids = np.where(ids >= 0, ids + self.offsets[s.number], -1)
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
        return topk.merge(all_ids, all_scores, opts.k, excl, self._id_rank)

    def _search_shard(self, shard: Shard, q: np.ndarray, methods: list[Method], counts: list[int],
                      opts: SearchOptions) -> tuple[np.ndarray, np.ndarray]:
        """(local ids (b, ≤n'), scores) of one shard for a query chunk; -1 / -inf pads.

        One method's own cosines are kept unless re-ranking was asked for; a union, or a
        method whose order is not by cosine, is re-scored from the stored vectors.
        """
        found = [m.search(shard.handles[m.name], shard, q, min(n, shard.size), opts)
                 for m, n in zip(methods, counts, strict=True)]
        if len(found) == 1:
            ids, scores = found[0]
            if scores is not None and (methods[0].name == "exact" or not opts.rerank):
                return ids, scores
        else:
            ids = topk.union_rows(*(f[0] for f in found))
        return ids, topk.score(shard.dense(), q, ids)  # the float32 copy when the cache holds it: same values

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
        self._pool.shutdown(wait=False)
        for s in self.shards:
            for name, handle in s.handles.items():
                self.methods[name].close_shard(handle)

    def __enter__(self) -> Searcher:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


__all__ = ["Hit", "IndexManifest", "Searcher", "SearchOptions", "Shard", "normalise_rows"]
