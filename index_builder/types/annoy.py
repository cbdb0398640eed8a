"""Annoy (angular): random-projection trees, memory-mapped, searched per query with the GIL released.

Annoy writes and maps local files only, so a shard's trees are built on the worker's disk. Ids
must be dense (memory is allocated for the largest id), the file stores neither dimension nor
metric (the manifest keeps them), and items cannot be added after ``build``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from typing import Any

import numpy as np
from annoy import AnnoyIndex

from artefacts import layout
from artefacts.manifests import AnnoyParams, ShardRecord
from index_builder import calibration, topk
from index_builder.types.base import IndexType, ShardBuild

log = logging.getLogger(__name__)

DEFAULT_TREES = 50
DEFAULT_ON_DISK_BYTES = 1 << 30  # Annoy builds in its file above this: RAM for the vectors, not the trees
RERANK_FACTOR = 4  # Annoy candidates per shard = RERANK_FACTOR * k when they are re-scored
TREE_IDS_FILE = "annoy_ids.npy"  # after an in-place update: each tree item's dense id now, -1 once removed
COMPACT_SHARE = 0.1  # trees whose removed + not-yet-planted items pass this share of the shard are rebuilt


@dataclasses.dataclass(frozen=True)
class Params:
    trees: int = DEFAULT_TREES
    on_disk_bytes: int = DEFAULT_ON_DISK_BYTES  # build in the file above this estimated index size

    def __post_init__(self) -> None:
        if self.trees < 1:
            raise ValueError(f"--trees must be at least 1, not {self.trees}")
        if self.on_disk_bytes < 0:
            raise ValueError("the on-disk threshold cannot be negative")


def bytes_estimate(n: int, dim: int, trees: int) -> int:
    """Size of an angular Annoy index of n items, close enough to choose RAM or disk.

    A node is 12 bytes of header plus the vector; each tree adds split nodes for
    about 3n/(dim + 2) of them, since a leaf holds up to dim + 2 item ids.
    """
    node = 12 + 4 * dim
    return int(node * n * (1 + 3 * trees / (dim + 2)))


def build_file(vectors: np.ndarray, path: str, params: Params, seed: int, n_jobs: int = -1) -> bool:
    """Builds and writes an angular Annoy index of ``vectors`` (ids 0..n-1); True if built on disk.

    Above ``params.on_disk_bytes`` the nodes are written straight into ``path`` as they are
    built (``on_disk_build``), so a shard larger than the worker's RAM still builds; below,
    building in memory and saving is faster.
    """
    n, dim = vectors.shape
    index = AnnoyIndex(dim, layout.METRIC)
    index.set_seed(seed)
    on_disk = bytes_estimate(n, dim, params.trees) > params.on_disk_bytes
    if on_disk:
        if os.path.exists(path):
            os.remove(path)
        index.on_disk_build(path)  # must precede add_item
    for i in range(n):
        index.add_item(i, vectors[i])
    index.build(params.trees, n_jobs=n_jobs)
    if not on_disk:
        index.save(path)
    index.unload()
    return on_disk


def _ids(index: AnnoyIndex, q: np.ndarray, n: int, search_k: int) -> np.ndarray:
    """Ids only (what calibration needs): Annoy skips the distances."""
    ids = np.full((len(q), n), -1, np.int64)
    for row, vec in enumerate(q.tolist()):
        r = index.get_nns_by_vector(vec, n, search_k=search_k)
        ids[row, : len(r)] = r
    return ids


def _search_file(index: AnnoyIndex, q: np.ndarray, n: int, search_k: int) -> tuple[np.ndarray, np.ndarray]:
    ids = np.full((len(q), n), -1, np.int64)
    dists = np.full((len(q), n), np.inf, np.float32)
    for row, vec in enumerate(q.tolist()):  # lists convert faster than arrays in Annoy's binding
        r, d = index.get_nns_by_vector(vec, n, search_k=search_k, include_distances=True)
        ids[row, : len(r)] = r
        dists[row, : len(d)] = d
    scores = np.where(ids >= 0, 1.0 - np.square(dists) / 2.0, -np.inf).astype(np.float32)  # angular → cosine
    return ids, scores


@dataclasses.dataclass
class Trees:
    """One shard's Annoy trees as opened, with the segment an in-place update left beside them.

    Annoy cannot add or remove after ``build``: an update keeps the trees, maps their item ids to
    the shard's dense ids now (``tree_ids``, -1 for a removed item) and searches the items the trees
    do not hold (``delta``, dense ids) exactly, until a rebuild plants them (:data:`COMPACT_SHARE`).
    """

    index: AnnoyIndex
    calibrated: int
    tree_ids: np.ndarray | None = None
    delta: np.ndarray | None = None
    dense: Any = None  # () -> the shard's stored vectors

    @property
    def removed_share(self) -> float:
        return float((self.tree_ids < 0).mean()) if self.tree_ids is not None and len(self.tree_ids) else 0.0

    def search(self, q: np.ndarray, n: int, search_k: int) -> tuple[np.ndarray, np.ndarray]:
        if self.tree_ids is None:
            return _search_file(self.index, q, n, search_k)
        fetch = min(len(self.tree_ids), n + int(np.ceil(2 * n * self.removed_share)) + 1)
        ids, scores = _search_file(self.index, q, fetch, search_k)
        ids = np.where(ids >= 0, self.tree_ids[np.maximum(ids, 0)], -1)
        scores = np.where(ids >= 0, scores, -np.inf).astype(np.float32)
        if self.delta is not None and len(self.delta):
            extra = topk.as_float32(np.asarray(self.dense()[self.delta])) @ q.T  # (delta, b)
            ids = np.concatenate([ids, np.broadcast_to(self.delta, (len(q), len(self.delta)))], axis=1)
            scores = np.concatenate([scores, extra.T.astype(np.float32)], axis=1)
        order = np.argsort(-scores, axis=1, kind="stable")[:, :n]
        ids, scores = np.take_along_axis(ids, order, axis=1), np.take_along_axis(scores, order, axis=1)
        return np.where(np.isfinite(scores), ids, -1), scores


def open_trees(shard_dir: str, n: int, dim: int, calibrated: int, dense: Any) -> Trees:
    """A shard's trees memory-mapped, with its update segment when it has one; checked against ``n`` items."""
    index = AnnoyIndex(dim, layout.METRIC)
    index.load(os.path.join(shard_dir, layout.ANNOY_FILE))  # memory-mapped, shared between processes
    ids_path = os.path.join(shard_dir, TREE_IDS_FILE)
    if not os.path.exists(ids_path):
        if index.get_n_items() != n:
            raise layout.IndexIntegrityError(f"{shard_dir}: Annoy holds {index.get_n_items()} items, the id map {n}")
        return Trees(index, calibrated)
    tree_ids = np.load(ids_path)
    live = tree_ids[tree_ids >= 0]
    if len(tree_ids) != index.get_n_items() or len(np.unique(live)) != len(live) or (len(live) and live.max() >= n):
        raise layout.IndexIntegrityError(f"{shard_dir}: {TREE_IDS_FILE} does not map Annoy's items into {n} items")
    delta = np.setdiff1d(np.arange(n, dtype=np.int64), live)
    return Trees(index, calibrated, tree_ids, delta, dense)


