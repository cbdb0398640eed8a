"""``cbir evaluate``: how good is an index? Leave-one-out retrieval with the id map's labels.

Every query is an indexed item (all of them, or ``--sample N`` of them), searched
with itself left out:

* label metrics over the *full exact ranking* of the stored vectors: mAP,
  precision@1/5/10 and a precision–recall curve (``evaluation.metrics`` holds the
  definitions); with ``--qe N`` also for queries expanded with their exact top N;
* for each approximate method (Annoy, LSH, both): recall@k against exact search
  over the same vectors, P@k and mAP@k of the lists it returns, and queries per
  second of batch search, next to exact search's own throughput.

Not a Beam job: it runs where the index is (a copy is made first when the index
lives on an object store). The whole stored-vector matrix is loaded as float32,
so a 10M × 256 index wants about 10 GB; use ``--sample`` to bound the number of
queries, whose cost grows as queries × items.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import logging
import time
from typing import Any

import numpy as np

from evaluation import metrics, rerank_eval
from plumbing import fsutil
from search import index_files
from search.options import SearchOptions
from search.searcher import Searcher, normalise_rows

log = logging.getLogger(__name__)

PRECISION_KS = (1, 5, 10)


@dataclasses.dataclass
class EvaluateConfig:
    """``search`` is the search each approximate method runs with (its ``method`` is replaced by each of
    ``methods`` in turn; ``k`` is the list length for recall@k and mAP@k)."""

    index: str
    version: str | None = None
    search: SearchOptions = dataclasses.field(default_factory=SearchOptions)
    methods: tuple[str, ...] = ()  # () : every approximate type the index has
    sample: int = 0  # 0: every item is a query
    seed: int = 0
    verify: bool = True
    plot: str | None = None
    signing_key: bytes | None = None
    configurations: bool = True  # every re-ranking configuration the index supports (evaluation.rerank_eval)
    feedback_rounds: int = 0  # simulated relevance-feedback rounds (precision@10 after each)


def pick_queries(n_items: int, sample: int, seed: int) -> np.ndarray:
    """Global ids of the query items: all, or a seeded uniform sample without replacement."""
    if sample <= 0 or sample >= n_items:
        return np.arange(n_items, dtype=np.int64)
    return np.sort(np.random.default_rng(seed).choice(n_items, size=sample, replace=False)).astype(np.int64)


def timed_search(searcher: Searcher, vectors: np.ndarray, exclude: np.ndarray, opts: SearchOptions):
    """(ids, scores, queries per second) of one batch search.

    Without verification: it is measured as a configuration of its own over the global top N
    (``evaluation.rerank_eval``), where it re-orders that head of the full ranking.
    """
    t0 = time.perf_counter()
    ids, scores = searcher.search_arrays(vectors, opts, exclude=exclude, verify=0)
    elapsed = time.perf_counter() - t0
    return ids, scores, (len(vectors) / elapsed if elapsed > 0 else float("inf"))


def evaluate(searcher: Searcher, cfg: EvaluateConfig) -> dict[str, Any]:
    """The report of one index version (see the module docstring)."""
    approx = cfg.methods or tuple(m for m in searcher.available_methods if m != "exact")
    for m in approx:
        if m == "exact":
            raise ValueError("--methods lists approximate methods; exact search is always measured")
        cfg.search.replace(method=m).validate(searcher.available_methods)
    started = time.perf_counter()
    n = searcher.size
    if n < 2:
        raise ValueError(f"{searcher.version_dir} holds {n} item(s): leave-one-out needs at least 2")
    queries = pick_queries(n, cfg.sample, cfg.seed)
    vectors = searcher.all_vectors()
    qv = normalise_rows(vectors[queries])  # what search_arrays searches with, and expands
    k = min(cfg.search.k, n - 1)
    base = cfg.search.replace(k=k)
    # exact search over the stored vectors (with the same query expansion): the ground truth for
    # recall, and the throughput baseline
    exact_ids, _, exact_qps = timed_search(searcher, qv, queries, base.replace(method="exact"))
    ks = tuple(x for x in PRECISION_KS if x <= k)
    exact_lists = metrics.list_metrics(exact_ids, queries, searcher.labels, ks)
    methods: dict[str, Any] = {"exact": {"recall@k": 1.0, "qps": exact_qps, **_lists(exact_lists)}}
    for m in approx:
        ids, _, qps = timed_search(searcher, qv, queries, base.replace(method=m))
        recall = metrics.recall_at_k(ids, exact_ids)
        lists = metrics.list_metrics(ids, queries, searcher.labels, ks)
        methods[m] = {"recall@k": float(np.nanmean(recall)), "qps": qps, **_lists(lists)}
    # label metrics over the full exact ranking (and with exact query expansion)
    full = metrics.label_metrics(vectors, searcher.labels, queries, ks=PRECISION_KS)
    report: dict[str, Any] = {
        "index": {
            "version": searcher.version,
            "items": n,
            "shards": len(searcher.shards),
            "dimension": searcher.dim,
            "model": searcher.manifest.preset,
            "model_fingerprint": searcher.model_fingerprint,
        },
        "k": k,
        "queries": int(len(queries)),
        "sampled": bool(0 < cfg.sample < n),
        "options": {"rerank": base.rerank.exact, "qe": base.rerank.qe, "qe_alpha": base.rerank.qe_alpha,
                    "search_k": base.effort.annoy_search_k, "lsh_radius": base.effort.lsh_radius, "seed": cfg.seed},
        "exact": _label_part(full),
        "methods": methods,
        "pr_curve": {"exact": full["pr_curve"]},
    }
    if base.rerank.qe > 0:
        with_qe = _exact_with_expansion(searcher, qv, queries, vectors, base)
        report["exact_qe"] = _label_part(with_qe)
        report["pr_curve"][f"exact_qe{base.rerank.qe}"] = with_qe["pr_curve"]
    if cfg.configurations:
        report["configurations"] = rerank_eval.configurations(searcher, queries, qv, vectors, base)
    if cfg.feedback_rounds:
        report["feedback"] = {"rounds": cfg.feedback_rounds, "weights": dataclasses.asdict(base.feedback),
                              "precision": rerank_eval.feedback_rounds(searcher, queries, qv, cfg.feedback_rounds,
                                                                       base.feedback)}
    report["elapsed_seconds"] = round(time.perf_counter() - started, 3)
    return report


def _exact_with_expansion(searcher: Searcher, qv: np.ndarray, queries: np.ndarray, vectors: np.ndarray,
                          base: SearchOptions) -> dict[str, Any]:
    """Label metrics over the full exact ranking of each query expanded with its exact top ``qe``."""
    qe = base.rerank.qe
    top, top_scores = searcher.search_arrays(qv, base, exclude=queries, k=qe, method="exact", qe=0, verify=0)
    expanded = searcher.expand(qv, top, qe, top_scores, base.rerank.qe_alpha)
    return metrics.label_metrics(vectors, searcher.labels, queries, query_vectors=expanded, ks=PRECISION_KS)


def _label_part(m: dict[str, Any]) -> dict[str, Any]:
    return {key: v for key, v in m.items() if key != "pr_curve"}


def _lists(m: dict[str, Any]) -> dict[str, Any]:
    return {key: v for key, v in m.items() if key not in ("queries", "k")}


def format_markdown(report: dict[str, Any]) -> str:
    idx = report["index"]
    k = report["k"]
    lines = [
        f"## cbir evaluate: {idx['version']}",
        "",
        f"{idx['items']} items in {idx['shards']} shard(s), {idx['dimension']} dims, model {idx['model']}; "
        f"{report['queries']} leave-one-out queries{' (sampled)' if report['sampled'] else ''}; "
        f"label metrics over {report['exact']['queries']} labelled queries "
        f"({report['exact']['classes']} labels; skipped: {report['exact']['skipped_unlabelled']} unlabelled, "
        f"{report['exact']['skipped_no_relevant']} with no other item of their label).",
        "",
    ]
    cols = [("exact ranking", report["exact"])]
    if "exact_qe" in report:
        cols.append((f"exact + QE {report['options']['qe']}", report["exact_qe"]))
    lines.append("| metric | " + " | ".join(c for c, _ in cols) + " |")
    lines.append("|---|" + "---:|" * len(cols))
    for key, name in [("map", "mAP (full ranking)")] + [(f"p@{x}", f"precision@{x}") for x in PRECISION_KS]:
        lines.append(f"| {name} | " + " | ".join(_fmt(c.get(key)) for _, c in cols) + " |")
    lines += ["", f"| method | recall@{k} | queries/s | " + " | ".join(
        f"P@{x}" for x in PRECISION_KS if x <= k) + f" | mAP@{k} |", "|---|" + "---:|" * (3 + sum(
            1 for x in PRECISION_KS if x <= k))]
    opts = report["options"]
    suffix = ("+rerank" if opts["rerank"] else "") + (f"+qe{opts['qe']}" if opts["qe"] else "")
    for name, m in report["methods"].items():
        label = name + (suffix.replace("+rerank", "") if name == "exact" else suffix)
        cells = [_fmt(m["recall@k"]), f"{m['qps']:.0f}"] + [_fmt(m.get(f"p@{x}")) for x in PRECISION_KS if x <= k]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {_fmt(m.get('map@k'))} |")
    if report.get("configurations"):
        lines += ["", "| configuration | mAP | P@1 | P@10 | queries/s |", "|---|---:|---:|---:|---:|"]
        for c in report["configurations"]:
            lines.append(f"| {c['name']} | {_fmt(c['map'])} | {_fmt(c['p@1'])} | {_fmt(c['p@10'])} | "
                         f"{c['qps']:.0f} |")
    if report.get("feedback"):
        rounds = report["feedback"]["precision"]
        lines += ["", "relevance feedback (simulated, marks by label): precision@10 "
                  + " → ".join(f"{r['p@10']:.4f}" for r in rounds) + f" over rounds 0–{len(rounds) - 1}"]
    lines += ["", f"elapsed {report['elapsed_seconds']:.1f}s"]
    return "\n".join(lines)


def _fmt(x: Any) -> str:
    return "-" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{x:.4f}"


def plot_pr(report: dict[str, Any]) -> bytes:
    """PNG of the mean interpolated precision–recall curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=100)
    for name, curve in report["pr_curve"].items():
        part = report["exact"] if name == "exact" else report["exact_qe"]
        label = ("exact ranking" if name == "exact" else f"exact + QE {report['options']['qe']}") + \
            f" (mAP {part['map']:.3f})"
        ax.plot(curve["recall"], curve["precision"], label=label)
    ax.set_xlabel("recall")
    ax.set_ylabel("interpolated precision")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.set_title(f"{report['index']['version']}: {report['exact']['queries']} queries", fontsize=10)
    ax.legend(loc="lower left")
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def run(cfg: EvaluateConfig) -> dict[str, Any]:
    version, _ = index_files.resolve(cfg.index, cfg.version, cfg.signing_key)
    with Searcher(index_files.localise(cfg.index, version), version=version, verify=cfg.verify,
                  signing_key=cfg.signing_key) as searcher:
        report = evaluate(searcher, cfg)
    if cfg.plot:
        fsutil.write_bytes_atomic(cfg.plot, plot_pr(report))
        report["plot"] = cfg.plot
    return report


