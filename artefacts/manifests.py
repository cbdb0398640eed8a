"""The manifests every job writes, as typed records with one reader and one writer.

Five kinds (ARCHITECTURE.md, "Artefacts"):

========================  ==========================================  ==============================
kind                      written by                                  file
========================  ==========================================  ==============================
``features``              ``cbir extract``, ``cbir autoencode``       ``<out>/MANIFEST.json``
``index``                 ``cbir index``                              ``<index>/<version>/MANIFEST.json``
``neighbors``             ``cbir neighbors``                          ``<out>/MANIFEST.json``
``shards``                ``cbir shard`` (packed input shards)        ``<out>/_SHARDS.json``
``cbir-savedmodel``       ``cbir export-model``                       ``<N>/assets.extra/cbir_export.json``
========================  ==========================================  ==============================

Each is a dataclass. :meth:`Manifest.from_dict` checks ``kind`` and ``format_version``
before it trusts anything else, fills fields an older manifest lacks with their
defaults (so every default is written once, here), and keeps keys it does not know
in ``extra`` so that reading and re-writing never drops information. Nothing here
does I/O: the jobs read and write through Beam filesystems (``plumbing.publish``),
the searcher through ``search.index_files``.

This module also owns run ids, so that every job names its runs alike.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
import types
import typing
import uuid
from typing import Any, ClassVar, TypeVar

M = TypeVar("M", bound="Manifest")


class ManifestError(ValueError):
    """A file that is not the manifest it should be (kind, format version, structure)."""


def new_run_id(now: float | None = None) -> str:
    """``YYYYmmddTHHMMSS-xxxxxx``: sorts by start time (UTC), never collides."""
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime(now)) + "-" + uuid.uuid4().hex[:6]


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def fingerprint(description: Any) -> str:
    """A short digest of a JSON-able description (sorted keys): model and vector-space fingerprints.

    Two runs with equal model fingerprints produce interchangeable vectors, which is what
    incremental re-indexing and every "wrong vector space" check rely on.
    """
    blob = json.dumps(description, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


# -- a small converter between JSON values and the dataclasses below ---------------------------------


def _convert(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if hint is Any or hint is object:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        last: Exception | None = None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, where)
            except ManifestError as exc:
                last = exc
        raise last or ManifestError(f"{where}: unexpected {value!r}")
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ManifestError(f"{where}: expected an object, found {type(value).__name__}")
        return _from_dict(hint, value, where)
    if origin is list or origin is tuple:
        if not isinstance(value, list | tuple):
            raise ManifestError(f"{where}: expected a list, found {type(value).__name__}")
        (item,) = typing.get_args(hint)[:1] or (Any,)
        out = [_convert(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise ManifestError(f"{where}: expected an object, found {type(value).__name__}")
        _, item = typing.get_args(hint) or (str, Any)
        return {str(k): _convert(v, item, f"{where}.{k}") for k, v in value.items()}
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ManifestError(f"{where}: expected a number, found {value!r}")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ManifestError(f"{where}: expected an integer, found {value!r}")
        return value
    if hint in (str, bool):
        if not isinstance(value, hint):
            raise ManifestError(f"{where}: expected {hint.__name__}, found {value!r}")
        return value
    return value


def _from_dict(cls: type, data: dict[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    names = set()
    for f in dataclasses.fields(cls):
        names.add(f.name)
        if f.name == "extra" or not f.init:
            continue
        if f.name in data:
            kwargs[f.name] = _convert(data[f.name], hints[f.name], f"{where}.{f.name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ManifestError(f"{where} lacks {f.name!r}")
    obj = cls(**kwargs)
    if "extra" in names:
        skip = names | {"kind", "format_version", getattr(cls, "KIND_KEY", "kind")}
        obj.extra = {k: v for k, v in data.items() if k not in skip}
    return obj


def _to_json(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out = {}
        for f in dataclasses.fields(value):
            v = getattr(value, f.name)
            if f.name == "extra":
                out.update(_to_json(v))
            else:
                out[f.name] = _to_json(v)
        return out
    if isinstance(value, dict):
        return {str(k): _to_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_to_json(v) for v in value]
    return value


@dataclasses.dataclass(kw_only=True)
class Manifest:
    """Base of every manifest: ``kind`` and ``format_version`` checked on read, written on write."""

    KIND: ClassVar[str] = ""
    KIND_KEY: ClassVar[str] = "kind"
    FORMAT_VERSION: ClassVar[int] = 1
    READS: ClassVar[tuple[int, ...]] = (1,)  # format versions this code reads
    REBUILD: ClassVar[str] = "re-run the job that wrote it"

    extra: dict[str, Any] = dataclasses.field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_dict(cls: type[M], data: Any, source: str = "manifest") -> M:
        if not isinstance(data, dict):
            raise ManifestError(f"{source} is not a JSON object")
        kind = data.get(cls.KIND_KEY)
        if kind != cls.KIND:
            raise ManifestError(f"{source} is a {kind!r} manifest, not {cls.KIND!r}")
        version = data.get("format_version", 1)
        if version not in cls.READS:
            raise ManifestError(
                f"{source} has {cls.KIND} format {version}; this version of cbir reads {list(cls.READS)}: "
                f"{cls.REBUILD}"
            )
        return _from_dict(cls, data, source)

    def to_dict(self) -> dict[str, Any]:
        return {self.KIND_KEY: self.KIND, "format_version": self.FORMAT_VERSION, **_to_json(self)}


# -- parts-based outputs (features, neighbours) -------------------------------------------------------


@dataclasses.dataclass
class PartFile:
    """One Parquet part a manifest lists: path relative to the output, and its row count."""

    path: str
    rows: int


@dataclasses.dataclass
class Accounting:
    """Where a job's input count came from and the counts it checked before publishing.

    ``source`` says how ``inputs`` was known: ``listing`` (the launcher listed the files),
    ``tallies`` (every shard reader reported how many entries it emitted, one tally per
    listed shard), ``parquet footers`` (row counts from the files' metadata), or
    ``upstream manifest`` (the input was itself a published, counted output).
    """

    source: str
    units: int  # files, shards or parts the count covers
    inputs: int
    checked: dict[str, int] = dataclasses.field(default_factory=dict)  # every figure that had to agree


@dataclasses.dataclass
class ExtractCounts:
    read: int
    ok: int
    failed: int
    inputs: int | None = None  # counted where inputs are first known (absent in old manifests)


@dataclasses.dataclass(kw_only=True)
class FeaturesManifest(Manifest):
    """``<out>/MANIFEST.json`` of an extract (or autoencode) output."""

    KIND: ClassVar[str] = "features"
    REBUILD: ClassVar[str] = "run cbir extract again"

    run_id: str
    created_utc: str
    model: dict[str, Any]  # the model description (ModelSpec.describe()); its digest is the fingerprint
    model_fingerprint: str
    dimension: int
    counts: ExtractCounts
    files: dict[str, list[PartFile]]
    input_size: int | None = None
    preprocessing: str | None = None
    feature_dtype: str = "float32"
    precision: str = "float32"
    failures_by_reason: dict[str, int] = dataclasses.field(default_factory=dict)
    elapsed_seconds: float = 0.0
    images_per_second: float | None = None
    metrics: dict[str, Any] = dataclasses.field(default_factory=dict)
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    accounting: Accounting | None = None
    source_features: str | None = None  # autoencode: the features the codes were made from
    local_features: dict[str, Any] | None = None  # --local-features: detector, max_keypoints, rows, keypoints
    # the runtime(s) the batches ran on (keras, graph, xla, litert; "+"-joined when workers chose differently);
    # None when no batch ran (everything reused from --previous)
    runtime: str | None = None

    @property
    def reduced_decode(self) -> bool:
        """Whether JPEGs were decoded at reduced scale (the query path must decode alike)."""
        return bool(self.model.get("reduced_decode", True))

    @property
    def encoder(self) -> dict[str, Any] | None:
        return self.model.get("encoder")

    def parts(self, kind: str = "features") -> list[PartFile]:
        return list(self.files.get(kind, []))


@dataclasses.dataclass(kw_only=True)
class NeighborsIndexRef:
    path: str
    version: str
    items: int
    shards: int
    model_fingerprint: str
    space_fingerprint: str


@dataclasses.dataclass
class NeighborsCounts:
    rows: int
    rows_with_duplicates: int | None = None


@dataclasses.dataclass(kw_only=True)
class NeighborsManifest(Manifest):
    KIND: ClassVar[str] = "neighbors"
    REBUILD: ClassVar[str] = "run cbir neighbors again"

    run_id: str
    created_utc: str
    index: NeighborsIndexRef
    counts: NeighborsCounts
    files: list[PartFile]
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    columns: list[str] = dataclasses.field(default_factory=list)
    elapsed_seconds: float = 0.0
    items_per_second: float | None = None
    accounting: Accounting | None = None


# -- packed input shards -------------------------------------------------------------------------------


@dataclasses.dataclass
class PackedShard:
    name: str
    images: int
    bytes: int
    sha256: str
    first_id: str
    last_id: str


@dataclasses.dataclass
class ShardsCounts:
    listed: int
    written: int
    unreadable: int
    skipped_not_image: int


@dataclasses.dataclass(kw_only=True)
class ShardsManifest(Manifest):
    """``<out>/_SHARDS.json`` of ``cbir shard``: the commit point of a set of packed input shards."""

    KIND: ClassVar[str] = "shards"
    REBUILD: ClassVar[str] = "run cbir shard again"

    format: str
    run_id: str
    created_utc: str
    input: str
    input_spec: str
    shard_size_mb: float
    counts: ShardsCounts
    shards: list[PackedShard]
    bytes: int = 0
    elapsed_seconds: float = 0.0
    unreadable: list[dict[str, str]] = dataclasses.field(default_factory=list)
    skipped: list[str] = dataclasses.field(default_factory=list)


# -- the index -------------------------------------------------------------------------------------------


@dataclasses.dataclass
class FileDigest:
    sha256: str
    bytes: int


@dataclasses.dataclass
class Dimension:
    input: int
    output: int


@dataclasses.dataclass
class TransformInfo:
    steps: list[str]
    dims: int
    # the transform as data (projection and bias .npy, what queries apply): never a SavedModel
    projection_file: str | None = None
    bias_file: str | None = None


@dataclasses.dataclass
class AnnoyParams:
    trees: int
    metric: str = "angular"
    seed: int = 1234
    search_k: int = -1  # -1: Annoy's own default (trees × candidates)
    on_disk_build_shards: list[int] = dataclasses.field(default_factory=list)
    calibration: dict[str, Any] | None = None


@dataclasses.dataclass
class LshParams:
    bits: int
    seed: int = 1234
    substring_bits: int = 16
    method: str = "gaussian"  # how the projection was made
    candidates: int | None = None  # per shard and query; None: the searcher's rule
    calibration: dict[str, Any] | None = None


@dataclasses.dataclass
class HnswParams:
    m: int
    ef_construction: int
    ef_search: int
    calibration: dict[str, Any] | None = None


@dataclasses.dataclass(kw_only=True)
class IndexManifest(Manifest):
    """``<index>/<version>/MANIFEST.json``: the commit point of an index version."""

    KIND: ClassVar[str] = "index"
    FORMAT_VERSION: ClassVar[int] = 2
    READS: ClassVar[tuple[int, ...]] = (2,)
    REBUILD: ClassVar[str] = ("rebuild the index with cbir index (format 2 stores the transform as data, learned "
                              "LSH codes, HNSW graphs and calibrated search efforts)")

    version: str
    created_utc: str
    metric: str
    dimension: Dimension
    transform: TransformInfo
    shards: int
    items: int
    model: dict[str, Any]
    model_fingerprint: str
    files: dict[str, FileDigest]
    annoy: AnnoyParams | None = None
    lsh: LshParams | None = None
    hnsw: HnswParams | None = None
    index_types: list[str] = dataclasses.field(default_factory=lambda: ["annoy", "lsh"])
    items_per_shard: list[int] = dataclasses.field(default_factory=list)
    duplicates_dropped: int = 0
    sharding: dict[str, str] = dataclasses.field(default_factory=dict)
    ids: str = "dense per shard, 0..n-1 in image_id order"
    features_run_id: str | None = None
    vectors_dtype: str = "float16"
    metrics: dict[str, Any] = dataclasses.field(default_factory=dict)
    elapsed_seconds: float = 0.0
    bytes: int = 0
    accounting: Accounting | None = None
    dba: dict[str, Any] | None = None  # --dba: stored vectors augmented by their neighbours (k, alpha, how)
    graph: dict[str, Any] | None = None  # --graph-k: the corpus k-NN graph for diffusion (k, files, how)
    local_features: dict[str, Any] | None = None  # shards carry local features (detector, max_keypoints, …)

    @property
    def reduced_decode(self) -> bool:
        return bool(self.model.get("reduced_decode", True))

    @property
    def preset(self) -> str | None:
        return self.model.get("preset")


# -- the TF Serving export card --------------------------------------------------------------------------


@dataclasses.dataclass(kw_only=True)
class ExportCard(Manifest):
    """``<base>/<N>/assets.extra/cbir_export.json``: what ``cbir export-model`` exported."""

    KIND: ClassVar[str] = "cbir-savedmodel"
    KIND_KEY: ClassVar[str] = "format"
    REBUILD: ClassVar[str] = "export the model again with cbir export-model"

    created_utc: str
    version: int
    model: dict[str, Any]
    model_fingerprint: str
    input_size: int
    dimension: int
    preprocessing: str
    decode: dict[str, Any]
    signatures: dict[str, Any]
    index: dict[str, Any] | None = None
    tensorflow_version: str = ""
