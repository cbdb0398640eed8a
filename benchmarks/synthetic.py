"""Synthetic vectors shaped like the real features: one generator for every benchmark.

``SyntheticModel`` is fitted to real transformed features (the vectors of an index built
from the dev photos, with their folder labels): the mean, the covariance Σ, the share
alpha of the variance that lies between class means, and each class's own within-class
covariance. Items are a Gaussian mixture of ~``per_class``-item components: centres
around the real mean with covariance alpha·Σ, items around their centre with the
within-class covariance of a randomly chosen real class, then L2-normalised. Borrowing
real class shapes matters: real classes spread along a few dozen directions, and a mixture
with globally-shaped noise made Annoy's recall 0.76 where the real set gives 0.87 at the
same size. Queries are further draws from the same mixture, never indexed.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np


@dataclasses.dataclass
class Dataset:
    name: str
    base: np.ndarray  # (n, d) float32, unit norm
    queries: np.ndarray  # (q, d) float32, unit norm
    exclude: np.ndarray | None = None  # per query, a base id that must not count (leave-one-out), or None
    truth: np.ndarray | None = None  # (q, K) exact neighbour ids


def _normalise(x: np.ndarray) -> np.ndarray:
    return (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)).astype(np.float32)


@dataclasses.dataclass
class SyntheticModel:
    """A class-shaped Gaussian mixture fitted to real transformed features.

    Centres of the mixture components are drawn around the real mean with
    covariance alpha·Σ (Σ the real covariance, alpha the between-class share of the
    variance). Each component borrows the within-class covariance of one real
    class (its centred items' SVD, so of rank at most that class's size − 1): real
    classes spread along a few dozen directions, not all 256, and an isotropic or
    globally-shaped noise makes neighbours far harder to find than in real data.
    """

    mean: np.ndarray  # (d,)
    basis: np.ndarray  # (d, d) columns: eigenvectors of the covariance
    scales: np.ndarray  # (d,) square roots of the eigenvalues
    alpha: float  # between-class share of the variance
    per_class: int  # items per mixture component
    shapes: list[np.ndarray]  # per real class, (r, d): z @ shape has that class's covariance

    @classmethod
    def fit(cls, vectors: np.ndarray, labels: list[str | None]) -> SyntheticModel:
        x = vectors.astype(np.float64)
        mean = x.mean(axis=0)
        eigval, eigvec = np.linalg.eigh(np.cov(x - mean, rowvar=False))
        order = np.argsort(eigval)[::-1]
        eigval, eigvec = np.clip(eigval[order], 0, None), eigvec[:, order]
        lab = np.asarray([str(v) for v in labels])
        between, shapes = 0.0, []
        for c in np.unique(lab):
            members = x[lab == c]
            if len(members) < 2:
                continue
            centre = members.mean(axis=0)
            between += len(members) * np.sum((centre - mean) ** 2)
            _, sv, vt = np.linalg.svd(members - centre, full_matrices=False)
            shapes.append((sv[:, None] * vt / np.sqrt(len(members) - 1)).astype(np.float32))
        alpha = float(between / np.sum((x - mean) ** 2))
        return cls(mean.astype(np.float32), eigvec.astype(np.float32), np.sqrt(eigval).astype(np.float32),
                   alpha, max(2, round(len(x) / max(1, len(shapes)))), shapes)

    def describe(self) -> dict[str, Any]:
        var = self.scales.astype(np.float64) ** 2
        share = np.cumsum(var) / var.sum()
        return {
            "alpha_between_class": round(self.alpha, 3),
            "items_per_class": self.per_class,
            "class_shapes": len(self.shapes),
            "variance_top10_axes": round(float(share[9]), 3),
            "axes_for_90pct": int(np.searchsorted(share, 0.9) + 1),
        }

    def sample(self, n: int, seed: int) -> np.ndarray:
        rng = np.random.default_rng(seed)
        d = len(self.mean)
        a = (self.basis * self.scales[None, :]).T  # z @ a has covariance Σ
        n_comp = max(1, n // self.per_class)
        centres = self.mean + np.sqrt(self.alpha) * (rng.standard_normal((n_comp, d), dtype=np.float32) @ a)
        shape_of = rng.integers(0, len(self.shapes), size=n_comp)
        which = rng.integers(0, n_comp, size=n)
        out = centres[which]
        for s, shape in enumerate(self.shapes):  # one matmul per real class shape
            idx = np.flatnonzero(shape_of[which] == s)
            out[idx] += rng.standard_normal((len(idx), shape.shape[0]), dtype=np.float32) @ shape
        return _normalise(out)


def synthetic_dataset(model: SyntheticModel, n: int, n_queries: int, seed: int) -> Dataset:
    allv = model.sample(n + n_queries, seed)
    perm = np.random.default_rng(seed + 1).permutation(len(allv))
    return Dataset(f"synthetic {n:,}", allv[perm[:n]], allv[perm[n:]])
