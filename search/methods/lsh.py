"""LSH codes: candidates by a full Hamming scan, always re-scored exactly from the stored vectors.

The codes come from hyperplanes learned in the index fit (``index_builder.lsh``). The
scan covers every code of a shard (faiss's binary flat scan, ``lsh.HammingScan``), takes
the Hamming top-N, and the searcher re-ranks those N exactly; N is what calibration chose for the
shard (scaled with k). The multi-index-hashing tables stay for exact radius queries
(``Searcher.near_duplicates``), where they beat a scan.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from artefacts import layout
from index_builder import lsh
from search.methods.base import Method
from search.options import SearchOptions

LSH_FACTOR = 20  # LSH candidates per shard = LSH_FACTOR * k when the index recorded no calibrated count


class LshMethod(Method):
    name = "lsh"
    exact_scores = False  # Hamming distances are too coarse to rank by

    def __init__(self, version_dir: str, manifest: Any):
        super().__init__(version_dir, manifest)
        self.planes = np.load(os.path.join(version_dir, layout.LSH_PLANES))
        offsets = os.path.join(version_dir, layout.LSH_OFFSETS)
        self.offsets = np.load(offsets) if os.path.exists(offsets) else None

    def open_shard(self, shard_dir: str, n: int, number: int) -> Any:
        codes = np.load(os.path.join(shard_dir, layout.CODES_FILE), mmap_mode="r")
        if codes.shape[0] != n:
            raise layout.IndexIntegrityError(f"{shard_dir}: {codes.shape[0]} LSH codes for {n} items")
        tables = lsh.MIHTables(
            np.load(os.path.join(shard_dir, layout.MIH_OFFSETS_FILE), mmap_mode="r"),
            np.load(os.path.join(shard_dir, layout.MIH_IDS_FILE), mmap_mode="r"),
        )
        return codes, lsh.HammingScan(codes), tables, self.calibrated(number, "candidates")

    def default_candidates(self, opts: SearchOptions, union: bool) -> int:
        return opts.effort.lsh_candidates or LSH_FACTOR * opts.k

    def candidates_for(self, handle: Any, opts: SearchOptions) -> int | None:
        """The per-shard count: the option, else the calibrated one scaled to k, else LSH_FACTOR·k."""
        if opts.effort.lsh_candidates or opts.candidates:
            return None
        calibrated = handle[3]
        if calibrated:
            return max(opts.k, int(np.ceil(calibrated * opts.k / self.calibration_k)))
        return None

    def encode(self, q: np.ndarray) -> np.ndarray:
        return lsh.encode(q, self.planes, self.offsets)

    def search(self, handle: Any, shard: Any, q: np.ndarray, n: int, opts: SearchOptions
               ) -> tuple[np.ndarray, np.ndarray | None]:
        _, scan, _, _ = handle
        n = min(self.candidates_for(handle, opts) or n, shard.size)
        ids = np.full((len(q), n), -1, np.int64)
        found = scan.top(self.encode(q), n)
        ids[:, : found.shape[1]] = found
        return ids, None

    def within_radius(self, handle: Any, q: np.ndarray, radius: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per query, every (id, Hamming distance) within ``radius``: exact, through the MIH tables."""
        codes, _, tables, _ = handle
        return [lsh.radius_search(code, codes, tables, radius) for code in self.encode(q)]
