"""The index job: features in, a published index version out.

1. read the feature files listed in the extract manifest;
2. fit tf.Transform over the whole corpus (L2 → PCA → L2) and transform every row;
3. key rows by a stable hash of ``image_id``, group per shard, build each shard
   (Annoy, LSH codes + MIH tables, float16 vectors, id map) on its worker, which
   uploads it to an attempt folder under ``<index>/_staging/<version>/``;
4. publish: move one complete attempt per shard and the transform into
   ``<index>/<version>/``, check every file is there at its size, write
   ``MANIFEST.json`` with a digest of every file (the commit point), switch
   ``LATEST``, then garbage-collect old versions and dead builds.

A build killed at any point before ``LATEST`` is switched leaves the previous
version and pointer exactly as they were: versions are never written in place,
and a version folder without a manifest is not an index. Concurrent builds into
one output are not supported (the last to publish wins ``LATEST``).

Modules: ``config`` (IndexConfig and its checks), ``graphs`` (the Beam passes, each a
``build_*(p, …)``), ``steps`` (launcher-side work between passes: the transform as data and
LSH, DBA, the k-NN graph), ``job`` (``run``: the order of it all), ``publishing`` (manifest,
commit, gate, ``LATEST``, cleanup), ``command`` (the ``cbir index`` options and summary).
"""

from pipelines.index.command import main, print_summary, register
from pipelines.index.config import IndexBuildError, IndexConfig
from pipelines.index.job import run
from pipelines.index.publishing import GATE_SUFFIX, SHARDING, Extras, choose_attempts, collect_garbage, publish

__all__ = [
    "GATE_SUFFIX",
    "SHARDING",
    "Extras",
    "IndexBuildError",
    "IndexConfig",
    "choose_attempts",
    "collect_garbage",
    "main",
    "print_summary",
    "publish",
    "register",
    "run",
]
