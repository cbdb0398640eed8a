"""The night's report: ``<root>/reports/<night>.json`` and ``.md``, written at the end and after a failure.

Figures come from what the steps published (the features, index and neighbours manifests, the
gate's ``<version>.gate.json``), not from the process that ran them, so a night resumed by a second
run reports the steps the first run did exactly as if one run had done them all. The state adds
the wall time, attempts and errors of each step.
"""

from __future__ import annotations

import logging
from typing import Any

from artefacts import layout
from artefacts.manifests import FeaturesManifest, IndexManifest, NeighborsManifest, utc_now
from pipelines.reindex.night import STEPS, Night, Paths
from plumbing import fsutil
from plumbing import publish as protocol

log = logging.getLogger(__name__)

REUSE_METRICS = ("reused_by_metadata", "reused", "to_extract")  # extract's reuse counters, when it reports them
SHOWN_REASONS = 10


def build(paths: Paths, night: Night, compared: dict[str, Any] | None, compare_note: str | None) -> dict[str, Any]:
    """The report as JSON-able data: the night, each step's record and figures, the comparison."""
    steps = {name: dict(night.steps[name]) for name in STEPS}
    failed = next((name for name in STEPS if steps[name]["status"] == "failed"), None)
    _add(steps["extract"], _extract_figures, paths)
    _add(steps["index"], _index_figures, paths)
    _add(steps["neighbors"], _neighbors_figures, paths)
    return {
        "kind": "cbir-reindex-report", "night": night.night, "root": paths.root, "status": night.status,
        "failed_step": failed, "started_utc": night.started_utc, "written_utc": utc_now(),
        "previous_version": night.previous_version, "abandoned_night": night.abandoned, "runs": night.runs,
        "steps": steps, "compare": compared, "compare_note": compare_note,
    }


def _add(record: dict[str, Any], figures: Any, paths: Paths) -> None:
    """The figures of what the step published (or, when it failed, of what it left: the refused version, the
    extract run with too many failures)."""
    target = record.get("output") or record.get("version") or record.get("run_id")
    if record["status"] not in ("done", "failed") or target is None:
        return
    try:
        record.update(figures(paths, record, target))
    except (OSError, ValueError) as exc:  # a report must not fail the night: say what could not be read
        log.warning("report: could not read the figures of %s: %s", target, exc)
        record["figures_error"] = f"{type(exc).__name__}: {exc}"


def _extract_figures(paths: Paths, record: dict[str, Any], run_id: str) -> dict[str, Any]:
    m = protocol.read_manifest(fsutil.join(paths.features, layout.MANIFEST), FeaturesManifest)
    if m.run_id != run_id:
        return {}
    reasons = dict(list(m.failures_by_reason.items())[:SHOWN_REASONS])
    return {"counts": {"inputs": m.counts.inputs, "read": m.counts.read, "ok": m.counts.ok, "failed": m.counts.failed},
            "reuse": {k: m.metrics[k] for k in REUSE_METRICS if m.metrics.get(k) is not None},
            "job_seconds": m.elapsed_seconds, "images_per_second": m.images_per_second, "failures_by_reason": reasons}


def _index_figures(paths: Paths, record: dict[str, Any], version: str) -> dict[str, Any]:
    from pipelines.index.publishing import GATE_SUFFIX

    path = fsutil.join(paths.index, version, layout.MANIFEST)
    out: dict[str, Any] = {"version": version}
    if fsutil.exists(path):
        m = protocol.read_manifest(path, IndexManifest)
        night = dict(m.extra.get("incremental") or {"decision": "full", "reason": "built without --incremental"})
        out.update(items=m.items, shards=m.shards, job_seconds=m.elapsed_seconds, decision=night.pop("decision"),
                   reason=night.pop("reason", None), incremental=night)
        if "added" in night:  # the diff's figures: a changed item is counted once removed and once added
            changed = night.get("changed", 0)
            out["changes"] = {"new": night["added"] - changed, "changed": changed,
                              "removed": night["removed"] - changed}
    gate_path = fsutil.join(paths.index, version + GATE_SUFFIX)
    if fsutil.exists(gate_path):
        g = fsutil.read_json(gate_path)
        out["gate"] = {k: g.get(k) for k in ("passed", "conditions", "measured", "sample", "queries_file", "seconds")}
    return out


def _neighbors_figures(paths: Paths, record: dict[str, Any], run_id: str) -> dict[str, Any]:
    m = protocol.read_manifest(fsutil.join(paths.neighbors, layout.MANIFEST), NeighborsManifest)
    if m.run_id != run_id:
        return {}
    night = dict(m.extra.get("incremental") or {"decision": "full"})
    return {"rows": m.counts.rows, "index_version": m.index.version, "job_seconds": m.elapsed_seconds,
            "decision": night.pop("decision"), "reason": night.pop("reason", None),
            "rows_computed": night.pop("rows_computed", m.counts.rows),  # a full table computes every row
            "rows_copied": night.pop("rows_copied", 0), "selected": night.pop("selected", None)}


