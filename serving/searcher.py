"""Offline searcher over a published index.

Opening checks the manifest (and by default every file digest), memory-maps each
shard's Annoy file and float16 vectors, and keeps the id maps in memory. A batch
of queries fans out over (shard, query chunk) tasks in a thread pool (Annoy
releases the GIL while it searches, numpy while it multiplies), the per-shard
candidate lists are merged into one global top-k, optionally re-ranked exactly
against the stored vectors, and optionally expanded (average the query with its
top N and search again).

Items have two names: ``(shard, id)`` as stored, and a *global id*, the position
in the concatenation of the shards (``offsets[shard] + id``). The array API
(:meth:`Searcher.search_arrays`) speaks global ids so that batch users
(evaluation, neighbour tables) never build a Python object per hit; the
:class:`Hit` API on top of it is what the query command prints.

Ties are broken by ``image_id``, never by shard or position, so the merged top-k
of an index does not depend on how many shards it was built with.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow.parquet as pq
from annoy import AnnoyIndex

from index_builder import layout, lsh

log = logging.getLogger(__name__)

METHODS = ("annoy", "lsh", "both", "exact")
RERANK_FACTOR = 4  # Annoy candidates per shard = RERANK_FACTOR * k when re-ranking
LSH_FACTOR = 20  # LSH candidates per shard = LSH_FACTOR * k: Hamming order is coarse, exact scoring is cheap
LSH_RADIUS = 3  # largest MIH substring radius probed when nearer buckets hold too few candidates
_EXACT_BLOCK = 32768  # stored vectors converted to float32 at a time by exact search
_SCORE_ELEMENTS = 1 << 22  # float32 elements gathered at a time when re-scoring candidates


class TransformMismatchError(ValueError):
    """Query vectors come from another vector space (model or transform_fn) than the index's."""


@dataclasses.dataclass
class Shard:
    number: int
    annoy: AnnoyIndex | None
    vectors: np.ndarray  # (n, dim) float16, memory-mapped
    codes: np.ndarray  # (n, bits/8) uint8
    tables: lsh.MIHTables
    image_ids: list[str]
    uris: list[str]
    labels: list[str | None]
    sha256: list[str]

    @property
    def size(self) -> int:
        return len(self.image_ids)


@dataclasses.dataclass(frozen=True)
class Hit:
    score: float  # cosine similarity in the transformed space
    shard: int
    id: int


def _check_version_name(version: str) -> str:
    """A version name is read from LATEST or the command line: never let it walk out of the index."""
    if not version or "/" in version or "\\" in version or version.startswith((".", "_")):
        raise layout.IndexIntegrityError(f"{version!r} is not an index version name")
    return version


def available_versions(index_dir: str) -> list[str]:
    """Complete (manifest-bearing) version folders, oldest first."""
    if not os.path.isdir(index_dir):
        return []
    return sorted(
        v for v in os.listdir(index_dir)
        if not v.startswith((".", "_")) and os.path.isfile(os.path.join(index_dir, v, layout.MANIFEST))
    )


def resolve_version(index_dir: str, version: str | None = None) -> str:
    """The folder of ``version``, or of the one ``LATEST`` points to."""
    if version is None:
        pointer = os.path.join(index_dir, layout.POINTER)
        if not os.path.exists(pointer):
            raise FileNotFoundError(f"{index_dir} has no {layout.POINTER}: no index was published there")
        with open(pointer) as f:
            version = json.load(f)["version"]
    version = _check_version_name(version)
    path = os.path.join(index_dir, version)
    if not os.path.isdir(path):
        known = available_versions(index_dir)
        raise FileNotFoundError(
            f"index version {version} does not exist in {index_dir} "
            f"(versions there: {', '.join(known) if known else 'none'})"
        )
    if not os.path.exists(os.path.join(path, layout.MANIFEST)):
        raise layout.IndexIntegrityError(f"{path} has no {layout.MANIFEST}: not a complete index version")
    return path


def verify_files(version_dir: str, manifest: dict[str, Any], full: bool = True) -> None:
    """Refuses a version whose files differ from its manifest (size always, sha256 if ``full``)."""
    bad = []
    for rel, meta in manifest["files"].items():
        path = os.path.join(version_dir, rel)
        if not os.path.exists(path) or os.path.getsize(path) != meta["bytes"]:
            bad.append(rel)
        elif full and layout.sha256_file(path)[0] != meta["sha256"]:
            bad.append(rel)
    if bad:
        raise layout.IndexIntegrityError(
            f"{version_dir}: {len(bad)} file(s) do not match the manifest ({', '.join(bad[:5])}); "
            "the index is damaged or was modified: rebuild or republish it"
        )


