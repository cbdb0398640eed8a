"""Beam metrics of a finished job, as the launcher reports them in manifests and summaries."""

from __future__ import annotations

from typing import Any


def collect(result: Any, namespaces: tuple[str, ...], distributions: bool = True) -> dict[str, Any]:
    """Counters (summed over steps) and distributions of ``namespaces``; {} on runners that report none."""
    try:
        metrics = result.metrics().query()
    except Exception:  # some runners expose no metrics to the launcher
        return {}
    out: dict[str, Any] = {}
    for c in metrics["counters"]:
        if c.key.metric.namespace in namespaces:
            out[c.key.metric.name] = out.get(c.key.metric.name, 0) + int(c.committed or c.attempted or 0)
    if distributions:
        for d in metrics["distributions"]:
            if d.key.metric.namespace in namespaces:
                v = d.committed or d.attempted
                if v is not None and v.count:
                    out[d.key.metric.name] = {"count": v.count, "min": v.min, "max": v.max,
                                              "mean": round(v.mean, 3)}
    return dict(sorted(out.items()))


def add(total: dict[str, Any], more: dict[str, Any]) -> dict[str, Any]:
    """``more`` (one pipeline's metrics) added into ``total``: counters summed, distributions merged."""
    for name, value in more.items():
        mine = total.get(name)
        if isinstance(value, dict) and isinstance(mine, dict):
            count = mine["count"] + value["count"]
            total[name] = {"count": count, "min": min(mine["min"], value["min"]), "max": max(mine["max"], value["max"]),
                           "mean": round((mine["mean"] * mine["count"] + value["mean"] * value["count"]) / count, 3)}
        elif isinstance(value, int) and isinstance(mine, int):
            total[name] = mine + value
        else:
            total[name] = value
    return dict(sorted(total.items()))
