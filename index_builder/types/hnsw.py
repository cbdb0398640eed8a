"""HNSW graphs with faiss: built per index shard, written as one file, opened memory-mapped.

``IndexHNSWSQ`` with float16 storage (``QT_fp16``) over the shard's unit vectors with the
inner-product metric, inside an ``IndexIDMap`` so that results are the shard's dense ids.
The vectors reaching a shard are already rounded to float16 (the precision ``vectors.f16.npy``
holds for exact scoring), so the graph stores exactly those values in half the bytes of
``IndexHNSWFlat`` and its distances are the cosines exact scoring computes. Half the bytes per
distance is also what makes it faster: measured on 200k class-shaped 256-d vectors (2 cores to
build, one thread to search), the flat graph built in 52.0 s and the float16 one in 38.6 s with
the same recall@10 at every efSearch (0.979 at 48, 0.991 at 96) and more queries/s (2,825 vs
1,761 at ef 48, 1,217 vs 929 at ef 96). Graphs written as ``IndexHNSWFlat`` by earlier builds
open and search as before. The file is faiss's own format, which faiss keeps readable across
releases; it is data (graph and vectors), never code. Opening with
``IO_FLAG_MMAP_IFC | IO_FLAG_READ_ONLY`` maps the stored vectors instead of reading them, so the
processes of one machine share one copy in the page cache (faiss's older ``IO_FLAG_MMAP`` reads
them in): measured on a 44 MB flat shard, opening added 3.6 MB of resident memory (the graph
links) instead of 44 MB.

Defaults M=32, efConstruction=40, from held-out queries on 200k class-shaped vectors
(flat storage; build on 2 cores; the efSearch reaching recall@10 0.95; one-thread q/s there):
M=16/efC=40 29 s, ef 384, 444 q/s; M=16/efC=80 60 s, ef 192, 884 q/s; M=32/efC=40 46 s, ef
96, 1,210 q/s; M=16/efC=160 104 s, ef 192, 741 q/s. Clustered data needs the wider graph more
than a longer build: at 1M, M=16/efC=40 needed ef 1,024. Again at 1M with float16 storage
(efC 40, same vectors and held-out queries as bench_index, one run): M=16 built in 187 s and
reached at most recall 0.912 (ef 256); M=24 in 326 s, 0.953 at ef 128 (689 q/s); M=32 took
379 s inside the index job and reached 0.963 at ef 96 (826 q/s). A narrower graph saves little
build time for the recall it gives up.

GPU note: faiss has no GPU HNSW; a GPU deployment would use ``faiss.index_cpu_to_gpu``
with a flat or IVF index instead. HNSW here is the CPU path.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from collections.abc import Callable
from typing import Any

import numpy as np

from artefacts import layout
from artefacts.manifests import HnswParams, ShardRecord
from index_builder import calibration
from index_builder.types.base import IndexType, ShardBuild

log = logging.getLogger(__name__)

HNSW_FILE = "hnsw.faiss"
DEFAULT_M = 32
DEFAULT_EF_CONSTRUCTION = 40
DEFAULT_EF_SEARCH = 64
COMPACT_SHARE = 0.2  # a graph whose tombstones pass this share of its nodes is rebuilt (issue 27 measures it)
MIN_NEW_TO_CALIBRATE = 50  # an update with fewer new items keeps the shard's earlier calibration
EF_GRID = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048)


@dataclasses.dataclass(frozen=True)
class Params:
    m: int = DEFAULT_M
    ef_construction: int = DEFAULT_EF_CONSTRUCTION

    def __post_init__(self) -> None:
        if self.m < 2 or self.ef_construction < 1:
            raise ValueError("--hnsw-m must be at least 2 and --hnsw-ef-construction at least 1")


def _faiss():
    try:
        import faiss
    except ImportError as exc:  # pinned in requirements.in; a worker image without it cannot build HNSW
        raise RuntimeError("the hnsw index type needs faiss-cpu (pip install faiss-cpu, pinned in "
                           "requirements.in), or build without it: --index-types annoy,lsh") from exc
    return faiss


def build(vectors: np.ndarray, path: str, m: int = DEFAULT_M, ef_construction: int = DEFAULT_EF_CONSTRUCTION,
          held_out: np.ndarray | None = None, while_held_out: Callable[[Any], Any] | None = None) -> Any:
    """Builds an inner-product HNSW graph of ``vectors`` (ids 0..n-1) and writes it to ``path``.

    With ``held_out``, those items join the graph last, and ``while_held_out(index)`` runs
    before they do: calibration searches for them as queries the graph has never seen, as a
    new image is. (Searching for an item already in the graph is easier, since its own links
    lead to its neighbours: calibrated on such queries, recall on new images came out 0.90 for
    a target of 0.95.) Returns what ``while_held_out`` returned. Ids are the items' own
    (``IndexIDMap``), whatever the order they were added in. The graph stores the vectors as
    float16: pass values already rounded to float16 (as the shard builder does) for scores
    equal to exact scoring's.
    """
    faiss = _faiss()
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    graph = faiss.IndexHNSWSQ(vectors.shape[1], faiss.ScalarQuantizer.QT_fp16, m, faiss.METRIC_INNER_PRODUCT)
    graph.hnsw.efConstruction = ef_construction
    index = faiss.IndexIDMap(graph)
    result = _add_holding_out(index, vectors, np.arange(len(vectors), dtype=np.int64), held_out, while_held_out)
    faiss.write_index(index, path)
    return result


def _add_holding_out(index: Any, vectors: np.ndarray, labels: np.ndarray, held_out: np.ndarray | None,
                     while_held_out: Callable[[Any], Any] | None) -> Any:
    """Adds ``vectors`` under ``labels``; rows ``held_out`` last, after ``while_held_out(index)`` ran."""
    result = None
    if held_out is not None and while_held_out is not None and len(held_out):
        late = np.zeros(len(vectors), bool)
        late[held_out] = True
        index.add_with_ids(vectors[~late], labels[~late])
        result = while_held_out(index)
        index.add_with_ids(vectors[late], labels[late])
    elif len(vectors):
        index.add_with_ids(vectors, labels)
    return result


def relabel_and_add(base_path: str, path: str, remap: np.ndarray, vectors: np.ndarray, first_label: int,
                    held_out: np.ndarray | None = None, while_held_out: Callable[[Any], Any] | None = None) -> Any:
    """Updates a built graph in place: labels renumbered by ``remap`` (-1: removed), ``vectors`` added.

    HNSW cannot delete a node without hurting the links through it, so a removed item stays in
    the graph under label -1 as a tombstone: a search skips it (:func:`search`, through an id
    selector) while its links still lead elsewhere. New items are added under labels
    ``first_label`` onwards, the held-out ones last as in :func:`build`. Returns what
    ``while_held_out`` returned.
    """
    faiss = _faiss()
    index = faiss.read_index(base_path)  # read whole: a memory-mapped index cannot be written to
    labels = faiss.vector_to_array(index.id_map)
    faiss.copy_array_to_vector(np.where(labels >= 0, remap[np.maximum(labels, 0)], -1).astype(np.int64),
                               index.id_map)
    new_labels = np.arange(first_label, first_label + len(vectors), dtype=np.int64)
    result = _add_holding_out(index, np.ascontiguousarray(vectors, np.float32), new_labels, held_out, while_held_out)
    faiss.write_index(index, path)
    return result


def live_items(index: Any) -> int:
    """Items a search can return: the graph's nodes less its tombstones (label -1)."""
    return int((_faiss().vector_to_array(index.id_map) >= 0).sum())