def transform_fingerprint(manifest: dict[str, Any]) -> str:
    """Digest of the saved transform_fn (its files' digests) and the transform settings.

    Two indexes share it only when queries are transformed by byte-identical graphs,
    which is what makes their vectors comparable.
    """
    prefix = layout.TRANSFORM_DIR + "/"
    files = sorted((p, m["sha256"]) for p, m in manifest["files"].items() if p.startswith(prefix))
    blob = json.dumps({"files": files, "transform": manifest.get("transform"),
                       "dimension": manifest.get("dimension")}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def space_fingerprint(manifest: dict[str, Any]) -> str:
    """The vector space of an index: model fingerprint and transform fingerprint together.

    An embedder opened on one version and a searcher on another agree on it only
    when vectors from the first can be searched in the second.
    """
    blob = f"{manifest['model_fingerprint']}:{transform_fingerprint(manifest)}".encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def default_candidates(k: int, method: str, rerank: bool) -> int:
    """Annoy candidates per shard before the merge: k, or RERANK_FACTOR·k when they are re-scored."""
    return RERANK_FACTOR * k if (rerank or method in ("lsh", "both")) and method != "exact" else k


class Searcher:
    """Nearest-neighbour search over every shard of one index version.

    ``expected_model`` (a model fingerprint or a ``ModelSpec``) and
    ``expected_fingerprint`` (a :func:`space_fingerprint`, e.g. an embedder's) make
    a service refuse an index whose vectors it cannot query. Exact search keeps up to
    ``cache_mb`` of shards' vectors as float32 in memory (converted on first use), so
    repeated exact queries do not convert the float16 file every time; larger shards
    are converted block by block per query.
    """

    def __init__(
        self,
        index_dir: str,
        version: str | None = None,
        verify: bool = True,
        threads: int = 0,
        expected_fingerprint: str | None = None,
        expected_model: Any = None,
        cache_mb: int = 256,
    ):
        self.version_dir = resolve_version(index_dir, version)
        self.version = os.path.basename(os.path.normpath(self.version_dir))
        with open(os.path.join(self.version_dir, layout.MANIFEST)) as f:
            self.manifest = json.load(f)
        layout.check_manifest(self.manifest)
        if self.manifest.get("version", self.version) != self.version:
            raise layout.IndexIntegrityError(
                f"{self.version_dir} holds the manifest of version {self.manifest.get('version')}: "
                "a version folder must keep the name it was published under"
            )
        self._check_expected(expected_fingerprint, expected_model)
        verify_files(self.version_dir, self.manifest, full=verify)
        self.dim = int(self.manifest["dimension"]["output"])
        self.planes = np.load(os.path.join(self.version_dir, layout.LSH_PLANES))
        self.shards = [self._open_shard(s) for s in range(int(self.manifest["shards"]))]
        sizes = [s.size for s in self.shards]
        if sum(sizes) != int(self.manifest["items"]):
            raise layout.IndexIntegrityError(
                f"{self.version_dir}: the id maps hold {sum(sizes)} items, the manifest {self.manifest['items']}"
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
        self._cache_left = max(0, cache_mb) << 20
        self._dense: dict[int, np.ndarray] = {}
        self._dense_lock = threading.Lock()
        self._threads = threads or min(8, max(2, os.cpu_count() or 1))
        self._pool = ThreadPoolExecutor(max_workers=self._threads, thread_name_prefix="cbir-search")
        log.info("opened %s: %d items in %d shards (%s)", self.version_dir, self.size, len(self.shards),
                 ", ".join(str(n) for n in sizes))

    @property
    def default_search_k(self) -> int:
        """Annoy's search_k when the caller gives none: the index's recommendation if its manifest
        records one (``annoy.search_k``), else -1, Annoy's own default (trees × candidates)."""
        return int(self.manifest.get("annoy", {}).get("search_k", -1) or -1)

    # -- identity ---------------------------------------------------------------------------------

    @property
    def size(self) -> int:
        return int(self.offsets[-1]) if hasattr(self, "offsets") else sum(s.size for s in self.shards)

    @property
    def model_fingerprint(self) -> str:
        return self.manifest["model_fingerprint"]

    @property
    def transform_fingerprint(self) -> str:
        return transform_fingerprint(self.manifest)

    @property
    def space_fingerprint(self) -> str:
        return space_fingerprint(self.manifest)

    def _check_expected(self, expected_fingerprint: str | None, expected_model: Any) -> None:
        if expected_model is not None:
            if isinstance(expected_model, str):
                if expected_model != self.model_fingerprint:
                    from serving.embedder import ModelMismatchError

                    raise ModelMismatchError(
                        f"the index {self.version_dir} was built with model {self.manifest['model'].get('preset')} "
                        f"(fingerprint {self.model_fingerprint}), not the requested model fingerprint "
                        f"{expected_model}. Query with the index's model and weights, or rebuild the index."
                    )
            else:
                from serving.embedder import check_same_model

                check_same_model(expected_model, self.manifest)
        if expected_fingerprint is not None and expected_fingerprint != self.space_fingerprint:
            raise TransformMismatchError(
                f"query vectors of space {expected_fingerprint} cannot be searched in {self.version_dir} "
                f"(space {self.space_fingerprint}: model {self.model_fingerprint}, transform "
                f"{self.transform_fingerprint}). Embed queries with this version's transform_fn "
                "(Searcher.open_embedder) or open the version the embedder was made for."
            )

    def check_embedder(self, embedder: Any) -> None:
        """Refuses an embedder made for another version's model or transform_fn."""
        self._check_expected(embedder.space_fingerprint, None)

    def open_embedder(self, weights_dir: str | None = None, precision: str | None = None) -> Any:
        """An :class:`serving.embedder.Embedder` for image queries against this very version."""
        from serving.embedder import open_embedder

        return open_embedder(self.version_dir, self.manifest, weights_dir, precision=precision)

    def _open_shard(self, number: int) -> Shard:
        d = os.path.join(self.version_dir, layout.shard_dir(number))
        idmap = pq.read_table(os.path.join(d, layout.IDMAP_FILE))
        n = idmap.num_rows
        vectors = np.load(os.path.join(d, layout.VECTORS_FILE), mmap_mode="r")
        codes = np.load(os.path.join(d, layout.CODES_FILE), mmap_mode="r")
        annoy = None
        if n:
            annoy = AnnoyIndex(self.dim, layout.METRIC)
            annoy.load(os.path.join(d, layout.ANNOY_FILE))  # memory-mapped, shared between processes
        found = {"vectors": vectors.shape[0] if vectors.ndim == 2 else -1, "codes": codes.shape[0],
                 "annoy": annoy.get_n_items() if annoy is not None else 0}
        if any(v != n for v in found.values()) or (n and vectors.shape[1] != self.dim):
            raise layout.IndexIntegrityError(
                f"{d}: the id map holds {n} items but the shard files disagree ({found}, vectors "
                f"{vectors.shape}, index dimension {self.dim})"
            )
        ids = idmap.column("image_id").to_pylist()
        if idmap.column("id").to_pylist() != list(range(n)):
            raise layout.IndexIntegrityError(f"{d}: the id map is not dense 0..{n - 1}")
        return Shard(
            number=number,
            annoy=annoy,
            vectors=vectors,
            codes=codes,
            tables=lsh.MIHTables(
                np.load(os.path.join(d, layout.MIH_OFFSETS_FILE), mmap_mode="r"),
                np.load(os.path.join(d, layout.MIH_IDS_FILE), mmap_mode="r"),
            ),
            image_ids=ids,
            uris=idmap.column("uri").to_pylist(),
            labels=idmap.column("label").to_pylist(),
            sha256=idmap.column("sha256").to_pylist(),
        )

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

    def search(
        self,
        vector: np.ndarray,
        k: int = 10,
        method: str = "annoy",
        rerank: bool = False,
        qe: int = 0,
        search_k: int = -1,
        candidates: int = 0,
        lsh_radius: int = LSH_RADIUS,
        exclude: tuple[int, int] | int | None = None,
    ) -> list[Hit]:
        """Top-k hits for one transformed query vector (normalised here).

        ``candidates`` is how many items each shard returns before the merge
        (default :func:`default_candidates` for Annoy, LSH_FACTOR·k for LSH); ``exclude`` drops one item, given as
        (shard, id) or global id, for leave-one-out evaluation and neighbour tables.
        """
        if exclude is not None and not isinstance(exclude, int | np.integer):
            exclude = self.global_id(*exclude)
        excl = None if exclude is None else np.asarray([exclude], dtype=np.int64)
        ids, scores = self.search_arrays(
            np.asarray(vector, dtype=np.float32).reshape(1, -1), k=k, method=method, rerank=rerank, qe=qe,
            search_k=search_k, candidates=candidates, lsh_radius=lsh_radius, exclude=excl,
        )
        return self._hits(ids[0], scores[0])

    def search_batch(self, vectors: np.ndarray, **kwargs: Any) -> list[list[Hit]]:
        """:meth:`search` for many queries at once (same keywords; ``exclude`` is one global id per query)."""
        ids, scores = self.search_arrays(vectors, **kwargs)
        return [self._hits(i, s) for i, s in zip(ids, scores, strict=True)]

    def search_arrays(
        self,
        vectors: np.ndarray,
        k: int = 10,
        method: str = "annoy",
        rerank: bool = False,
        qe: int = 0,
        search_k: int = -1,
        candidates: int = 0,
        lsh_radius: int = LSH_RADIUS,
        exclude: np.ndarray | None = None,
        batch_size: int = 1024,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k of a batch: (global ids (B, k) int64, scores (B, k) float32), best first.

        Rows with fewer than k results (LSH finding few candidates, tiny indexes) are
        padded with id -1 and score -inf. ``exclude`` holds one global id per query
        (-1 for none); ``search_k`` -1 means :attr:`default_search_k`. Exact search and
        re-ranking are matrix products over the batch; Annoy and LSH run per vector, in
        parallel over shards and query chunks.
        """
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, not {method!r}")
        if k < 1:
            raise ValueError(f"k must be at least 1, not {k}")
        if qe < 0:
            raise ValueError(f"--qe must not be negative, not {qe}")
        q = np.asarray(vectors, dtype=np.float32)
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise ValueError(f"queries of shape {q.shape} do not match the index dimension {self.dim}")
        if not np.all(np.isfinite(q)):
            raise ValueError("query vectors contain NaN or infinity")
        excl = np.full(len(q), -1, np.int64) if exclude is None else np.asarray(exclude, np.int64).reshape(-1)
        if len(excl) != len(q):
            raise ValueError(f"exclude holds {len(excl)} ids for {len(q)} queries")
        out_ids = np.full((len(q), k), -1, np.int64)
        out_scores = np.full((len(q), k), -np.inf, np.float32)
        for lo in range(0, len(q), batch_size):
            hi = min(lo + batch_size, len(q))
            opts = (method, rerank, search_k if search_k != -1 else self.default_search_k, candidates, lsh_radius)
            qb = normalise_rows(q[lo:hi])
            ids, scores = self._search_once(qb, k, opts, excl[lo:hi])
            if qe > 0:
                ids, scores = self._search_once(self.expand(qb, ids, qe), k, opts, excl[lo:hi])
            out_ids[lo:hi], out_scores[lo:hi] = ids, scores
        return out_ids, out_scores

    def expand(self, queries: np.ndarray, ids: np.ndarray, n: int) -> np.ndarray:
        """Average query expansion: each query plus its top ``n`` stored vectors, re-normalised."""
        top = ids[:, :n]
        return normalise_rows(np.asarray(queries, np.float32) + self.vectors_of(top).sum(axis=1))

    def _search_once(self, q: np.ndarray, k: int, opts: tuple, excl: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        method, rerank, search_k, candidates, lsh_radius = opts
        extra = 1 if np.any(excl >= 0) else 0  # the excluded item may take one of the places
        per_shard = (candidates or default_candidates(k, method, rerank)) + extra
        per_shard_lsh = (candidates or LSH_FACTOR * k) + extra
        shards = [s for s in self.shards if s.size]
        if not shards:
            return np.full((len(q), k), -1, np.int64), np.full((len(q), k), -np.inf, np.float32)
        # Annoy and LSH go vector by vector with the GIL released: split the batch so every thread has
        # work. Exact search is BLAS, multi-threaded already: running shards side by side would only
        # oversubscribe the cores (measured: 4 shards in parallel were slower than one after another).
        chunks = 1 if method == "exact" else max(1, min(len(q), -(-self._threads // len(shards))))
        bounds = np.linspace(0, len(q), chunks + 1).astype(int)
        tasks = [(s, lo, hi) for s in shards for lo, hi in zip(bounds[:-1], bounds[1:], strict=True) if hi > lo]

        def run(task):
            s, lo, hi = task
            return self._search_shard(s, q[lo:hi], per_shard, per_shard_lsh, method, rerank, search_k, lsh_radius)

        serial = len(tasks) == 1 or method == "exact"
        results = [run(t) for t in tasks] if serial else list(self._pool.map(run, tasks))
        per_shard_ids, per_shard_scores = {}, {}
        for (s, _, _), (ids, scores) in zip(tasks, results, strict=True):
            gids = np.where(ids >= 0, ids + self.offsets[s.number], -1)
            per_shard_ids.setdefault(s.number, []).append(gids)
            per_shard_scores.setdefault(s.number, []).append(scores)
        width = max(a.shape[1] for parts in per_shard_ids.values() for a in parts)
        all_ids = np.concatenate(
            [np.concatenate([_pad(a, width, -1) for a in parts]) for parts in per_shard_ids.values()], axis=1
        )
        all_scores = np.concatenate(
            [np.concatenate([_pad(a, width, -np.inf) for a in parts]) for parts in per_shard_scores.values()],
            axis=1,
        )
        return self._merge(all_ids, all_scores, k, excl)

    def _merge(self, ids: np.ndarray, scores: np.ndarray, k: int, excl: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Global top-k of per-shard candidates: best score first, ties by image_id."""
        drop = (ids < 0) | (ids == excl[:, None])
        scores = np.where(drop, -np.inf, scores).astype(np.float32)
        ids = np.where(drop, -1, ids)
        rank = np.where(ids >= 0, self._id_rank[np.maximum(ids, 0)], len(self._id_rank))
        order = np.lexsort((rank, -scores), axis=1)[:, :k]
        top_ids = np.take_along_axis(ids, order, axis=1)
        top_scores = np.take_along_axis(scores, order, axis=1)
        if top_ids.shape[1] < k:
            top_ids, top_scores = _pad(top_ids, k, -1), _pad(top_scores, k, -np.inf)
        return top_ids, top_scores

    def _search_shard(
        self, shard: Shard, q: np.ndarray, n: int, n_lsh: int, method: str, rerank: bool, search_k: int,
        lsh_radius: int,
    ) -> tuple[np.ndarray, np.ndarray]:
        """(local ids (b, ≤n'), scores) of one shard for a query chunk; -1 / -inf pads."""
        if method == "exact":
            ids = _exact_top(self._exact_vectors(shard), q, min(n, shard.size))
            return ids, _score(shard.vectors, q, ids)
        found = []
        scores = None
        if method in ("annoy", "both"):
            a_ids = np.full((len(q), n), -1, np.int64)
            dists = np.full((len(q), n), np.inf, np.float32)
            for row, vec in enumerate(q.tolist()):  # lists convert faster than arrays in Annoy's binding
                r, d = shard.annoy.get_nns_by_vector(vec, n, search_k=search_k, include_distances=True)
                a_ids[row, : len(r)] = r
                dists[row, : len(d)] = d
            found.append(a_ids)
            scores = np.where(a_ids >= 0, 1.0 - np.square(dists) / 2.0, -np.inf).astype(np.float32)  # angular→cos
        if method in ("lsh", "both"):
            codes = lsh.encode(q, self.planes)
            l_ids = np.full((len(q), n_lsh), -1, np.int64)
            for row in range(len(q)):
                r, _ = lsh.search(codes[row], shard.codes, shard.tables, n_lsh, n_lsh, lsh_radius)
                l_ids[row, : len(r)] = r
            found.append(l_ids)
            rerank = True  # Hamming distances are too coarse to rank by
        ids = found[0] if len(found) == 1 else _union_rows(found[0], found[1])
        if rerank or scores is None:
            scores = _score(shard.vectors, q, ids)
        return ids, scores

    def _exact_vectors(self, shard: Shard) -> np.ndarray:
        """The shard's vectors as float32 when the cache budget allows, else the float16 map."""
        dense = self._dense.get(shard.number)
        if dense is not None:
            return dense
        with self._dense_lock:
            if shard.number not in self._dense and shard.vectors.size * 4 <= self._cache_left:
                self._dense[shard.number] = np.asarray(shard.vectors, dtype=np.float32)
                self._cache_left -= shard.vectors.size * 4
        return self._dense.get(shard.number, shard.vectors)

    # -- lookups ----------------------------------------------------------------------------------

    def _hits(self, gids: np.ndarray, scores: np.ndarray) -> list[Hit]:
        keep = gids >= 0
        gids, scores = gids[keep], scores[keep]
        shards = np.searchsorted(self.offsets, gids, side="right") - 1
        return [
            Hit(float(s), int(sh), int(g - self.offsets[sh]))
            for s, sh, g in zip(scores.tolist(), shards.tolist(), gids.tolist(), strict=True)
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
        return {
            "rank": rank,
            "image_id": s.image_ids[hit.id],
            "uri": s.uris[hit.id],
            "label": s.labels[hit.id],
            "score": round(hit.score, 6),
        }

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
            if s.annoy is not None:
                s.annoy.unload()

    def __enter__(self) -> Searcher:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def normalise_rows(v: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero)."""
    v = np.asarray(v, dtype=np.float32)
    norms = np.linalg.norm(v, axis=-1, keepdims=True)
    return np.divide(v, norms, out=np.zeros_like(v), where=norms > 0)


def _normalise(v: np.ndarray) -> np.ndarray:
    return normalise_rows(v)


def _pad(a: np.ndarray, width: int, value: float) -> np.ndarray:
    if a.shape[1] >= width:
        return a
    return np.concatenate([a, np.full((a.shape[0], width - a.shape[1]), value, a.dtype)], axis=1)


def _union_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-row union of two padded id arrays, padded with -1."""
    rows = [np.unique(np.concatenate([x[x >= 0], y[y >= 0]])) for x, y in zip(a, b, strict=True)]
    out = np.full((len(rows), max([len(r) for r in rows] + [1])), -1, np.int64)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


def _exact_top(vectors: np.ndarray, q: np.ndarray, n: int) -> np.ndarray:
    """Local ids of the n highest inner products per query, blockwise over the stored vectors.

    Each block is cut to its own top n before it meets the running best, so no array
    wider than the block's similarities (and no id array that wide) is ever built.
    """
    best_ids = np.zeros((len(q), 0), np.int64)
    best = np.zeros((len(q), 0), np.float32)
    for start in range(0, vectors.shape[0], _EXACT_BLOCK):
        block = np.asarray(vectors[start:start + _EXACT_BLOCK], dtype=np.float32)
        sims = q @ block.T
        if sims.shape[1] > n:
            part = np.argpartition(-sims, n - 1, axis=1)[:, :n]
            sims = np.take_along_axis(sims, part, axis=1)
        else:
            part = np.broadcast_to(np.arange(sims.shape[1]), sims.shape)
        sims = np.concatenate([best, sims], axis=1)
        ids = np.concatenate([best_ids, part + start], axis=1)
        if sims.shape[1] > n:
            keep = np.argpartition(-sims, n - 1, axis=1)[:, :n]
            sims, ids = np.take_along_axis(sims, keep, axis=1), np.take_along_axis(ids, keep, axis=1)
        best, best_ids = sims, ids
    return best_ids


def _score(vectors: np.ndarray, q: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Exact cosine of each query with its candidate ids (-1 → -inf) from the stored vectors.

    Computed element by element (einsum, not BLAS) so a score does not depend on the
    shape of the batch it was computed in: the same pair scores the same in a
    one-shard and a many-shard index.
    """
    out = np.full(ids.shape, -np.inf, np.float32)
    if ids.size == 0:
        return out
    rows = max(1, _SCORE_ELEMENTS // max(1, ids.shape[1] * q.shape[1]))
    for lo in range(0, len(ids), rows):
        sub = ids[lo:lo + rows]
        cand = np.asarray(vectors[np.maximum(sub, 0)], dtype=np.float32)  # (b, m, d)
        s = np.einsum("bmd,bd->bm", cand, q[lo:lo + rows])
        out[lo:lo + rows] = np.where(sub >= 0, s, -np.inf)
    return out
