"""Comparing two index versions: how much each item's neighbours churn, and whether quality moved.

Tonight's index may differ from last night's in its items (added, removed), its model or
transform (the manifests say), and in what users see: each item's top-k. The figures:

* **overlap@k** — for each query item present in both versions, |OLD top-k ∩ NEW top-k| / k,
  both lists searched as served (the same search options, item itself left out), compared by
  ``image_id``. Its distribution is the churn users will notice; a version compared with
  itself gives 1 everywhere.
* **exact overlap@k** — the same over exact search in each version: the churn the vectors
  themselves cause (model, transform, items), without the approximate index's own misses.
* **recall of NEW against OLD's exact neighbours** — |NEW served top-k ∩ OLD exact top-k| / k:
  how much of what the old index would ideally return the new one still returns.
  ``reachable`` is the share of those neighbours NEW still holds at all (removed items cannot
  be found); against itself this is NEW's own recall@k.
* **label metrics side by side** when the items carry labels: full-ranking mAP and P@k
  (``evaluation.metrics.label_metrics``) on the same query items, and P@k / mAP@k of the lists
  each version serves.

Queries are a seeded sample of the items both versions hold (all of them with ``sample=0``).
"""

from __future__ import annotations

import dataclasses
import io
import time
from typing import Any

import numpy as np

from artefacts.vector_space import space_fingerprint, transform_fingerprint
from evaluation import metrics
from search.options import SearchOptions
from search.searcher import Searcher, normalise_rows

PRECISION_KS = (1, 5, 10)
LOWEST_SHOWN = 10  # items with the least overlap listed in the report
EXAMPLES_SHOWN = 10  # added / removed ids listed


@dataclasses.dataclass(frozen=True)
class CompareConfig:
    search: SearchOptions = dataclasses.field(default_factory=SearchOptions)  # how each version serves
    sample: int = 1000  # query items (0: every item both versions hold)
    seed: int = 0


def _distribution(values: np.ndarray, k: int) -> dict[str, Any]:
    """Mean, quantiles and the histogram over the k + 1 possible values 0/k … k/k."""
    v = np.asarray(values, np.float64)
    v = v[~np.isnan(v)]
    if not len(v):
        return {"queries": 0}
    counts = np.bincount(np.rint(v * k).astype(np.int64), minlength=k + 1)[: k + 1]
    return {
        "queries": int(len(v)),
        "mean": float(v.mean()),
        "median": float(np.median(v)),
        "p10": float(np.percentile(v, 10)),
        "p90": float(np.percentile(v, 90)),
        "min": float(v.min()),
        "full": float(np.mean(v >= 1.0 - 1e-9)),
        "histogram": [int(c) for c in counts],  # index i: queries with i of k in common
    }


def _overlap(a: np.ndarray, b: np.ndarray, k: int) -> np.ndarray:
    """Per row: shared names of two (Q, k) object arrays of image ids (None = padding), over k."""
    out = np.empty(len(a), np.float64)
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        out[i] = len({n for n in x if n is not None} & {n for n in y if n is not None}) / k
    return out


def _names(s: Searcher, ids: np.ndarray) -> np.ndarray:
    names = np.asarray(s.image_ids + [None], dtype=object)
    return names[np.where(ids >= 0, ids, len(s.image_ids))]


def _manifest_changes(old: Searcher, new: Searcher) -> list[dict[str, Any]]:
    """What changed in how the versions were built: model, weights, transform, index layout."""
    a, b = old.manifest, new.manifest
    rows = [
        ("model preset", a.preset, b.preset),
        ("model fingerprint", a.model_fingerprint, b.model_fingerprint),
        ("weights sha256", a.model.get("weights_sha256"), b.model.get("weights_sha256")),
        ("input size", a.model.get("input_size"), b.model.get("input_size")),
        ("transform fingerprint", transform_fingerprint(a), transform_fingerprint(b)),
        ("vector space", space_fingerprint(a), space_fingerprint(b)),
        ("transform steps", " → ".join(a.transform.steps), " → ".join(b.transform.steps)),
        ("dimension", f"{a.dimension.input} → {a.dimension.output}", f"{b.dimension.input} → {b.dimension.output}"),
        ("index types", ", ".join(a.index_types), ", ".join(b.index_types)),
        ("shards", a.shards, b.shards),
        ("items", a.items, b.items),
        ("features run", a.features_run_id, b.features_run_id),
        ("created (UTC)", a.created_utc, b.created_utc),
    ]
    return [{"what": w, "old": x, "new": y, "changed": x != y} for w, x, y in rows]