def open_mapped(path: str):
    """The index in ``path``, memory-mapped and read-only."""
    faiss = _faiss()
    return faiss.read_index(path, faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY)


@functools.lru_cache(maxsize=64)
def _params(ef_search: int) -> Any:
    """Search parameters per efSearch, made once: faiss only reads them, so threads may share one."""
    params = _faiss().SearchParametersHNSW()
    params.efSearch = ef_search
    return params


def _selected_params(ef_search: int, live: int) -> tuple[Any, Any]:
    """Fresh parameters that return only labels 0..live-1, and their selector (kept alive by the caller).

    Never shared between threads: faiss's ``IndexIDMap.search`` swaps a translating selector into the
    parameters for the duration of a search, so two searches sharing one record would read each
    other's (freed) selector. Measured as a crash in calibration's two-thread searches.
    """
    faiss = _faiss()
    params = faiss.SearchParametersHNSW()
    params.efSearch = ef_search
    selector = faiss.IDSelectorRange(0, live)
    params.sel = selector
    return params, selector


def search(index, queries: np.ndarray, n: int, ef_search: int, live: int | None = None
           ) -> tuple[np.ndarray, np.ndarray]:
    """(ids (b, n) int64 with -1 pads, cosines (b, n) float32) with ``efSearch`` for this call only.

    The search parameters travel with the call, so threads searching one index with
    different efforts never race on the index's own setting. ``live`` (a graph with
    tombstones) keeps the removed items out of the results.
    """
    ef = max(int(ef_search), n)
    if live is None:
        params = _params(ef)
    else:
        params, selector = _selected_params(ef, live)  # ``selector`` stays referenced through the search
    q = np.ascontiguousarray(queries, dtype=np.float32)
    scores, ids = index.search(q, n, params=params)
    if (ids < 0).any():
        scores = np.where(ids >= 0, scores, -np.inf).astype(np.float32)
    return ids.astype(np.int64, copy=False), scores.astype(np.float32, copy=False)


