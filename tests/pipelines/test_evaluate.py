"""cbir evaluate: its figures equal a brute-force computation over the same stored vectors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from evaluation import metrics
from pipelines import cli
from pipelines.evaluate import EvaluateConfig, format_markdown, run
from search.options import LSH_RADIUS, Rerank, SearchOptions
from search.searcher import Searcher, normalise_rows

K = 10


@pytest.fixture(scope="module")
def searcher(flowers_index):
    with Searcher(str(flowers_index[0])) as s:
        yield s


def _ranking(v64: np.ndarray, query: np.ndarray, q: int) -> list[int]:
    sims = v64 @ np.asarray(query, np.float64)
    sims[q] = -np.inf
    return [int(i) for i in np.argsort(-sims, kind="stable") if i != q]


def brute_force_labels(vectors: np.ndarray, labels: list[str], queries, qe: int = 0) -> dict[str, float]:
    """The textbook definitions, one query at a time: full leave-one-out ranking, AP, P@k.

    Rankings are in float64 like ``evaluation.metrics``: a float32 matrix-vector product rounds
    differently from the matrix product there, by more than the closest neighbours differ.
    An expanded query is built in float32 with the searcher's normalisation, because that
    vector is what evaluate ranks with.
    """
    v64 = vectors.astype(np.float64)
    aps, precision = [], {1: [], 5: [], 10: []}
    for q in queries:
        order = _ranking(v64, v64[q], q)
        if qe:
            top = vectors[order[:qe]].sum(axis=0)
            order = _ranking(v64, normalise_rows(normalise_rows(vectors[q]) + top), q)
        relevant = [labels[i] == labels[q] for i in order]
        n_relevant = sum(relevant)
        hits, total = 0, 0.0
        for rank, rel in enumerate(relevant, start=1):
            if rel:
                hits += 1
                total += hits / rank
        aps.append(total / n_relevant)
        for k in precision:
            precision[k].append(sum(relevant[:k]) / k)
    return {"map": float(np.mean(aps)), **{f"p@{k}": float(np.mean(v)) for k, v in precision.items()}}


def near_ties_at(vectors: np.ndarray, queries, k: int, eps: float = 2e-6) -> int:
    """Queries whose k-th and (k+1)-th neighbours are closer than float32 search can tell apart.

    The searcher scores in float32 (errors up to ~1e-6 on unit vectors); where two neighbours
    straddle the cut within that, its top-k may hold either one, and a figure built on it
    may move by one place of one query.
    """
    v64 = vectors.astype(np.float64)
    ties = 0
    for q in queries:
        sims = v64 @ v64[q]
        sims[q] = -np.inf
        kth, nxt = np.sort(sims)[::-1][k - 1:k + 1]
        ties += int(kth - nxt < eps)
    return ties


def test_evaluate_equals_brute_force(searcher, flowers_index):
    report = run(EvaluateConfig(index=str(flowers_index[0]), search=SearchOptions(k=K), sample=300, seed=7))
    assert set(report["methods"]) == {"exact", "annoy", "lsh", "hnsw"}  # every type the index has
    queries = np.sort(np.random.default_rng(7).choice(searcher.size, 300, replace=False))
    vectors = searcher.all_vectors()
    expected = brute_force_labels(vectors, searcher.labels, queries)
    assert report["queries"] == 300 and report["exact"]["queries"] == 300
    for key, value in expected.items():
        assert report["exact"][key] == pytest.approx(value, abs=1e-9), key
    # recall@k: the per-query search path (search with exclude) against a full numpy sort
    names = np.asarray(searcher.image_ids)
    for method in ("annoy", "lsh", "hnsw"):
        recalls = []
        for q in queries:
            sims = vectors.astype(np.float64) @ vectors[q].astype(np.float64)
            sims[q] = -np.inf
            exact = set(np.lexsort((names, -sims))[:K].tolist())
            hits = searcher.search(vectors[q], k=K, method=method, exclude=searcher.locate(int(q)))
            recalls.append(len(exact & {searcher.global_id(h.shard, h.id) for h in hits}) / K)
        slack = near_ties_at(vectors, queries, K) / (K * len(queries))
        assert report["methods"][method]["recall@k"] == pytest.approx(np.mean(recalls), abs=slack + 1e-12), method
        assert report["methods"][method]["qps"] > 0
    assert report["methods"]["exact"]["recall@k"] == 1.0
    assert report["methods"]["annoy"]["recall@k"] > 0.9 and report["methods"]["hnsw"]["recall@k"] > 0.9
    # the exact lists' P@k are the full ranking's P@k (same ranking, truncated)
    for k in (1, 5, 10):
        slack = near_ties_at(vectors, queries, k) / (k * len(queries))
        assert report["methods"]["exact"][f"p@{k}"] == pytest.approx(expected[f"p@{k}"], abs=slack + 1e-9)
    # precision–recall curve: a mean of interpolated precisions, non-increasing in recall
    curve = report["pr_curve"]["exact"]
    assert len(curve["recall"]) == 101 and curve["recall"][0] == 0 and curve["recall"][-1] == 1
    assert np.all(np.diff(curve["precision"]) <= 1e-12)
    assert curve["precision"][0] >= expected["p@1"]
    assert "| mAP (full ranking) |" in format_markdown(report)


def test_query_expansion_figures_equal_brute_force(searcher, flowers_index):
    report = run(EvaluateConfig(index=str(flowers_index[0]), search=SearchOptions(k=K, rerank=Rerank(qe=2)), methods=(),
                                sample=150, seed=3))
    queries = np.sort(np.random.default_rng(3).choice(searcher.size, 150, replace=False))
    expected = brute_force_labels(searcher.all_vectors(), searcher.labels, queries, qe=2)
    for key, value in expected.items():
        assert report["exact_qe"][key] == pytest.approx(value, abs=1e-9), key
    assert set(report["pr_curve"]) == {"exact", "exact_qe2"}


def test_metric_definitions_on_hand_made_rankings():
    rel = np.array([[True, False, True, False], [False, False, False, False], [False, True, True, True]])
    ap = metrics.average_precision(rel, np.array([2, 0, 5]))
    assert ap[0] == pytest.approx((1 + 2 / 3) / 2)
    assert np.isnan(ap[1])  # no relevant item: undefined, skipped by the callers
    assert ap[2] == pytest.approx((1 / 2 + 2 / 3 + 3 / 4) / 4)  # truncated at 4 of 5 relevant: / min(R, L)
    assert metrics.precision_at(rel, 2).tolist() == [0.5, 0.0, 0.5]
    assert metrics.precision_at(rel[:, :1], 2).tolist() == [0.5, 0.0, 0.0]
    curve = metrics.interpolated_pr(rel[:1], np.array([2]), np.array([0.0, 0.5, 0.6, 1.0]))
    assert curve.tolist() == [[1.0, 1.0, pytest.approx(2 / 3), pytest.approx(2 / 3)]]
    assert metrics.recall_at_k(np.array([[1, 2, 3], [4, -1, -1]]), np.array([[3, 2, 9], [5, 6, 7]])).tolist() == \
        [pytest.approx(2 / 3), 0.0]


def test_full_rankings_do_not_depend_on_the_block_size(searcher, monkeypatch):
    """The same ranking whether queries are ranked one at a time or 256 at a time, and with
    the element budget that shrinks blocks on large indexes: mAP must not change with the
    BLAS kernel a block size selects (float32 rankings did, on another CPU)."""
    vectors = searcher.all_vectors()
    queries = np.arange(0, searcher.size, 3)
    one = np.concatenate([r for _, r in metrics.leave_one_out_rankings(vectors, queries, block=1)])
    many = np.concatenate([r for _, r in metrics.leave_one_out_rankings(vectors, queries, block=256)])
    monkeypatch.setattr(metrics, "_RANK_ELEMENTS", 7 * len(vectors))
    bounded = list(metrics.leave_one_out_rankings(vectors, queries, block=256))
    assert {len(pos) for pos, _ in bounded[:-1]} == {7}
    assert np.array_equal(one, many) and np.array_equal(one, np.concatenate([r for _, r in bounded]))


def test_unlabelled_items_are_left_out():
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((40, 8)).astype(np.float32)
    labels = [str(i % 3) for i in range(40)]
    partial = [None if i % 7 == 0 else lab for i, lab in enumerate(labels)]
    keep = [i for i, lab in enumerate(partial) if lab is not None]
    with_none = metrics.label_metrics(vectors, partial)
    subset = metrics.label_metrics(vectors[keep], [partial[i] for i in keep])
    assert with_none["skipped_unlabelled"] == 0 and with_none["queries"] == len(keep)
    for key in ("map", "p@1", "p@5", "p@10"):
        assert with_none[key] == pytest.approx(subset[key])
    queried = metrics.label_metrics(vectors, partial, queries=np.arange(40))
    assert queried["skipped_unlabelled"] == 40 - len(keep)
    # a label nobody else carries has no relevant item: skipped and counted
    lonely = metrics.label_metrics(vectors, labels[:-1] + ["alone"])
    assert lonely["skipped_no_relevant"] == 1 and lonely["queries"] == 39
    # returned lists: an unlabelled candidate is dropped and the rest move up
    lists = metrics.relevance(np.array([[0, 1, 3]]), np.array(["0"], dtype=object),
                              np.array(["0", None, "x", "0"], dtype=object))
    assert lists.tolist() == [[True, True, False]]


def test_cli_json_markdown_and_plot(flowers_index, tmp_path, capsys):
    png = tmp_path / "pr.png"
    assert cli.main(["evaluate", "--index", str(flowers_index[0]), "--json", "--sample", "50", "-k", "5",
                     "--plot", str(png), "--qe", "2", "--methods", "annoy,both", "--rerank"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["queries"] == 50 and report["k"] == 5 and report["sampled"]
    assert set(report["methods"]) == {"exact", "annoy", "both"}
    assert report["options"] == {"rerank": True, "qe": 2, "qe_alpha": 0.0, "search_k": -1, "lsh_radius": LSH_RADIUS,
                                 "seed": 0}
    assert 0 < report["exact_qe"]["map"] <= 1
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert cli.main(["evaluate", "--index", str(flowers_index[0]), "--sample", "20"]) == 0
    out = capsys.readouterr().out
    assert "| method | recall@10 | queries/s |" in out and "| annoy |" in out and "| lsh |" in out
    assert cli.main(["evaluate", "--index", str(flowers_index[0]), "--methods", "exact"]) == 2
    assert "--methods lists approximate methods" in capsys.readouterr().err
    assert cli.main(["evaluate", "--index", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "LATEST" in err and "Traceback" not in err