def compare(old: Searcher, new: Searcher, cfg: CompareConfig | None = None) -> dict[str, Any]:
    """The comparison report of two opened versions (see the module docstring)."""
    cfg = cfg or CompareConfig()
    started = time.perf_counter()
    old_pos = {name: i for i, name in enumerate(old.image_ids)}
    new_pos = {name: i for i, name in enumerate(new.image_ids)}
    common = sorted(old_pos.keys() & new_pos.keys())
    added = sorted(new_pos.keys() - old_pos.keys())
    removed = sorted(old_pos.keys() - new_pos.keys())
    if not common:
        raise ValueError(f"{old.version} and {new.version} hold no item in common: nothing to compare")
    k = min(cfg.search.k, min(old.size, new.size) - 1)
    if k < 1:
        raise ValueError("each version needs at least 2 items to compare neighbours")
    queries = _sample(common, cfg.sample, cfg.seed)
    q_old = np.asarray([old_pos[n] for n in queries], np.int64)
    q_new = np.asarray([new_pos[n] for n in queries], np.int64)
    served = cfg.search.replace(k=k, verify=0)  # neighbour lists as candidates and re-rankers give them, unverified
    exact = served.replace(method="exact", rerank=False)
    old_served, new_served = _lists(old, q_old, served), _lists(new, q_new, served)
    old_exact, new_exact = _lists(old, q_old, exact), _lists(new, q_new, exact)
    names = {key: _names(s, ids) for key, s, ids in (("old_served", old, old_served), ("new_served", new, new_served),
                                                     ("old_exact", old, old_exact), ("new_exact", new, new_exact))}
    overlap = _overlap(names["old_served"], names["new_served"], k)
    exact_overlap = _overlap(names["old_exact"], names["new_exact"], k)
    recall = _overlap(names["new_served"], names["old_exact"], k)
    reachable = np.asarray([sum(1 for n in row if n is not None and n in new_pos) / k for row in names["old_exact"]])
    new_self_recall = _overlap(names["new_served"], names["new_exact"], k)
    lowest = np.argsort(overlap, kind="stable")[:LOWEST_SHOWN]
    report: dict[str, Any] = {
        "old": _describe(old),
        "new": _describe(new),
        "k": k,
        "search": {key: v for key, v in served.to_dict().items() if key in ("method", "rerank", "qe", "qe_alpha")},
        "queries": len(queries),
        "sampled": bool(0 < cfg.sample < len(common)),
        "seed": cfg.seed,
        "items": {"old": old.size, "new": new.size, "common": len(common), "added": len(added),
                  "removed": len(removed), "added_examples": added[:EXAMPLES_SHOWN],
                  "removed_examples": removed[:EXAMPLES_SHOWN]},
        "changes": _manifest_changes(old, new),
        "overlap": _distribution(overlap, k),
        "exact_overlap": _distribution(exact_overlap, k),
        "recall_vs_old_exact": {**_distribution(recall, k), "reachable": float(np.mean(reachable)),
                                "new_own_recall": float(np.mean(new_self_recall))},
        "lowest_overlap": [{"image_id": queries[i], "overlap": float(overlap[i]),
                            "old": [n for n in names["old_served"][i] if n is not None],
                            "new": [n for n in names["new_served"][i] if n is not None]} for i in lowest],
    }
    if _labelled(old) and _labelled(new):
        report["labels"] = {"old": _label_figures(old, q_old, old_served, k),
                            "new": _label_figures(new, q_new, new_served, k)}
    report["elapsed_seconds"] = round(time.perf_counter() - started, 3)
    return report


def _sample(common: list[str], sample: int, seed: int) -> list[str]:
    """The query items: all common items, or ``sample`` of them drawn with ``seed`` (kept in id order)."""
    if sample <= 0 or sample >= len(common):
        return list(common)
    picked = np.sort(np.random.default_rng(seed).choice(len(common), size=sample, replace=False))
    return [common[i] for i in picked]


def _lists(s: Searcher, q: np.ndarray, opts: SearchOptions) -> np.ndarray:
    """The neighbour ids of the items ``q`` in ``s``, each item left out of its own list."""
    ids, _ = s.search_arrays(normalise_rows(s.vectors_of(q)), opts, exclude=q)
    return ids


def _describe(s: Searcher) -> dict[str, Any]:
    return {"version": s.version, "dir": s.version_dir, "items": s.size, "shards": len(s.shards),
            "dimension": s.dim, "model": s.manifest.preset, "methods": list(s.available_methods)}


def _labelled(s: Searcher) -> bool:
    return any(x not in (None, "") for x in s.labels)


def _label_figures(s: Searcher, queries: np.ndarray, served: np.ndarray, k: int) -> dict[str, Any]:
    ks = tuple(x for x in PRECISION_KS if x <= k)
    full = metrics.label_metrics(s.all_vectors(), s.labels, queries, ks=ks)
    lists = metrics.list_metrics(served, queries, s.labels, ks)
    out = {"map": full["map"], **{f"p@{x}": full[f"p@{x}"] for x in ks}, "queries": full["queries"],
           "classes": full["classes"], "served_map@k": lists["map@k"]}
    out.update({f"served_p@{x}": lists[f"p@{x}"] for x in ks})
    return out


