"""The one interface every index type implements, and the shard being built that it builds into.

An index type is one module: its build parameters, how it builds a shard's files, how it
calibrates its search effort on the shard's own items, how a searcher opens it (memory-mapped
where the library allows) and searches it with an effort given per call. The shard builder,
the manifest, the file checks and the searcher loop over :mod:`index_builder.types.registry`
and never branch on a type's name, so adding a type is one module plus one registry line.

Build side (class methods: no searcher state): :meth:`IndexType.build` writes the type's files
into the shard folder and returns its ``SHARD.json`` entry; :meth:`IndexType.calibrate` returns
the effort reaching the target recall on held-out items. Search side (an instance per opened
version, which knows the version's manifest): :meth:`IndexType.open_shard`,
:meth:`IndexType.candidates` (how many candidates a shard is asked for), :meth:`IndexType.search`.
The effort is a plain integer in the type's own unit (``search_k``, ``efSearch``, candidate
count); 0 asks for the value the shard calibrated.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, ClassVar

import numpy as np

from artefacts.manifests import ShardRecord
from index_builder import calibration


@dataclasses.dataclass(frozen=True)
class BuildSettings:
    """What every type's build shares: seed, threads, the calibration target."""

    seed: int = 1234
    n_jobs: int = -1  # all cores of the worker
    target_recall: float = calibration.DEFAULT_TARGET  # 0 turns calibration off
    calibration_k: int = calibration.DEFAULT_K
    calibration_queries: int = calibration.DEFAULT_QUERIES

    @property
    def threads(self) -> int:
        """Threads calibration measures recall with: the worker's cores, as the builds use."""
        return self.n_jobs if self.n_jobs > 0 else (os.cpu_count() or 1)


@dataclasses.dataclass(frozen=True)
class ShardChange:
    """What an in-place update does to a built shard: which of its items stay, how many are appended.

    The updated shard keeps its surviving items in their old order (dense ids renumbered
    without gaps) and appends the new ones after them, so every file a reader sees stays
    dense; only a type that cannot drop items from its own structure (a graph, Annoy's trees)
    keeps them inside as tombstones that its search skips.
    """

    base_dir: str  # the built shard folder this update starts from
    remap: np.ndarray  # (base items,) int64: each base item's dense id after the update, -1 if removed
    added: int  # items appended after the survivors

    @property
    def kept(self) -> int:
        return int((self.remap >= 0).sum())


@dataclasses.dataclass
class ShardBuild:
    """One shard being built in a local folder: its vectors and what the types share.

    ``vectors`` are float32 holding float16 values (the precision the shard stores), so every
    structure is built from exactly the values exact scoring reads. ``query_ids`` are the
    held-out calibration queries (None when the shard is too small or calibration is off).
    """

    number: int
    out_dir: str
    vectors: np.ndarray
    planes: np.ndarray
    offsets: np.ndarray | None
    settings: BuildSettings
    type_params: dict[str, Any]
    query_ids: np.ndarray | None = None
    image_ids: list[str] = dataclasses.field(default_factory=list)
    sha256: list[str] = dataclasses.field(default_factory=list)
    local_rows: Any = None  # pyarrow Table of local-feature rows, or None
    built: dict[str, Any] = dataclasses.field(default_factory=dict)  # type name -> what its build returned
    change: ShardChange | None = None  # set when the shard is updated in place rather than built
    earlier: dict[str, Any] | None = None  # an updated shard's calibration before the update (SHARD.json's)

    @property
    def size(self) -> int:
        return len(self.vectors)

    def earlier_effort(self, name: str, key: str) -> int | None:
        """The effort type ``name`` had before an in-place update (None for a build, or when it had none)."""
        entry = (self.earlier or {}).get(name) or {}
        return int(entry[key]) if entry.get(key) else None

    def path(self, name: str) -> str:
        return os.path.join(self.out_dir, name)

    @functools.cached_property
    def stored(self) -> np.ndarray:
        """The shard's ``vectors.f16.npy`` read back memory-mapped (written before any type builds)."""
        from artefacts import layout

        return np.load(self.path(layout.VECTORS_FILE), mmap_mode="r")

    def truth(self, leave_out_all: bool = False) -> np.ndarray:
        """Exact top-k of the held-out queries (each query left out, or all of them)."""
        key = f"_truth_{leave_out_all}"
        if key not in self.__dict__:
            self.__dict__[key] = calibration.exact_neighbours(
                self.vectors, self.query_ids, self.settings.calibration_k, leave_out_all=leave_out_all)
        return self.__dict__[key]


