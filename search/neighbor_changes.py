"""Which rows of a neighbour table a night can change, so ``cbir neighbors --incremental`` recomputes only those.

Between a base version and one updated in place from it (``cbir index --incremental``), every
item that stayed keeps its vector, so a row changes only when:

1. its item is new or changed (new content under the same id);
2. it listed a removed or changed item among its neighbours;
3. a new or changed item now enters its top k: the items whose current k-th score some new item
   beats. For a table made by exact search this is tested exactly, every item against every new
   one in blocks (so the table equals one computed in full); otherwise among each new item's
   ``REACH``·k nearest by the table's own method, approximate only in how far that search reaches;
4. its exact duplicates changed (an item with the same sha256 came or went).

Every other row is copied from the previous table. Items and neighbours are named by
``image_id``, which does not change between versions, so copied rows stay valid.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from search.options import SearchOptions
from search.searcher import Searcher

REACH = 4  # a new item is searched for its REACH·k nearest items when looking for the rows it enters


@dataclasses.dataclass
class RowChanges:
    recompute: np.ndarray  # global ids (in the new version) whose rows are computed again
    keep: set[str]  # image ids whose previous rows are copied
    reasons: dict[str, int]  # how many rows each rule selected (a row may be selected by several)


def rows_to_recompute(searcher: Searcher, previous: pa.Table, base_ids: dict[str, str], k: int,
                      opts: SearchOptions) -> RowChanges:
    """The new version's rows that may differ from ``previous`` (the table made from the base version).

    ``base_ids``: image_id → sha256 of the base version's items. ``opts``: the search the table was
    made with (used to find the rows a new item enters).
    """
    current = dict(zip(searcher.image_ids, searcher.sha256, strict=True))
    new = {i for i, d in current.items() if base_ids.get(i) != d}
    gone = {i for i, d in base_ids.items() if current.get(i) != d}  # removed, and the old rows of changed ones
    listed = _rows_listing(previous, gone)
    entered = _rows_entered(searcher, previous, sorted(new), k, opts)
    digests = {base_ids[i] for i in gone} | {current[i] for i in new}
    twins = {i for i, d in current.items() if d and d in digests} - new
    chosen = (new | listed | entered | twins) & set(current)
    gid = {name: g for g, name in enumerate(searcher.image_ids)}
    recompute = np.asarray(sorted(gid[i] for i in chosen), np.int64)
    keep = set(current) - chosen
    return RowChanges(recompute, keep, {"new or changed": len(new), "listed a removed or changed item": len(listed),
                                        "a new item entered": len(entered), "duplicates changed": len(twins)})


def _rows_listing(previous: pa.Table, gone: set[str]) -> set[str]:
    if not gone or not previous.num_rows:
        return set()
    flat = pc.list_flatten(previous.column("neighbor_ids"))
    owners = pc.list_parent_indices(previous.column("neighbor_ids"))
    hit = pc.is_in(flat, value_set=pa.array(sorted(gone), pa.string()))
    rows = np.unique(np.asarray(owners)[np.asarray(hit.to_numpy(zero_copy_only=False), bool)])
    return set(previous.column("image_id").take(pa.array(rows, pa.int64())).to_pylist())


def _rows_entered(searcher: Searcher, previous: pa.Table, new: list[str], k: int, opts: SearchOptions) -> set[str]:
    """Items whose current k-th score a new item beats (see the module docstring)."""
    if not new:
        return set()
    kth = {}
    for name, scores in zip(previous.column("image_id").to_pylist(), previous.column("scores").to_pylist(),
                            strict=True):
        kth[name] = scores[k - 1] if len(scores) >= k else -np.inf
    gids = np.asarray([searcher.find(i) for i in new], np.int64)
    if opts.method == "exact":
        return _entered_exactly(searcher, kth, gids)
    ids, scores = searcher.search_arrays(searcher.vectors_of(gids), opts.replace(k=REACH * k), exclude=gids)
    names = searcher.image_ids
    out = set()
    for row_ids, row_scores in zip(ids, scores, strict=True):
        for g, s in zip(row_ids.tolist(), row_scores.tolist(), strict=True):
            if g >= 0 and s >= kth.get(names[g], -np.inf):
                out.add(names[g])
    return out


def _entered_exactly(searcher: Searcher, kth: dict[str, float], new: np.ndarray, block: int = 65536) -> set[str]:
    """Every item some new item beats the k-th score of: all items against all new ones, a block at a time."""
    queries = searcher.vectors_of(new)
    names = searcher.image_ids
    threshold = np.asarray([kth.get(n, -np.inf) for n in names], np.float32)
    out: set[str] = set()
    for lo in range(0, searcher.size, block):
        gids = np.arange(lo, min(lo + block, searcher.size))
        best = (searcher.vectors_of(gids) @ queries.T).max(axis=1)
        best[np.isin(gids, new)] = -np.inf  # a new item's own row is recomputed anyway
        out.update(names[g] for g in gids[best >= threshold[gids]].tolist())
    return out