def _fmt(x: Any) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return "-" if np.isnan(x) else f"{x:.4f}"
    return str(x)


def format_markdown(report: dict[str, Any]) -> str:
    """The report as a markdown page (what ``cbir compare`` prints)."""
    old, new, k = report["old"], report["new"], report["k"]
    items = report["items"]
    search = report["search"]
    how = search["method"] + ("+rerank" if search["rerank"] else "") + (f"+qe{search['qe']}" if search["qe"] else "")
    lines = [
        f"## cbir compare: {old['version']} → {new['version']}",
        "",
        f"{report['queries']} query items{' (sampled)' if report['sampled'] else ''} held by both versions, "
        f"top-{k} as served ({how}), each item left out of its own list.",
        "",
        f"Items: {items['old']} → {items['new']} ({items['common']} in both, {items['added']} added, "
        f"{items['removed']} removed).",
    ]
    for key, title in (("added_examples", "added"), ("removed_examples", "removed")):
        if items[key]:
            more = items[key.split("_")[0]] - len(items[key])
            lines.append(f"- {title}: {', '.join(items[key])}" + (f" … and {more} more" if more > 0 else ""))
    changed = [c for c in report["changes"] if c["changed"]]
    lines += ["", "### What changed in the build", ""]
    if changed:
        lines += ["| what | old | new |", "|---|---|---|"]
        lines += [f"| {c['what']} | {_fmt(c['old'])} | {_fmt(c['new'])} |" for c in changed]
    else:
        lines.append("Nothing: same model, transform, layout and items.")
    lines += ["", "### Neighbours", "", "| figure | mean | median | p10 | min | share at 1.0 |",
              "|---|---:|---:|---:|---:|---:|"]
    for key, name in (("overlap", f"overlap@{k} (served lists)"), ("exact_overlap", f"overlap@{k} (exact lists)"),
                      ("recall_vs_old_exact", f"recall@{k} of NEW against OLD's exact neighbours")):
        d = report[key]
        lines.append(f"| {name} | {_fmt(d.get('mean'))} | {_fmt(d.get('median'))} | {_fmt(d.get('p10'))} | "
                     f"{_fmt(d.get('min'))} | {_fmt(d.get('full'))} |")
    r = report["recall_vs_old_exact"]
    lines += ["", f"Of OLD's exact neighbours, {r['reachable']:.1%} are still in NEW; NEW's own recall@{k} "
              f"(served against its exact lists) is {r['new_own_recall']:.4f}.",
              "", f"overlap@{k} histogram (items with i of {k} neighbours in common): " +
              ", ".join(f"{i}: {c}" for i, c in enumerate(report["overlap"]["histogram"]) if c)]
    if "labels" in report:
        a, b = report["labels"]["old"], report["labels"]["new"]
        keys = ["map"] + [x for x in a if x.startswith("p@")] + ["served_map@k"] + [
            x for x in a if x.startswith("served_p@")]
        names = {"map": "mAP (full exact ranking)", "served_map@k": f"mAP@{k} (served lists)"}
        lines += ["", f"### Label metrics ({a['queries']} labelled queries)", "", "| metric | old | new | change |",
                  "|---|---:|---:|---:|"]
        for key in keys:
            name = names.get(key) or (f"P@{key.split('@')[1]} (served lists)" if key.startswith("served")
                                      else f"P@{key.split('@')[1]} (full exact ranking)")
            lines.append(f"| {name} | {_fmt(a[key])} | {_fmt(b[key])} | {b[key] - a[key]:+.4f} |")
    low = [x for x in report["lowest_overlap"] if x["overlap"] < 1.0]
    if low:
        lines += ["", "### Items whose neighbours changed most", "", f"| item | overlap@{k} |", "|---|---:|"]
        lines += [f"| {x['image_id']} | {x['overlap']:.2f} |" for x in low]
    lines += ["", f"elapsed {report['elapsed_seconds']:.1f}s"]
    return "\n".join(lines)


def plot_overlap(report: dict[str, Any]) -> bytes:
    """PNG: how many items share 0 … k of their k neighbours between the versions (served and exact lists)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = report["k"]
    x = np.arange(k + 1)
    served = report["overlap"]["histogram"]
    exact = report["exact_overlap"]["histogram"]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=100)
    width = 0.4
    ax.bar(x - width / 2, served, width, label=f"served lists (mean {report['overlap']['mean']:.3f})",
           color="#0b5cad")
    ax.bar(x + width / 2, exact, width, label=f"exact lists (mean {report['exact_overlap']['mean']:.3f})",
           color="#e07b00")
    ax.set_xticks(x)
    ax.set_xlabel(f"neighbours in common out of {k}")
    ax.set_ylabel("query items")
    ax.set_title(f"top-{k} overlap: {report['old']['version']} → {report['new']['version']} "
                 f"({report['queries']} items)", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper left")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()
