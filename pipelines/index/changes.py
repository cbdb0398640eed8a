"""What changed since the base version: the night's features compared with the base's id maps.

An item is identified by ``image_id`` and its content by ``sha256``: an id the base lacks is
added, an id whose digest differs is changed (removed, then added with its new vector), a base
id the features lack is removed. Only the id and digest columns of the features are read for
the comparison; the vectors are read for the added and changed rows alone. Duplicate ids in the
features keep one row by the full build's rule (lowest sha256, then uri) and are counted, as are
rows whose vector is not finite, so the accounting adds up as a full build's does.
"""

from __future__ import annotations

import dataclasses
import logging
import os

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from artefacts import layout
from artefacts.transform import VectorTransform
from index_builder.shard import ShardItems
from plumbing import fsutil

log = logging.getLogger(__name__)

_ID_COLUMNS = ["image_id", "uri", "label", "sha256"]


@dataclasses.dataclass
class ShardChanges:
    """One shard's part of a night: what to add (transformed, float16 values) and which ids to drop."""

    added: ShardItems
    removed: list[str]
    duplicates: int = 0
    non_finite: int = 0

    @property
    def touched(self) -> bool:
        return bool(self.added.size or self.removed)


@dataclasses.dataclass
class Changes:
    shards: list[ShardChanges]
    rows: int  # feature rows read
    base_items: int
    energy: dict[str, float]  # the fit check's figures (see :func:`projected_energy`)

    @property
    def added(self) -> int:
        return sum(s.added.size for s in self.shards)

    @property
    def removed(self) -> int:
        """Base items that leave: removed ids and the old rows of changed ones."""
        return sum(len(s.removed) for s in self.shards) + self.changed

    changed: int = 0


def diff(feature_files: list[str], base_root: str, shards: int, transform: VectorTransform, dim: int) -> Changes:
    """Compares the features with the base version at ``base_root`` (a local folder) shard by shard."""
    ids = _feature_ids(feature_files)
    rows = ids.num_rows
    ids, duplicates = _one_row_per_id(ids)
    base = _base_ids(base_root, shards)
    current = dict(zip(ids.column("image_id").to_pylist(), ids.column("sha256").to_pylist(), strict=True))
    wanted = {i for i, digest in current.items() if base.get(i) != digest}
    changed = sum(1 for i in wanted if i in base)
    removed = [i for i in base if i not in current]
    vectors, non_finite = _vectors_of(feature_files, ids, wanted, transform)
    per_shard = [ShardChanges(ShardItems([], [], [], [], np.zeros((0, dim), np.float32)), []) for _ in range(shards)]
    _assign_added(per_shard, vectors, shards)
    for i in removed:
        per_shard[layout.stable_shard(i, shards)].removed.append(i)
    for image_id in non_finite:  # a base item whose new vector is not finite leaves the index
        target = per_shard[layout.stable_shard(image_id, shards)]
        target.non_finite += 1
        if image_id in base:
            target.removed.append(image_id)
    for image_id in duplicates:
        per_shard[layout.stable_shard(image_id, shards)].duplicates += 1
    energy = projected_energy(transform, feature_files, ids, wanted)
    return Changes(per_shard, rows, len(base), energy, changed=changed - sum(1 for i in non_finite if i in base))


def _feature_ids(files: list[str]) -> pa.Table:
    """The id columns of every feature part (no vectors), in part order."""
    return pa.concat_tables([_read(path, _ID_COLUMNS) for path in files]) if files else \
        pa.table({c: pa.array([], pa.string()) for c in _ID_COLUMNS})


def _read(path: str, columns: list[str]) -> pa.Table:
    local = fsutil.localise_tree(path) if "://" in path else path
    return pq.read_table(local, columns=columns)


def _one_row_per_id(ids: pa.Table) -> tuple[pa.Table, list[str]]:
    """One row per image id by the full build's rule (lowest sha256, then uri); the ids that had more."""
    order = pc.sort_indices(ids, sort_keys=[("image_id", "ascending"), ("sha256", "ascending"),
                                            ("uri", "ascending")])
    ids = ids.take(order)
    names = ids.column("image_id").to_pylist()
    keep = np.ones(len(names), bool)
    keep[1:] = [a != b for a, b in zip(names[1:], names[:-1], strict=True)]
    duplicates = [n for n, k in zip(names, keep.tolist(), strict=True) if not k]
    return ids.filter(pa.array(keep)), duplicates


