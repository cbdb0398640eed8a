"""LSH codes with multi-index hashing: candidates by Hamming distance, always re-scored exactly."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from index_builder import layout, lsh
from serving.methods.base import Method, SearchOptions

LSH_FACTOR = 20  # LSH candidates per shard = LSH_FACTOR * k: Hamming order is coarse, exact scoring is cheap


class LshMethod(Method):
    name = "lsh"
    exact_scores = False  # Hamming distances are too coarse to rank by

    def __init__(self, version_dir: str, manifest: Any):
        super().__init__(version_dir, manifest)
        self.planes = np.load(os.path.join(version_dir, layout.LSH_PLANES))

    def open_shard(self, shard_dir: str, n: int) -> Any:
        codes = np.load(os.path.join(shard_dir, layout.CODES_FILE), mmap_mode="r")
        if codes.shape[0] != n:
            raise layout.IndexIntegrityError(f"{shard_dir}: {codes.shape[0]} LSH codes for {n} items")
        tables = lsh.MIHTables(
            np.load(os.path.join(shard_dir, layout.MIH_OFFSETS_FILE), mmap_mode="r"),
            np.load(os.path.join(shard_dir, layout.MIH_IDS_FILE), mmap_mode="r"),
        )
        return codes, tables

    def default_candidates(self, opts: SearchOptions, union: bool) -> int:
        return opts.lsh_candidates or LSH_FACTOR * opts.k

    def search(self, handle: Any, shard: Any, q: np.ndarray, n: int, opts: SearchOptions
               ) -> tuple[np.ndarray, np.ndarray | None]:
        codes, tables = handle
        qcodes = lsh.encode(q, self.planes)
        ids = np.full((len(q), n), -1, np.int64)
        for row in range(len(q)):
            r, _ = lsh.search(qcodes[row], codes, tables, n, n, opts.lsh_radius)
            ids[row, : len(r)] = r
        return ids, None
