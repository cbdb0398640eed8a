"""LSH codes: candidates by a full Hamming scan, always re-scored exactly from the stored vectors.

The codes come from a projection learned once per index in the fit (``index_builder.lsh``:
PCA-ITQ by default) and applied to queries too. A shard keeps its codes and the
multi-index-hashing tables; the scan covers every code (faiss's binary flat scan,
``lsh.HammingScan``), takes the Hamming top-N, and the searcher re-ranks those N exactly: N is
what calibration chose for the shard (scaled with k). The MIH tables answer exact radius
queries (``Searcher.near_duplicates``), where they beat a scan.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import numpy as np

from artefacts import layout
from artefacts.manifests import LshParams, ShardRecord
from index_builder import calibration, lsh
from index_builder.types.base import IndexType, ShardBuild

log = logging.getLogger(__name__)

LSH_FACTOR = 20  # LSH candidates per shard = LSH_FACTOR * k when the index recorded no calibrated count
LSH_RADIUS = 3  # largest MIH substring radius probed when nearer buckets hold too few candidates
DEFAULT_BITS = 256  # 128-bit codes needed 8× the candidates for recall 0.95 at 1M (scan cost ~equal)


@dataclasses.dataclass(frozen=True)
class Params:
    bits: int = DEFAULT_BITS
    projection: str = "itq"

    def __post_init__(self) -> None:
        if self.bits not in lsh.SUPPORTED_BITS:
            raise ValueError(f"--lsh-bits must be one of {lsh.SUPPORTED_BITS}")
        if self.projection not in lsh.PROJECTIONS:
            raise ValueError(f"--lsh-projection must be one of {', '.join(lsh.PROJECTIONS)}")


def _rescored_top(scan: lsh.HammingScan, vectors16: np.ndarray, planes: np.ndarray, offsets: np.ndarray | None,
                  q: np.ndarray, m: int, candidates: int) -> np.ndarray:
    """The top ``m`` ids of the Hamming top ``candidates``, re-scored exactly (what the searcher does)."""
    found = scan.top(lsh.encode(q, planes, offsets), candidates)
    ids = np.full((len(q), m), -1, np.int64)
    for row in range(len(q)):
        cand = found[row][found[row] >= 0]
        scores = np.asarray(vectors16[cand], np.float32) @ q[row]
        top = cand[np.argsort(-scores, kind="stable")[:m]]
        ids[row, : len(top)] = top
    return ids


class LshType(IndexType):
    name = "lsh"
    files = (layout.CODES_FILE, layout.MIH_OFFSETS_FILE, layout.MIH_IDS_FILE)
    version_files = (layout.LSH_PLANES, layout.LSH_OFFSETS)  # the projection learned in the fit
    effort_key = "candidates"
    effort_option = "lsh_candidates"
    effort_is_candidates = True
    exact_scores = False  # Hamming distances are too coarse to rank by
    Params = Params

    @classmethod
    def add_arguments(cls, parser: Any, positive_int: Any) -> None:
        parser.add_argument("--lsh-bits", type=int, default=DEFAULT_BITS, choices=lsh.SUPPORTED_BITS)
        parser.add_argument("--lsh-projection", choices=lsh.PROJECTIONS, default="itq",
                            help="how LSH hyperplanes are made (itq: learned PCA-ITQ rotation)")

    @classmethod
    def params_from_record(cls, record: Any) -> Params | None:
        return Params(bits=record.bits, projection=record.method) if record is not None else None

    @classmethod
    def params_from_args(cls, args: Any) -> Params:
        return Params(bits=args.lsh_bits, projection=args.lsh_projection)

    @classmethod
    def build(cls, shard: ShardBuild) -> dict[str, Any] | None:
        log.info("shard %d: LSH codes and multi-index tables…", shard.number)
        codes = lsh.encode(shard.vectors, shard.planes, shard.offsets)
        tables = lsh.MIHTables.build(codes)
        np.save(shard.path(layout.CODES_FILE), codes)
        np.save(shard.path(layout.MIH_OFFSETS_FILE), tables.offsets)
        np.save(shard.path(layout.MIH_IDS_FILE), tables.ids)
        shard.built["lsh_codes"] = codes
        return None

    @classmethod
    def calibrate(cls, shard: ShardBuild) -> dict[str, Any] | None:
        if shard.query_ids is None:
            return None
        scan = lsh.HammingScan(shard.built["lsh_codes"])  # the searcher's own scan: the count means the same there
        k, n = shard.settings.calibration_k, shard.size
        grid = calibration.starting_at(calibration.geometric_grid(2 * k, n, 1.5),
                                       shard.earlier_effort(cls.name, cls.effort_key))
        found = calibration.calibrate(
            lambda q, m, candidates: _rescored_top(scan, shard.stored, shard.planes, shard.offsets, q, m, candidates),
            grid, shard.vectors, shard.query_ids, shard.truth(), shard.settings.target_recall,
            threads=shard.settings.threads)
        return found.to_dict(cls.effort_key)

    @classmethod
    def manifest_params(cls, cfg_params: Params, seed: int, shards: list[ShardRecord],
                        summary: dict[str, Any] | None) -> LshParams:
        efforts = [int(e[cls.effort_key]) for e in (summary or {}).get("per_shard", []) if e]
        return LshParams(bits=cfg_params.bits, seed=seed, substring_bits=lsh.SUBSTRING_BITS,
                         method=cfg_params.projection, candidates=max(efforts, default=None), calibration=summary)

    # -- search -------------------------------------------------------------------------------------

    def __init__(self, version_dir: str, manifest: Any):
        super().__init__(version_dir, manifest)
        self.planes = np.load(os.path.join(version_dir, layout.LSH_PLANES))
        offsets = os.path.join(version_dir, layout.LSH_OFFSETS)
        self.offsets = np.load(offsets) if os.path.exists(offsets) else None

    def open_shard(self, shard_dir: str, n: int, number: int, dense: Any) -> Any:
        codes = np.load(os.path.join(shard_dir, layout.CODES_FILE), mmap_mode="r")
        if codes.shape[0] != n:
            raise layout.IndexIntegrityError(f"{shard_dir}: {codes.shape[0]} LSH codes for {n} items")
        tables = lsh.MIHTables(
            np.load(os.path.join(shard_dir, layout.MIH_OFFSETS_FILE), mmap_mode="r"),
            np.load(os.path.join(shard_dir, layout.MIH_IDS_FILE), mmap_mode="r"),
        )
        return codes, lsh.HammingScan(codes), tables, self.calibrated(number)

    def candidates(self, handle: Any, k: int, requested: int, reranked: bool) -> int:
        """The option when given, else the calibrated count scaled to k, else LSH_FACTOR·k."""
        calibrated = handle[3] if handle is not None else None
        if requested or not calibrated:
            return requested or LSH_FACTOR * k
        return max(k, -(-calibrated * k // self.calibration_k))  # the calibrated count scaled to k, rounded up

    def encode(self, q: np.ndarray) -> np.ndarray:
        return lsh.encode(q, self.planes, self.offsets)

    def search(self, handle: Any, q: np.ndarray, n: int, effort: int) -> tuple[np.ndarray, np.ndarray | None]:
        codes, scan, _, _ = handle
        n = min(n, len(codes))
        ids = np.full((len(q), n), -1, np.int64)
        found = scan.top(self.encode(q), n)
        ids[:, : found.shape[1]] = found
        return ids, None

    def within_radius(self, handle: Any, q: np.ndarray, radius: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per query, every (id, Hamming distance) within ``radius``: exact, through the MIH tables."""
        codes, _, tables, _ = handle
        return [lsh.radius_search(code, codes, tables, radius) for code in self.encode(q)]