class AnnoyType(IndexType):
    name = "annoy"
    files = (layout.ANNOY_FILE,)
    effort_key = "search_k"
    effort_option = "annoy_search_k"
    Params = Params

    @classmethod
    def add_arguments(cls, parser: Any, positive_int: Any) -> None:
        parser.add_argument("--trees", type=positive_int, default=DEFAULT_TREES, help="Annoy trees per shard")
        parser.add_argument("--annoy-on-disk-mb", type=positive_int, default=None,
                            help="build a shard's Annoy in its file (not RAM) above this estimated size")

    @classmethod
    def params_from_record(cls, record: Any) -> Params | None:
        return Params(trees=record.trees) if record is not None else None

    @classmethod
    def params_from_args(cls, args: Any) -> Params:
        mb = args.annoy_on_disk_mb
        return Params(trees=args.trees, on_disk_bytes=mb << 20 if mb else DEFAULT_ON_DISK_BYTES)

    @classmethod
    def build(cls, shard: ShardBuild) -> dict[str, Any]:
        params = cls.params(shard)
        n, dim = shard.vectors.shape
        log.info("shard %d: Annoy, %d trees over %s items…", shard.number, params.trees, f"{n:,}")
        on_disk = build_file(shard.vectors, shard.path(layout.ANNOY_FILE), params, shard.settings.seed,
                             shard.settings.n_jobs)
        return {"trees": params.trees, "on_disk_build": on_disk,
                "estimated_bytes": bytes_estimate(n, dim, params.trees)}

    @classmethod
    def update(cls, shard: ShardBuild) -> dict[str, Any]:
        """The base trees kept, their items mapped to the new dense ids, new items in the exact segment.

        Rebuilt instead once removed and unplanted items pass :data:`COMPACT_SHARE` of the shard.
        """
        change = shard.change
        base_ids_path = os.path.join(change.base_dir, TREE_IDS_FILE)
        base_ids = np.load(base_ids_path) if os.path.exists(base_ids_path) else np.arange(len(change.remap))
        tree_ids = np.where(base_ids >= 0, change.remap[np.maximum(base_ids, 0)], -1).astype(np.int64)
        removed, unplanted = int((tree_ids < 0).sum()), shard.size - int((tree_ids >= 0).sum())
        if removed + unplanted > COMPACT_SHARE * shard.size:
            log.info("shard %d: Annoy %d removed + %d new items, rebuilding the trees", shard.number, removed,
                     unplanted)
            return cls.build(shard)
        _link_or_copy(os.path.join(change.base_dir, layout.ANNOY_FILE), shard.path(layout.ANNOY_FILE))
        np.save(shard.path(TREE_IDS_FILE), tree_ids)
        base = _base_entry(change.base_dir)
        return {**base, "removed": removed, "delta": unplanted}

    @classmethod
    def calibrate(cls, shard: ShardBuild) -> dict[str, Any] | None:
        if shard.query_ids is None:
            return None
        params, k, n = cls.params(shard), shard.settings.calibration_k, shard.size
        trees = open_trees(shard.out_dir, n, shard.vectors.shape[1], 0, lambda: shard.stored)
        search = (lambda q, m, search_k: _ids(trees.index, q, m, search_k)) if trees.tree_ids is None else \
            (lambda q, m, search_k: trees.search(q, m, search_k)[0])
        try:
            grid = calibration.starting_at(calibration.geometric_grid(params.trees * (k + 1), params.trees * n * 2,
                                                                      1.6), shard.earlier_effort(cls.name,
                                                                                                 cls.effort_key))
            found = calibration.calibrate(search, grid, shard.vectors, shard.query_ids, shard.truth(),
                                          shard.settings.target_recall, threads=shard.settings.threads)
        finally:
            trees.index.unload()
        return found.to_dict(cls.effort_key)

    @classmethod
    def manifest_params(cls, cfg_params: Params, seed: int, shards: list[ShardRecord],
                        summary: dict[str, Any] | None) -> AnnoyParams:
        efforts = [e for e in (summary or {}).get("per_shard", []) if e and e.get(cls.effort_key)]
        return AnnoyParams(
            trees=cfg_params.trees, metric=layout.METRIC, seed=seed,
            search_k=max((int(e[cls.effort_key]) for e in efforts), default=-1),
            on_disk_build_shards=[s for s, record in enumerate(shards) if record.on_disk_build],
            calibration=summary,
        )

    # -- search -------------------------------------------------------------------------------------

    @property
    def default_search_k(self) -> int:
        """The largest search_k calibration chose over the shards; -1 (Annoy's own default) when none."""
        params = self.manifest.annoy
        return int(params.search_k) if params and params.search_k else -1

    def open_shard(self, shard_dir: str, n: int, number: int, dense: Any) -> Any:
        if not n:
            return None
        return open_trees(shard_dir, n, self.dim, self.calibrated(number) or self.default_search_k, dense)

    def close_shard(self, handle: Any) -> None:
        if handle is not None:
            handle.index.unload()

    def candidates(self, handle: Any, k: int, requested: int, reranked: bool) -> int:
        return requested or (RERANK_FACTOR * k if reranked else k)

    def search(self, handle: Any, q: np.ndarray, n: int, effort: int) -> tuple[np.ndarray, np.ndarray | None]:
        if effort:
            search_k = effort
        elif handle.calibrated > 0:  # calibrated for k candidates: keep at least trees × n for more
            search_k = max(handle.calibrated, self.manifest.annoy.trees * n)
        else:
            search_k = -1
        return handle.search(q, n, search_k)


def _link_or_copy(src: str, dst: str) -> None:
    """The base version's file in the new one: a hard link where the filesystem allows (no bytes copied)."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _base_entry(base_dir: str) -> dict[str, Any]:
    """The base shard's Annoy entry of its SHARD.json (trees, how and how big it was built)."""
    with open(os.path.join(base_dir, layout.SHARD_INFO)) as f:
        entry = json.load(f)["annoy"]
    return {k: entry[k] for k in ("trees", "on_disk_build", "estimated_bytes")}
