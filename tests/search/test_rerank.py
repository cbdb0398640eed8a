"""Re-ranking pieces as pure functions: Rocchio, diffusion, DBA, and their identities."""

from __future__ import annotations

import numpy as np
import pytest

from index_builder import augment
from index_builder.topk import normalise_rows
from search import rerank


def _unit(n: int, d: int, seed: int = 0) -> np.ndarray:
    return normalise_rows(np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32))


def test_rocchio_without_marks_is_the_normalised_query():
    q = np.array([3.0, 4.0, 0.0], np.float32)
    out = rerank.rocchio(q, np.zeros((0, 3)), np.zeros((0, 3)))
    np.testing.assert_allclose(out, [0.6, 0.8, 0.0], atol=1e-6)


def test_rocchio_moves_toward_liked_and_away_from_unliked():
    x = _unit(3, 8, seed=1)
    q, liked, unliked = x[0], x[1:2], x[2:3]
    moved = rerank.rocchio(q, liked, unliked, rerank.FeedbackWeights(1.0, 0.75, 0.25))
    assert moved @ liked[0] > q @ liked[0]
    assert moved @ unliked[0] < q @ unliked[0]
    assert abs(np.linalg.norm(moved) - 1) < 1e-5


def test_feedback_weights_parse_and_refuse():
    assert rerank.FeedbackWeights.parse("1,0.5,0") == rerank.FeedbackWeights(1.0, 0.5, 0.0)
    for bad in ("1,2", "a,b,c", "1,-1,0"):
        with pytest.raises(ValueError):
            rerank.FeedbackWeights.parse(bad)


def test_diffusion_over_a_graph_without_edges_among_candidates_keeps_the_plain_ranking():
    """One item per label: no candidate lists another, so nothing diffuses and the order stays."""
    n = 30
    ids = np.arange(100, 100 + n)
    scores = np.sort(np.random.default_rng(2).uniform(0.2, 0.9, n))[::-1].astype(np.float32)
    graph_ids = np.arange(1000, 1000 + n * 5).reshape(n, 5)  # neighbours outside the candidate list
    graph_sims = np.full((n, 5), 0.8, np.float32)
    f = rerank.diffuse(ids, scores, graph_ids, graph_sims)
    assert rerank.order_by(f, scores).tolist() == list(range(n))


def test_diffusion_lifts_a_candidate_its_neighbours_vouch_for():
    """Candidate 5 is weak on its own but tightly linked to the query's top results: it moves up."""
    n = 12
    ids = np.arange(n)
    scores = np.linspace(0.9, 0.3, n).astype(np.float32)
    graph_ids = np.full((n, 3), -1)
    graph_sims = np.zeros((n, 3), np.float32)
    for top in (0, 1, 2):
        graph_ids[top] = [5, (top + 1) % 3, (top + 2) % 3]
        graph_sims[top] = [0.95, 0.9, 0.9]
    graph_ids[5] = [0, 1, 2]
    graph_sims[5] = [0.95, 0.95, 0.95]
    f = rerank.diffuse(ids, scores, graph_ids, graph_sims, rerank.DiffusionOptions(query_neighbours=3))
    order = rerank.order_by(f, scores).tolist()
    assert order.index(5) < 5


def test_knn_excludes_each_item_and_dba_pulls_neighbours_together():
    x = _unit(50, 16, seed=3)
    x[1] = normalise_rows((x[0] + 0.05 * x[1])[None, :])[0]  # 1 is a near copy of 0
    ids, sims = augment.knn(x, 4)
    assert ids.shape == (50, 4) and not (ids == np.arange(50)[:, None]).any()
    assert ids[0, 0] == 1 and ids[1, 0] == 0
    np.testing.assert_allclose(sims[:, 0], np.einsum("ij,ij->i", x, x[ids[:, 0]]), atol=1e-5)
    y = augment.dba(x, ids, sims, 2)
    assert np.allclose(np.linalg.norm(y, axis=1), 1, atol=1e-5)
    second = ids[0, 1]  # 0's second neighbour: DBA mixes it into 0, so 0 moves toward it
    assert y[0] @ x[second] > x[0] @ x[second]
    zero = augment.dba(x, ids, np.zeros_like(sims), 2)  # weights 0: every vector stays itself
    np.testing.assert_allclose(zero, x, atol=1e-6)


def test_feedback_scores_follow_the_nearest_mark_and_keep_the_plain_order_without_marks():
    x = _unit(40, 16, seed=4)
    q = x[0]
    plain = rerank.feedback_scores(q, np.zeros((0, 16)), np.zeros((0, 16)), x[1:])
    cos = x[1:] @ q  # candidates on the far side all score 0: the cosine breaks those ties, as the searcher does
    assert np.array_equal(rerank.order_by(plain, cos), np.argsort(-cos, kind="stable"))
    liked = normalise_rows(x[5:6] + 0.0)
    near_liked = normalise_rows(liked + 0.1 * x[6:7])
    near_rejected = normalise_rows(x[7:8] + 0.1 * x[8:9])
    cands = np.vstack([near_liked, near_rejected])
    s = rerank.feedback_scores(q, liked, x[7:8], cands)
    assert s[0] > s[1]
    off = rerank.feedback_scores(q, liked, x[7:8], cands, rerank.FeedbackWeights(negative=0))
    assert s[1] < off[1] and s[0] == pytest.approx(off[0])  # the rejected item only ever lowers scores


def test_feedback_kernel_parses_and_refuses():
    w = rerank.FeedbackWeights.parse("1,0.5,0").with_kernel("8,2")
    assert (w.alpha, w.beta, w.gamma, w.power, w.negative) == (1.0, 0.5, 0.0, 8.0, 2.0)
    for bad in ("5", "5,x", "-1,2", "nan,1"):
        with pytest.raises(ValueError, match="--feedback-kernel"):
            rerank.FeedbackWeights().with_kernel(bad)