def register(subparsers: Any) -> None:
    from pipelines.options import add_search_args, add_signing_arg, non_negative_int

    p = subparsers.add_parser("evaluate", help="leave-one-out mAP, precision@k, recall@k of an index")
    p.add_argument("--index", required=True)
    p.add_argument("--version", default=None, help="index version (default: LATEST)")
    add_search_args(p)
    p.add_argument("--methods", default="",
                   help="approximate methods to measure, comma-separated (hnsw, annoy, lsh, both, a+b); "
                        "default: every type the index has")
    p.add_argument("--sample", type=non_negative_int, default=0, help="use N random items as queries (default all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--feedback-rounds", type=non_negative_int, default=0, metavar="R",
                   help="simulate R rounds of relevance feedback (the shown top 10 marked by label)")
    p.add_argument("--feedback-weights", default=None, metavar="A,B,G", help="Rocchio weights (default 1,0.75,0.25)")
    p.add_argument("--feedback-kernel", default=None, metavar="P,C",
                   help="feedback's kernel re-scoring: power and weight of the rejected (default 5,3; 0,0: off)")
    p.add_argument("--no-configurations", action="store_true",
                   help="skip the re-ranking configurations (plain, QE, αQE, diffusion, verification)")
    p.add_argument("--plot", default=None, help="write the precision–recall curve to this PNG")
    p.add_argument("--no-verify", action="store_true", help="check file sizes only, not digests")
    add_signing_arg(p)
    p.set_defaults(handler=main, beam=False)


def main(args: argparse.Namespace, beam_args: list[str]) -> int:
    from pipelines.options import search_options, signing_key

    cfg = EvaluateConfig(
        index=args.index, version=args.version, search=search_options(args),
        methods=tuple(m.strip() for m in args.methods.split(",") if m.strip()),
        sample=args.sample, seed=args.seed, verify=not args.no_verify, plot=args.plot, signing_key=signing_key(args),
        configurations=not args.no_configurations, feedback_rounds=args.feedback_rounds,
    )
    report = run(cfg)
    if args.json:
        print(json.dumps(report, sort_keys=True))
    else:
        print(format_markdown(report))
        if cfg.plot:
            print(f"\nprecision–recall curve: {cfg.plot}")
    return 0
