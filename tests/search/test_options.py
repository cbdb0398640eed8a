"""The options record: grouped inside, the same flat names outside (flags, JSON, reports)."""

from __future__ import annotations

import pytest

from search.options import FLAT, Effort, Rerank, SearchOptions
from search.rerank import FeedbackWeights

# to_dict as it was when the record was 16 flat fields: reports and service answers keep this form
FLAT_DEFAULTS = {
    "k": 10, "method": "auto", "rerank": False, "qe": 0, "qe_alpha": 0.0, "search_k": -1, "ef_search": 0,
    "lsh_radius": 3, "lsh_candidates": 0, "candidates": 0, "batch_size": 1024, "diffusion": False,
    "diffusion_candidates": 100, "verify": 0, "verify_votes": True,
    "feedback": {"alpha": 1.0, "beta": 0.75, "gamma": 0.25, "power": 5.0, "negative": 3.0, "candidates": 500},
}


def test_to_dict_keeps_the_flat_names_values_and_order():
    out = SearchOptions().to_dict()
    assert out == FLAT_DEFAULTS and list(out) == list(FLAT_DEFAULTS) == list(FLAT)


def test_flat_names_land_in_their_groups_and_round_trip():
    opts = SearchOptions.from_dict({"k": 7, "method": "annoy+lsh", "rerank": True, "qe": 2, "qe_alpha": 3.0,
                                    "search_k": 500, "ef_search": 64, "lsh_candidates": 40, "lsh_radius": 2,
                                    "diffusion": True, "diffusion_candidates": 30, "verify": 9,
                                    "verify_votes": False, "candidates": 12, "batch_size": 64,
                                    "feedback": FeedbackWeights(power=0.0)})
    assert opts.effort == Effort(annoy_search_k=500, hnsw_ef_search=64, lsh_candidates=40, lsh_radius=2)
    assert opts.rerank == Rerank(exact=True, qe=2, qe_alpha=3.0, diffusion=True, diffusion_candidates=30, verify=9,
                                 verify_votes=False)
    assert (opts.k, opts.method, opts.candidates, opts.batch_size) == (7, "annoy+lsh", 12, 64)
    assert SearchOptions.from_dict(opts.to_dict()) == opts  # feedback comes back from its dict form
    assert hash(SearchOptions.from_dict(opts.to_dict())) == hash(opts)  # a cache key, as the searcher uses it


def test_replace_takes_flat_names_or_whole_groups():
    base = SearchOptions(k=5, rerank=Rerank(qe=3))
    assert base.replace(rerank=True).rerank == Rerank(exact=True, qe=3)  # a bool: the flat name
    assert base.replace(rerank=Rerank(verify=4)).rerank == Rerank(verify=4)  # a Rerank: the group
    assert base.replace(verify=4, k=8) == SearchOptions(k=8, rerank=Rerank(qe=3, verify=4))
    assert base.replace() is base
    with pytest.raises(TypeError, match="unknown search option 'like'"):
        base.replace(like=[1])


def test_validation_names_the_flag():
    available = ("exact", "annoy")
    assert SearchOptions().resolve(available).method == "annoy"
    for fields, message in (({"qe": -1}, "--qe"), ({"qe_alpha": -0.5}, "--qe-alpha"), ({"verify": -1}, "--verify"),
                            ({"diffusion": True, "diffusion_candidates": 1}, "--diffusion-candidates"),
                            ({"k": 0}, "k must be"), ({"method": "hnsw"}, "not available"),
                            ({"method": "exact+annoy"}, "cannot be combined")):
        with pytest.raises(ValueError, match=message):
            SearchOptions.from_dict(fields).resolve(available)
