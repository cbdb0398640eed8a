"""Search methods behind one interface (:class:`Method`); the options record is ``search.options``.

``METHODS`` maps a name to its class; an index lists the types it was built with
(``index_types`` in its manifest) and the searcher opens those plus ``exact``.
"""

from __future__ import annotations

from search.methods.annoy import RERANK_FACTOR, AnnoyMethod
from search.methods.base import Method
from search.methods.exact import ExactMethod
from search.methods.hnsw import HnswMethod
from search.methods.lsh import LSH_FACTOR, LshMethod

METHODS: dict[str, type[Method]] = {m.name: m for m in (ExactMethod, AnnoyMethod, LshMethod, HnswMethod)}
COMBINATIONS = ("both",)  # annoy+lsh; any names joined by "+" also work

__all__ = ["COMBINATIONS", "LSH_FACTOR", "METHODS", "RERANK_FACTOR", "Method"]
