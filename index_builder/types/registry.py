"""Every index type, by name: the one list the shard builder, the manifest, the file checks and the searcher loop over.

Adding a type: write its module under ``index_builder/types/`` (a subclass of
:class:`~index_builder.types.base.IndexType` with its ``Params``, build, calibration, open and
search) and add it to :data:`TYPES` below.
"""

from __future__ import annotations

from typing import Any

from artefacts.manifests import ShardRecord
from index_builder import calibration
from index_builder.types.annoy import AnnoyType
from index_builder.types.base import IndexType
from index_builder.types.exact import ExactType
from index_builder.types.hnsw import HnswType
from index_builder.types.lsh import LshType
from index_builder.types.votes import VotesType

TYPES: dict[str, type[IndexType]] = {t.name: t for t in (AnnoyType, LshType, HnswType, ExactType, VotesType)}
SELECTABLE: tuple[str, ...] = tuple(name for name, t in TYPES.items() if t.selectable)  # --index-types choices
DEFAULT_TYPES: tuple[str, ...] = SELECTABLE
LOCAL: tuple[str, ...] = tuple(name for name, t in TYPES.items() if t.local_record)  # built from local features


def get(name: str) -> type[IndexType]:
    found = TYPES.get(name)
    if found is None:
        raise ValueError(f"unknown index type {name!r}: choose from {', '.join(TYPES)}")
    return found


def check_selection(names: tuple[str, ...], allow_empty: bool = False) -> None:
    """``names`` must be a non-empty subset of the selectable types (``--index-types``)."""
    unknown = [n for n in names if n not in SELECTABLE]
    if unknown or not (names or allow_empty):
        raise ValueError(f"--index-types takes a non-empty subset of {', '.join(SELECTABLE)}, not {unknown}")


def default_params(names: tuple[str, ...]) -> dict[str, Any]:
    """Each named type's build parameters at their defaults."""
    return {n: get(n).Params() for n in names if get(n).Params is not type(None)}


def add_arguments(parser: Any, positive_int: Any) -> None:
    """Every type's own build options, for ``cbir index``."""
    for t in TYPES.values():
        t.add_arguments(parser, positive_int)


def params_from_args(args: Any) -> dict[str, Any]:
    """Every type's ``Params`` from parsed ``cbir index`` options (types without parameters left out)."""
    found = {name: t.params_from_args(args) for name, t in TYPES.items()}
    return {name: p for name, p in found.items() if p is not None}


def shard_files(names: tuple[str, ...]) -> list[str]:
    """The files the named types write in every shard folder (what a reader requires)."""
    return [f for n in names for f in get(n).files]


def calibration_summary(infos: list[ShardRecord], name: str, target: float) -> dict[str, Any] | None:
    """What calibration chose and measured, per shard, for one index type (None when it did not run)."""
    per_shard = [i.calibrated(name) for i in infos]
    if not any(per_shard):
        return None
    measured = [p for p in per_shard if p]
    return {
        "target_recall": target, "k": calibration.DEFAULT_K,
        "per_shard": per_shard,
        "min_recall": min(p["recall"] for p in measured),
        "reached_target": all(p["reached_target"] for p in measured),
    }


def manifest_records(names: tuple[str, ...], params: dict[str, Any], seed: int, infos: list[ShardRecord],
                     target: float) -> dict[str, Any]:
    """Per built type, the record the index manifest keeps (its parameters and calibration summary)."""
    out = {}
    for name in names:
        t = get(name)
        record = t.manifest_params(params.get(name) or t.Params(), seed, infos,
                                   calibration_summary(infos, name, target))
        if record is not None:
            out[name] = record
    return out