class HnswType(IndexType):
    """Calibrated while it is built: the held-out queries join the graph last (see :func:`build`)."""

    name = "hnsw"
    files = (HNSW_FILE,)
    effort_key = "ef_search"
    effort_option = "hnsw_ef_search"
    parallel = False  # faiss spreads a batch over its OpenMP threads itself
    Params = Params

    @classmethod
    def add_arguments(cls, parser: Any, positive_int: Any) -> None:
        parser.add_argument("--hnsw-m", type=positive_int, default=DEFAULT_M, help="HNSW links per node")
        parser.add_argument("--hnsw-ef-construction", type=positive_int, default=DEFAULT_EF_CONSTRUCTION,
                            help="HNSW candidate list while building")

    @classmethod
    def params_from_record(cls, record: Any) -> Params | None:
        return Params(m=record.m, ef_construction=record.ef_construction) if record is not None else None

    @classmethod
    def params_from_args(cls, args: Any) -> Params:
        return Params(m=args.hnsw_m, ef_construction=args.hnsw_ef_construction)

    @classmethod
    def build(cls, shard: ShardBuild) -> dict[str, Any]:
        params = cls.params(shard)
        log.info("shard %d: HNSW graph (M=%d, efConstruction=%d)…", shard.number, params.m, params.ef_construction)
        calibrating = shard.query_ids is not None
        shard.built["hnsw_calibration"] = build(
            shard.vectors, shard.path(HNSW_FILE), params.m, params.ef_construction, held_out=shard.query_ids,
            while_held_out=(lambda index: cls._calibrate_on(index, shard, shard.query_ids)) if calibrating else None,
        )
        return {"m": params.m, "ef_construction": params.ef_construction}

    @classmethod
    def update(cls, shard: ShardBuild) -> dict[str, Any]:
        """New items added to the base graph, removed ones left in it as tombstones; rebuilt past COMPACT_SHARE.

        Calibrated on a sample of the new items, held out of the graph until it ran, as a build
        calibrates on held-out items (too few new items: on held-out items by a rebuild's rule).
        """
        change, params = shard.change, cls.params(shard)
        base = os.path.join(change.base_dir, HNSW_FILE)
        mapped = open_mapped(base)
        tombstones = mapped.ntotal - live_items(mapped) + int((change.remap < 0).sum())
        del mapped
        if tombstones > COMPACT_SHARE * (len(change.remap) + change.added):
            log.info("shard %d: %d HNSW tombstones, rebuilding the graph", shard.number, tombstones)
            return {**cls.build(shard), "tombstones": 0}
        new = shard.vectors[change.kept:]
        held = None
        if shard.query_ids is not None and change.added >= MIN_NEW_TO_CALIBRATE:
            held = calibration.held_out_queries(change.added, shard.settings.calibration_queries,
                                                shard.settings.seed + shard.number)
        log.info("shard %d: HNSW +%d items, %d tombstones…", shard.number, change.added, tombstones)
        shard.built["hnsw_calibration"] = relabel_and_add(
            base, shard.path(HNSW_FILE), change.remap, new, change.kept, held_out=held,
            while_held_out=(lambda index: cls._calibrate_on(index, shard, held + change.kept, shard.size))
            if held is not None else None)
        return {"m": params.m, "ef_construction": params.ef_construction, "tombstones": tombstones}

    @classmethod
    def _calibrate_on(cls, index: Any, shard: ShardBuild, query_ids: np.ndarray, live: int | None = None
                      ) -> dict[str, Any]:
        """The smallest efSearch reaching the target for items the graph does not hold yet."""
        k = shard.settings.calibration_k
        grid = calibration.starting_at([e for e in EF_GRID if e >= k + 1], shard.earlier_effort(cls.name,
                                                                                                 cls.effort_key))
        truth = calibration.exact_neighbours(shard.vectors, query_ids, k, leave_out_all=True)
        found = calibration.calibrate(lambda q, m, ef: search(index, q, m, ef, live)[0], grid, shard.vectors,
                                      query_ids, truth, shard.settings.target_recall, threads=shard.settings.threads)
        return {**found.to_dict(cls.effort_key), "queries": "held out of the graph"}

    @classmethod
    def calibrate(cls, shard: ShardBuild) -> dict[str, Any] | None:
        return shard.built.get("hnsw_calibration")

    @classmethod
    def manifest_params(cls, cfg_params: Params, seed: int, shards: list[ShardRecord],
                        summary: dict[str, Any] | None) -> HnswParams:
        efforts = [int(e[cls.effort_key]) for e in (summary or {}).get("per_shard", []) if e]
        return HnswParams(m=cfg_params.m, ef_construction=cfg_params.ef_construction,
                          ef_search=max(efforts, default=DEFAULT_EF_SEARCH), calibration=summary)

    # -- search -------------------------------------------------------------------------------------

    def open_shard(self, shard_dir: str, n: int, number: int, dense: Any) -> Any:
        index = open_mapped(os.path.join(shard_dir, HNSW_FILE))
        live = index.ntotal if index.ntotal == n else live_items(index)  # an updated graph holds tombstones
        if live != n:
            raise layout.IndexIntegrityError(f"{shard_dir}: the HNSW graph holds {live} items, the id map {n}")
        ef = self.calibrated(number) or (self.manifest.hnsw.ef_search if self.manifest.hnsw else 0)
        return index, ef or DEFAULT_EF_SEARCH, (None if index.ntotal == n else n)

    def search(self, handle: Any, q: np.ndarray, n: int, effort: int) -> tuple[np.ndarray, np.ndarray | None]:
        index, calibrated, live = handle
        return search(index, q, n, effort or max(calibrated, n), live)
