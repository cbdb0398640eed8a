"""The query library: the searcher, top-k arithmetic, re-rankers, verification, query embedding,
version resolution and checks."""
