"""The seam every search method plugs into: one candidate-generator interface (options: ``search.options``).

A method turns a chunk of (normalised) query vectors into per-shard candidates: local
ids, and scores when it has exact cosines. The searcher does the rest for every method
alike: fan-out over shards and query chunks, exact re-scoring from the stored float16
vectors where asked or needed, the global merge with the image-id tie-break, query
expansion. Adding a method is one module that subclasses :class:`Method` and
registers itself in ``search.methods``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from artefacts.manifests import IndexManifest
from search.options import SearchOptions


class Method:
    """A candidate generator over one shard.

    ``open_shard`` returns the method's handle for a shard folder (memory-mapped where the
    library allows) after checking it holds ``n`` items; ``search`` returns local ids
    ``(b, ≤n)`` int64 padded with -1, and float32 cosines of the same shape or None when
    its ranking is not by cosine (LSH's Hamming order), in which case the searcher
    re-scores exactly.
    """

    name: ClassVar[str] = ""
    exact_scores: ClassVar[bool] = True  # its scores are the cosines of the index's vectors
    parallel: ClassVar[bool] = True  # runs per query with the GIL released: worth a thread per chunk

    def __init__(self, version_dir: str, manifest: IndexManifest):
        self.version_dir = version_dir
        self.manifest = manifest
        self.dim = manifest.dimension.output

    def open_shard(self, shard_dir: str, n: int, number: int) -> Any:
        return None

    def calibrated(self, number: int, key: str) -> int | None:
        """The effort calibration chose for shard ``number`` (None when the index recorded none)."""
        params = getattr(self.manifest, self.name, None)
        cal = getattr(params, "calibration", None) if params is not None else None
        per_shard = (cal or {}).get("per_shard") or []
        entry = per_shard[number] if number < len(per_shard) else None
        return int(entry[key]) if entry and entry.get(key) is not None else None

    @property
    def calibration_k(self) -> int:
        params = getattr(self.manifest, self.name, None)
        cal = getattr(params, "calibration", None) if params is not None else None
        return int((cal or {}).get("k") or 10)

    def close_shard(self, handle: Any) -> None:
        return None

    def default_candidates(self, opts: SearchOptions, union: bool) -> int:
        """Candidates per shard when the caller gives none."""
        return opts.k

    def search(self, handle: Any, shard: Any, q: np.ndarray, n: int, opts: SearchOptions
               ) -> tuple[np.ndarray, np.ndarray | None]:
        raise NotImplementedError
