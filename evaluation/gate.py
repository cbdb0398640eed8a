"""A quality gate on a built index version, before ``LATEST`` moves to it.

``cbir index --gate 'map>=0.50,recall@10>=0.95'`` evaluates the new version (committed in its
folder, not yet pointed to) and refuses to switch ``LATEST`` when a condition fails. The
figures come from a seeded sample of indexed items as leave-one-out queries:

* ``map``, ``p@1``, ``p@5``, ``p@10``: label metrics over the exact full ranking (labelled items);
* ``recall@K``: the default search method's top K against exact search (what products get);
* with ``--gate-queries FILE`` (JSON lines ``{"image_id": ..., "expected": [...]}``, e.g. known
  copies or curated answers): ``expected@K``, the mean fraction of each query's expected ids in
  its top K, and ``queries_found``, the fraction of the file's queries the version still holds.

Each metric a condition names must be computable (labels present, queries given), else the
gate fails and says why: a gate that silently passes on missing data is no gate.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any

import numpy as np

from evaluation import metrics
from search.options import SearchOptions
from search.searcher import Searcher, normalise_rows

_CONDITION = re.compile(r"^\s*([a-z_]+(?:@\d+)?)\s*(>=|<=|>|<)\s*([0-9]*\.?[0-9]+)\s*$")
_OPS = {">=": np.greater_equal, "<=": np.less_equal, ">": np.greater, "<": np.less}


@dataclasses.dataclass(frozen=True)
class Condition:
    metric: str
    op: str
    value: float

    def holds(self, measured: float | None) -> bool:
        return measured is not None and not np.isnan(measured) and bool(_OPS[self.op](measured, self.value))

    def __str__(self) -> str:
        return f"{self.metric}{self.op}{self.value:g}"


class GateFailedError(RuntimeError):
    """The built version did not pass the gate: it stays unpublished (``LATEST`` unchanged)."""

    def __init__(self, message: str, report: dict[str, Any]):
        super().__init__(message)
        self.report = report


def parse_conditions(text: str) -> list[Condition]:
    """``'map>=0.5,recall@10>=0.95'`` → conditions; a malformed one is refused with the expected form."""
    out = []
    for part in (p for p in text.split(",") if p.strip()):
        m = _CONDITION.match(part)
        if not m:
            raise ValueError(f"--gate: cannot read {part.strip()!r}; write METRIC>=VALUE (metrics: map, p@1, p@5, "
                             "p@10, recall@K, expected@K, queries_found), several joined by commas")
        out.append(Condition(m.group(1), m.group(2), float(m.group(3))))
    if not out:
        raise ValueError("--gate needs at least one condition, e.g. 'map>=0.5'")
    return out


def read_gate_queries(raw: bytes) -> list[dict[str, Any]]:
    """JSON lines of ``{"image_id": str, "expected": [str, ...]}``."""
    out = []
    for n, line in enumerate(raw.decode("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            image_id, expected = str(row["image_id"]), [str(x) for x in row["expected"]]
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"--gate-queries line {n}: expected {{\"image_id\": ..., \"expected\": [...]}} "
                             f"({exc})") from None
        out.append({"image_id": image_id, "expected": expected})
    if not out:
        raise ValueError("--gate-queries holds no queries")
    return out


def measure(searcher: Searcher, conditions: list[Condition], sample: int = 1000, seed: int = 0,
            queries: list[dict[str, Any]] | None = None) -> dict[str, float | None]:
    """Every metric the conditions name, on ``sample`` seeded leave-one-out queries (and the query file)."""
    wanted = {c.metric for c in conditions}
    out: dict[str, float | None] = {}
    n = searcher.size
    rng = np.random.default_rng(seed)
    ids = np.arange(n) if n <= sample else np.sort(rng.choice(n, size=sample, replace=False))
    vectors = None
    if wanted & {"map", "p@1", "p@5", "p@10"}:
        vectors = searcher.all_vectors()
        has_labels = any(label is not None for label in searcher.labels)
        if has_labels and n > 1:
            m = metrics.label_metrics(vectors, searcher.labels, ids)
            for key in ("map", "p@1", "p@5", "p@10"):
                out[key] = m.get(key)
        else:
            out.update({key: None for key in ("map", "p@1", "p@5", "p@10")})
    for metric in sorted(w for w in wanted if w.startswith("recall@")):
        k = int(metric.split("@")[1])
        qv = normalise_rows(searcher.vectors_of(ids))
        approx, _ = searcher.search_arrays(qv, SearchOptions(k=k), exclude=ids)
        exact, _ = searcher.search_arrays(qv, SearchOptions(k=k, method="exact"), exclude=ids)
        out[metric] = float(np.nanmean(metrics.recall_at_k(approx, exact)))
    expected_metrics = sorted(w for w in wanted if w.startswith("expected@"))
    if queries is not None and (expected_metrics or "queries_found" in wanted):
        found = [(q, searcher.find(q["image_id"])) for q in queries if _holds(searcher, q["image_id"])]
        out["queries_found"] = len(found) / len(queries)
        for metric in expected_metrics:
            k = int(metric.split("@")[1])
            if not found:
                out[metric] = None
                continue
            gids = np.asarray([g for _, g in found], np.int64)
            top, _ = searcher.search_arrays(searcher.vectors_of(gids), SearchOptions(k=k), exclude=gids)
            fractions = []
            for (q, _), row in zip(found, top, strict=True):
                got = {searcher.image_ids[i] for i in row.tolist() if i >= 0}
                fractions.append(len(got & set(q["expected"])) / max(1, len(q["expected"])))
            out[metric] = float(np.mean(fractions))
    for metric in wanted - set(out):
        out[metric] = None  # named but not computable here (e.g. expected@K without --gate-queries)
    return out


def _holds(searcher: Searcher, image_id: str) -> bool:
    try:
        searcher.find(image_id)
    except KeyError:
        return False
    return True


def check(conditions: list[Condition], measured: dict[str, float | None]) -> tuple[bool, list[dict[str, Any]]]:
    """(all hold, one row per condition with what was measured and whether it held)."""
    rows = []
    for c in conditions:
        value = measured.get(c.metric)
        rows.append({"condition": str(c), "measured": value, "passed": c.holds(value),
                     **({"why": "not computable for this index (no labels, or no --gate-queries)"}
                        if value is None else {})})
    return all(r["passed"] for r in rows), rows
