"""The seam every search method plugs into: one options record, one candidate-generator interface.

A method turns a chunk of (normalised) query vectors into per-shard candidates: local
ids, and scores when it has exact cosines. The searcher does the rest for every method
alike: fan-out over shards and query chunks, exact re-scoring from the stored float16
vectors where asked or needed, the global merge with the image-id tie-break, query
expansion. Adding a method is one module that subclasses :class:`Method` and
registers itself in ``search.methods``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import numpy as np

from artefacts.manifests import IndexManifest
from search.rerank import FeedbackWeights

LSH_RADIUS = 3  # largest MIH substring radius probed when nearer buckets hold too few candidates


@dataclasses.dataclass(frozen=True)
class SearchOptions:
    """Everything a search can be asked for; every search entry point takes this one record.

    ``method`` is a method name (``exact``, ``annoy``, ``lsh``, ``hnsw``), ``auto`` (the
    fastest type the index has: HNSW, else Annoy), ``both`` (Annoy and LSH), or several names
    joined by ``+``: the union of their candidates, re-scored exactly. ``candidates`` (per
    shard) overrides each method's own default count; ``search_k`` (Annoy), ``ef_search``
    (HNSW) and ``lsh_candidates`` tune one method each, ``-1`` / ``0`` meaning the value the
    index calibrated per shard (or the library's default).

    Re-ranking (``search.rerank``, ``search.verify``) runs after candidate generation:
    ``qe`` / ``qe_alpha`` expand the query with its top results and search again;
    ``diffusion`` re-orders the top ``diffusion_candidates`` by diffusion over the index's
    k-NN graph (``cbir index --graph-k``); ``verify`` re-orders the top N by geometric
    verification inliers (needs local features: ``cbir extract --local-features``), together
    with up to N more candidates the query's local descriptors vote for (``verify_votes``,
    on indexes that carry a vote index);
    ``feedback`` weighs relevance-feedback marks (Rocchio) when a search is given any.
    """

    k: int = 10
    method: str = "auto"  # hnsw when the index has it, else annoy
    rerank: bool = False
    qe: int = 0
    qe_alpha: float = 0.0  # α-weighted query expansion: weights similarity**alpha (0: plain average)
    search_k: int = -1
    ef_search: int = 0
    lsh_radius: int = LSH_RADIUS
    lsh_candidates: int = 0
    candidates: int = 0
    batch_size: int = 1024
    diffusion: bool = False
    diffusion_candidates: int = 100
    verify: int = 0
    verify_votes: bool = True  # also verify up to ``verify`` candidates proposed by local-descriptor votes
    feedback: FeedbackWeights = FeedbackWeights()

    def methods(self) -> tuple[str, ...]:
        names = ("annoy", "lsh") if self.method == "both" else tuple(self.method.split("+"))
        return tuple(dict.fromkeys(n.strip() for n in names if n.strip()))

    def validate(self, available: tuple[str, ...]) -> None:
        if self.k < 1:
            raise ValueError(f"k must be at least 1, not {self.k}")
        if self.qe < 0:
            raise ValueError(f"--qe must not be negative, not {self.qe}")
        if self.qe_alpha < 0:
            raise ValueError(f"--qe-alpha must not be negative, not {self.qe_alpha}")
        if self.verify < 0:
            raise ValueError(f"--verify must not be negative, not {self.verify}")
        if self.diffusion and self.diffusion_candidates < 2:
            raise ValueError(f"--diffusion-candidates must be at least 2, not {self.diffusion_candidates}")
        names = self.methods()
        if not names:
            raise ValueError("no search method given")
        for name in names:
            if name not in available:
                raise ValueError(f"method {name!r} is not available here: this index has {', '.join(available)}")
        if "exact" in names and len(names) > 1:
            raise ValueError("exact search cannot be combined with other methods: it already finds the true top-k")

    def resolve(self, available: tuple[str, ...]) -> SearchOptions:
        """``auto`` replaced by the method this index answers best with; checked against ``available``."""
        opts = self
        if self.method == "auto":
            opts = dataclasses.replace(self, method="hnsw" if "hnsw" in available else "annoy")
        opts.validate(available)
        return opts

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


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
