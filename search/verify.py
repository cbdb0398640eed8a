"""Geometric verification: how many local matches between two images one homography explains.

Matches are mutual nearest neighbours in RootSIFT space that also pass Lowe's ratio test
in both directions, so the match set of (A, B) is the match set of (B, A): the score is
symmetric up to the robust fit. The fit is OpenCV's USAC MAGSAC++ homography (a plane
seen from two viewpoints, which covers crops, rotations, scale and perspective), with a
fixed seed so a ranking is reproducible; its inlier count is the verification score.

Fewer than :data:`MIN_INLIERS` inliers is scored 0: four points always fit a homography,
so a handful of inliers says nothing.
"""

from __future__ import annotations

import dataclasses
import threading

import numpy as np

from index_builder.local_store import root_sift
from models.backbone.local_features import LocalFeatures

RATIO = 0.9  # Lowe's ratio test; 0.8 kept too few matches on strongly edited copies (bench_rerank: the
# original verified first for 0.65 of 200 copies at 0.8, 0.68 at 0.9, with no more false matches)
REPROJECTION_PX = 6.0  # inlier threshold in pixels of the ≤512 px frames
MIN_INLIERS = 8
SEED = 1234

_cv_lock = threading.Lock()  # cv2.setRNGSeed is process-wide: seed and fit together


@dataclasses.dataclass(frozen=True)
class Prepared:
    """A query's local features made ready for many comparisons (RootSIFT computed once)."""

    features: LocalFeatures
    root: np.ndarray  # (n, 128) float32


def prepare(features: LocalFeatures) -> Prepared:
    return Prepared(features, root_sift(features.descriptors))


def matches(a: Prepared, b: Prepared, ratio: float = RATIO) -> np.ndarray:
    """(m, 2) index pairs (into a, into b): mutual nearest neighbours passing the ratio test both ways."""
    if a.features.size < 2 or b.features.size < 2:
        return np.zeros((0, 2), np.int64)
    sims = a.root @ b.root.T  # RootSIFT vectors have unit L2 norm: squared distance = 2 - 2·similarity
    rows, cols = np.arange(sims.shape[0]), np.arange(sims.shape[1])
    best_b = sims.argmax(axis=1)  # each a's nearest b
    best_a = sims.argmax(axis=0)  # each b's nearest a
    first_ab = sims[rows, best_b]
    first_ba = sims[best_a, cols]
    masked = sims.copy()
    masked[rows, best_b] = -np.inf
    second_ab = masked.max(axis=1)
    masked = sims.copy()
    masked[best_a, cols] = -np.inf
    second_ba = masked.max(axis=0)
    r2 = ratio * ratio

    def passes(first: np.ndarray, second: np.ndarray) -> np.ndarray:
        return (2.0 - 2.0 * first) < r2 * (2.0 - 2.0 * second)

    keep = (best_a[best_b] == rows) & passes(first_ab, second_ab) & passes(first_ba[best_b], second_ba[best_b])
    return np.stack([rows[keep], best_b[keep]], axis=1)


def inliers(a: Prepared, b: Prepared) -> int:
    """Matches consistent with one homography from a to b (0 below :data:`MIN_INLIERS`)."""
    import cv2

    pairs = matches(a, b)
    if len(pairs) < MIN_INLIERS:
        return 0
    src = a.features.points[pairs[:, 0]].reshape(-1, 1, 2)
    dst = b.features.points[pairs[:, 1]].reshape(-1, 1, 2)
    with _cv_lock:
        cv2.setRNGSeed(SEED)
        h, mask = cv2.findHomography(src, dst, cv2.USAC_MAGSAC, REPROJECTION_PX, maxIters=2000, confidence=0.999)
    if h is None or mask is None:
        return 0
    count = int(mask.sum())
    return count if count >= MIN_INLIERS else 0


def verify(query: LocalFeatures | Prepared, candidates: list[LocalFeatures | None]) -> np.ndarray:
    """Inlier counts of the query against each candidate (0 where a candidate has no local features)."""
    q = query if isinstance(query, Prepared) else prepare(query)
    out = np.zeros(len(candidates), np.int32)
    for i, c in enumerate(candidates):
        if c is not None and c.size:
            out[i] = inliers(q, prepare(c))
    return out


def rerank(ids: np.ndarray, scores: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Order of a result list by verified inliers, the global score breaking ties (both descending)."""
    return np.lexsort((-np.asarray(scores, np.float64), -np.asarray(counts, np.int64)))
