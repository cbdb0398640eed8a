"""What every manifest shares: the base class, its errors, run ids, fingerprints, and the JSON converter.

:meth:`Manifest.from_dict` checks ``kind`` and ``format_version`` before it trusts anything
else, fills fields an older manifest lacks with their defaults (so every default is written
once, in the dataclass), and keeps keys it does not know in ``extra`` so that reading and
re-writing never drops information. The converter is shared with records that are not
manifests (``SHARD.json``), so one set of rules decides what a well-formed file is.
Run ids live here too, so that every job names its runs alike. Nothing here does I/O.
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
    """The ``created_utc`` every manifest records: ISO 8601, whole seconds, UTC, whatever the machine's zone."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def fingerprint(description: Any) -> str:
    """A short digest of a JSON-able description (sorted keys): model and vector-space fingerprints.

    Two runs with equal model fingerprints produce interchangeable vectors, which is what
    incremental re-indexing and every "wrong vector space" check rely on.
    """
    blob = json.dumps(description, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


# -- a small converter between JSON values and the typed records ----------------------------------------


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
        return record_from_dict(hint, value, where)
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


def record_from_dict(cls: type, data: dict[str, Any], where: str) -> Any:
    """Builds dataclass ``cls`` from a JSON object: defaults for absent fields, unknown keys into ``extra``.

    Shared by every manifest and by the records that are not manifests, so that a missing required
    field or a wrong type is refused with the same message (the field's path) wherever it occurs.
    """
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
        # a manifest's kind and format version are written by to_dict, never kept as extra keys
        skip = names | ({"kind", "format_version", cls.KIND_KEY} if hasattr(cls, "KIND_KEY") else set())
        obj.extra = {k: v for k, v in data.items() if k not in skip}
    return obj


def record_to_json(value: Any) -> Any:
    """The JSON value of a record: fields in declaration order, ``extra`` keys merged where it is declared."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out = {}
        for f in dataclasses.fields(value):
            v = getattr(value, f.name)
            if f.name == "extra":
                out.update(record_to_json(v))
            else:
                out[f.name] = record_to_json(v)
        return out
    if isinstance(value, dict):
        return {str(k): record_to_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [record_to_json(v) for v in value]
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
        return record_from_dict(cls, data, source)

    def to_dict(self) -> dict[str, Any]:
        return {self.KIND_KEY: self.KIND, "format_version": self.FORMAT_VERSION, **record_to_json(self)}


# -- parts shared by several kinds -------------------------------------------------------------------


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
class FileDigest:
    """A file a manifest commits to: its sha256 and size, checked before anything trusts it."""

    sha256: str
    bytes: int
