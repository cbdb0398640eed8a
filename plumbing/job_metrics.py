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
