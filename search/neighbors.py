"""Neighbour tables: the top-k similar items of every indexed item, as Arrow tables.

This is the table a product loads into a key-value store for "similar images".
Rows never contain the item itself. Exact duplicates (the same sha256 of the
original bytes, recorded in the id map at extract time) are marked twice: a
``duplicate`` flag aligned with each neighbour, and ``duplicate_ids``, every
other item with the same digest whether or not the search returned it (capped,
with the full count in ``duplicate_count``), so a consumer can drop or collapse
copies without a second pass over the corpus.

No Beam here: ``pipelines/neighbors.py`` splits the work into (shard, id range)
chunks and calls :func:`neighbor_table` on each.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict

import numpy as np
import pyarrow as pa

from search.options import Rerank, SearchOptions
from search.searcher import Searcher

SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("neighbor_ids", pa.list_(pa.string())),
        ("scores", pa.list_(pa.float32())),
        ("duplicate", pa.list_(pa.bool_())),
        ("duplicate_ids", pa.list_(pa.string())),
        ("duplicate_count", pa.int32()),
        pa.field("inliers", pa.list_(pa.int32()), nullable=True),  # --verify N: per neighbour, -1 beyond N
    ]
)


@dataclasses.dataclass(frozen=True)
class NeighborOptions:
    """The search every row is made with (re-ranked exactly by default), and the table's own settings."""

    search: SearchOptions = dataclasses.field(
        default_factory=lambda: SearchOptions(batch_size=256, rerank=Rerank(exact=True)))
    max_duplicates: int = 100  # duplicate_ids listed per row; duplicate_count has the full number

    @property
    def batch_size(self) -> int:
        return self.search.batch_size


def chunks(items_per_shard: list[int], chunk_size: int) -> list[tuple[int, int, int]]:
    """(shard, start, end) ranges covering every item once: the units of work of the job."""
    if chunk_size < 1:
        raise ValueError(f"chunk size must be at least 1, not {chunk_size}")
    return [
        (shard, start, min(start + chunk_size, n))
        for shard, n in enumerate(items_per_shard)
        for start in range(0, n, chunk_size)
    ]


class DuplicateGroups:
    """Global ids that share a content digest, for O(1) lookups per item.

    Items without a digest (empty string) are never anyone's duplicate.
    """

    def __init__(self, sha256: list[str], image_ids: list[str]):
        groups: dict[str, list[int]] = defaultdict(list)
        for gid, digest in enumerate(sha256):
            if digest:
                groups[digest].append(gid)
        self._digest = sha256
        # each group ordered by image_id so duplicate_ids is deterministic
        self._groups = {d: sorted(g, key=lambda i: image_ids[i]) for d, g in groups.items() if len(g) > 1}

    @property
    def groups(self) -> int:
        return len(self._groups)

    def others(self, gid: int) -> list[int]:
        group = self._groups.get(self._digest[gid])
        return [g for g in group if g != gid] if group else []

    def same(self, gid: int, other: np.ndarray) -> np.ndarray:
        digest = self._digest[gid]
        if not digest or digest not in self._groups:
            return np.zeros(len(other), bool)
        return np.asarray([self._digest[o] == digest for o in other.tolist()], bool)


def neighbor_table(
    searcher: Searcher, gids: np.ndarray, opts: NeighborOptions, duplicates: DuplicateGroups
) -> pa.Table:
    """Neighbour rows of the given global ids, searched as one batch with each item excluded."""
    gids = np.asarray(gids, np.int64)
    vectors = searcher.vectors_of(gids)
    # --verify: the top N re-ordered by inliers against each item's own local features; the global top N
    # only, since a vote search per corpus item would cost tens of milliseconds each
    ranking = searcher.rank(vectors, opts.search, exclude=gids, verify_votes=False)
    ids, scores, counts = ranking.ids, ranking.scores, ranking.inliers
    names = searcher.image_ids
    col_inliers = []
    col_ids, col_scores, col_dup, col_dup_ids, col_dup_count = [], [], [], [], []
    for gid, row_ids, row_scores in zip(gids.tolist(), ids, scores, strict=True):
        keep = (row_ids >= 0) & (row_ids != gid)  # the search excludes it already; a table must never hold it
        row_ids, row_scores = row_ids[keep], row_scores[keep]
        col_inliers.append(None if counts is None else counts[len(col_inliers)][keep].tolist())
        col_ids.append([names[i] for i in row_ids.tolist()])
        col_scores.append(row_scores.astype(np.float32))
        col_dup.append(duplicates.same(gid, row_ids).tolist())
        others = duplicates.others(gid)
        col_dup_ids.append([names[i] for i in others[: opts.max_duplicates]])
        col_dup_count.append(len(others))
    return pa.Table.from_arrays(
        [
            pa.array([names[g] for g in gids.tolist()], pa.string()),
            pa.array(col_ids, pa.list_(pa.string())),
            pa.array([s.tolist() for s in col_scores], pa.list_(pa.float32())),
            pa.array(col_dup, pa.list_(pa.bool_())),
            pa.array(col_dup_ids, pa.list_(pa.string())),
            pa.array(col_dup_count, pa.int32()),
            pa.array(col_inliers, pa.list_(pa.int32())),
        ],
        schema=SCHEMA,
    )
