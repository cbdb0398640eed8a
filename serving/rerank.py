"""Re-ranking a result list: relevance feedback (Rocchio) and diffusion over the corpus k-NN graph.

Query expansion (plain and α-weighted) lives in the searcher (``Searcher.expand``), database-side
augmentation in the index build, geometric verification in ``serving.verify``. What is here is
pure numpy over the searcher's arrays, so the CLI, the evaluation and a service share it.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from serving.topk import normalise_rows


@dataclasses.dataclass(frozen=True)
class FeedbackWeights:
    """Rocchio's weights: the query, the mean of results marked relevant, of those marked not relevant."""

    alpha: float = 1.0
    beta: float = 0.75
    gamma: float = 0.25

    @classmethod
    def parse(cls, text: str) -> FeedbackWeights:
        parts = [float(x) for x in text.split(",")]
        if len(parts) != 3 or any(p < 0 for p in parts):
            raise ValueError(f"--feedback-weights takes three non-negative numbers A,B,G, not {text!r}")
        return cls(*parts)


def rocchio(query: np.ndarray, liked: np.ndarray, unliked: np.ndarray,
            weights: FeedbackWeights = FeedbackWeights()) -> np.ndarray:
    """The query moved toward what was marked relevant and away from what was not (unit length).

    ``liked`` / ``unliked`` are (m, d) stored vectors, possibly empty; with neither, the query
    comes back unchanged (normalised), so feedback with no marks is the plain search.
    """
    q = normalise_rows(np.asarray(query, np.float32).reshape(1, -1))[0]
    moved = weights.alpha * q
    if len(liked):
        moved = moved + weights.beta * np.asarray(liked, np.float32).mean(axis=0)
    if len(unliked):
        moved = moved - weights.gamma * np.asarray(unliked, np.float32).mean(axis=0)
    return normalise_rows(moved.reshape(1, -1))[0]


@dataclasses.dataclass(frozen=True)
class DiffusionOptions:
    """Iscen et al. (CVPR 2017), truncated: diffusion among the top ``candidates`` of the first search."""

    candidates: int = 200  # the truncation: cost depends on this, never on the corpus size
    query_neighbours: int = 10  # y: the query's similarity^gamma to its top few candidates
    alpha: float = 0.99
    gamma: float = 3.0
    iterations: int = 20  # conjugate-gradient steps


def diffuse(candidate_ids: np.ndarray, candidate_scores: np.ndarray, graph_ids: np.ndarray,
            graph_sims: np.ndarray, opts: DiffusionOptions = DiffusionOptions()) -> np.ndarray:
    """Ranking scores for ``candidate_ids`` (one query) after diffusion over the stored k-NN graph.

    ``graph_ids`` / ``graph_sims`` are the candidates' rows of the corpus graph (each item's
    neighbours by global id, and their cosines). The affinity of two candidates is
    ``max(s, 0)^gamma`` when either lists the other, symmetrically normalised over the
    candidate subgraph; ``(I - alpha S) f = y`` is solved by conjugate gradient from
    ``y_i = score_i^gamma`` on the query's first ``query_neighbours`` candidates. Returns f;
    callers rank by f, ties by the first score (so a graph with no edges among the
    candidates leaves the first ranking as it was).
    """
    ids = np.asarray(candidate_ids, np.int64)
    n = len(ids)
    if n == 0:
        return np.zeros(0, np.float32)
    gids = np.asarray(graph_ids, np.int64)
    sims = np.asarray(graph_sims, np.float64)
    order = np.argsort(ids, kind="stable")
    sorted_ids = ids[order]
    at = np.minimum(np.searchsorted(sorted_ids, gids), n - 1)
    rows = np.broadcast_to(np.arange(n)[:, None], gids.shape)
    cols = order[at]
    keep = (sorted_ids[at] == gids) & (gids >= 0) & (cols != rows) & (sims > 0)
    affinity = np.zeros((n, n), np.float64)
    weights = sims[keep] ** opts.gamma
    np.maximum.at(affinity, (rows[keep], cols[keep]), weights)
    affinity = np.maximum(affinity, affinity.T)  # an edge if either lists the other
    degree = affinity.sum(axis=1)
    inv = np.where(degree > 0, 1.0 / np.sqrt(np.maximum(degree, 1e-12)), 0.0)
    s_matrix = affinity * inv[:, None] * inv[None, :]
    y = np.zeros(n)
    top = np.argsort(-np.asarray(candidate_scores, np.float64), kind="stable")[: opts.query_neighbours]
    y[top] = np.maximum(np.asarray(candidate_scores, np.float64)[top], 0) ** opts.gamma
    # conjugate gradient on A f = y with A = I - alpha S (symmetric positive definite for alpha < 1)
    f = np.zeros(n)
    r = y.copy()
    p = r.copy()
    rs = r @ r
    for _ in range(opts.iterations):
        if rs < 1e-20:
            break
        ap = p - opts.alpha * (s_matrix @ p)
        step = rs / (p @ ap)
        f += step * p
        r -= step * ap
        new = r @ r
        p = r + (new / rs) * p
        rs = new
    return f.astype(np.float32)


def order_by(primary: np.ndarray, secondary: np.ndarray) -> np.ndarray:
    """Indices sorting by ``primary`` descending, ties by ``secondary`` descending."""
    return np.lexsort((-np.asarray(secondary, np.float64), -np.asarray(primary, np.float64)))
