"""``cbir index``: its command-line options, the handler that turns them into an IndexConfig, the summary."""

from __future__ import annotations

import dataclasses
from typing import Any

from artefacts.manifests import IndexManifest
from index_builder import augment, calibration
from index_builder.types import registry
from index_builder.types.registry import DEFAULT_TYPES as INDEX_TYPES
from pipelines.index.config import IndexConfig
from pipelines.index.incremental import run_incremental
from pipelines.index.job import run
from pipelines.index.publishing import GATE_SUFFIX, show_measured
from plumbing import fsutil


def register(subparsers: Any) -> None:
    """Adds ``index`` to the ``cbir`` parser; Beam options pass through to the job (``beam=True``)."""
    from pipelines.options import fraction, non_negative_int, positive_int

    ix = subparsers.add_parser("index", help="features → sharded Annoy + LSH index version")
    ix.add_argument("--features", required=True, help="an extract output folder")
    ix.add_argument("--output", required=True)
    ix.add_argument("--shards", type=positive_int, default=1)
    ix.add_argument("--dims", type=non_negative_int, default=256, help="PCA dimension (0 keeps the input dimension)")
    ix.add_argument("--seed", type=int, default=1234)
    ix.add_argument("--keep-versions", type=positive_int, default=3,
                    help="complete versions kept (LATEST's always is)")
    ix.add_argument("--stale-after-hours", type=float, default=24.0,
                    help="unpublished builds older than this are cleaned up")
    ix.add_argument("--index-types", default=",".join(INDEX_TYPES),
                    help=f"comma-separated subset of {','.join(INDEX_TYPES)} (default all)")
    ix.add_argument("--target-recall", type=fraction, default=calibration.DEFAULT_TARGET,
                    help="recall@10 each index type is calibrated to per shard (0: no calibration)")
    registry.add_arguments(ix, positive_int)  # each index type's own build options (--trees, --hnsw-m, …)
    ix.add_argument("--dba", type=non_negative_int, default=0, metavar="K",
                    help="database-side augmentation: store each vector as the similarity-weighted mean of itself "
                         "and its top K (a second build pass; queries stay as they are)")
    ix.add_argument("--dba-alpha", type=float, default=augment.DEFAULT_DBA_ALPHA,
                    help="DBA weights are similarity**alpha")
    ix.add_argument("--graph-k", type=non_negative_int, default=0, metavar="K",
                    help="store the corpus k-NN graph with K neighbours per item, for --diffusion re-ranking")
    ix.add_argument("--no-local-features", action="store_true",
                    help="leave out the local features the extract stored (no --verify with this index)")
    ix.add_argument("--gate", default="", metavar="CONDITIONS",
                    help="only switch LATEST when the new version meets these, e.g. 'map>=0.50,recall@10>=0.95' "
                         "(metrics: map, p@1, p@5, p@10, recall@K, expected@K, queries_found); else exit 5")
    ix.add_argument("--gate-queries", default=None, metavar="FILE",
                    help="JSON lines {\"image_id\": ..., \"expected\": [...]} for expected@K")
    ix.add_argument("--gate-sample", type=positive_int, default=1000,
                    help="leave-one-out queries the gate measures on (seeded)")
    ix.add_argument("--incremental", action="store_true",
                    help="update the version LATEST names (or --base) with what changed in the features, instead "
                         "of building from scratch; builds in full by itself when the base cannot be updated")
    ix.add_argument("--base", default=None, metavar="VERSION", help="with --incremental: the version to update")
    ix.add_argument("--full", action="store_true",
                    help="build from scratch even with --incremental (a scheduled run's override)")
    ix.add_argument("--signing-key", default=None, metavar="FILE",
                    help="sign the version's manifest with HMAC-SHA256 under this key (readers given it refuse others)")
    ix.set_defaults(handler=main, beam=True)


def main(args: Any, beam_args: list[str]) -> int:
    """Runs the job from parsed options; the CLI maps its errors (refused, gate failed) to exit codes."""
    cfg = IndexConfig(
        features=args.features, output=args.output, shards=args.shards, dims=args.dims,
        type_params=registry.params_from_args(args), seed=args.seed, keep_versions=args.keep_versions,
        stale_after_seconds=args.stale_after_hours * 3600,
        index_types=tuple(t.strip() for t in args.index_types.split(",") if t.strip()),
        target_recall=args.target_recall, signing_key_file=args.signing_key, dba=args.dba,
        dba_alpha=args.dba_alpha, graph_k=args.graph_k, local_features=not args.no_local_features,
        gate=args.gate, gate_queries=args.gate_queries, gate_sample=args.gate_sample,
    )
    if args.base and not args.incremental:
        raise ValueError("--base names the version --incremental updates: add --incremental")
    if args.incremental and not args.full:
        manifest = run_incremental(dataclasses.replace(cfg, base=args.base), run, beam_args)
    else:
        manifest = run(cfg, beam_args)
    print_summary(manifest)
    if cfg.gate:
        report = fsutil.read_json(fsutil.join(cfg.output, manifest.version + GATE_SUFFIX))
        print("  gate passed: " + ", ".join(f"{r['condition']} ({show_measured(r['measured'])})"
                                            for r in report["conditions"]))
    return 0


def print_summary(m: IndexManifest) -> None:
    """One line for the version, then per index type the search effort calibration chose."""
    rate = m.items / m.elapsed_seconds if m.elapsed_seconds else 0
    print(f"index: {m.version}: {m.items} items in {m.shards} shard(s) ({'+'.join(m.index_types)}), "
          f"{m.dimension.input}→{m.dimension.output} dims, {m.bytes / 1e6:.1f} MB, "
          f"{m.elapsed_seconds:.1f}s ({rate:.0f} items/s)")
    for kind in m.index_types:
        key = registry.get(kind).effort_key
        params = getattr(m, kind, None) or m.extra.get(kind)
        cal = (params.get("calibration") if isinstance(params, dict) else params.calibration) if params else None
        if cal:
            values = [p[key] for p in cal["per_shard"] if p]
            print(f"  {kind}: {key} {min(values)}–{max(values)} per shard for recall@{cal['k']} ≥ "
                  f"{cal['target_recall']} (lowest measured {cal['min_recall']:.3f})")
