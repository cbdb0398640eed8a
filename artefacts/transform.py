"""The index's vector transform as data: L2 → centre and project (PCA) → L2, in numpy.

tf.Transform fits the transform over the whole corpus (``transform_fn/`` keeps its graph,
which the TF Serving export embeds). What the index applies, to its own vectors at build
time and to every query, is this data: ``projection`` (D_in × D_out) and ``bias``
(D_out, equal to −mean · projection), stored as ``.npy`` next to the shards. A query path
that never loads a SavedModel cannot be made to run code by an index it opens.

The data is read off the fitted graph by probing it (:func:`probe_matrices`): the graph
maps an input ``x`` to ``normalise(x) @ P + b`` before its last L2 step, so the zero
vector gives ``b`` and each basis vector ``e_i`` gives ``P[i] + b``. The build then checks
that this data reproduces the graph on real rows (:func:`max_difference`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

PROJECTION_FILE = "projection.npy"
BIAS_FILE = "bias.npy"
CHECK_TOLERANCE = 1e-5  # max |Δ| between this transform and transform_fn on the build's sample


def l2_normalise(x: np.ndarray) -> np.ndarray:
    """Rows to unit length, as ``tf.math.l2_normalize`` does (zero rows stay zero)."""
    x = np.asarray(x, dtype=np.float32)
    sq = np.einsum("ij,ij->i", x, x)[:, None]
    return x / np.sqrt(np.maximum(sq, 1e-12), dtype=np.float32)


@dataclasses.dataclass(frozen=True)
class VectorTransform:
    """``projection`` None means the L2 step alone (``--dims 0``)."""

    projection: np.ndarray | None = None  # (D_in, D_out) float32
    bias: np.ndarray | None = None  # (D_out,) float32

    @property
    def steps(self) -> list[str]:
        return ["l2", "pca", "l2"] if self.projection is not None else ["l2"]

    def output_dim(self, input_dim: int) -> int:
        return input_dim if self.projection is None else int(self.projection.shape[1])

    def __call__(self, raw: np.ndarray) -> np.ndarray:
        """Raw backbone features (n, D_in) → index space (n, D_out), unit rows."""
        x = l2_normalise(raw)
        if self.projection is None:
            return x
        if x.shape[1] != self.projection.shape[0]:
            raise ValueError(f"features of dimension {x.shape[1]} do not fit a {self.projection.shape[0]}-d transform")
        return l2_normalise(x @ self.projection + self.bias)


def probe_matrices(projected: Callable[[np.ndarray], np.ndarray], dim: int) -> tuple[np.ndarray, np.ndarray]:
    """(projection, bias) of an affine map after L2, read off ``projected`` with dim + 1 probes."""
    probes = np.zeros((dim + 1, dim), np.float32)
    probes[1:] = np.eye(dim, dtype=np.float32)
    out = np.asarray(projected(probes), dtype=np.float64)
    bias = out[0]
    return (out[1:] - bias).astype(np.float32), bias.astype(np.float32)


def max_difference(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)))) if len(a) else 0.0