def _base_ids(base_root: str, shards: int) -> dict[str, str]:
    """image_id → sha256 of every item the base version holds."""
    out: dict[str, str] = {}
    for s in range(shards):
        idmap = pq.read_table(os.path.join(base_root, layout.shard_dir(s), layout.IDMAP_FILE),
                              columns=["image_id", "sha256"])
        out.update(zip(idmap.column("image_id").to_pylist(), idmap.column("sha256").to_pylist(), strict=True))
    return out


def _vectors_of(files: list[str], ids: pa.Table, wanted: set[str], transform: VectorTransform
                ) -> tuple[dict[str, tuple[dict, np.ndarray]], list[str]]:
    """The kept rows of ``wanted`` ids, transformed and rounded to float16: id → (id columns, vector)."""
    chosen = {(r["image_id"], r["sha256"], r["uri"]) for r in ids.to_pylist() if r["image_id"] in wanted}
    out: dict[str, tuple[dict, np.ndarray]] = {}
    non_finite: list[str] = []
    if not wanted:
        return out, non_finite
    ask = pa.array(sorted(wanted), pa.string())
    for path in files:
        table = _read(path, [*_ID_COLUMNS, "feature"])
        table = table.filter(pc.is_in(table.column("image_id"), value_set=ask))
        if not table.num_rows:
            continue
        raw = np.asarray(table.column("feature").combine_chunks().flatten().to_numpy(zero_copy_only=False),
                         np.float32).reshape(table.num_rows, -1)
        for row, r in enumerate(table.select(_ID_COLUMNS).to_pylist()):
            if (r["image_id"], r["sha256"], r["uri"]) not in chosen or r["image_id"] in out:
                continue
            if not np.isfinite(raw[row]).all():
                non_finite.append(r["image_id"])
                continue
            out[r["image_id"]] = (r, transform(raw[row:row + 1])[0].astype(np.float16).astype(np.float32))
    return out, non_finite


def _assign_added(per_shard: list[ShardChanges], vectors: dict[str, tuple[dict, np.ndarray]], shards: int) -> None:
    grouped: dict[int, list[str]] = {}
    for image_id in sorted(vectors):
        grouped.setdefault(layout.stable_shard(image_id, shards), []).append(image_id)
    for s, members in grouped.items():
        rows = [vectors[i][0] for i in members]
        per_shard[s].added = ShardItems(members, [r["uri"] or "" for r in rows], [r["label"] for r in rows],
                                        [r["sha256"] or "" for r in rows], np.stack([vectors[i][1] for i in members]))


def projected_energy(transform: VectorTransform, files: list[str], ids: pa.Table, wanted: set[str],
                     sample: int = 2000) -> dict[str, float]:
    """How much of the new items' (unit) vectors the fitted projection keeps, next to the unchanged items'.

    ``‖l2(x)·P + b‖²``, the squared length a normalised feature keeps after centring and
    projecting, averaged over up to ``sample`` added or changed items and as many unchanged ones
    (a seeded choice). When the new items put much less of their energy into the fitted subspace
    than the items it was fitted on, the fit no longer describes the data: the job builds in full.
    """
    if transform.projection is None:
        return {}
    names = ids.column("image_id").to_pylist()
    rng = np.random.default_rng(0)
    new = [i for i in names if i in wanted]
    old = [i for i in names if i not in wanted]
    picks = {"new": set(rng.permutation(new)[:sample].tolist()),
             "unchanged": set(rng.permutation(old)[:sample].tolist())}
    sums = {k: [] for k in picks}
    for path in files:
        table = _read(path, ["image_id", "feature"])
        mask = pc.is_in(table.column("image_id"), value_set=pa.array(sorted(picks["new"] | picks["unchanged"]),
                                                                      pa.string()))
        table = table.filter(mask)
        if not table.num_rows:
            continue
        raw = np.asarray(table.column("feature").combine_chunks().flatten().to_numpy(zero_copy_only=False),
                         np.float32).reshape(table.num_rows, -1)
        finite = np.isfinite(raw).all(axis=1)
        x = raw[finite] / np.maximum(np.linalg.norm(raw[finite], axis=1, keepdims=True), 1e-12)
        kept = np.square(x @ transform.projection + transform.bias).sum(axis=1)
        for name, value in zip(np.asarray(table.column("image_id").to_pylist(), object)[finite], kept, strict=True):
            sums["new" if name in picks["new"] else "unchanged"].append(float(value))
    return {k: round(float(np.mean(v)), 4) for k, v in sums.items() if v}