def write(paths: Paths, report: dict[str, Any]) -> str:
    """Writes both files atomically; returns the Markdown one's path."""
    base = fsutil.join(paths.reports, report["night"])
    fsutil.write_json_atomic(base + ".json", report)
    fsutil.write_bytes_atomic(base + ".md", markdown(report).encode())
    return base + ".md"


# -- Markdown ---------------------------------------------------------------------------------------------------


def markdown(report: dict[str, Any]) -> str:
    """The report as a page a person reads the morning after."""
    steps = report["steps"]
    outcome = "done" if report["status"] == "done" else f"stopped at {report['failed_step'] or 'an interruption'}"
    lines = [f"# cbir reindex: night {report['night']}, {outcome}", "",
             f"Root `{report['root']}`; began {report['started_utc']}, report written {report['written_utc']}; "
             f"{len(report['runs'])} run(s) of the command this night "
             f"({_runs(report['runs'])}).", ""]
    if report.get("abandoned_night"):
        lines += [f"Night {report['abandoned_night']} failed and was too old to resume: this night replaced it.", ""]
    lines += ["| step | status | seconds | attempts | what |", "|---|---|---:|---:|---|"]
    for name in STEPS:
        s = steps[name]
        lines.append(f"| {name} | {s['status']} | {_num(s.get('seconds'))} | {s.get('attempts', 0)} | "
                     f"{_SUMMARIES[name](s)} |")
    for name in STEPS:
        if steps[name]["status"] == "failed":
            lines += ["", f"## {name} failed", "", f"`{steps[name].get('error')}`: {steps[name].get('message')}"]
    lines += _index_section(steps["index"])
    lines += _neighbors_section(steps["neighbors"])
    lines += _compare_section(report)
    return "\n".join(lines) + "\n"


def _runs(runs: list[dict[str, Any]]) -> str:
    return ", ".join(f"from {r['from']}: {r.get('status', 'running')}" for r in runs)


def _extract_summary(s: dict[str, Any]) -> str:
    c = s.get("counts")
    if not c:
        return ""
    reuse = s.get("reuse") or {}
    parts = [f"read {c['read']}, ok {c['ok']}, failed {c['failed']}"]
    if "reused_by_metadata" in reuse:
        parts.append(f"reused by metadata {reuse['reused_by_metadata']}")
    if "reused" in reuse:
        parts.append(f"reused by digest {reuse['reused']}")
    if "to_extract" in reuse:
        parts.append(f"extracted {reuse['to_extract']}")
    if not reuse:
        parts.append("nothing reused (first night, or the previous features were not reusable)")
    return "; ".join(parts)


def _index_summary(s: dict[str, Any]) -> str:
    if "decision" not in s:
        return ""
    text = f"{s['version']}: {s['items']} items, {s['decision']}"
    ch = s.get("changes")
    if ch:
        text += f" ({ch['new']} new, {ch['changed']} changed, {ch['removed']} removed)"
    gate = s.get("gate")
    if gate:
        text += f"; gate {'passed' if gate['passed'] else 'FAILED'}"
    return text


def _neighbors_summary(s: dict[str, Any]) -> str:
    if "rows" not in s:
        return ""
    return f"{s['rows']} rows of {s['index_version']}, {s['decision']}: {s['rows_computed']} computed, " \
           f"{s['rows_copied']} copied"


_SUMMARIES = {"extract": _extract_summary, "index": _index_summary, "neighbors": _neighbors_summary}


def summary(step: str, record: dict[str, Any]) -> str:
    """One line of what a step did (empty when it did not run), as the table and the command's summary show it."""
    return _SUMMARIES[step](record)


def _index_section(s: dict[str, Any]) -> list[str]:
    if "decision" not in s and "gate" not in s:
        return []
    lines = ["", "## Index: what was rebuilt and why", ""]
    if "decision" in s:
        base = s["incremental"].get("base")
        lines.append(f"{s['decision'].capitalize()}" + (f" from {base}" if base else "") +
                     (f": {s['reason']}." if s.get("reason") else "."))
        if s["incremental"].get("touched_shards") is not None:
            lines.append(f"Shards updated: {s['incremental']['touched_shards']} of {s['shards']}.")
    gate = s.get("gate")
    if gate:
        lines += ["", f"### Gate: {'passed' if gate['passed'] else 'failed'} (sample {gate.get('sample')})", "",
                  "| condition | measured | held |", "|---|---:|---|"]
        lines += [f"| {r['condition']} | {_num(r['measured'], 4)} | {'yes' if r['passed'] else 'no'} |"
                  for r in gate.get("conditions") or []]
    return lines


def _neighbors_section(s: dict[str, Any]) -> list[str]:
    if "rows" not in s:
        return []
    lines = ["", "## Neighbours", "", f"{s['decision'].capitalize()}" + (f": {s['reason']}." if s.get("reason")
                                                                         else ".")]
    if s.get("selected"):
        lines.append("Rows computed again, by why: " + ", ".join(f"{k} {v}" for k, v in s["selected"].items()) + ".")
    return lines


def _compare_section(report: dict[str, Any]) -> list[str]:
    if report.get("compare"):
        from evaluation.compare import format_markdown

        return ["", format_markdown(report["compare"])]
    return ["", "## cbir compare", "", report.get("compare_note") or "Not run."]


def _num(value: Any, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"