class IndexType:
    """Base of every index type. Subclasses set the class attributes and override what they have."""

    name: ClassVar[str] = ""
    files: ClassVar[tuple[str, ...]] = ()  # the files it writes in each shard folder
    version_files: ClassVar[tuple[str, ...]] = ()  # files it needs beside the shards, in the version folder
    effort_key: ClassVar[str] = ""  # its effort's name in SHARD.json and the manifest's calibration
    effort_option: ClassVar[str] = ""  # the field of the searcher's Effort options that sets it per call
    effort_is_candidates: ClassVar[bool] = False  # its effort is the candidate count itself (LSH)
    selectable: ClassVar[bool] = True  # chosen with --index-types (exact is always there, votes with local features)
    exact_scores: ClassVar[bool] = True  # its scores are the cosines of the stored vectors
    parallel: ClassVar[bool] = True  # searches per query with the GIL released: worth a thread per chunk
    local_record: ClassVar[str] = ""  # built from the shard's local features; its SHARD.json key under local_features
    Params: ClassVar[type] = type(None)  # its build parameters

    # -- options ------------------------------------------------------------------------------------

    @classmethod
    def add_arguments(cls, parser: Any, positive_int: Any) -> None:
        """Adds this type's build options to ``cbir index`` (``positive_int``: the CLI's checked integer type)."""
        return None

    @classmethod
    def params_from_record(cls, record: Any) -> Any:
        """The build parameters a built index recorded for this type (its manifest record), or None."""
        return None

    @classmethod
    def params_from_args(cls, args: Any) -> Any:
        """This type's ``Params`` from the parsed options (its defaults when it has none)."""
        return cls.Params() if cls.Params is not type(None) else None

    # -- build --------------------------------------------------------------------------------------

    @classmethod
    def params(cls, shard: ShardBuild) -> Any:
        return shard.type_params.get(cls.name) or (cls.Params() if cls.Params is not type(None) else None)

    @classmethod
    def build(cls, shard: ShardBuild) -> dict[str, Any] | None:
        """Writes this type's files for ``shard``; returns its SHARD.json entry (None: nothing to record)."""
        return None

    @classmethod
    def update(cls, shard: ShardBuild) -> dict[str, Any] | None:
        """Brings this type's files from ``shard.change.base_dir`` to the updated items; its SHARD.json entry.

        The default builds afresh from ``shard.vectors`` (right for a type whose files are a
        cheap function of the vectors, as LSH codes are); a type whose build is the expensive
        part overrides it to add and remove in place.
        """
        return cls.build(shard)

    @classmethod
    def calibrate(cls, shard: ShardBuild) -> dict[str, Any] | None:
        """The smallest effort reaching the target recall on the held-out queries, or None."""
        return None

    @classmethod
    def manifest_params(cls, cfg_params: Any, seed: int, shards: list[ShardRecord],
                        summary: dict[str, Any] | None) -> Any:
        """The record the index manifest keeps for this type (None: nothing)."""
        return None

    # -- search -------------------------------------------------------------------------------------

    def __init__(self, version_dir: str, manifest: Any):
        self.version_dir = version_dir
        self.manifest = manifest
        self.dim = manifest.dimension.output
        found = getattr(manifest, self.name, None)
        # this type's record in the manifest: a field of its name, or an unknown key kept in ``extra``
        self.recorded = found if found is not None else (manifest.extra or {}).get(self.name)
        self.calibration_k = int((_get(self.recorded, "calibration") or {}).get("k") or calibration.DEFAULT_K)

    def calibrated(self, number: int) -> int | None:
        """The effort calibration chose for shard ``number`` (None when the index recorded none)."""
        cal = _get(self.recorded, "calibration")
        per_shard = (cal or {}).get("per_shard") or []
        entry = per_shard[number] if number < len(per_shard) else None
        return int(entry[self.effort_key]) if entry and entry.get(self.effort_key) is not None else None

    def open_shard(self, shard_dir: str, n: int, number: int, dense: Any) -> Any:
        """This type's handle on a shard folder holding ``n`` items; ``dense()`` gives its stored vectors."""
        return None

    def close_shard(self, handle: Any) -> None:
        return None

    def candidates(self, handle: Any, k: int, requested: int, reranked: bool) -> int:
        """Candidates a shard is asked for: ``requested`` when given (> 0), else the type's rule for k."""
        return requested or k

    def search(self, handle: Any, q: np.ndarray, n: int, effort: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Local ids ``(b, ≤n)`` int64 padded with -1, and float32 cosines of the same shape (None when
        its order is not by cosine: the searcher re-scores exactly)."""
        raise NotImplementedError


def _get(record: Any, key: str) -> Any:
    if record is None:
        return None
    return record.get(key) if isinstance(record, dict) else getattr(record, key, None)
