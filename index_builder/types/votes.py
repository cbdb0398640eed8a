"""The local-descriptor vote index: every descriptor of a shard, as RootSIFT, under its item's dense id.

A query's descriptors *propose* candidates by votes (:func:`votes`): an edited copy whose global
descriptor has drifted out of the top N (a crop, a rotation) still shares local features with
its original. Up to :data:`EXACT_VOTES_UP_TO` descriptors it is exact (``IndexFlatIP``), beyond
an inverted file over 8-bit scalar-quantised vectors (``IVF√m,SQ8``: a quarter of the float
bytes, opened memory-mapped; :func:`vote_index_kind`). Built from the shard's local-feature
arrays (``index_builder.local_store``) whenever the features carry local features, so it is not
chosen with ``--index-types``; its query is a set of descriptors, not a vector, and it has no
effort to calibrate (``nprobe`` is fixed).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from index_builder.local_store import DESCRIPTOR_DIM, DESCRIPTORS_FILE, OFFSETS_FILE, root_sift
from index_builder.types.base import IndexType, ShardBuild

VOTES_FILE = "local_votes.faiss"  # recorded as the manifest's local_features["vote_index"]; older indexes lack it
EXACT_VOTES_UP_TO = 50_000
VOTE_NPROBE = 16
VOTE_RATIO = 0.8  # Lowe's ratio test on a query descriptor's two nearest stored descriptors
TRAIN_PER_LIST = 64  # k-means samples per inverted list (faiss warns below 39)


def vote_index_kind(m: int) -> str:
    """The faiss index for ``m`` descriptors: exact when small, else an inverted file of √m lists.

    √m lists keep both the k-means training (on :data:`TRAIN_PER_LIST` samples a list) and a
    query's scan (:data:`VOTE_NPROBE` lists of ~√m descriptors each) growing with √m; beyond
    4,096 lists the coarse assignment goes through an HNSW graph of the centroids, so adding
    100k images' descriptors does not compare each with every centroid.
    """
    if m <= EXACT_VOTES_UP_TO:
        return "flat"
    lists = int(np.sqrt(m))
    return f"IVF{lists}_HNSW32,SQ8" if lists > 4096 else f"IVF{lists},SQ8"


def write_vote_index(out_dir: str, seed: int = 0) -> dict[str, object]:
    """Builds ``local_votes.faiss`` from the shard's descriptor arrays (written just before)."""
    import faiss

    offsets = np.load(os.path.join(out_dir, OFFSETS_FILE))
    descriptors = np.load(os.path.join(out_dir, DESCRIPTORS_FILE), mmap_mode="r")
    m = int(offsets[-1])
    owners = np.repeat(np.arange(len(offsets) - 1, dtype=np.int64), np.diff(offsets))
    kind = vote_index_kind(m)
    if kind == "flat":
        index = faiss.IndexIDMap(faiss.IndexFlatIP(DESCRIPTOR_DIM))
    else:
        index = faiss.index_factory(DESCRIPTOR_DIM, kind, faiss.METRIC_INNER_PRODUCT)
        lists = faiss.extract_index_ivf(index).nlist
        sample = np.sort(np.random.default_rng(seed).choice(m, size=min(m, TRAIN_PER_LIST * lists), replace=False))
        index.train(root_sift(descriptors[sample]))
    for lo in range(0, m, 1 << 18):  # bounded memory: a quarter million descriptors at a time
        hi = min(m, lo + (1 << 18))
        index.add_with_ids(root_sift(descriptors[lo:hi]), owners[lo:hi])
    faiss.write_index(index, os.path.join(out_dir, VOTES_FILE))
    return {"descriptors": m, "kind": kind}


def open_vote_index(shard_dir: str):
    """The shard's vote index, memory-mapped where faiss can (the inverted lists)."""
    import faiss

    path = os.path.join(shard_dir, VOTES_FILE)
    try:
        index = faiss.read_index(path, faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
    except RuntimeError:  # a flat index cannot be memory-mapped: read it
        index = faiss.read_index(path)
    if index.d != DESCRIPTOR_DIM:
        raise ValueError(f"{path}: vote index of dimension {index.d}, not {DESCRIPTOR_DIM}")
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf.nprobe = VOTE_NPROBE
    return index


def votes(index, root: np.ndarray, n_items: int) -> np.ndarray:
    """Per item of the shard, how many query descriptors (RootSIFT rows) have it as a ratio-tested match."""
    out = np.zeros(n_items, np.int64)
    if not len(root) or index.ntotal < 2:
        return out
    sims, ids = index.search(np.ascontiguousarray(root, np.float32), 2)
    first, second = 2.0 - 2.0 * sims[:, 0], 2.0 - 2.0 * sims[:, 1]  # squared distances of unit vectors
    keep = (ids[:, 0] >= 0) & (first < VOTE_RATIO * VOTE_RATIO * second)
    np.add.at(out, ids[keep, 0], 1)
    return out


def manifest_record(kinds: list[str]) -> dict[str, Any]:
    """What the index manifest's ``local_features.vote_index`` says of the shards' vote indexes."""
    return {"file": VOTES_FILE, "nprobe": VOTE_NPROBE, "ratio": VOTE_RATIO, "kinds": sorted(set(kinds))}


class VotesType(IndexType):
    """Searched with a query's RootSIFT descriptors; answers votes per item instead of cosines."""

    name = "votes"
    files = (VOTES_FILE,)
    selectable = False  # built with the shard's local features
    local_record = "vote_index"
    exact_scores = False

    @classmethod
    def build(cls, shard: ShardBuild) -> dict[str, Any]:
        return write_vote_index(shard.out_dir, seed=shard.number)

    def open_shard(self, shard_dir: str, n: int, number: int, dense: Any) -> Any:
        return open_vote_index(shard_dir), n

    def candidates(self, handle: Any, k: int, requested: int, reranked: bool) -> int:
        return requested or k

    def search(self, handle: Any, q: np.ndarray, n: int, effort: int) -> tuple[np.ndarray, np.ndarray | None]:
        """``q`` is one query's descriptors (raw SIFT, uint8 or float): the ``n`` items most of them vote for,
        as a (1, ≤n) row of ids and their vote counts (items without a vote left out)."""
        index, size = handle
        root = root_sift(q) if len(q) else np.zeros((0, DESCRIPTOR_DIM), np.float32)
        v = votes(index, root, size)
        top = np.flatnonzero(v)
        top = top[np.lexsort((top, -v[top]))][:n]
        return top[None, :].astype(np.int64), v[top][None, :].astype(np.float32)
