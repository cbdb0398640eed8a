"""Offline searcher over a published index.

Opening checks the manifest (and by default every file digest), memory-maps each
shard's Annoy file and float16 vectors, and keeps the id maps in memory. A query
fans out over the shards in a thread pool (Annoy releases the GIL), the per-shard
top lists are merged into one global top-k, optionally re-ranked exactly against
the stored vectors, and optionally expanded (average the query with its top N and
search again).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow.parquet as pq
from annoy import AnnoyIndex

from index_builder import layout, lsh

log = logging.getLogger(__name__)

METHODS = ("annoy", "lsh", "both", "exact")


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


def resolve_version(index_dir: str, version: str | None = None) -> str:
    """The folder of ``version``, or of the one ``LATEST`` points to."""
    if version is None:
        pointer = os.path.join(index_dir, layout.POINTER)
        if not os.path.exists(pointer):
            raise FileNotFoundError(f"{index_dir} has no {layout.POINTER}: no index was published there")
        with open(pointer) as f:
            version = json.load(f)["version"]
    path = os.path.join(index_dir, version)
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


class Searcher:
    """Nearest-neighbour search over every shard of one index version."""

    def __init__(self, index_dir: str, version: str | None = None, verify: bool = True, threads: int = 0):
        self.version_dir = resolve_version(index_dir, version)
        with open(os.path.join(self.version_dir, layout.MANIFEST)) as f:
            self.manifest = json.load(f)
        layout.check_manifest(self.manifest)
        verify_files(self.version_dir, self.manifest, full=verify)
        self.dim = int(self.manifest["dimension"]["output"])
        self.planes = np.load(os.path.join(self.version_dir, layout.LSH_PLANES))
        self.shards = [self._open_shard(s) for s in range(int(self.manifest["shards"]))]
        self._pool = ThreadPoolExecutor(max_workers=threads or min(8, max(1, len(self.shards))))
        log.info("opened %s: %d items in %d shards", self.version_dir, self.size, len(self.shards))

    @property
    def size(self) -> int:
        return sum(s.size for s in self.shards)

    @property
    def model_fingerprint(self) -> str:
        return self.manifest["model_fingerprint"]

    def _open_shard(self, number: int) -> Shard:
        d = os.path.join(self.version_dir, layout.shard_dir(number))
        idmap = pq.read_table(os.path.join(d, layout.IDMAP_FILE))
        n = idmap.num_rows
        annoy = None
        if n:
            annoy = AnnoyIndex(self.dim, layout.METRIC)
            annoy.load(os.path.join(d, layout.ANNOY_FILE))  # memory-mapped, shared between processes
        return Shard(
            number=number,
            annoy=annoy,
            vectors=np.load(os.path.join(d, layout.VECTORS_FILE), mmap_mode="r"),
            codes=np.load(os.path.join(d, layout.CODES_FILE), mmap_mode="r"),
            tables=lsh.MIHTables(
                np.load(os.path.join(d, layout.MIH_OFFSETS_FILE), mmap_mode="r"),
                np.load(os.path.join(d, layout.MIH_IDS_FILE), mmap_mode="r"),
            ),
            image_ids=idmap.column("image_id").to_pylist(),
            uris=idmap.column("uri").to_pylist(),
            labels=idmap.column("label").to_pylist(),
            sha256=idmap.column("sha256").to_pylist(),
        )

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
        lsh_radius: int = 2,
        exclude: tuple[int, int] | None = None,
    ) -> list[Hit]:
        """Top-k hits for one transformed (L2-normalised) query vector.

        ``candidates`` is how many items each shard returns before the merge (default
        max(k, 4k when re-ranking)); ``exclude`` drops one (shard, id), for
        leave-one-out evaluation and neighbour tables.
        """
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}")
        q = _normalise(np.asarray(vector, dtype=np.float32).reshape(-1))
        if q.shape[0] != self.dim:
            raise ValueError(f"query has {q.shape[0]} dims, the index {self.dim}")
        hits = self._search_once(q, k, method, rerank, search_k, candidates, lsh_radius, exclude)
        if qe > 0 and hits:
            top = [self.vector(h.shard, h.id) for h in hits[:qe]]
            q2 = _normalise(q + np.sum(top, axis=0))
            hits = self._search_once(q2, k, method, rerank, search_k, candidates, lsh_radius, exclude)
        return hits

    def _search_once(self, q, k, method, rerank, search_k, candidates, lsh_radius, exclude) -> list[Hit]:
        per_shard = candidates or (4 * k if rerank or method in ("lsh", "both") else k)
        per_shard += 1 if exclude else 0
        futures = [
            self._pool.submit(self._search_shard, s, q, per_shard, method, rerank, search_k, lsh_radius)
            for s in self.shards
            if s.size
        ]
        hits = [h for f in futures for h in f.result()]
        if exclude:
            hits = [h for h in hits if (h.shard, h.id) != exclude]
        hits.sort(key=lambda h: (-h.score, h.shard, h.id))
        return hits[:k]

    def _search_shard(self, shard: Shard, q, n, method, rerank, search_k, lsh_radius) -> list[Hit]:
        ids: np.ndarray
        scores: np.ndarray | None = None
        if method == "exact":
            sims = shard.vectors.astype(np.float32) @ q
            take = min(n, shard.size)
            ids = np.argpartition(-sims, take - 1)[:take]
            return [Hit(float(sims[i]), shard.number, int(i)) for i in ids]
        found = []
        if method in ("annoy", "both"):
            a_ids, dists = shard.annoy.get_nns_by_vector(q, n, search_k=search_k, include_distances=True)
            found.append(np.asarray(a_ids, dtype=np.int64))
            scores = 1.0 - np.square(np.asarray(dists, dtype=np.float32)) / 2.0  # angular → cosine
        if method in ("lsh", "both"):
            code = lsh.encode(q[None, :], self.planes)[0]
            l_ids, _ = lsh.search(code, shard.codes, shard.tables, n, n, lsh_radius)
            found.append(l_ids.astype(np.int64))
            rerank = True  # Hamming distances are too coarse to rank by
        ids = np.unique(np.concatenate(found)) if len(found) > 1 else found[0]
        if rerank or scores is None:
            scores = shard.vectors[ids].astype(np.float32) @ q
        return [Hit(float(s), shard.number, int(i)) for s, i in zip(scores, ids, strict=True)]

    def search_batch(self, vectors: np.ndarray, **kwargs) -> list[list[Hit]]:
        return [self.search(v, **kwargs) for v in vectors]

    # -- lookups ----------------------------------------------------------------------------------

    def vector(self, shard: int, item: int) -> np.ndarray:
        return self.shards[shard].vectors[item].astype(np.float32)

    def describe(self, hit: Hit, rank: int) -> dict[str, Any]:
        s = self.shards[hit.shard]
        return {
            "rank": rank,
            "image_id": s.image_ids[hit.id],
            "uri": s.uris[hit.id],
            "label": s.labels[hit.id],
            "score": round(hit.score, 6),
        }

    def items(self):
        """(shard, id) for every indexed item, in id-map order."""
        for s in self.shards:
            for i in range(s.size):
                yield s.number, i

    def all_vectors(self) -> np.ndarray:
        return np.concatenate([s.vectors.astype(np.float32) for s in self.shards]) if self.shards else np.zeros(
            (0, self.dim), np.float32
        )

    def close(self) -> None:
        self._pool.shutdown(wait=False)
        for s in self.shards:
            if s.annoy is not None:
                s.annoy.unload()


def _normalise(v: np.ndarray) -> np.ndarray:
    norm = float(np.linalg.norm(v))
    return v / norm if norm > 0 else v
