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

A row selected by rule 3 alone needs no search: its old neighbours are all still there with the
same scores, so its new row is the old one merged with the new items that beat its k-th score
(their scores come with the test). Those rows are *patched*; rows selected by rules 1, 2 or 4
are computed again. Every other row is copied from the previous table. Items and neighbours are
named by ``image_id``, which does not change between versions, so copied rows stay valid.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from index_builder.topk import normalise_rows
from search.options import SearchOptions
from search.searcher import Searcher

# A new item is searched for its REACH·k nearest items when looking for the rows it enters. Measured on
# 100k class-shaped vectors, 750 new items, HNSW (M 32): the rows a new item enters that this search finds
# are 0.895 of them at 4·k, 0.960 at 10·k and 0.987 at 20·k, for 0.20 / 0.20 / 0.29 s of search; at 4·k the
# misses added up over seven 1 % nights to a row recall 0.010 below a full table (benchmarks/RESULTS.md).
REACH = 20


@dataclasses.dataclass
class RowChanges:
    recompute: np.ndarray  # global ids (in the new version) whose rows are computed again
    keep: set[str]  # image ids whose previous rows are copied (patched ones included)
    reasons: dict[str, int]  # how many rows each rule selected (a row may be selected by several)
    patched: dict[str, list[tuple[str, float]]] = dataclasses.field(default_factory=dict)  # row -> entrants


def patch_rows(kept: pa.Table, patched: dict[str, list[tuple[str, float]]], k: int) -> pa.Table:
    """Copied rows with the new items that entered them merged in by score (best k kept).

    Only the patched rows become Python objects; the rest stay Arrow columns.
    """
    if not patched:
        return kept
    mask = pc.is_in(kept.column("image_id"), value_set=pa.array(sorted(patched), pa.string()))
    rows = kept.filter(mask).to_pylist()
    for row in rows:
        merged = list(zip(row["neighbor_ids"], row["scores"], row["duplicate"], strict=True))
        merged += [(name, score, False) for name, score in patched[row["image_id"]]]  # a twin's row is computed
        merged.sort(key=lambda t: (-t[1], t[0]))
        row["neighbor_ids"] = [m[0] for m in merged[:k]]
        row["scores"] = [float(m[1]) for m in merged[:k]]
        row["duplicate"] = [m[2] for m in merged[:k]]
    return pa.concat_tables([kept.filter(pc.invert(mask)), pa.Table.from_pylist(rows, schema=kept.schema)])


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
    chosen = (new | listed | twins) & set(current)
    if opts.rerank.verify:  # a patched row would lack the entrants' inlier counts: compute those rows too
        chosen |= set(entered) & set(current)
    gid = {name: g for g, name in enumerate(searcher.image_ids)}
    recompute = np.asarray(sorted(gid[i] for i in chosen), np.int64)
    keep = set(current) - chosen
    patched = {name: found for name, found in entered.items() if name in keep}
    return RowChanges(recompute, keep, {"new or changed": len(new), "listed a removed or changed item": len(listed),
                                        "a new item entered": len(entered), "duplicates changed": len(twins),
                                        "patched without a search": len(patched)}, patched)


def _rows_listing(previous: pa.Table, gone: set[str]) -> set[str]:
    if not gone or not previous.num_rows:
        return set()
    flat = pc.list_flatten(previous.column("neighbor_ids"))
    owners = pc.list_parent_indices(previous.column("neighbor_ids"))
    hit = pc.is_in(flat, value_set=pa.array(sorted(gone), pa.string()))
    rows = np.unique(np.asarray(owners)[np.asarray(hit.to_numpy(zero_copy_only=False), bool)])
    return set(previous.column("image_id").take(pa.array(rows, pa.int64())).to_pylist())


def _rows_entered(searcher: Searcher, previous: pa.Table, new: list[str], k: int, opts: SearchOptions
                  ) -> dict[str, list[tuple[str, float]]]:
    """Per item whose current k-th score some new items beat: those new items and their scores."""
    if not new:
        return {}
    kth = dict(zip(previous.column("image_id").to_pylist(), _kth_scores(previous, k).tolist(), strict=True))
    gids = np.asarray([searcher.find(i) for i in new], np.int64)
    if opts.method == "exact":
        return _entered_exactly(searcher, kth, gids)
    ids, scores = searcher.search_arrays(searcher.vectors_of(gids), opts.replace(k=REACH * k), exclude=gids)
    names = searcher.image_ids
    out: dict[str, list[tuple[str, float]]] = {}
    for query, x, row_ids in zip(new, gids.tolist(), ids, strict=True):
        found = row_ids[row_ids >= 0]
        # row r scores x with r's normalised vector against x's stored one: the search from x scored the reverse
        exact = normalise_rows(searcher.vectors_of(found)) @ searcher.vectors_of(np.asarray([x]))[0]
        for g, s in zip(found.tolist(), exact.tolist(), strict=True):
            if s >= kth.get(names[g], -np.inf):
                out.setdefault(names[g], []).append((query, s))
    return out


def _kth_scores(previous: pa.Table, k: int) -> np.ndarray:
    """Each row's k-th score (-inf for a row with fewer), read from the Arrow buffers without Python lists."""
    scores = previous.column("scores").combine_chunks()
    lengths = pc.list_value_length(scores).to_numpy(zero_copy_only=False)
    out = np.full(len(lengths), -np.inf, np.float32)
    full = lengths >= k
    out[full] = scores.values.to_numpy(zero_copy_only=False)[scores.offsets.to_numpy()[:-1][full] + k - 1]
    return out


def _entered_exactly(searcher: Searcher, kth: dict[str, float], new: np.ndarray, block: int = 65536
                     ) -> dict[str, list[tuple[str, float]]]:
    """Every item some new item beats the k-th score of, with those new items: all against all, in blocks."""
    queries = searcher.vectors_of(new)
    names = searcher.image_ids
    threshold = np.asarray([kth.get(n, -np.inf) for n in names], np.float32)
    out: dict[str, list[tuple[str, float]]] = {}
    for lo in range(0, searcher.size, block):
        gids = np.arange(lo, min(lo + block, searcher.size))
        sims = normalise_rows(searcher.vectors_of(gids)) @ queries.T  # row r's score of x: as its row computes it
        sims[np.isin(gids, new)] = -np.inf  # a new item's own row is computed anyway
        rows, cols = np.nonzero(sims >= threshold[gids][:, None])
        for r, c in zip(rows.tolist(), cols.tolist(), strict=True):
            out.setdefault(names[int(gids[r])], []).append((names[int(new[c])], float(sims[r, c])))
    return out
